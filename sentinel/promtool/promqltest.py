"""Conformance runner for Prometheus's promqltest scripts.

    sentinel promql test FILE...      (calls `main(argv)`)

Each `eval` passes, fails (printed with file:line, expression, expected and got) or
is skipped. An eval is skipped only when it needs native histograms (`{{...}}` in
its expected output, or a selector that reads a series loaded with histogram
samples) or when promql-parser cannot parse its expression. Annotation messages
are compared without their trailing `(line:col)` position, because promql-parser's
AST carries no positions.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser as pp

from sentinel.promql import syntax
from sentinel.promql.engine import Engine, QueryResult
from sentinel.promql.gomath import almost_equal
from sentinel.promql.labels import format_series
from sentinel.promql.model import Annotations, Matrix, PromQLError, Scalar, String, Vector
from sentinel.promtool.testformat import (
    HISTOGRAM,
    OMITTED,
    STALE,
    Clear,
    Eval,
    Expectation,
    Load,
    TestFormatError,
    parse_script,
)
from sentinel.store import STALE_NAN, Labels, Store

__all__ = ["Outcome", "Report", "main", "run_files", "run_script"]

_EPSILON = 1e-6
_POSITION = re.compile(r"\s*\(\d+:\d+\)$")
# The same position suffix as written in an `expect ... regex:` pattern.
_POSITION_PATTERN = re.compile(r"\s*\\\(\S*\\\)\$?$")


@dataclass
class Outcome:
    """The result of one eval: status is "passed", "failed" or "skipped"."""

    file: str
    line: int
    expr: str
    status: str
    message: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "passed")

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "failed")

    @property
    def skipped(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "skipped")

    def summary(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


class _Mismatch(Exception):
    """An eval's result differs from the expectation."""


class _Skip(Exception):
    """An eval needs something Sentinel does not support (native histograms, new syntax)."""


def _engine(store: Store, compat: int) -> Engine:
    # Prometheus 2 semantics come from the engine's own mode (`Engine(prometheus_compat=2)`).
    return Engine(store, prometheus_compat=compat)


class _Env:
    """The store of one script plus where native histogram samples were loaded."""

    def __init__(self, compat: int = 3) -> None:
        self.compat = compat
        self.store = Store(retention_ms=1 << 62)
        self.engine = _engine(self.store, compat)
        # Histogram sample timestamps per series; None means "any time" (NHCB series).
        self.histograms: dict[Labels, list[int] | None] = {}

    def load(self, cmd: Load) -> None:
        for desc in cmd.series:
            for i, value in enumerate(desc.values):
                if value == OMITTED:
                    continue
                ts = i * cmd.interval_ms
                if value == HISTOGRAM:
                    times = self.histograms.setdefault(desc.labels, [])
                    if times is not None:
                        times.append(ts)
                    continue
                self.store.append(desc.labels, ts, STALE_NAN if value == STALE else float(value))
            if cmd.with_nhcb:
                self._note_nhcb(desc.labels)

    def _note_nhcb(self, labels: Labels) -> None:
        # `load_with_nhcb` also creates a native histogram named without `_bucket`.
        names = dict(labels)
        name = names.get("__name__", "")
        if name.endswith("_bucket"):
            names["__name__"] = name[: -len("_bucket")]
            names.pop("le", None)
            self.histograms[tuple(sorted(names.items()))] = None

    def reads_histograms(self, node: syntax.Node, start: int, end: int) -> Labels | None:
        """A series with a histogram sample inside the time window a selector reads, if any."""
        if not self.histograms:
            return None
        for sel, lo, hi in _read_windows(node, start, end, self.engine.lookback_ms):
            for labels, times in self.histograms.items():
                if times is not None and not any(lo <= t <= hi for t in times):
                    continue
                values = dict(labels)
                for group in sel.alternatives:
                    if all(m.matches(values.get(m.name, "")) for m in group):
                        return labels
        return None


def _read_windows(
    node: syntax.Node, lo: int, hi: int, lookback: int, bounds: tuple[int, int] | None = None
) -> list[tuple[syntax.Selector, int, int]]:
    """Each selector with a (conservative) time window it may read, for evals over [lo, hi]."""
    query = bounds or (lo, hi)

    def shift(at: syntax.At | None, offset: int) -> tuple[int, int]:
        if at is None:
            return lo - offset, hi - offset
        base = {"start": query[0], "end": query[1]}.get(at.kind, at.t_ms)
        return base - offset, base - offset

    if isinstance(node, syntax.Selector):
        a, b = shift(node.at, node.offset_ms)
        return [(node, a - lookback, b)]
    if isinstance(node, syntax.MatrixSel):
        a, b = shift(node.selector.at, node.selector.offset_ms)
        return [(node.selector, a - node.range_ms, b)]
    if isinstance(node, syntax.Subquery):
        a, b = shift(node.at, node.offset_ms)
        return _read_windows(node.expr, a - node.range_ms, b, lookback, query)
    out = []
    for child in syntax.children(node):
        out.extend(_read_windows(child, lo, hi, lookback, query))
    return out


