"""`sentinel test rules FILE...`: rule unit tests in the `promtool test rules` format.

The same test files run under Prometheus's `promtool test rules` and here, with the
same verdicts and the same report (`Unit Testing:  FILE`, then `  SUCCESS` or
`  FAILED:` and one block per failure). Semantics follow promtool (cmd/promtool/
unittest.go) as shipped in Prometheus 2.42, checked against the real binary:

- each test group gets a fresh store; input samples sit at t = i * `interval` and
  are appended lazily, up to each evaluation time, as promtool's lazy loader does;
- every rule group is evaluated at 0, `evaluation_interval`, ... up to the largest
  `eval_time` of the test group, in `group_eval_order` (unlisted groups rank with
  the first listed one, as promtool's sort does); a rule evaluation error ends the
  test group;
- an `alert_rule_test` at `eval_time` compares the FIRING alerts (pending ones are
  not listed) of the evaluation at the last step at or before it; labels and
  annotations are compared as sets, after template expansion;
- a `promql_expr_test` runs after the last step, over the samples loaded by then,
  and compares values exactly (so an expected NaN never matches, as in 2.42).

`prometheus_compat` picks whose promtool to follow. 3 (the default) is Prometheus 3's:
a test group without `interval` uses `evaluation_interval`, and windows are open on
the left. 2 is promtool 2.42's, byte for byte: a test group without `interval` loads
every sample at t=0 (the first sample of a series wins, as in its storage), the rule
files are read with 2.42's rulefmt (no group `labels` or `query_offset`), and the
engine runs in its Prometheus 2 mode (range and lookback windows closed on the left).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import yaml

from sentinel.gotemplate.values import go_quote
from sentinel.promql import Engine
from sentinel.promtool.seriesdesc import series_error
from sentinel.promtool.testformat import HISTOGRAM, OMITTED, STALE, TestFormatError, parse_series_line
from sentinel.rules.group import GroupEvaluator, QueryError, QueryFn
from sentinel.rules.query import engine_query
from sentinel.rules.rulefile import (
    DEFAULT_PROMETHEUS_COMPAT,
    RuleFileError,
    RuleGroup,
    load_rule_files,
    parse_prom_duration,
)
from sentinel.rules.state import AlertState
from sentinel.store import DEFAULT_LOOKBACK_MS, STALE_NAN, Labels, Store

__all__ = [
    "DEFAULT_EVALUATION_INTERVAL_MS",
    "AlertTestCase",
    "ExpectedAlert",
    "ExpectedSample",
    "InputSeries",
    "PromqlTestCase",
    "TestFileError",
    "TestGroup",
    "UnitTestFile",
    "format_float_e",
    "format_go_duration",
    "format_model_duration",
    "main",
    "make_engine",
    "parse_test_file",
    "run_file",
    "run_files",
]

DEFAULT_EVALUATION_INTERVAL_MS = 60_000


# -- the test file -------------------------------------------------------------------


class TestFileError(ValueError):
    """The test file itself is malformed (YAML, unknown fields, bad durations)."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class InputSeries:
    series: str
    values: str


@dataclass(frozen=True)
class ExpectedAlert:
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class AlertTestCase:
    eval_time_ms: int
    alertname: str
    exp_alerts: list[ExpectedAlert]


@dataclass(frozen=True)
class ExpectedSample:
    labels: str  # series notation, parsed when the test runs (promtool reports it there)
    value: float


@dataclass(frozen=True)
class PromqlTestCase:
    expr: str
    eval_time_ms: int
    exp_samples: list[ExpectedSample]


@dataclass(frozen=True)
class TestGroup:
    """One entry of `tests`: input series and the checks run over them."""

    __test__ = False  # not a pytest test class

    interval_ms: int
    input_series: list[InputSeries] = field(default_factory=list)
    alert_rule_tests: list[AlertTestCase] = field(default_factory=list)
    promql_expr_tests: list[PromqlTestCase] = field(default_factory=list)
    external_labels: dict[str, str] = field(default_factory=dict)
    external_url: str = ""
    name: str = ""

    def max_eval_time_ms(self) -> int:
        times = [t.eval_time_ms for t in self.alert_rule_tests] + [t.eval_time_ms for t in self.promql_expr_tests]
        return max(times, default=0)


