"""What a worker backend is: the verbs Sentinel can carry out on a worker.

Backends (systemd over D-Bus, a supervised child process, an operator's commands)
implement `WorkerBackend`. The policy never learns which one it talks to. A worker
that runs Sentinel's in-worker probe can also take a new batch limit live; that path
is `LiveControl`, separate from the backend, because it needs no restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sentinel.remediation.rebalance_params import RebalanceSettings
from sentinel.remediation.settings import Profile

__all__ = [
    "ActionContext",
    "BackendError",
    "LiveControl",
    "LivePlacement",
    "ProfileRecord",
    "UnitState",
    "WorkerBackend",
]


class BackendError(Exception):
    """A verb failed; the message says what the backend saw (job result, exit code, ...)."""


@dataclass(frozen=True)
class ActionContext:
    """Why a verb runs. Values come from monitored systems: never spliced into a shell."""

    worker: str
    action: str
    alertname: str = ""
    fingerprint: str = ""
    profile: str = ""
    previous_profile: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """SENTINEL_* variables for command backends and child processes."""
        env = {
            "SENTINEL_WORKER": self.worker,
            "SENTINEL_ACTION": self.action,
            "SENTINEL_ALERTNAME": self.alertname,
            "SENTINEL_FINGERPRINT": self.fingerprint,
            "SENTINEL_PROFILE": self.profile,
            "SENTINEL_PREVIOUS_PROFILE": self.previous_profile,
        }
        for name, value in self.labels.items():
            key = "SENTINEL_LABEL_" + "".join(c if c.isalnum() else "_" for c in name.upper())
            env[key] = value
        return env


@dataclass(frozen=True)
class UnitState:
    """The worker as its backend sees it: `active`, `activating`, `inactive`, `failed` or `unknown`."""

    state: str
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.state in ("active", "activating", "reloading")


@runtime_checkable
class WorkerBackend(Protocol):
    """Carries out verbs on one worker. Each verb returns when the job has finished."""

    async def start(self, profile: Profile, ctx: ActionContext) -> None: ...

    async def stop(self, ctx: ActionContext) -> None: ...

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        """Write the profile where the worker reads it (atomically), then restart."""

    async def state(self) -> UnitState: ...

    async def close(self) -> None: ...


@runtime_checkable
class ProfileRecord(Protocol):
    """A backend that records the profile it last applied, so the ladder position survives a restart."""

    async def active_profile(self) -> str | None:
        """The recorded profile's name; None when nothing was recorded."""


@runtime_checkable
class LiveControl(Protocol):
    """A worker that can change its batch limit while running (Sentinel's probe)."""

    def supports_live_batch_limit(self, worker: str) -> bool: ...

    async def set_batch_limit(self, worker: str, limit: int) -> None: ...


@runtime_checkable
class LivePlacement(Protocol):
    """A worker whose expert placement can change while it runs (the probe's live `rebalance_experts`)."""

    def supports_live_rebalance(self, worker: str) -> bool: ...

    async def rebalance_experts(self, worker: str, settings: RebalanceSettings) -> str:
        """Plan, apply and verify a new placement; returns what it did, raises `BackendError`."""