def run_script(text: str, name: str = "<script>", prometheus_compat: int = 3) -> Report:
    """Run one script's commands in order (`prometheus_compat` 2: Prometheus 2's engine semantics)."""
    report = Report()
    try:
        commands = parse_script(text)
    except (TestFormatError, ValueError) as exc:
        report.outcomes.append(Outcome(name, getattr(exc, "line", 0), "", "failed", f"cannot parse script: {exc}"))
        return report
    env = _Env(prometheus_compat)
    for cmd in commands:
        if isinstance(cmd, Clear):
            env = _Env(prometheus_compat)
        elif isinstance(cmd, Load):
            env.load(cmd)
        else:
            report.outcomes.append(_run_eval(env, cmd, name))
    return report


def run_files(paths: Sequence[str | Path], prometheus_compat: int = 3) -> Report:
    """Run every script; outcomes of all files in one report. An unreadable file is one failure."""
    report = Report()
    for path in paths:
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.outcomes.append(Outcome(str(p), 0, "", "failed", f"cannot read: {exc}"))
            continue
        report.outcomes.extend(run_script(text, str(p), prometheus_compat).outcomes)
    return report


def _run_eval(env: _Env, cmd: Eval, file: str) -> Outcome:
    def outcome(status: str, message: str = "") -> Outcome:
        return Outcome(file, cmd.line, cmd.expr, status, message)

    try:
        _check_eval(env, cmd)
    except _Skip as exc:
        return outcome("skipped", str(exc))
    except _Mismatch as exc:
        return outcome("failed", str(exc))
    except Exception as exc:  # a crash is a failure of this eval, not of the run
        return outcome("failed", f"unexpected {type(exc).__name__}: {exc}")
    return outcome("passed")


def _check_eval(env: _Env, cmd: Eval) -> None:
    fails = cmd.expects("fail")
    if cmd.has_histogram:
        raise _Skip("needs native histograms (histogram in expected result)")
    try:
        pp.parse(cmd.expr)
    except ValueError as exc:
        if fails:
            _check_error(fails, f"parse error: {exc}")
            return
        raise _Skip(f"promql-parser cannot parse it: {exc}") from None
    try:
        node = syntax.parse(cmd.expr)
    except PromQLError as exc:
        if fails:
            _check_error(fails, str(exc))
            return
        raise _Mismatch(f"expected success, got error: {exc}") from None
    hist = env.reads_histograms(node, cmd.start_ms, cmd.end_ms)
    if hist is not None:
        raise _Skip(f"needs native histograms (reads {format_series(hist)})")
    try:
        if cmd.instant:
            result = env.engine.instant_query(node, cmd.start_ms)
        else:
            result = env.engine.range_query(node, cmd.start_ms, cmd.end_ms, cmd.step_ms)
    except PromQLError as exc:
        if fails:
            _check_error(fails, str(exc))
            return
        raise _Mismatch(f"expected success, got error: {exc}") from None
    if fails:
        raise _Mismatch(f"expected error, got result {_show_value(result)}")
    _check_annotations(cmd, result.annotations)
    _check_value(cmd, result)


def _check_error(fails: list[Expectation], message: str) -> None:
    for exp in fails:
        if exp.match == "msg" and exp.text != message:
            raise _Mismatch(f"expected error {exp.text!r}, got {message!r}")
        if exp.match == "regex" and not re.search(exp.text, message):
            raise _Mismatch(f"expected error matching {exp.text!r}, got {message!r}")


def _check_annotations(cmd: Eval, annotations: Annotations) -> None:
    for kind, got in (("warn", annotations.warnings), ("info", annotations.infos)):
        if cmd.expects(f"no_{kind}") and got:
            raise _Mismatch(f"expected no {kind} annotation, got {got}")
        wanted = cmd.expects(kind)
        if not wanted:
            continue
        if not got:
            raise _Mismatch(f"expected a {kind} annotation, got none")
        plain = [_POSITION.sub("", g) for g in got]
        for exp in wanted:
            if exp.match == "msg" and _POSITION.sub("", exp.text) not in plain:
                raise _Mismatch(f"expected {kind} {exp.text!r}, got {got}")
            if exp.match == "regex" and not any(re.search(_POSITION_PATTERN.sub("", exp.text), g) for g in plain):
                raise _Mismatch(f"expected {kind} matching {exp.text!r}, got {got}")


