"""Prometheus rule files: loading and validation the way promtool does it.

The same file must pass `promtool check rules` and run in a fleet Prometheus, so the
accepted shape is exactly Prometheus's `rulefmt`: unknown fields are errors, a rule is
either `alert` or `record`, `expr` must parse, names and labels must be valid. Each
problem names the file and, where Prometheus knows it, the line and column, the group
and the rule, in promtool's own words (`RuleProblem.text`):

    r.yml: 5:11: group "g", rule 1, "x": could not parse expression: 1:7: parse error: ...

As in Prometheus, decoding comes first (`goyaml`: unknown fields and type errors are one
`yaml: unmarshal errors:` message, a bad duration ends decoding) and the rules are
validated only when it succeeded. `prometheus_compat` picks the rulefmt of Prometheus 2
(2.42: no group `labels` or `query_offset`, classic metric and label names) or of
Prometheus 3 (the default). `duplicate_rules` is promtool's `--lint=duplicate-rules`.
"""

from __future__ import annotations

import glob
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from sentinel.config.yamlpos import YamlError, load_document
from sentinel.gotemplate import parse as parse_template
from sentinel.gotemplate.parse import TemplateError
from sentinel.gotemplate.values import go_quote
from sentinel.rules.goyaml import GoDecoder, go_node_value, go_syntax_error
from sentinel.rules.promql_errors import parse_error
from sentinel.runtime import durations
from sentinel.runtime.durations import DurationError

__all__ = [
    "DEFAULT_PROMETHEUS_COMPAT",
    "MAX_RULE_FILE_BYTES",
    "DuplicateRule",
    "Rule",
    "RuleFileError",
    "RuleGroup",
    "RuleProblem",
    "duplicate_rules",
    "load_rule_files",
    "parse_prom_duration",
    "parse_rule_file",
]

DEFAULT_PROMETHEUS_COMPAT = 3
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_RULE_FILE_BYTES = 4 * 1024 * 1024
"""Largest rule file read (Sentinel's default rules are 20 KB together)."""

