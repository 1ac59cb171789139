"""Building blocks shared by the configuration models: frozen models and durations."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Duration", "Frozen", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a Prometheus-style duration (`500ms`, `15s`, `1m30s`)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 15s, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration like 500ms, 15s, 1m or 1h30m")
    text = value.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 500ms, 15s, 1m or 1h30m")
    return total


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