def _check_value(cmd: Eval, result: QueryResult) -> None:
    value = result.value
    if cmd.string is not None:
        if not isinstance(value, String) or value.value != cmd.string:
            raise _Mismatch(f"expected string {cmd.string!r}, got {_show_value(result)}")
        return
    if isinstance(value, Scalar):
        if cmd.scalar is None or not almost_equal(cmd.scalar, value.value, _EPSILON):
            raise _Mismatch(f"expected {_show_expected(cmd)}, got scalar {value.value!r}")
        return
    if cmd.scalar is not None:
        raise _Mismatch(f"expected scalar {cmd.scalar!r}, got {_show_value(result)}")
    if isinstance(value, Vector):
        if not cmd.instant:
            raise _Mismatch("range query returned an instant vector")
        _check_vector(cmd, value)
        return
    if isinstance(value, Matrix):
        if cmd.instant:
            if cmd.range_vector is None:
                raise _Mismatch(f"instant query returned a range vector {_show_value(result)}")
            start, _, step = cmd.range_vector
        else:
            start, step = cmd.start_ms, cmd.step_ms
        _check_matrix(cmd, value, start, step)
        return
    raise _Mismatch(f"unexpected result {_show_value(result)}")


def _check_vector(cmd: Eval, vec: Vector) -> None:
    expected: dict[Labels, float] = {}
    for exp in cmd.series:
        if len(exp.values) != 1 or not isinstance(exp.values[0], float):
            raise _Mismatch(f"expected series {format_series(exp.labels)} needs exactly one value")
        expected[exp.labels] = exp.values[0]
    got = {s.labels: s.value for s in vec}
    if len(got) != len(vec):
        raise _Mismatch("result has duplicate label sets")
    missing = [labels for labels in expected if labels not in got]
    extra = [labels for labels in got if labels not in expected]
    wrong = [labels for labels, v in expected.items() if labels in got and not almost_equal(v, got[labels], _EPSILON)]
    if missing or extra or wrong:
        raise _Mismatch(f"expected {_show_expected(cmd)}\n    got {_show_vector(vec)}")
    if cmd.expects("ordered"):
        order = [s.labels for s in vec]
        if order != [exp.labels for exp in cmd.series]:
            raise _Mismatch(f"expected order {_show_expected(cmd)}\n    got {_show_vector(vec)}")


def _check_matrix(cmd: Eval, matrix: Matrix, start: int, step: int) -> None:
    expected: dict[Labels, list[tuple[int, float]]] = {}
    for exp in cmd.series:
        points = []
        for i, v in enumerate(exp.values):
            if isinstance(v, float):
                points.append((start + i * step, v))
        expected[exp.labels] = points
    got = {s.labels: s.points() for s in matrix}
    ok = set(got) == set(expected) and all(
        len(got[k]) == len(pts)
        and all(gt == et and almost_equal(ev, gv, _EPSILON) for (gt, gv), (et, ev) in zip(got[k], pts, strict=True))
        for k, pts in expected.items()
    )
    if not ok:
        shown = "; ".join(f"{format_series(k)} {v}" for k, v in expected.items()) or "(empty)"
        got_shown = "; ".join(f"{format_series(k)} {v}" for k, v in got.items()) or "(empty)"
        raise _Mismatch(f"expected {shown}\n    got {got_shown}")


def _show_expected(cmd: Eval) -> str:
    if cmd.scalar is not None:
        return f"scalar {cmd.scalar!r}"
    if not cmd.series:
        return "(empty)"
    return "; ".join(f"{format_series(e.labels)} {' '.join(str(v) for v in e.values)}" for e in cmd.series)


def _show_vector(vec: Vector) -> str:
    return "; ".join(f"{format_series(s.labels)} {s.value!r}" for s in vec) or "(empty)"


def _show_value(result: QueryResult) -> str:
    value = result.value
    if isinstance(value, Vector):
        return _show_vector(value)
    if isinstance(value, Matrix):
        return "; ".join(f"{format_series(s.labels)} {s.points()}" for s in value) or "(empty)"
    return repr(value)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run test scripts, print failures and skips, exit 1 if any eval failed."""
    parser = argparse.ArgumentParser(prog="sentinel promql test", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="promqltest scripts (*.test)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not list skipped evals")
    parser.add_argument("--prometheus-compat", type=int, choices=[2, 3], default=3, help="Prometheus 2 or 3 semantics")
    args = parser.parse_args(argv)
    report = run_files(args.files, args.prometheus_compat)
    for o in report.outcomes:
        if o.status == "failed":
            print(f"FAIL {o.file}:{o.line}: {o.expr}\n    {o.message}")
        elif o.status == "skipped" and not args.quiet:
            print(f"SKIP {o.file}:{o.line}: {o.expr}\n    {o.message}")
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