GROUP_KEYS = {"name", "interval", "query_offset", "limit", "labels", "rules"}
# Prometheus 2.42's rulefmt.RuleGroup has neither group labels nor query_offset.
GROUP_KEYS_V2 = {"name", "interval", "limit", "rules"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def parse_prom_duration(text: object) -> int:
    """Milliseconds from a Prometheus duration, refused in promtool 2.42's words (Go quoting)."""
    try:
        return durations.parse_prom_duration(text)
    except DurationError as exc:
        raise ValueError(exc.describe(go_quote, detailed=exc.kind == "out_of_range")) from None


@dataclass(frozen=True)
class Rule:
    """One alerting or recording rule as written in its file."""

    kind: str  # "alert" | "record"
    name: str
    expr: str
    file: str
    group: str
    index: int
    line: int
    for_ms: int = 0
    keep_firing_for_ms: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_alert(self) -> bool:
        return self.kind == "alert"

    def location(self) -> str:
        return f"{self.file}:{self.line}: group {self.group!r}, rule {self.index + 1} ({self.kind} {self.name!r})"


@dataclass(frozen=True)
class RuleGroup:
    name: str
    file: str
    interval_ms: int | None  # None: the engine's default interval
    query_offset_ms: int
    limit: int
    labels: dict[str, str]
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class RuleProblem:
    """One problem; `text` is promtool's line for it (several lines for a YAML error list)."""

    file: str
    line: int | None
    group: str | None
    rule: str | None
    message: str
    text: str = ""
    # promtool prints a YAML syntax error twice (it decodes the file twice).
    times: int = 1

    def __str__(self) -> str:
        if self.text:
            return self.text
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class RuleFileError(Exception):
    """Every problem found in one or more rule files."""

    def __init__(self, problems: Sequence[RuleProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


_Mark = tuple[int, int]  # (line, column), 1-based; (0, 0) for a field not in the file


def _mark(node: yaml.Node | None) -> _Mark:
    if node is None:
        return (0, 0)
    return (node.start_mark.line + 1, node.start_mark.column + 1)


@dataclass
class _RuleNode:
    """A rule as decoded, with the nodes rulefmt's errors point at."""

    record: yaml.Node | None
    alert: yaml.Node | None
    expr: yaml.Node | None
    for_ms: int
    keep_firing_for_ms: int
    labels: dict[str, str]
    annotations: dict[str, str]
    node: yaml.Node


@dataclass
class _GroupNode:
    name: str
    interval_ms: int | None
    query_offset_ms: int
    limit: int
    labels: dict[str, str]
    rules: list[_RuleNode]
    node: yaml.Node


class _Validator:
    def __init__(self, file: str, compat: int) -> None:
        self.file = file
        self.compat = compat
        self.problems: list[RuleProblem] = []

    def plain(self, message: str, line: int | None = None, group: str | None = None) -> None:
        self.problems.append(RuleProblem(self.file, line, group, None, message, f"{self.file}: {message}"))

    def at(self, mark: _Mark, message: str, group: str | None = None) -> None:
        text = f"{self.file}: {mark[0]}:{mark[1]}: {message}"
        self.problems.append(RuleProblem(self.file, mark[0] or None, group, None, message, text))

    def rule(
        self,
        group: str,
        index: int,
        kind: str,
        name: str,
        message: str,
        node: _Mark | None,
        alt: _Mark | None,
        line: int,
    ) -> None:
        where = ""
        if node is not None:
            where = f"{node[0]}:{node[1]}: "
            if alt is not None:
                where += f"{alt[0]}:{alt[1]}: "
        text = f"{self.file}: {where}group {go_quote(group)}, rule {index + 1}, {go_quote(name)}: {message}"
        desc = f"rule {index + 1} ({kind} {name!r})" if name else f"rule {index + 1}"
        self.problems.append(
            RuleProblem(self.file, (node[0] if node and node[0] else line), group, desc, message, text)
        )

    def valid_metric_name(self, name: str) -> bool:
        return bool(_METRIC_NAME.match(name)) if self.compat < 3 else bool(name)

    def valid_label_name(self, name: str) -> bool:
        return bool(_LABEL_NAME.match(name)) if self.compat < 3 else bool(name)


def parse_rule_file(text: str, file: str, prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT) -> list[RuleGroup]:
    """Validate one rule file; raises RuleFileError listing every problem, as promtool does."""
    try:
        doc = load_document(text, file, text_only=True)
    except YamlError as exc:
        # Prometheus decodes twice (into the groups and into their nodes): both fail alike.
        if exc.cause is not None:
            message = go_syntax_error(exc.cause, exc.problem)
        else:
            message = f"yaml: line {exc.line}: {exc.problem}" if exc.line is not None else f"yaml: {exc.problem}"
        raise RuleFileError([RuleProblem(file, exc.line, None, None, exc.problem, f"{file}: {message}", 2)]) from None
    root = doc.nodes.get(())
    if root is None:
        return []
    decoder = GoDecoder()
    groups = _decode(decoder, root, prometheus_compat)
    messages = decoder.messages() + _second_pass(root)
    if messages:
        line = decoder.type_errors[0][0] if decoder.type_errors else None
        raise RuleFileError([RuleProblem(file, line, None, None, m, f"{file}: {m}") for m in messages])
    check = _Validator(file, prometheus_compat)
    result = _validate(check, groups)
    if check.problems:
        raise RuleFileError(check.problems)
    return result


def _decode(decoder: GoDecoder, root: yaml.Node, compat: int) -> list[_GroupNode]:
    """Decode in document order, field by field, as yaml.v3 does (its errors come in that order)."""
    top = decoder.fields(root, "rulefmt.RuleGroups", ("groups",))
    decoder.finish(top)  # `groups` is the only field: nothing is decoded before a merge
    group_keys = GROUP_KEYS_V2 if compat < 3 else GROUP_KEYS
    out: list[_GroupNode] = []
    for gnode in decoder.seq(top.get("groups"), "[]rulefmt.RuleGroup"):
        group = _GroupNode("", None, 0, 0, {}, [], gnode)
        fields = decoder.fields(gnode, "rulefmt.RuleGroup", group_keys)
        for key, node in fields.items():
            if key == "name":
                group.name = decoder.string(node)
            elif key in ("interval", "query_offset"):
                ms = decoder.duration(node, parse_prom_duration)
                if key == "interval":
                    group.interval_ms = ms
                else:
                    group.query_offset_ms = ms or 0
            elif key == "limit":
                group.limit = decoder.integer(node)
            elif key == "labels":
                group.labels = decoder.string_map(node)
            else:
                group.rules = [_decode_rule(decoder, r) for r in decoder.seq(node, "[]rulefmt.RuleNode")]
        decoder.finish(fields)
        out.append(group)
    return out


def _decode_rule(decoder: GoDecoder, rnode: yaml.Node) -> _RuleNode:
    rule = _RuleNode(None, None, None, 0, 0, {}, {}, rnode)
    fields = decoder.fields(rnode, "rulefmt.RuleNode", RULE_KEYS)
    for key, node in fields.items():
        if key in ("record", "alert", "expr"):
            setattr(rule, key, node)  # yaml.Node fields: any node, no decoding
        elif key == "for":
            rule.for_ms = decoder.duration(node, parse_prom_duration) or 0
        elif key == "keep_firing_for":
            rule.keep_firing_for_ms = decoder.duration(node, parse_prom_duration) or 0
        elif key == "labels":
            rule.labels = decoder.string_map(node)
        else:
            rule.annotations = decoder.string_map(node)
    decoder.finish(fields)
    return rule


def _second_pass(root: yaml.Node) -> list[str]:
    """Prometheus's second decode, into `struct{Groups []yaml.Node}`: its own type errors."""
    decoder = GoDecoder()
    top = decoder.fields(root, "rulefmt.ruleGroups", ("groups", *_unknown_keys(root)))
    decoder.seq(top.get("groups"), "[]yaml.Node")
    return decoder.messages()


def _unknown_keys(root: yaml.Node) -> list[str]:
    # The second decode is not strict: unknown fields are no error there.
    if not isinstance(root, yaml.MappingNode):
        return []
    return [go_node_value(k) for k, _ in root.value if go_node_value(k) != "groups"]


def _validate(check: _Validator, groups: list[_GroupNode]) -> list[RuleGroup]:
    seen: set[str] = set()
    out: list[RuleGroup] = []
    for g in groups:
        gmark = _mark(g.node)
        if g.name == "":
            check.at(gmark, "Groupname must not be empty")
        if g.name in seen:
            check.at(gmark, f'groupname: "{g.name}" is repeated in the same file', g.name)
        seen.add(g.name)
        if check.compat >= 3:
            for k in g.labels:
                if not check.valid_label_name(k) or k == "__name__":
                    check.plain(f"invalid label name: {k}", gmark[0], g.name)
        rules = []
        for index, r in enumerate(g.rules):
            rule = _validate_rule(check, g.name, index, r)
            if rule is not None:
                rules.append(rule)
        out.append(RuleGroup(g.name, check.file, g.interval_ms, g.query_offset_ms, g.limit, g.labels, tuple(rules)))
    return out


def _validate_rule(check: _Validator, group: str, index: int, r: _RuleNode) -> Rule | None:
    record, alert, expr = go_node_value(r.record), go_node_value(r.alert), go_node_value(r.expr)
    name = alert or record
    line = _mark(r.node)[0]
    before = len(check.problems)

    def problem(message: str, node: yaml.Node | bool | None = False, alt: yaml.Node | bool | None = False) -> None:
        # node False: no position (Prometheus has none for label errors); None: 0:0.
        at = None if node is False else _mark(node if isinstance(node, yaml.Node) else None)
        at_alt = None if alt is False else _mark(alt if isinstance(alt, yaml.Node) else None)
        check.rule(group, index, "alert" if alert else "record", name, message, at, at_alt, line)

    if record and alert:
        problem("only one of 'record' and 'alert' must be set", r.record, r.alert)
    if not record and not alert:
        if check.compat >= 3:
            problem("one of 'record' or 'alert' must be set", r.record, r.alert)
        else:
            problem("one of 'record' or 'alert' must be set", r.record)
    if expr == "":
        problem("field 'expr' must be set in rule", r.expr)
    else:
        error = parse_error(expr, check.compat)
        if error is not None:
            problem(f"could not parse expression: {error}", r.expr)
    if record:
        if r.annotations:
            problem("invalid field 'annotations' in recording rule", r.record)
        if r.for_ms:
            problem("invalid field 'for' in recording rule", r.record)
        if r.keep_firing_for_ms:
            problem("invalid field 'keep_firing_for' in recording rule", r.record)
        if not check.valid_metric_name(record):
            problem(f"invalid recording rule name: {record}", r.record)
        if check.compat >= 3 and ("{" in record or "}" in record):
            problem(f"braces present in the recording rule name; should it be in expr?: {record}", r.record)
    for k in r.labels:
        if not check.valid_label_name(k) or k == "__name__":
            problem(f"invalid label name: {k}")
    for k in r.annotations:
        if not check.valid_label_name(k):
            problem(f"invalid annotation name: {k}")
    if alert:
        # Only alerting rules expand templates; a recording rule's labels are literal.
        for what, mapping in (("label", r.labels), ("annotation", r.annotations)):
            for k, v in mapping.items():
                try:
                    parse_template(v)
                except TemplateError as exc:
                    problem(f"{what} {go_quote(k)}: template: __alert_{alert}:{exc.line}: {exc.detail}")
    if len(check.problems) != before:
        return None
    kind = "alert" if alert else "record"
    return Rule(
        kind, name, expr, check.file, group, index, line, r.for_ms, r.keep_firing_for_ms, r.labels, r.annotations
    )


# -- promtool's duplicate-rule lint --------------------------------------------------------------


@dataclass(frozen=True)
class DuplicateRule:
    """A rule name with a label set that more than one rule of a file records or alerts on."""

    metric: str
    labels: tuple[tuple[str, str], ...]


def duplicate_rules(groups: Iterable[RuleGroup]) -> list[DuplicateRule]:
    """promtool's checkDuplicates: (name, labels) pairs that occur more than once, sorted."""
    keys = sorted((rule.name, tuple(sorted(rule.labels.items()))) for group in groups for rule in group.rules)
    out: list[DuplicateRule] = []
    for previous, current in itertools.pairwise(keys):
        if previous == current and (not out or (out[-1].metric, out[-1].labels) != current):
            out.append(DuplicateRule(current[0], current[1]))
    return out


def duplicate_rules_message(duplicates: Sequence[DuplicateRule]) -> str:
    """promtool's lint error text for the duplicates of one file."""
    text = f"lint error {len(duplicates)} duplicate rule(s) found.\n"
    for dup in duplicates:
        text += f"Metric: {dup.metric}\nLabel(s):\n"
        text += "".join(f"\t{name}: {value}\n" for name, value in dup.labels)
    return text + "Might cause inconsistency while recording expressions"


def load_rule_files(patterns: Iterable[str], prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT) -> list[RuleGroup]:
    """Expand globs and load every rule file; raises RuleFileError with all problems."""
    problems: list[RuleProblem] = []
    groups: list[RuleGroup] = []
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for path in paths:
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_RULE_FILE_BYTES + 1)  # bounded: a path may be a device or a FIFO
                if len(raw) > MAX_RULE_FILE_BYTES:
                    problems.append(RuleProblem(path, None, None, None, f"larger than {MAX_RULE_FILE_BYTES} bytes"))
                    continue
                text = raw.decode("utf-8")
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                problems.append(
                    RuleProblem(path, None, None, None, f"cannot read: {exc}", f"{path}: open {path}: {reason}")
                )
                continue
            except UnicodeDecodeError as exc:
                problems.append(RuleProblem(path, None, None, None, f"cannot read: {exc}", f"{path}: {exc}"))
                continue
            try:
                groups.extend(parse_rule_file(text, path, prometheus_compat))
            except RuleFileError as exc:
                problems.extend(exc.problems)
    if problems:
        raise RuleFileError(problems)
    return groups
