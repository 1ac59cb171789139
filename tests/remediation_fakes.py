"""Shared pieces of the remediation tests: a fake backend, a controllable wall clock, alerts.

No tests here (hence no test_ prefix); the test_remediation_* modules import these.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sentinel.config.models import WorkerConfig
from sentinel.notify.actions import ActionReport
from sentinel.remediation.backend import ActionContext, BackendError, UnitState, WorkerBackend
from sentinel.remediation.engine import Remediator
from sentinel.remediation.settings import Profile, RemediationConfig
from sentinel.rules.manager import AlertEvent
from sentinel.rules.rulefile import Rule
from sentinel.rules.state import Alert, AlertState, Transition
from sentinel.state.health import StateHealth
from sentinel.store import Store

T0 = 1_700_000_000.0

LADDER_PROFILES = (
    Profile(name="full", batch_limit=64, env={"MAX_NUM_SEQS": "64"}),
    Profile(name="reduced", batch_limit=16, env={"MAX_NUM_SEQS": "16"}),
    Profile(name="fp8", batch_limit=16, quantized=True, env={"MAX_NUM_SEQS": "16", "QUANTIZATION": "fp8"}),
)


class Wall:
    """The engine's clocks: a wall clock that moves only when told, and a steady clock that
    runs in real time (verification deadlines pass) plus whatever `advance` added."""

    def __init__(self, t: float = T0, boot: str = "test-boot") -> None:
        self.t = t
        self.boot = boot
        self._steady_offset = 0.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t

    def steady(self) -> float:
        return time.monotonic() + self._steady_offset

    def boot_id(self) -> str:
        return self.boot

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self._steady_offset += seconds

    def step_wall(self, seconds: float) -> None:
        """The wall clock alone jumps (an NTP step, `date -s`): the steady clock does not."""
        self.t += seconds

    @property
    def ms(self) -> int:
        return int(self.t * 1000)


def healthy(store: Store, wall: Wall, worker: str, *, up: float = 1.0) -> None:
    """Samples the endpoint collector would write for a worker that serves (or not)."""
    store.add("sentinel_endpoint_up", up, {"worker": worker}, timestamp_ms=wall.ms)
    store.add("sentinel_endpoint_stalled", 0.0, {"worker": worker}, timestamp_ms=wall.ms)


class FakeBackend:
    """Records verbs; can fail, block on a gate, and report the worker healthy when a verb returns."""

    def __init__(
        self,
        name: str,
        store: Store | None = None,
        wall: Wall | None = None,
        *,
        heals: bool = True,
        fail: bool = False,
        concurrency: list[int] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.wall = wall
        self.heals = heals
        self.fail = fail
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.calls: list[tuple[str, str]] = []
        self.contexts: list[ActionContext] = []
        self.unit = UnitState("active", "fake")
        self.closed = False
        # Shared between backends: [running now, most at once].
        self.concurrency = concurrency if concurrency is not None else [0, 0]

    async def _verb(self, verb: str, profile: str, ctx: ActionContext) -> None:
        self.calls.append((verb, profile))
        self.contexts.append(ctx)
        self.concurrency[0] += 1
        self.concurrency[1] = max(self.concurrency[1], self.concurrency[0])
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise BackendError(f"job for {self.name} failed")
            if self.heals and self.store is not None and self.wall is not None and verb != "stop":
                healthy(self.store, self.wall, self.name)
        finally:
            self.concurrency[0] -= 1

    async def start(self, profile: Profile, ctx: ActionContext) -> None:
        await self._verb("start", profile.name, ctx)

    async def stop(self, ctx: ActionContext) -> None:
        await self._verb("stop", "", ctx)

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        await self._verb("restart", profile.name, ctx)

    async def state(self) -> UnitState:
        return self.unit

    async def close(self) -> None:
        self.closed = True


class FakeLive:
    """A LiveControl that records batch limits."""

    def __init__(self) -> None:
        self.limits: list[tuple[str, int]] = []

    def supports_live_batch_limit(self, worker: str) -> bool:
        return True

    async def set_batch_limit(self, worker: str, limit: int) -> None:
        self.limits.append((worker, limit))


_RULE = Rule(kind="alert", name="Test", expr="vector(1)", file="rules.yml", group="g", index=0, line=1)


def firing(alertname: str, *, active_at_ms: int = 1_000, **labels: str) -> AlertEvent:
    """A pending -> firing transition of an alert with these labels."""
    alert = Alert(
        labels={"alertname": alertname, **labels},
        annotations={"summary": f"{alertname} fired"},
        state=AlertState.FIRING,
        value=1.0,
        active_at_ms=active_at_ms,
        fired_at_ms=active_at_ms + 1,
    )
    return AlertEvent(
        Transition(alert, AlertState.PENDING, AlertState.FIRING, active_at_ms + 1), _RULE, "g", "rules.yml"
    )


def resolved(event: AlertEvent) -> AlertEvent:
    alert = event.alert
    gone = Alert(alert.labels, alert.annotations, AlertState.INACTIVE, alert.value, alert.active_at_ms)
    return AlertEvent(Transition(gone, AlertState.FIRING, AlertState.INACTIVE, alert.active_at_ms + 2), _RULE, "g", "x")


def worker(name: str = "qwen", *, gpus: Sequence[int] = (0, 1), **kwargs: Any) -> WorkerConfig:
    """A worker with an endpoint and the full -> reduced -> fp8 ladder."""
    kwargs.setdefault("profiles", LADDER_PROFILES)
    kwargs.setdefault("endpoint", "http://127.0.0.1:8000")
    return WorkerConfig(name=name, gpus=tuple(gpus), **kwargs)


def policy(**overrides: Any) -> RemediationConfig:
    """Act mode, fast verification, generous defaults a test overrides."""
    base: dict[str, Any] = {
        "mode": "act",
        "verify_timeout": 0.3,
        "verify_interval": 0.01,
        "cooldown": 0,
        "budget": {"count": 10, "window": 3600},
    }
    base.update(overrides)
    return RemediationConfig.model_validate(base)


_OPEN: list[Harness] = []  # every Harness the running test built


@pytest.fixture(autouse=True)
async def close_harnesses() -> AsyncIterator[None]:
    """Close every Remediator a test built, also when an assert failed before its own close
    (a Remediator left open leaks its tasks and its journal's thread into later tests).
    Autouse in each module that imports it."""
    yield
    while _OPEN:
        await _OPEN.pop().remediator.close()


class Harness:
    """A Remediator over fakes, with its reports collected."""

    def __init__(
        self,
        state_dir: Path,
        config: RemediationConfig,
        workers: Sequence[WorkerConfig],
        *,
        backends: Mapping[str, WorkerBackend] | None = None,
        store: Store | None = None,
        wall: Wall | None = None,
        live: Any = None,
        startup_grace: float = 0.0,
        gates: Sequence[Any] = (),
    ) -> None:
        self.store = store or Store()
        self.wall = wall or Wall()
        self.reports: list[ActionReport] = []
        self.health = StateHealth()
        if backends is None:
            backends = {w.name: FakeBackend(w.name, self.store, self.wall) for w in workers}
        self.backends = backends
        self.remediator = Remediator(
            config,
            workers,
            backends,
            self.store,
            state_dir,
            notify=self.reports.append,
            live=live,
            clocks=self.wall,
            health=self.health,
            gates=gates,
            tick_interval=3600.0,  # the tests call tick() themselves
            startup_grace=startup_grace,
        )
        _OPEN.append(self)

    def backend(self, name: str) -> FakeBackend:
        backend = self.backends[name]
        assert isinstance(backend, FakeBackend)
        return backend

    def outcomes(self, worker: str | None = None) -> list[tuple[str, str]]:
        return [(r.action, r.outcome) for r in self.reports if worker is None or r.worker == worker]

    def metric(self, name: str, **labels: str) -> float | None:
        for sample in self.store.latest(name):
            got = dict(sample.labels)
            if all(got.get(k) == v for k, v in labels.items()):
                return sample.value
        return None
