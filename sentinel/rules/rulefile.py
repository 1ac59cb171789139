"""Prometheus rule files: loading and validation the way promtool does it.

The same file must pass `promtool check rules` and run in a fleet Prometheus, so the
accepted shape is exactly Prometheus's `rulefmt`: unknown fields are errors, a rule is
either `alert` or `record`, `expr` must parse, names and labels must be valid. Each
problem names the file, the line, the group and the rule.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import yaml

from sentinel.config.yamlpos import Position, YamlError, load_with_positions
from sentinel.gotemplate import TemplateError
from sentinel.gotemplate import parse as parse_template
from sentinel.promql import PromQLError, guard
from sentinel.runtime.durations import parse_prom_duration

__all__ = [
    "Rule",
    "RuleFileError",
    "RuleGroup",
    "RuleProblem",
    "load_rule_files",
    "parse_prom_duration",
    "parse_rule_file",
]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

GROUP_KEYS = {"name", "interval", "query_offset", "limit", "labels", "rules"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


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
    file: str
    line: int | None
    group: str | None
    rule: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        scope = ""
        if self.group is not None:
            scope += f" group {self.group!r}"
        if self.rule is not None:
            scope += f", {self.rule}"
        return f"{where}:{scope}: {self.message}" if scope else f"{where}: {self.message}"


class RuleFileError(Exception):
    """Every problem found in one or more rule files."""

    def __init__(self, problems: Sequence[RuleProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Checker:
    def __init__(self, file: str, positions: dict[Any, Position], data: object, raw: object) -> None:
        self.file = file
        self.positions = positions
        self.problems: list[RuleProblem] = []
        self._data = data
        self._raw = raw

    def text(self, path: tuple[str | int, ...], value: object) -> str:
        """A scalar as Go's YAML decoder hands it to a string field: its source text.

        PyYAML resolves YAML 1.1 types (`yes` is true, `1.50` is 1.5); Prometheus keeps
        the text, so `page: yes` must stay "yes" for Alertmanager routes to match.
        """
        if value is None:
            return ""
        raw = self._raw_at(path)
        if isinstance(raw, str):
            return raw
        return value if isinstance(value, str) else _scalar_text(value)

    def key_text(self, path: tuple[str | int, ...], key: object) -> str:
        """A mapping key's source text (see `text`)."""
        raw = self._raw_key(path, key)
        return raw if isinstance(raw, str) else _scalar_text(key)

    def _raw_at(self, path: tuple[str | int, ...]) -> object:
        typed, raw = self._data, self._raw
        for key in path:
            if isinstance(typed, dict) and isinstance(raw, dict):
                raw_key = self._raw_key_in(typed, raw, key)
                if raw_key is None:
                    return None
                typed, raw = typed[key], raw[raw_key]
            elif isinstance(typed, list) and isinstance(raw, list) and isinstance(key, int) and key < len(raw):
                typed, raw = typed[key], raw[key]
            else:
                return None
        return raw

    def _raw_key(self, path: tuple[str | int, ...], key: object) -> object:
        typed, raw = self._data, self._raw_at(path)
        try:
            for step in path:
                typed = typed[step]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
        if isinstance(typed, dict) and isinstance(raw, dict):
            return self._raw_key_in(typed, raw, key)
        return None

    @staticmethod
    def _raw_key_in(typed: dict[Any, Any], raw: dict[Any, Any], key: object) -> object:
        # Both loaders keep the file's key order, so the n-th keys are the same node.
        if key not in typed or len(typed) != len(raw):
            return None
        return list(raw)[list(typed).index(key)]

    def line(self, *path: str | int) -> int | None:
        p: tuple[str | int, ...] = tuple(path)
        while True:
            hit = self.positions.get(p)
            if hit is not None:
                return hit.line
            if not p:
                return None
            p = p[:-1]

    def add(self, path: tuple[str | int, ...], message: str, group: str | None = None, rule: str | None = None) -> None:
        self.problems.append(RuleProblem(self.file, self.line(*path), group, rule, message))


