"""What each host publishes about itself, and what the fleet keeps about each member.

`HostStatus` is written under the host's lease at `hosts/<host>`: it disappears with the
lease, which is how the leader knows a host is gone. The daemon fills it through a
callback (`StatusSource`); the coordinator writes it when its content changes.

Models ignore unknown fields so a fleet can run two Sentinel versions during an upgrade.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AlertStatus", "HostStatus", "MemberRecord", "StatusSource", "WorkerStatus"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WorkerStatus(_Lenient):
    name: str
    state: str = Field("unknown", description="serving, starting, stopped, failed, paused or unknown")
    profile: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    needs_human: bool = False


class AlertStatus(_Lenient):
    name: str
    severity: str | None = None
    active_at: float = Field(description="Unix time the alert became active on this host.")
    worker: str | None = None


class HostStatus(_Lenient):
    host: str = ""
    version: str = ""
    gpus_up: int | None = None
    gpus_expected: int | None = None
    workers: tuple[WorkerStatus, ...] = ()
    alerts: tuple[AlertStatus, ...] = ()
    started_at: float = 0.0
    updated_at: float = 0.0

    @property
    def needs_human(self) -> list[str]:
        return [w.name for w in self.workers if w.needs_human]

    def content(self) -> dict[str, object]:
        """Everything but the timestamp of the write: what decides whether to write again."""
        return self.model_dump(exclude={"updated_at"})


class MemberRecord(_Lenient):
    """Kept without a lease: the fleet remembers hosts that are gone."""

    host: str
    joined_at: float
    state: Literal["alive", "down", "left"] = "alive"
    since: float = Field(default_factory=time.time, description="When `state` was last changed.")
    last_status: HostStatus | None = None


StatusSource = Callable[[], HostStatus]
