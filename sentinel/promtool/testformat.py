"""Parser for Prometheus's promqltest scripts (`load`, `clear`, `eval ...`, `expect ...`).

The format is documented in the test data's README.upstream.md. Series values use the
expanding notation of `promtool test rules`: `1+2x3` is 1 3 5 7, `5x2` is 5 5 5,
`_` is a missing sample, `_x3` three of them, `stale` a staleness marker; `{{...}}`
is a native histogram, which Sentinel cannot store and only records as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from sentinel.promql import syntax
from sentinel.promql.model import PromQLError
from sentinel.runtime.durations import parse_test_duration_ms as parse_duration_ms
from sentinel.store import Labels, MatchOp

__all__ = [
    "HISTOGRAM",
    "OMITTED",
    "STALE",
    "Clear",
    "Command",
    "Eval",
    "Expectation",
    "ExpectedSeries",
    "Load",
    "TestFormatError",
    "parse_duration_ms",
    "parse_script",
    "parse_series_line",
]


class TestFormatError(ValueError):
    """A malformed test script line."""

    __test__ = False  # not a pytest test class

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


# Sentinel values in a series' value list (floats otherwise).
OMITTED: Final = "_"
STALE: Final = "stale"
HISTOGRAM: Final = "histogram"
Point = float | Literal["_", "stale", "histogram"]


@dataclass
class SeriesDesc:
    labels: Labels
    values: list[Point]
    line: int


@dataclass
class Load:
    interval_ms: int
    series: list[SeriesDesc]
    with_nhcb: bool
    line: int


@dataclass
class Clear:
    line: int


@dataclass
class Expectation:
    """One `expect` line: kind is fail/warn/info/no_warn/no_info/ordered."""

    kind: str
    match: str | None = None  # "msg" | "regex"
    text: str = ""


@dataclass
class ExpectedSeries:
    labels: Labels
    values: list[Point]


@dataclass
class Eval:
    line: int
    expr: str
    instant: bool
    start_ms: int
    end_ms: int
    step_ms: int
    expectations: list[Expectation] = field(default_factory=list)
    series: list[ExpectedSeries] = field(default_factory=list)
    scalar: float | None = None
    string: str | None = None
    range_vector: tuple[int, int, int] | None = None  # from, to, step for `expect range vector`
    has_histogram: bool = False

    def expects(self, kind: str) -> list[Expectation]:
        return [e for e in self.expectations if e.kind == kind]


Command = Load | Clear | Eval

_EVAL_INSTANT = re.compile(r"^eval(?:_(fail|warn|ordered|info))?\s+instant\s+(?:at\s+(.+?))?\s+(.+)$")
_EVAL_RANGE = re.compile(r"^eval(?:_(fail|warn|info))?\s+range\s+from\s+(.+)\s+to\s+(.+)\s+step\s+(.+?)\s+(.+)$")
_LOAD = re.compile(r"^load(_with_nhcb)?\s+(\S+)$")
_EXPECT = re.compile(r"^expect\s+(fail|warn|info|no_warn|no_info|ordered)(?:\s+(msg|regex)\s*:\s?(.*))?$")
_RANGE_VECTOR = re.compile(r"^expect\s+range\s+vector\s+from\s+(\S+)\s+to\s+(\S+)\s+step\s+(\S+)$")
_STRING = re.compile(r"^expect\s+string\s+(.*)$")


def _strip(line: str) -> str:
    line = line.strip()
    return "" if line.startswith("#") else line


def parse_script(text: str) -> list[Command]:
    """Parse a whole test script into commands (1-based line numbers)."""
    lines = [_strip(line) for line in text.splitlines()]
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
            continue
        word = line.split(None, 1)[0].lower()
        if word == "clear":
            commands.append(Clear(i + 1))
            i += 1
        elif word.startswith("load"):
            i = _parse_load(lines, i, commands)
        elif word.startswith("eval"):
            i = _parse_eval(lines, i, commands)
        else:
            raise TestFormatError(i + 1, f"invalid command {line!r}")
    return commands


def _parse_load(lines: list[str], i: int, out: list[Command]) -> int:
    m = _LOAD.match(lines[i])
    if m is None:
        raise TestFormatError(i + 1, f"invalid load command {lines[i]!r}")
    load = Load(parse_duration_ms(m.group(2)), [], m.group(1) is not None, i + 1)
    i += 1
    while i < len(lines) and lines[i]:
        labels, values = parse_series_line(lines[i], i + 1)
        load.series.append(SeriesDesc(labels, values, i + 1))
        i += 1
    out.append(load)
    return i


def _parse_eval(lines: list[str], i: int, out: list[Command]) -> int:
    header = lines[i]
    line_no = i + 1
    if m := _EVAL_INSTANT.match(header):
        variant, at, expr = m.groups()
        t = parse_duration_ms(at) if at else 0
        ev = Eval(line_no, expr, True, t, t, 0)
    elif m := _EVAL_RANGE.match(header):
        variant, start, end, step, expr = m.groups()
        ev = Eval(line_no, expr, False, parse_duration_ms(start), parse_duration_ms(end), parse_duration_ms(step))
    else:
        raise TestFormatError(line_no, f"invalid eval command {header!r}")
    if variant:
        ev.expectations.append(Expectation(variant))
    i += 1
    while i < len(lines) and lines[i]:
        line = lines[i]
        i += 1
        if line.startswith("expected_fail_message"):
            ev.expectations.append(Expectation("fail", "msg", line.split(None, 1)[1] if " " in line else ""))
            continue
        if line.startswith("expected_fail_regexp"):
            ev.expectations.append(Expectation("fail", "regex", line.split(None, 1)[1] if " " in line else ""))
            continue
        if line.startswith("expect"):
            _parse_expect(ev, line, i)
            continue
        number = _parse_float(line)
        if number is not None:
            ev.scalar = number
            break
        labels, values = parse_series_line(line, i)
        if HISTOGRAM in values:
            ev.has_histogram = True
        ev.series.append(ExpectedSeries(labels, values))
    out.append(ev)
    return i


def _parse_expect(ev: Eval, line: str, line_no: int) -> None:
    if m := _RANGE_VECTOR.match(line):
        ev.range_vector = (parse_duration_ms(m.group(1)), parse_duration_ms(m.group(2)), parse_duration_ms(m.group(3)))
        return
    if m := _STRING.match(line):
        ev.string = _unquote(m.group(1).strip())
        return
    m = _EXPECT.match(line)
    if m is None:
        raise TestFormatError(line_no, f"invalid expect line {line!r}")
    kind, match, text = m.groups()
    text = (text or "").strip()
    if match == "msg" and len(text) >= 2 and text[0] == text[-1] == '"':
        # `expect fail msg: "..."` quotes are optional in the upstream files.
        text = text[1:-1]
    ev.expectations.append(Expectation(kind, match, text))


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"`'":
        inner = text[1:-1]
        if text[0] == '"':
            return bytes(inner, "utf-8").decode("unicode_escape") if "\\" in inner else inner
        return inner
    return text


# Go's ParseFloat syntax; hex needs a `p` exponent there, so `0x59` is "0 repeated 59 times".
_NUMBER = re.compile(r"^[+-]?(?:inf|infinity|nan|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)$", re.IGNORECASE)


def _parse_float(token: str) -> float | None:
    """A number as Go's ParseFloat accepts it (Inf, NaN), else None."""
    if not _NUMBER.match(token):
        return None
    return float(token)


