"""The daemon's side of the fleet: one coordinator per process when `fleet:` is set.

Built by the daemon, started and stopped by the healing stack (it needs the
remediation engine, and must stop after it, so slots held by actions cut short are
given back first). A host without a `fleet:` section builds none of this and works
exactly as before.

What it wires:
- **Gates and group actions** for the engine: `FleetGate` (a disruption slot before a
  disruptive action) and `FleetGroupActions` (a disruptive action on a serving-group
  member becomes the group's action); the engine's `group_steps` is the coordinator's
  `LocalExecutor`, so this host carries out its own steps of any group plan.
- **Status.** `status()` is what this host publishes under its lease: GPUs up (from
  the store), each worker with its state, profile, labels and needs_human (from the
  engine), and the firing alerts with their onset (from the rule manager). The fleet
  job compares it with the last one each second and asks for a write on a change.
- **Series.** One scheduler job (`fleet`, 1 s, the daemon's only scheduler) commits
  the coordinator's series into the store as one pass, so series that end (this host
  stopped leading) go stale at once; `rules/fleet.yml` reads them.
- **Events** (peer down, breaker open, group failed, etcd unreachable, slot lost...)
  are logged, and re-published on the daemon's event bus naming the series they
  changed, so the rule groups that read them evaluate at once. The leader's series are
  recomputed just after its events, so the bus is told again on the next two passes.
- **Stop** within the daemon's stop budget: leave the fleet (mark `left`, revoke the
  lease) if etcd answers within `STOP_BUDGET_S`; otherwise the lease lapses by itself.

Reload: `fleet:` is read at start; a change is logged and takes effect at the next
restart (like the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from sentinel import __version__
from sentinel.config.models import Config
from sentinel.daemon.fleet_gate import FleetGate
from sentinel.daemon.fleet_groups import FleetGroupActions
from sentinel.fleet import AlertStatus, FleetCoordinator, FleetEvent, HostStatus, WorkerStatus, metrics
from sentinel.rules.state import AlertState
from sentinel.runtime.scheduler import Job, Scheduler
from sentinel.runtime.timeouts import wait_for
from sentinel.store import LabelMatcher, MatchOp, Store, now_ms
from sentinel.store.events import Event, EventBus

if TYPE_CHECKING:
    from sentinel.remediation.engine import Remediator
    from sentinel.rules.manager import RuleManager

__all__ = ["FleetLink"]

log = logging.getLogger(__name__)

TICK_S = 1.0
STOP_BUDGET_S = 0.5
_LOUD = frozenset({"peer_down", "breaker_open", "group_failed", "etcd_unreachable", "slot_lost", "leader_deposed"})


class FleetLink:
    """The coordinator and everything the daemon hands it (module doc)."""

    def __init__(self, config: Config, store: Store, bus: EventBus, scheduler: Scheduler) -> None:
        assert config.fleet is not None
        self.config = config.fleet
        self._store = store
        self._bus = bus
        self._scheduler = scheduler
        self.coordinator = FleetCoordinator(self.config, status_source=self.status, version=__version__)
        self.gate = FleetGate(self.coordinator, {w.name: dict(w.labels) for w in config.workers})
        self.groups = FleetGroupActions(self.coordinator, self.config)
        self._labels = {w.name: dict(w.labels) for w in config.workers}
        self._remediator: Remediator | None = None
        self._rules: RuleManager | None = None
        self._job: Job | None = None
        self._last_status: dict[str, object] | None = None
        self._pending: dict[tuple[str, ...], int] = {}  # series named by recent events -> passes left
        self.events: list[FleetEvent] = []  # the last few, for status views and tests

    def attach(self, remediator: Remediator, rules: RuleManager) -> None:
        """The engine (for the status and the group steps) and the alerts (for the status)."""
        self._remediator = remediator
        self._rules = rules
        remediator.group_steps.host = self.config.host_id
        self.coordinator.executor = remediator.group_steps

    async def start(self) -> None:
        """Join in the background (never waits for etcd); FleetSetupError for a local mistake."""
        metrics.declare(self._store)
        self.coordinator.subscribe(self._on_event)
        await self.coordinator.start()
        self._job = self._scheduler.add("fleet", self._tick, TICK_S, min_gap=0.05)
        log.info(
            "joining fleet %s as %s through %s (lease %gs, partition_policy %s)",
            self.config.name,
            self.config.host_id,
            ", ".join(self.config.endpoints),
            self.config.lease_ttl,
            self.config.partition_policy,
        )

    async def stop(self, budget_s: float = STOP_BUDGET_S) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            if self._scheduler.get(job.name) is job:
                self._scheduler.remove(job.name)
            await job.stop(0.1)
        try:
            await wait_for(self.coordinator.stop(timeout=budget_s), budget_s + 0.5)
        except asyncio.TimeoutError:
            log.warning("fleet: did not leave within %gs; the lease lapses by itself", budget_s)
        with contextlib.suppress(Exception):
            metrics.commit(self._store, [])  # this host's fleet series end with it

    # -- status ---------------------------------------------------------------------------

    def status(self) -> HostStatus:
        """What this host publishes (module doc); cheap, on the loop."""
        return HostStatus(
            gpus_up=self._gpus("sentinel_gpu_up", up_only=True),
            gpus_expected=self._gpus("sentinel_gpus_expected"),
            workers=self._workers(),
            alerts=self._alerts(),
        )

    def _gpus(self, metric: str, *, up_only: bool = False) -> int | None:
        samples = self._store.instant([LabelMatcher("__name__", MatchOp.EQ, metric)], now_ms())
        if not samples:
            return None
        if up_only:
            return sum(1 for s in samples if s.value == 1)
        return int(max(s.value for s in samples))

    def _workers(self) -> tuple[WorkerStatus, ...]:
        if self._remediator is None:
            return ()
        out = []
        for w in self._remediator.workers_json()["workers"]:
            out.append(
                WorkerStatus(
                    name=w["name"],
                    state=_state_word(w),
                    profile=w["profile"],
                    labels=self._labels.get(w["name"], {}),
                    needs_human=bool(w["needs_human"]),
                )
            )
        return tuple(out)

    def _alerts(self) -> tuple[AlertStatus, ...]:
        if self._rules is None:
            return ()
        seen = set()
        out = []
        for _, rule, alert in self._rules.active_alerts():
            if alert.state is not AlertState.FIRING:
                continue
            name = alert.labels.get("alertname", rule.name)
            worker = alert.labels.get("worker")
            if (name, worker) in seen:
                continue
            seen.add((name, worker))
            out.append(
                AlertStatus(
                    name=name, severity=alert.labels.get("severity"), active_at=alert.active_at_ms / 1000, worker=worker
                )
            )
        return tuple(sorted(out, key=lambda a: (a.name, a.worker or "")))

    # -- the job: series and status --------------------------------------------------------

    async def _tick(self) -> None:
        metrics.commit(self._store, self.coordinator.samples())
        for names, left in list(self._pending.items()):
            self._publish_series(names)
            if left <= 1:
                del self._pending[names]
            else:
                self._pending[names] = left - 1
        content = self.status().content()
        if content != self._last_status:
            self._last_status = content
            self.coordinator.notify_status_changed()

    def _publish_series(self, names: tuple[str, ...]) -> None:
        self._bus.publish(Event(kind="fleet.series", source="fleet", metrics=names))

    def _on_event(self, event: FleetEvent) -> None:
        level = logging.WARNING if event.kind in _LOUD else logging.INFO
        log.log(level, "fleet: %s", event.message)
        self.events = [*self.events[-49:], event]
        self._bus.publish(
            Event(
                kind=f"fleet.{event.kind}",
                source="fleet",
                labels=dict(event.labels),
                message=event.message,
            )
        )
        if event.metrics:
            # The leader recomputes its series right after the change that made the event.
            self._pending[tuple(event.metrics)] = 2
            if self._job is not None:
                self._job.wake()


def _state_word(worker: dict[str, Any]) -> str:
    """The engine's view of a worker in the fleet's words (serving, stopped, failed...)."""
    state = str(worker["state"])
    if state in ("needs_human", "paused"):
        return state
    if worker.get("in_flight"):
        return str(worker["in_flight"].get("phase") or "acting")
    unit = worker.get("unit")
    if unit in ("active", "activating", "reloading"):
        return "serving"
    if unit in ("inactive", "failed"):
        return "stopped" if unit == "inactive" else "failed"
    return "unknown" if unit is None else str(unit)