@dataclass(frozen=True)
class UnitTestFile:
    rule_files: list[str]
    evaluation_interval_ms: int
    group_eval_order: list[str]
    tests: list[TestGroup]


# -- running -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the test files named in argv; 0 when every test passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="sentinel test rules",
        description="Unit tests for Prometheus rules, in the `promtool test rules` file format.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="test files")
    parser.add_argument("--prometheus-compat", type=int, choices=[2, 3], default=DEFAULT_PROMETHEUS_COMPAT)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return 0 if run_files(args.files, sys.stdout, sys.stderr, prometheus_compat=args.prometheus_compat) else 1


def run_files(
    paths: Iterable[str], stdout: TextIO, stderr: TextIO, *, prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT
) -> bool:
    """Run and report every file, as promtool does; True when all passed.

    A missing file or a directory ends the run before anything is tested, as promtool's
    argument checks do.
    """
    paths = list(paths)
    for path in paths:
        if not os.path.exists(path):
            stderr.write(f"sentinel: error: path '{path}' does not exist, try --help\n")
            return False
        if os.path.isdir(path):
            stderr.write(f"sentinel: error: '{path}' is a directory, try --help\n")
            return False
    ok = True
    for path in paths:
        ok = run_file(path, stdout, stderr, prometheus_compat=prometheus_compat) and ok
    return ok


def run_file(path: str, stdout: TextIO, stderr: TextIO, *, prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT) -> bool:
    """Run one test file and print promtool's report for it; True when it passed."""
    out = _Report(stdout, stderr)
    if prometheus_compat == 2:
        # promtool 3 prints no such header (it has JUnit XML output instead).
        out.line(f"Unit Testing:  {path}")
    errors = _test_file(path, out, prometheus_compat)
    if errors:
        out.error("  FAILED:")
        for message in errors:
            out.error(message)
            out.line("")  # promtool prints a blank line on stdout after each failure
    else:
        out.line("  SUCCESS")
    out.line("")
    return not errors


class _Report:
    """promtool's two streams: results on stdout, failures and warnings on stderr.

    Each write flushes the stream that was written last, so a terminal showing both
    gets the lines in promtool's order.
    """

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._last: TextIO | None = None

    def line(self, text: str) -> None:
        self._write(self._stdout, text)

    def error(self, text: str) -> None:
        self._write(self._stderr, text)

    def _write(self, stream: TextIO, text: str) -> None:
        if self._last is not None and self._last is not stream:
            self._last.flush()
        stream.write(text + "\n")
        self._last = stream


def _test_file(path: str, out: _Report, compat: int) -> list[str]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        return [f"open {path}: {reason}"]
    except UnicodeDecodeError as exc:
        return [f"{path}: {exc}"]
    try:
        spec = parse_test_file(text, prometheus_compat=compat)
    except TestFileError as exc:
        return [str(exc)]
    rule_files = _resolve_rule_files(os.path.dirname(path), spec.rule_files, out)
    order: dict[str, int] = {}
    for index, name in enumerate(spec.group_eval_order):
        if name in order:
            return [f"group name repeated in evaluation order: {name}"]
        order[name] = index
    errors: list[str] = []
    for group in spec.tests:
        errors.extend(_run_test_group(group, spec.evaluation_interval_ms, order, rule_files, compat))
    return errors


def _resolve_rule_files(base_dir: str, patterns: Sequence[str], out: _Report) -> list[str]:
    """Rule files relative to the test file, globs expanded (sorted, like Go's Glob)."""
    files: list[str] = []
    for pattern in patterns:
        if pattern and not os.path.isabs(pattern):
            pattern = os.path.normpath(os.path.join(base_dir, pattern))
        matches = sorted(glob.glob(pattern)) if pattern else []
        if not matches:
            out.error(f"  WARNING: no file match pattern {pattern}")
        files.extend(matches)
    return files


