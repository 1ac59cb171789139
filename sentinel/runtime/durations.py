"""Every way Sentinel reads a duration, on one table of units and one scanner.

Three dialects, each where its users expect it:

- `parse_prom_duration`: Prometheus's `model.ParseDuration` (rule files, the query API's
  `step`, the `parseDuration` template function, promtool's test files): whole numbers,
  units `y w d h m s ms` from largest to smallest, each at most once, or a bare `0`.
  `DurationError` says why a text is refused (`kind`), and `describe()` words it as
  Prometheus does, with the caller's quoting (Go's `%q` in templates);
- `parse_duration`: `sentinel.yaml` and the command line, in seconds: a number, or
  `500ms`, `1.5s`, `1m30s` (decimal fractions allowed, units in any order, no `y`/`w`);
- `parse_test_duration_ms`: PromQL test scripts: a number of seconds (`1.5`) or units in
  any order (`10s53ms`), as the promql test format writes load intervals and times.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

__all__ = ["DurationError", "parse_duration", "parse_prom_duration", "parse_test_duration_ms"]

# Milliseconds per unit, in Prometheus's order (a unit may only follow a larger one).
UNIT_MS = {
    "y": 365 * 86_400_000,
    "w": 7 * 86_400_000,
    "d": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1_000,
    "ms": 1,
}
_ORDER = {unit: i for i, unit in enumerate(UNIT_MS)}
_MAX_NS = 2**63 - 1  # time.Duration's range
_TERM = re.compile(r"(\d+(?:\.\d+)?)(ms|y|w|d|h|m|s)")

ErrorKind = Literal["empty", "invalid", "unknown_unit", "out_of_range"]


class DurationError(ValueError):
    """A duration text refused; `str()` words it for Sentinel's own messages (Python quoting)."""

    def __init__(self, kind: ErrorKind, text: str, unit: str = "") -> None:
        self.kind = kind
        self.text = text
        self.unit = unit
        super().__init__(self.describe(repr, detailed=False))

    def describe(self, quote: Callable[[str], str] = repr, *, detailed: bool = True) -> str:
        """The message; `detailed` as current Prometheus words it, else as 2.x's regex did."""
        if not detailed:
            return f"not a valid duration string: {quote(self.text)}"
        if self.kind == "empty":
            return "empty duration string"
        if self.kind == "unknown_unit":
            return f"unknown unit {quote(self.unit)} in duration {quote(self.text)}"
        if self.kind == "out_of_range":
            return "duration out of range"
        return f"not a valid duration string: {quote(self.text)}"


def parse_prom_duration(text: object) -> int:
    """Milliseconds from a Prometheus duration (`1m`, `1h30m`, `500ms`, `0`); see the module doc."""
    if not isinstance(text, str):
        raise DurationError("invalid", repr(text))
    if text == "0":
        return 0
    if text == "":
        raise DurationError("empty", text)
    total_ms, last, rest = 0, -1, text
    while rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits == 0:
            raise DurationError("invalid", text)
        value, rest = int(rest[:digits]), rest[digits:]
        unit_len = next((i for i, ch in enumerate(rest) if "0" <= ch <= "9"), len(rest))
        if unit_len == 0:
            raise DurationError("invalid", text)
        unit, rest = rest[:unit_len], rest[unit_len:]
        if unit not in UNIT_MS:
            raise DurationError("unknown_unit", text, unit)
        if _ORDER[unit] <= last:
            raise DurationError("invalid", text)
        last = _ORDER[unit]
        total_ms += value * UNIT_MS[unit]
        if total_ms * 1_000_000 > _MAX_NS:
            raise DurationError("out_of_range", text)
    return total_ms


def _lenient_ms(text: str, units: frozenset[str], fractions: bool) -> float | None:
    """Milliseconds of `<number><unit>` terms in any order; None when `text` is not one."""
    pos, total = 0, 0.0
    for m in _TERM.finditer(text):
        if m.start() != pos or m.group(2) not in units or (not fractions and "." in m.group(1)):
            break
        total += float(m.group(1)) * UNIT_MS[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None


_CONFIG_UNITS = frozenset({"ms", "s", "m", "h", "d"})
_TEST_UNITS = frozenset(UNIT_MS)


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration like `500ms`, `15s`, `1m30s`, `1.5h` (config, CLI)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 15s, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration like 500ms, 15s, 1m or 1h30m")
    ms = _lenient_ms(value.strip(), _CONFIG_UNITS, fractions=True)
    if ms is None:
        raise ValueError(f"invalid duration {value!r}: expected e.g. 500ms, 15s, 1m or 1h30m")
    return ms / 1000


def parse_test_duration_ms(text: str) -> int:
    """Milliseconds from `5m`, `1h30m`, `10s53ms`, `0`, or plain seconds (`100`, `1.5`)."""
    text = text.strip()
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    ms = _lenient_ms(text, _TEST_UNITS, fractions=False)
    if ms is None:
        raise ValueError(f"invalid duration {text!r}")
    return int(ms)
