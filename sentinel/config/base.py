"""Building blocks shared by the configuration models: frozen models and durations.

Durations are read by `sentinel.runtime.durations.parse_duration`, re-exported here as
the config's dialect.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from sentinel.runtime.durations import parse_duration

__all__ = ["Duration", "Frozen", "parse_duration"]

Duration = Annotated[float, BeforeValidator(parse_duration)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
