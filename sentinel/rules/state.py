"""The alert state machine, as Prometheus's `rules/alerting.go` has it.

Small pure pieces over (previous alerts, query result, time):
inactive → pending when the expression returns a series; pending → firing once it has
been active for `for`; when the series disappears a pending alert vanishes, and a
firing one keeps firing for `keep_firing_for`, then is resolved and kept for
`RESOLVED_RETENTION_MS` so the resolution can still be delivered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

__all__ = [
    "RESOLVED_RETENTION_MS",
    "Alert",
    "AlertState",
    "Candidate",
    "LimitExceeded",
    "Transition",
    "fingerprint",
    "step",
]

RESOLVED_RETENTION_MS = 15 * 60 * 1000


class AlertState(str, Enum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex-digit identity of a label set (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(labels):
        h.update(k.encode())
        h.update(b"\xff")
        h.update(labels[k].encode())
        h.update(b"\xff")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Alert:
    labels: dict[str, str]
    annotations: dict[str, str]
    state: AlertState
    value: float
    active_at_ms: int
    fired_at_ms: int | None = None
    resolved_at_ms: int | None = None
    keep_firing_since_ms: int | None = None
    last_sent_at_ms: int | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)


@dataclass(frozen=True)
class Candidate:
    """One sample of the rule's result with its labels and annotations expanded."""

    labels: dict[str, str]
    annotations: dict[str, str]
    value: float


@dataclass(frozen=True)
class Transition:
    """A change of state worth telling subscribers about."""

    alert: Alert
    previous: AlertState
    current: AlertState
    timestamp_ms: int


class LimitExceeded(Exception):
    """More active alerts than the group's `limit`: Prometheus drops them all."""


@dataclass
class StepResult:
    active: dict[str, Alert]
    transitions: list[Transition] = field(default_factory=list)


def step(
    active: Mapping[str, Alert],
    candidates: list[Candidate],
    ts: int,
    for_ms: int,
    keep_firing_for_ms: int,
    limit: int = 0,
) -> StepResult:
    """One evaluation: returns the new active set and the transitions it caused."""
    result: dict[str, Alert] = dict(active)
    transitions: list[Transition] = []
    seen: set[str] = set()
    for cand in candidates:
        fp = fingerprint(cand.labels)
        seen.add(fp)
        old = result.get(fp)
        if old is not None and old.state is not AlertState.INACTIVE:
            # Still active: refresh value and annotations; keep_firing_for starts over.
            result[fp] = replace(old, value=cand.value, annotations=cand.annotations, keep_firing_since_ms=None)
        else:
            result[fp] = Alert(cand.labels, cand.annotations, AlertState.PENDING, cand.value, ts)
            transitions.append(Transition(result[fp], AlertState.INACTIVE, AlertState.PENDING, ts))

    active_count = 0
    for fp, alert in list(result.items()):
        if fp not in seen:
            keep_firing = False
            if alert.state is AlertState.FIRING and keep_firing_for_ms > 0:
                since = alert.keep_firing_since_ms if alert.keep_firing_since_ms is not None else ts
                alert = replace(alert, keep_firing_since_ms=since)
                keep_firing = ts - since < keep_firing_for_ms
            if alert.state is AlertState.PENDING or (
                alert.resolved_at_ms is not None and ts - alert.resolved_at_ms > RESOLVED_RETENTION_MS
            ):
                # Pending alerts vanish; resolved ones are forgotten after the retention.
                del result[fp]
                if alert.state is AlertState.PENDING:
                    transitions.append(Transition(alert, AlertState.PENDING, AlertState.INACTIVE, ts))
                continue
            if alert.state is not AlertState.INACTIVE and not keep_firing:
                resolved = replace(alert, state=AlertState.INACTIVE, resolved_at_ms=ts)
                result[fp] = resolved
                transitions.append(Transition(resolved, alert.state, AlertState.INACTIVE, ts))
            else:
                result[fp] = alert
            if not keep_firing:
                continue
        active_count += 1
        alert = result[fp]
        if alert.state is AlertState.PENDING and ts - alert.active_at_ms >= for_ms:
            fired = replace(alert, state=AlertState.FIRING, fired_at_ms=ts)
            result[fp] = fired
            transitions.append(Transition(fired, AlertState.PENDING, AlertState.FIRING, ts))

    if limit > 0 and active_count > limit:
        raise LimitExceeded(f"exceeded limit of {limit} with {active_count} alerts")
    return StepResult(result, transitions)


def restore_active_at(active_at_ms: int, down_at_ms: int, now_ms: int, for_ms: int, grace_ms: int) -> int:
    """Prometheus's `for` restore after an outage (RestoreForState).

    Time spent pending before the outage counts; if less than the grace period would
    remain, the alert gets the grace period so a restart cannot fire it at once. A rule
    whose `for` is shorter than the grace period is not restored (it waits its own `for`
    from now), as Prometheus skips those rather than make them wait the grace period.
    """
    if for_ms < grace_ms:
        return now_ms
    spent = down_at_ms - active_at_ms
    remaining = for_ms - spent
    if remaining <= 0:
        return active_at_ms
    if remaining < grace_ms:
        return now_ms + grace_ms - for_ms
    return active_at_ms + (now_ms - down_at_ms)