def parse_rule_file(text: str, file: str) -> list[RuleGroup]:
    """Validate one rule file; raises RuleFileError listing every problem."""
    try:
        data, positions = load_with_positions(text, file)
    except YamlError as exc:
        raise RuleFileError([RuleProblem(file, exc.line, None, None, exc.problem)]) from None
    if data is None:
        return []
    try:
        raw = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        raw = None
    check = _Checker(file, positions, data, raw)
    if not isinstance(data, dict):
        raise RuleFileError([RuleProblem(file, 1, None, None, "the top level must be a mapping with 'groups'")])
    for key in data:
        if key != "groups":
            check.add((key,), f"field {key} not found in type rulefmt.RuleGroups")
    groups_data = data.get("groups") or []
    if not isinstance(groups_data, list):
        check.add(("groups",), "'groups' must be a list")
        groups_data = []
    groups: list[RuleGroup] = []
    seen: set[str] = set()
    for gi, g in enumerate(groups_data):
        group = _parse_group(check, gi, g, seen)
        if group is not None:
            groups.append(group)
    if check.problems:
        raise RuleFileError(check.problems)
    return groups


def _parse_group(check: _Checker, gi: int, g: object, seen: set[str]) -> RuleGroup | None:
    path: tuple[str | int, ...] = ("groups", gi)
    if not isinstance(g, dict):
        check.add(path, "a group must be a mapping")
        return None
    name = g.get("name")
    gname = check.text((*path, "name"), name) if not isinstance(name, (dict, list)) else None
    for key in g:
        if key not in GROUP_KEYS:
            check.add((*path, key), f"field {key} not found in type rulefmt.RuleGroup", gname)
    if not gname:
        check.add((*path, "name"), "groupname must not be empty")
    elif gname in seen:
        check.add((*path, "name"), f'groupname: "{gname}" is repeated in the same file', gname)
    else:
        seen.add(gname)
    interval_ms = _duration_field(check, g, (*path, "interval"), gname, None)
    query_offset_ms = _duration_field(check, g, (*path, "query_offset"), gname, 0) or 0
    limit = g.get("limit", 0)
    if limit is None:
        limit = 0
    if not isinstance(limit, int) or isinstance(limit, bool):
        check.add((*path, "limit"), "limit must be an integer", gname)
        limit = 0
    # A negative limit is accepted and means no limit, as in Prometheus.
    labels = _label_map(check, g.get("labels"), (*path, "labels"), gname, None, "label")
    rules_data = g.get("rules") or []
    if not isinstance(rules_data, list):
        check.add((*path, "rules"), "'rules' must be a list", gname)
        rules_data = []
    rules = []
    for ri, r in enumerate(rules_data):
        rule = _parse_rule(check, (*path, "rules", ri), ri, r, gname or "")
        if rule is not None:
            rules.append(rule)
    return RuleGroup(gname or "", check.file, interval_ms, query_offset_ms, limit, labels, tuple(rules))


def _duration_field(
    check: _Checker,
    data: dict[str, Any],
    path: tuple[str | int, ...],
    group: str | None,
    default: int | None,
    rule: str | None = None,
) -> int | None:
    key = path[-1]
    if key not in data or data[key] is None:
        return default
    value = data[key]
    try:
        return parse_prom_duration(value if isinstance(value, (dict, list)) else check.text(path, value))
    except ValueError as exc:
        check.add(path, str(exc), group, rule)
        return default


def _label_map(
    check: _Checker, raw: object, path: tuple[str | int, ...], group: str | None, rule: str | None, what: str
) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        check.add(path, f"{what}s must be a mapping", group, rule)
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        key = check.key_text(path, k)
        if not _LABEL_NAME.match(key) or (what == "label" and key == "__name__"):
            check.add((*path, k), f"invalid {what} name: {key}", group, rule)
        if isinstance(v, (dict, list)):
            check.add((*path, k), f"invalid {what} value for {key}: must be a string", group, rule)
            continue
        # A null value is the empty string, as Go's YAML decoder gives it.
        out[key] = check.text((*path, k), v)
    return out