def parse_series_line(line: str, line_no: int, limit: int | None = None) -> tuple[Labels, list[Point]]:
    """`metric{a="b"} 1 2+3x4 _ stale` into labels and expanded values.

    `limit` keeps only the first `limit` values (every token is still checked): a test
    that evaluates up to 50m needs 51 values of `0x10000000`, not 268 million of them.
    """
    metric, rest = _split_metric(line, line_no)
    labels = _labels_of(metric, line_no)
    return labels, _expand_values(rest, line_no, limit)


def _split_metric(line: str, line_no: int) -> tuple[str, str]:
    brace = line.find("{")
    space = re.search(r"\s", line)
    if brace == -1 or (space is not None and space.start() < brace):
        if space is None:
            return line, ""
        return line[: space.start()], line[space.end() :]
    quote: str | None = None
    j = brace
    while j < len(line):
        ch = line[j]
        if quote:
            if ch == "\\":
                j += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch == "}":
            return line[: j + 1], line[j + 1 :]
        j += 1
    raise TestFormatError(line_no, f"unterminated label set in {line!r}")


def _labels_of(metric: str, line_no: int) -> Labels:
    if metric.strip() == "{}":
        return ()
    try:
        node = syntax.parse(metric)
    except PromQLError as exc:
        raise TestFormatError(line_no, f"invalid series {metric!r}: {exc}") from exc
    if not isinstance(node, syntax.Selector):
        raise TestFormatError(line_no, f"invalid series {metric!r}")
    pairs: dict[str, str] = {}
    for m in node.alternatives[0]:
        if m.op is not MatchOp.EQ:
            raise TestFormatError(line_no, f"series labels must use '=': {metric!r}")
        pairs[m.name] = m.value
    return tuple(sorted((k, v) for k, v in pairs.items() if v != ""))