def _ordered(groups: Sequence[RuleGroup], order: Mapping[str, int]) -> list[RuleGroup]:
    # promtool sorts by the listed position and gives unlisted groups 0, so they tie
    # with the first listed group; its tie order is Go map order (random), ours is
    # file order.
    return sorted(groups, key=lambda g: order.get(g.name, 0))


_InputSample = tuple[int, Labels, float]  # (timestamp ms, labels, value)


def _input_samples(group: TestGroup) -> list[_InputSample]:
    """All input samples in time order; raises ValueError for a malformed series.

    With interval 0 (Prometheus 2, no `interval`) every sample of a series falls on
    t=0 and only the first is kept, as 2.42's storage drops the later ones.
    """
    points: list[_InputSample] = []
    # Only samples up to the last evaluation are ever loaded (lazily, as promtool), so
    # longer series are expanded no further (`0x10000000` once took 3 GB and 2 minutes).
    # (With interval 0 every sample is at t=0, and a native histogram anywhere is an
    # error: those are expanded whole.)
    needed = group.max_eval_time_ms() // group.interval_ms + 1 if group.interval_ms > 0 else None
    for index, item in enumerate(group.input_series):
        if "{{" not in item.values:  # native histograms: promtool 3's syntax, not checked here
            error = series_error(item.series, item.values, index + 1)
            if error is not None:
                raise ValueError(error)
        try:
            labels, values = parse_series_line(
                f"{item.series} {item.values}", index + 2, None if "{{" in item.values else needed
            )
        except TestFormatError as exc:
            raise ValueError(f"input series {go_quote(item.series)}: {_without_line(exc)}") from None
        for i, value in enumerate(values):
            if value == OMITTED:
                continue
            if value == HISTOGRAM:
                raise ValueError(f"input series {go_quote(item.series)}: native histograms are not supported")
            points.append((i * group.interval_ms, labels, STALE_NAN if value == STALE else float(value)))
            if group.interval_ms == 0:
                break
    points.sort(key=lambda p: p[0])  # stable: series order within one timestamp
    return points


def _without_line(exc: TestFormatError) -> str:
    return str(exc).removeprefix(f"line {exc.line}: ")


def _run_test_group(
    group: TestGroup, eval_interval_ms: int, order: Mapping[str, int], rule_files: Sequence[str], compat: int
) -> list[str]:
    """Run one test group; returns its failures in promtool's words."""
    try:
        samples = _input_samples(group)
    except ValueError as exc:
        return [str(exc)]
    try:
        rule_groups = _ordered(load_rule_files(rule_files, compat), order)
    except RuleFileError as exc:
        return [str(p) for p in exc.problems]
    for case in group.alert_rule_tests:
        if not case.alertname:
            where = f" (in TestGroup {group.name})" if group.name else ""
            return [
                "an item under alert_rule_test misses required attribute alertname at eval_time "
                f"{format_model_duration(case.eval_time_ms)}{where}"
            ]

    store = Store(lookback_ms=DEFAULT_LOOKBACK_MS)
    # promtool's test suite steps subqueries by the evaluation interval.
    query = engine_query(make_engine(store, eval_interval_ms, compat))
    evaluators = [
        GroupEvaluator(
            g,
            store,
            query,
            # 2.42 gives the rule groups the test group's interval, 0 when unset.
            interval_ms=group.interval_ms or eval_interval_ms,
            external_labels=group.external_labels,
            external_url=group.external_url,
        )
        for g in rule_groups
    ]
    alert_times = sorted({case.eval_time_ms for case in group.alert_rule_tests})
    errors: list[str] = []
    loaded = 0
    checked = 0
    for ts in range(0, group.max_eval_time_ms() + 1, eval_interval_ms):
        # Lazy loading, as promtool: only samples up to this step exist when it runs.
        while loaded < len(samples) and samples[loaded][0] <= ts:
            t, labels, value = samples[loaded]
            store.append(labels, t, value)
            loaded += 1
        eval_errors: list[str] = []
        for evaluator in evaluators:
            evaluator.evaluate(ts)
            for rule, health in zip(evaluator.group.rules, evaluator.health, strict=True):
                if health.health == "err":
                    eval_errors.append(
                        f"    rule: {rule.name}, time: {format_go_duration(ts)}, err: {health.last_error}"
                    )
        errors.extend(eval_errors)
        if eval_errors:
            return errors
        # An eval_time between two steps sees the state of the earlier one.
        while checked < len(alert_times) and ts <= alert_times[checked] < ts + eval_interval_ms:
            errors.extend(_check_alerts(group, alert_times[checked], evaluators))
            checked += 1
    for expr_test in group.promql_expr_tests:
        errors.extend(_check_promql(expr_test, query))
    return errors


