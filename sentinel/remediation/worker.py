"""One worker as the engine knows it: its policy state, what is in flight, and its status.

`WorkerRuntime` gathers everything the engine keeps per worker (before, seven dicts
keyed by worker name): the policy's `WorkerState`, the phase of the action in flight,
the backend's last unit state, the last finished decision, the alerts waiting for a
passing obstacle, when an action last healed it, and what was last persisted. It also
converts the state to and from its journal record: times in memory are on the steady
clock, on disk they are an `Instant` (see `sentinel.runtime.clock`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sentinel.config.models import WorkerConfig
from sentinel.remediation.backend import LiveControl, LivePlacement, UnitState, WorkerBackend
from sentinel.remediation.journal import WorkerRecord, episode_key
from sentinel.remediation.policy import Request, WorkerSpec, WorkerState
from sentinel.rules.manager import AlertEvent
from sentinel.runtime.clock import Clocks, Instant, elapsed_since

__all__ = ["Phase", "Why", "WorkerRuntime"]

log = logging.getLogger(__name__)

Phase = str  # "acting", "verifying", or "settling" (waiting for a command left running by a crash)


@dataclass(frozen=True)
class Why:
    """The alert (if any) behind an action: for the journal, the backend and the report."""

    alertname: str = ""
    fingerprint: str = ""
    episode: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    active_at: float = 0.0  # when the alert became active (wall seconds)

    @classmethod
    def of(cls, event: AlertEvent) -> Why:
        alert = event.alert
        return cls(
            alert.labels.get("alertname", event.rule.name),
            alert.fingerprint,
            episode_key(alert.fingerprint, alert.active_at_ms),
            alert.labels,
            alert.active_at_ms / 1000,
        )


class WorkerRuntime:
    """What the engine keeps about one worker (module doc)."""

    def __init__(self, config: WorkerConfig, backend: WorkerBackend | None) -> None:
        self.config = config
        self.backend = backend
        self.state = WorkerState(profile_index=self.home_index)
        self.phase: Phase | None = None  # while an action is in flight
        self.phase_since = 0.0  # steady clock
        self.unit: UnitState | None = None  # the backend's view, refreshed each tick
        self.last: dict[str, Any] | None = None  # the last finished decision, for status
        # Alert requests refused for a passing reason (cooldown, in flight): tried again on
        # each tick while their alert still fires, so a crash during a cooldown is healed.
        self.deferred: dict[str, tuple[Request, Why]] = {}
        self.healed_at = -math.inf  # when an action last verified it healthy (wall seconds)
        self.trouble_saved = -math.inf  # state.last_trouble_at as last persisted

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def home_index(self) -> int:
        names = [p.name for p in self.config.profiles]
        return names.index(self.config.initial_profile) if self.config.initial_profile in names else 0

    def spec(self, live: LiveControl | None) -> WorkerSpec:
        """What the policy needs; asked each time, since a probe may connect (or vanish) any time."""
        probed = self.config.probe and live is not None
        live_batch = bool(probed and live is not None and live.supports_live_batch_limit(self.name))
        live_placement = bool(probed and isinstance(live, LivePlacement) and live.supports_live_rebalance(self.name))
        return WorkerSpec(
            self.name, self.config.profiles, self.home_index, self.backend is not None, live_batch, live_placement
        )

    # -- in flight ----------------------------------------------------------------------

    def begin(self, action: str, phase: Phase, now: float) -> None:
        self.state = replace(self.state, in_flight=action)
        self.enter(phase, now)

    def enter(self, phase: Phase, now: float) -> None:
        self.phase, self.phase_since = phase, now

    def end(self) -> None:
        self.state = replace(self.state, in_flight=None)
        self.phase = None

    def word(self, globally_paused: bool) -> str:
        """The worker's state in one word, as status shows it."""
        state = self.state
        if state.needs_human:
            return "needs_human"
        if state.paused or globally_paused:
            return "paused"
        if state.in_flight is not None:
            return self.phase or "acting"
        if state.profile_index != self.home_index:
            return "degraded"
        return "ok"

    # -- the journal record ---------------------------------------------------------------

    def record(self, clocks: Clocks) -> WorkerRecord:
        """The state as the journal keeps it; the trouble time as an `Instant`."""
        state = self.state
        trouble = Instant.at_steady(clocks, state.last_trouble_at) if math.isfinite(state.last_trouble_at) else None
        return WorkerRecord(
            profile=self.spec(None).profile(state.profile_index).name,
            escalation=state.escalation,
            needs_human=state.needs_human,
            needs_human_reason=state.needs_human_reason,
            paused=state.paused,
            trouble_alerts=tuple(sorted(state.trouble_alerts)),
            last_trouble_at=trouble.wall if trouble else 0.0,
            reverify=state.in_flight == "verify",
            boot_id=trouble.boot if trouble else "",
            last_trouble_steady=trouble.steady if trouble else None,
        )

    def restore(self, record: WorkerRecord | None, clocks: Clocks) -> None:
        """Take the state a journal record holds (at start)."""
        if record is None:
            return
        spec = self.spec(None)
        names = [p.name for p in spec.profiles]
        if record.profile in names:
            index = names.index(record.profile)
        else:
            if record.profile and spec.profiles:
                log.warning(
                    "worker %s: journaled profile %r is no longer configured; using %s",
                    self.name,
                    record.profile,
                    spec.profile(spec.home_index).name,
                )
            index = spec.home_index
        now = clocks.steady()
        trouble_at = -math.inf
        if record.last_trouble_at:
            then = Instant(record.last_trouble_at, record.boot_id, record.last_trouble_steady)
            trouble_at = now - elapsed_since(then, clocks)
        if index != spec.home_index and not math.isfinite(trouble_at):
            trouble_at = now  # stepped down at an unknown time: wait a full stable_for
        self.state = WorkerState(
            profile_index=index,
            escalation=record.escalation,
            needs_human=record.needs_human,
            needs_human_reason=record.needs_human_reason,
            paused=record.paused,
            trouble_alerts=frozenset(record.trouble_alerts),
            last_trouble_at=trouble_at,
        )

    # -- status ------------------------------------------------------------------------

    def status_json(self, clocks: Clocks, globally_paused: bool) -> dict[str, Any]:
        """One worker of GET /api/v1/workers."""
        spec, state = self.spec(None), self.state
        now_steady, now_wall = clocks.steady(), clocks.wall()
        in_flight = None
        if state.in_flight is not None:
            seconds = max(0.0, now_steady - self.phase_since) if self.phase else 0.0
            in_flight = {
                "action": state.in_flight,
                "phase": self.phase or "acting",
                "since": now_wall - seconds,
                "seconds": round(seconds, 1),
            }
        trouble = state.last_trouble_at
        return {
            "name": self.name,
            "state": self.word(globally_paused),
            "profile": spec.profile(state.profile_index).name,
            "profile_index": state.profile_index,
            "profiles": [p.name for p in spec.profiles],
            "home_profile": spec.profile(spec.home_index).name,
            "backend": type(self.backend).__name__ if self.backend is not None else None,
            "unit": self.unit.state if self.unit else None,
            "unit_detail": self.unit.detail if self.unit else None,
            "needs_human": state.needs_human,
            "needs_human_reason": state.needs_human_reason,
            "paused": state.paused,
            "in_flight": in_flight,
            "escalation": state.escalation,
            "trouble_alerts": sorted(state.trouble_alerts),
            "last_trouble_at": now_wall - (now_steady - trouble) if math.isfinite(trouble) else None,
            "last_action": self.last,
            "gpus": list(self.config.gpus),
        }