_REPEAT = re.compile(r"^(.*?)x(\d+)$")


def _tokens(text: str) -> list[str]:
    """Split on whitespace, keeping `{{ ... }}` histograms (and their `x3`/`+{{..}}` forms) whole."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        j = i
        depth = 0
        while j < len(text) and (depth > 0 or not text[j].isspace()):
            if text.startswith("{{", j):
                depth += 1
                j += 2
                continue
            if text.startswith("}}", j) and depth:
                depth -= 1
                j += 2
                continue
            j += 1
        tokens.append(text[i:j])
        i = j
    return tokens


def _expand_values(text: str, line_no: int, limit: int | None = None) -> list[Point]:
    values: list[Point] = []
    for token in _tokens(text):
        room = None if limit is None else max(0, limit - len(values))
        if "{{" in token:
            # `{{...}}`, `{{...}}x3` or `{{...}}+{{...}}x3`: only the count matters here.
            suffix = re.fullmatch(r"x(\d+)", token.rsplit("}}", 1)[-1])
            values.extend([HISTOGRAM] * _bounded(int(suffix.group(1)) + 1 if suffix else 1, room))
            continue
        if token == "_":
            values.extend([OMITTED] * _bounded(1, room))
            continue
        if token == "stale":
            values.extend([STALE] * _bounded(1, room))
            continue
        number = _parse_float(token)
        if number is not None:
            values.extend([number] * _bounded(1, room))
            continue
        m = _REPEAT.match(token)
        if m is None:
            raise TestFormatError(line_no, f"invalid value {token!r}")
        head, times = m.group(1), int(m.group(2))
        if head == "_":
            values.extend([OMITTED] * _bounded(times, room))
            continue
        if head == "stale":
            values.extend([STALE] * _bounded(times + 1, room))
            continue
        start, step = _split_increment(head, line_no)
        current = start
        for _ in range(_bounded(times + 1, room)):
            values.append(current)
            # Repeated addition, like Prometheus, so float rounding matches exactly.
            current += step
    return values


def _bounded(count: int, room: int | None) -> int:
    return count if room is None else min(count, room)


def _split_increment(head: str, line_no: int) -> tuple[float, float]:
    whole = _parse_float(head)
    if whole is not None:
        return whole, 0.0
    for k in range(len(head) - 1, 0, -1):
        if head[k] in "+-" and head[k - 1] not in "eE":
            start = _parse_float(head[:k])
            step = _parse_float(head[k:])
            if start is not None and step is not None:
                return start, step
    raise TestFormatError(line_no, f"invalid value {head!r}")