def make_engine(store: Store, subquery_step_ms: int, compat: int) -> Engine:
    """The engine of a test group: promtool steps subqueries by the evaluation interval."""
    return Engine(store, lookback_ms=DEFAULT_LOOKBACK_MS, subquery_step_ms=subquery_step_ms, prometheus_compat=compat)


# -- checks ----------------------------------------------------------------------------

_AlertKey = tuple[Labels, Labels]


def _check_alerts(group: TestGroup, t_ms: int, evaluators: Sequence[GroupEvaluator]) -> list[str]:
    cases = [case for case in group.alert_rule_tests if case.eval_time_ms == t_ms]
    names = {case.alertname for case in cases}
    # One alert name may belong to rules in several groups: promtool pools them.
    got: dict[str, list[_AlertKey]] = {}
    for evaluator in evaluators:
        for rule, health in zip(evaluator.group.rules, evaluator.health, strict=True):
            if not rule.is_alert or rule.name not in names:
                continue
            firing = [
                (_labels(a.labels), _labels(a.annotations))
                for a in health.active.values()
                if a.state is AlertState.FIRING
            ]
            got.setdefault(rule.name, []).extend(firing)
    errors: list[str] = []
    for case in cases:
        got_alerts = sorted(got.get(case.alertname, []))
        exp_alerts = sorted(
            (_labels({**a.labels, "alertname": case.alertname}), _labels(a.annotations)) for a in case.exp_alerts
        )
        if exp_alerts != got_alerts:
            name = f"    name: {group.name},\n" if group.name else ""
            indent = " " * 12
            errors.append(
                f"{name}    alertname: {case.alertname}, time: {format_model_duration(case.eval_time_ms)}, \n"
                f"        exp:{_indent(_alerts_text(exp_alerts), indent)}, \n"
                f"        got:{_indent(_alerts_text(got_alerts), indent)}"
            )
    return errors


def _check_promql(case: PromqlTestCase, query: QueryFn) -> list[str]:
    head = f"    expr: {go_quote(case.expr)}, time: {format_model_duration(case.eval_time_ms)}"
    try:
        result = query(case.expr, case.eval_time_ms)
    except QueryError as exc:
        return [f"{head}, err: {exc}"]
    got = sorted(((_labels(labels), value) for labels, value in result), key=lambda s: s[0])
    exp: list[tuple[Labels, float]] = []
    for sample in case.exp_samples:
        try:
            labels = _parse_metric(sample.labels)
        except ValueError as exc:
            return [f"{head}, err: labels {go_quote(sample.labels)}: {exc}"]
        exp.append((labels, sample.value))
    # Go's sort.Slice (insertion sort at these sizes, `<=` as less) puts samples with
    # equal labels in reverse order; sorting the reversed list stably does the same.
    exp = sorted(reversed(exp), key=lambda s: s[0])
    # Exact float equality, NaN never equal: promtool 2.42 compares with reflect.DeepEqual.
    same = len(exp) == len(got) and all(e[0] == g[0] and e[1] == g[1] for e, g in zip(exp, got, strict=True))
    if same:
        return []
    return [f"{head},\n        exp: {_samples_text(exp)}\n        got: {_samples_text(got)}"]