def _scalar_text(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _parse_rule(check: _Checker, path: tuple[str | int, ...], index: int, r: object, group: str) -> Rule | None:
    if not isinstance(r, dict):
        check.add(path, "a rule must be a mapping", group)
        return None
    # Names are strings in Go's rulefmt: `alert: 123` is the alert "123".
    alert = "" if isinstance(r.get("alert"), (dict, list)) else check.text((*path, "alert"), r.get("alert"))
    record = "" if isinstance(r.get("record"), (dict, list)) else check.text((*path, "record"), r.get("record"))
    kind = "alert" if alert else "record"
    name = alert or record
    rule_desc = f"rule {index + 1} ({kind} {name!r})" if name else f"rule {index + 1}"
    ok = True

    def problem(key: str | None, message: str) -> None:
        nonlocal ok
        ok = False
        check.add(path if key is None else (*path, key), message, group, rule_desc)

    for key in r:
        if key not in RULE_KEYS:
            problem(key, f"field {key} not found in type rulefmt.RuleNode")
    if alert and record:
        problem(None, "only one of 'record' and 'alert' must be set")
    elif not alert and not record:
        problem(None, "one of 'record' or 'alert' must be set")
    expr = r.get("expr")
    if expr is None or (isinstance(expr, str) and not expr.strip()):
        problem("expr", "field 'expr' must be set in rule")
        expr_text = ""
    else:
        expr_text = check.text((*path, "expr"), expr)
        try:
            # Bounded first: promql-parser can overflow its stack (SIGSEGV) on deep input.
            guard.check_text(expr_text)
            promql_parser.parse(expr_text)
        except PromQLError as exc:
            problem("expr", f"could not parse expression: {exc}")
        except ValueError as exc:
            problem("expr", f"could not parse expression: {_locate(expr_text, str(exc))}")
    before = len(check.problems)
    for_ms = _duration_field(check, r, (*path, "for"), group, 0, rule_desc) or 0
    keep_ms = _duration_field(check, r, (*path, "keep_firing_for"), group, 0, rule_desc) or 0
    labels = _label_map(check, r.get("labels"), (*path, "labels"), group, rule_desc, "label")
    annotations = _label_map(check, r.get("annotations"), (*path, "annotations"), group, rule_desc, "annotation")
    if len(check.problems) != before:
        ok = False
    if record:
        # Zero values are allowed (`for: 0s`), as rulefmt compares with the zero duration.
        if annotations:
            problem("annotations", "invalid field 'annotations' in recording rule")
        if for_ms:
            problem("for", "invalid field 'for' in recording rule")
        if keep_ms:
            problem("keep_firing_for", "invalid field 'keep_firing_for' in recording rule")
        if not _METRIC_NAME.match(record):
            problem("record", f"invalid recording rule name: {record}")
    # Alert names are not checked: any string is a valid `alertname` label value.
    if alert and not record:
        # Only alerting rules expand templates; a recording rule's labels are literal.
        for where, mapping in (("labels", labels), ("annotations", annotations)):
            for k, v in mapping.items():
                try:
                    parse_template(v)
                except TemplateError as exc:
                    ok = False
                    check.add((*path, where, k), f"template: {where}.{k}: {exc}", group, rule_desc)
    if not ok:
        return None
    line = check.line(*path) or 0
    return Rule(kind, name, expr_text, check.file, group, index, line, for_ms, keep_ms, labels, annotations)


def _locate(expr: str, message: str) -> str:
    """Add a 1-based column to the parser's message where it can be found."""
    column = None
    if "unclosed left parenthesis" in message:
        depth_stack = []
        for i, ch in enumerate(expr):
            if ch == "(":
                depth_stack.append(i)
            elif ch == ")" and depth_stack:
                depth_stack.pop()
        if depth_stack:
            column = depth_stack[-1] + 1
    elif "unexpected right parenthesis" in message or "unclosed right" in message:
        depth = 0
        for i, ch in enumerate(expr):
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                column = i + 1
                break
    if column is None:
        return f"{message} (in {expr!r})"
    return f"1:{column}: {message} (in {expr!r})"


MAX_RULE_FILE_BYTES = 4 * 1024 * 1024
"""Largest rule file read (Sentinel's default rules are 20 KB together)."""


def load_rule_files(patterns: Iterable[str]) -> list[RuleGroup]:
    """Expand globs and load every rule file; raises RuleFileError with all problems."""
    problems: list[RuleProblem] = []
    groups: list[RuleGroup] = []
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for path in paths:
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_RULE_FILE_BYTES + 1)  # bounded: a path may be a device or a FIFO
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(RuleProblem(path, None, None, None, f"cannot read: {exc}"))
                continue
            if len(raw) > MAX_RULE_FILE_BYTES:
                problems.append(RuleProblem(path, None, None, None, f"larger than {MAX_RULE_FILE_BYTES} bytes"))
                continue
            try:
                groups.extend(parse_rule_file(text, path))
            except RuleFileError as exc:
                problems.extend(exc.problems)
    if problems:
        raise RuleFileError(problems)
    return groups