def _parse_metric(text: str) -> Labels:
    """Go's parser.ParseMetric: `name{label="value"}`, `{...}`, or nothing at all."""
    if not text.strip():
        return ()
    try:
        labels, values = parse_series_line(text.strip(), 1)
    except TestFormatError as exc:
        raise ValueError(_without_line(exc)) from None
    if values:
        raise ValueError(f"unexpected text after the metric in {text!r}")
    return labels


def _labels(mapping: Mapping[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


# -- promtool's text forms ----------------------------------------------------------------


def _labels_text(labels: Labels) -> str:
    """Go's labels.Labels.String(): `{a="1", b="2"}`."""
    return "{" + ", ".join(f"{name}={go_quote(value)}" for name, value in labels) + "}"


def _alerts_text(alerts: Sequence[_AlertKey]) -> str:
    if not alerts:
        return "[]"
    items = [
        f"{i}:" + _indent(f"\nLabels:{_labels_text(labels)}\nAnnotations:{_labels_text(annotations)}", "  ")
        for i, (labels, annotations) in enumerate(alerts)
    ]
    return "[\n" + ",\n".join(items) + "\n]"


def _samples_text(samples: Sequence[tuple[Labels, float]]) -> str:
    if not samples:
        return "nil"
    return ", ".join(f"{_labels_text(labels)} {format_float_e(value)}" for labels, value in samples)


def _indent(text: str, indent: str) -> str:
    """promtool's indentLines: every line but the first gets the indent."""
    return ("\n" + indent).join(text.split("\n"))


def format_float_e(value: float) -> str:
    """Go's strconv.FormatFloat(v, 'E', -1, 64): `1.5E+03`, `0E+00`, `+Inf`, `NaN`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)  # finite
    text = "".join(str(d) for d in digits)
    power = exponent + len(text) - 1
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}E{'-' if power < 0 else '+'}{abs(power):02d}"


_MODEL_UNITS = (
    ("y", 31_536_000_000, True),
    ("w", 604_800_000, True),
    ("d", 86_400_000, False),
    ("h", 3_600_000, False),
    ("m", 60_000, False),
    ("s", 1000, False),
    ("ms", 1, False),
)


def format_model_duration(ms: int) -> str:
    """prometheus/common model.Duration.String(): `10m`, `1h30m`, `90d`, `0s`."""
    if ms == 0:
        return "0s"
    out = ""
    for unit, size, exact in _MODEL_UNITS:
        # Years and weeks only when they divide exactly (`90d`, not `12w6d`).
        if exact and ms % size:
            continue
        count, ms = divmod(ms, size)
        if count:
            out += f"{count}{unit}"
    return out


def format_go_duration(ms: int) -> str:
    """Go's time.Duration.String() for whole milliseconds: `0s`, `500ms`, `1m30s`, `1h0m0s`."""
    if ms == 0:
        return "0s"
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    if ms < 1000:
        return f"{sign}{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


# -- strict YAML decoding --------------------------------------------------------------------


def parse_test_file(text: str, prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT) -> UnitTestFile:
    """Decode a test file the way promtool's yaml.UnmarshalStrict does.

    Unknown fields and type mismatches are reported together, in document order, as
    go-yaml words them ("line N: field x not found in type main.testGroup"); a bad
    duration is reported alone, as model.Duration's unmarshaler aborts decoding.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise TestFileError(f"yaml: {where}{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise TestFileError(f"yaml: {exc}") from None
    decoder = _Decoder(prometheus_compat)
    spec = decoder.unit_test_file(root)
    # go-yaml decodes in document order; ours goes field by field, so sort by position.
    if decoder.fatal:
        raise TestFileError(min(decoder.fatal)[2])
    if decoder.errors:
        messages = (message for _, _, message in sorted(decoder.errors))
        raise TestFileError("yaml: unmarshal errors:\n  " + "\n  ".join(messages))
    return spec


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
# go-yaml v2 accepts a plain scalar as a float only in this shape (after dropping `_`).
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_YAML_SPECIAL_FLOATS = {
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
}


def _is_null(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG)


class _Decoder:
    """Builds the typed test file from composed YAML nodes, collecting go-yaml's errors."""

    def __init__(self, compat: int = DEFAULT_PROMETHEUS_COMPAT) -> None:
        self.compat = compat
        # (line, column, message): go-yaml's collected type errors, and the errors that
        # end its decoding (of which it reports the first).
        self.errors: list[tuple[int, int, str]] = []
        self.fatal: list[tuple[int, int, str]] = []

    def add(self, node: yaml.Node, message: str, *, fatal: bool = False) -> None:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if fatal:
            self.fatal.append((line, column, message))
        else:
            self.errors.append((line, column, f"line {line}: {message}"))

    # -- go-yaml's shapes ------------------------------------------------------------

    def type_error(self, node: yaml.Node, target: str) -> None:
        tag = "!!" + node.tag.rsplit(":", 1)[-1] if node.tag.startswith("tag:yaml.org,2002:") else node.tag
        value = ""
        if isinstance(node, yaml.ScalarNode):
            shown = node.value if len(node.value) <= 10 else node.value[:7] + "..."
            value = f" `{shown}`"
        self.add(node, f"cannot unmarshal {tag}{value} into {target}")

    def fields(self, node: yaml.Node | None, type_name: str, names: Iterable[str]) -> dict[str, yaml.Node]:
        """A struct's fields by name; unknown and repeated keys are errors (strict mode)."""
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.type_error(node, type_name)
            return {}
        known = set(names)
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if key not in known:
                self.add(key_node, f"field {key} not found in type {type_name}")
            elif key in out:
                self.add(key_node, f"field {key} already set in type {type_name}")
            else:
                out[key] = value_node
        return out

    def seq(self, node: yaml.Node | None, target: str) -> list[yaml.Node]:
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.type_error(node, target)
            return []
        return list(node.value)

    def string(self, node: yaml.Node | None) -> str:
        # go-yaml gives a string field the scalar's text whatever its implicit type.
        if node is None or _is_null(node):
            return ""
        if not isinstance(node, yaml.ScalarNode):
            self.type_error(node, "string")
            return ""
        return str(node.value)

    def string_map(self, node: yaml.Node | None, target: str = "map[string]string") -> dict[str, str]:
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.type_error(node, target)
            return {}
        out: dict[str, str] = {}
        for key_node, value_node in node.value:
            out[self.string(key_node)] = self.string(value_node)
        return out

    def float64(self, node: yaml.Node | None) -> float:
        if node is None or _is_null(node):
            return 0.0
        if not isinstance(node, yaml.ScalarNode):
            self.type_error(node, "float64")
            return 0.0
        value = _yaml_float(node)
        if value is None:
            self.type_error(node, "float64")
            return 0.0
        return value

    def duration(self, node: yaml.Node | None) -> int:
        """model.Duration: text through model.ParseDuration; an error ends decoding."""
        if node is None or _is_null(node):
            return 0
        text = self.string(node)
        if not isinstance(node, yaml.ScalarNode):
            return 0
        if text == "":
            self.add(node, "empty duration string", fatal=True)
            return 0
        try:
            return parse_prom_duration(text)
        except ValueError:
            self.add(node, f"not a valid duration string: {go_quote(text)}", fatal=True)
            return 0

    # -- promtool's types ----------------------------------------------------------------

    def unit_test_file(self, node: yaml.Node | None) -> UnitTestFile:
        f = self.fields(node, "main.unitTestFile", ("rule_files", "evaluation_interval", "group_eval_order", "tests"))
        interval = self.duration(f.get("evaluation_interval")) or DEFAULT_EVALUATION_INTERVAL_MS
        return UnitTestFile(
            rule_files=[self.string(n) for n in self.seq(f.get("rule_files"), "[]string")],
            evaluation_interval_ms=interval,
            group_eval_order=[self.string(n) for n in self.seq(f.get("group_eval_order"), "[]string")],
            tests=[self.test_group(n, interval) for n in self.seq(f.get("tests"), "[]main.testGroup")],
        )

    def test_group(self, node: yaml.Node, evaluation_interval_ms: int) -> TestGroup:
        f = self.fields(
            node,
            "main.testGroup",
            (
                "interval",
                "input_series",
                "alert_rule_test",
                "promql_expr_test",
                "external_labels",
                "external_url",
                "name",
            ),
        )
        return TestGroup(
            # Prometheus 3 defaults to evaluation_interval; 2.42 leaves 0 (all samples at t=0).
            interval_ms=self.duration(f.get("interval")) or (evaluation_interval_ms if self.compat >= 3 else 0),
            input_series=[self.input_series(n) for n in self.seq(f.get("input_series"), "[]main.series")],
            alert_rule_tests=[
                self.alert_test_case(n) for n in self.seq(f.get("alert_rule_test"), "[]main.alertTestCase")
            ],
            promql_expr_tests=[
                self.promql_test_case(n) for n in self.seq(f.get("promql_expr_test"), "[]main.promqlTestCase")
            ],
            external_labels=self.string_map(f.get("external_labels")),
            external_url=self.string(f.get("external_url")),
            name=self.string(f.get("name")),
        )

    def input_series(self, node: yaml.Node) -> InputSeries:
        f = self.fields(node, "main.series", ("series", "values"))
        return InputSeries(self.string(f.get("series")), self.string(f.get("values")))

    def alert_test_case(self, node: yaml.Node) -> AlertTestCase:
        f = self.fields(node, "main.alertTestCase", ("eval_time", "alertname", "exp_alerts"))
        return AlertTestCase(
            eval_time_ms=self.duration(f.get("eval_time")),
            alertname=self.string(f.get("alertname")),
            exp_alerts=[self.expected_alert(n) for n in self.seq(f.get("exp_alerts"), "[]main.alert")],
        )

    def expected_alert(self, node: yaml.Node) -> ExpectedAlert:
        f = self.fields(node, "main.alert", ("exp_labels", "exp_annotations"))
        return ExpectedAlert(self.string_map(f.get("exp_labels")), self.string_map(f.get("exp_annotations")))

    def promql_test_case(self, node: yaml.Node) -> PromqlTestCase:
        f = self.fields(node, "main.promqlTestCase", ("expr", "eval_time", "exp_samples"))
        return PromqlTestCase(
            expr=self.string(f.get("expr")),
            eval_time_ms=self.duration(f.get("eval_time")),
            exp_samples=[self.expected_sample(n) for n in self.seq(f.get("exp_samples"), "[]main.sample")],
        )

    def expected_sample(self, node: yaml.Node) -> ExpectedSample:
        f = self.fields(node, "main.sample", ("labels", "value"))
        return ExpectedSample(self.string(f.get("labels")), self.float64(f.get("value")))


def _yaml_float(node: yaml.ScalarNode) -> float | None:
    """A scalar as go-yaml v2 decodes it into float64, or None where it refuses."""
    text = str(node.value)
    if node.style:  # quoted or block: a string, which go-yaml will not put in a float
        return None
    if text in _YAML_SPECIAL_FLOATS:
        return _YAML_SPECIAL_FLOATS[text]
    plain = text.replace("_", "")
    integer = _go_int(plain)
    if integer is not None:
        return float(integer)
    if _YAML_FLOAT.match(plain):
        return float(plain)
    return None


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64): decimal, 0x/0o/0b prefixes, leading-zero octal."""
    match = re.fullmatch(r"([-+]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[0-7]*|0[bB][01]+|[1-9][0-9]*)", text)
    if match is None:
        return None
    sign, body = match.groups()
    if body[:2].lower() in ("0x", "0b", "0o"):
        value = int(body, 0)
    elif body.startswith("0") and len(body) > 1:
        value = int(body[1:], 8)
    else:
        value = int(body)
    value = -value if sign == "-" else value
    return value if -(2**63) <= value < 2**63 else None


if __name__ == "__main__":
    raise SystemExit(main())
