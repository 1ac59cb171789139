"""Is the worker healthy again? Pure judgments over what the collectors wrote since the action.

The engine reads the samples (`HealthReading.fresh_from`) and polls until `judge` says
yes or the verification deadline passes; the judgment itself is here, beside
`policy.py`, with no clock and no I/O:

- a worker with an endpoint is healthy when the endpoint is up, its engine is not
  stalled, and, while requests run, its progress counter (tokens, engine steps) moved
  past where it stood when verification began;
- without an endpoint, when a process of the worker runs (`sentinel_worker_up`), or,
  when nothing measures the process either, when its backend reports the unit running.

Only samples written after the action began count: an `up` from before the restart
says nothing about the worker after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sentinel.remediation.backend import UnitState
from sentinel.store import Sample

__all__ = ["HealthReading", "Progress", "judge"]


@dataclass(frozen=True)
class HealthReading:
    """The latest samples of one worker written since the action began (None: none since)."""

    has_endpoint: bool
    up: float | None = None
    stalled: float | None = None
    requests_running: float | None = None
    progress_total: float | None = None
    process_up: float | None = None
    unit: UnitState | None = None  # asked from the backend only when nothing else measures the worker
    unit_error: str = ""

    @classmethod
    def fresh_from(cls, latest: Callable[[str], Sample | None], since_ms: int, has_endpoint: bool) -> HealthReading:
        """A reading from `latest(metric)`, keeping samples not older than `since_ms`."""

        def fresh(metric: str) -> float | None:
            sample = latest(metric)
            return sample.value if sample is not None and sample.timestamp_ms >= since_ms else None

        if has_endpoint:
            return cls(
                True,
                up=fresh("sentinel_endpoint_up"),
                stalled=fresh("sentinel_endpoint_stalled"),
                requests_running=fresh("sentinel_endpoint_requests_running"),
                progress_total=fresh("sentinel_endpoint_progress_total"),
            )
        return cls(False, process_up=fresh("sentinel_worker_up"))

    @property
    def needs_unit(self) -> bool:
        """Whether only the backend can tell (no endpoint, no process measured)."""
        return not self.has_endpoint and self.process_up is None


@dataclass(frozen=True)
class Progress:
    """Where the engine's progress counter stood when verification began (None: not known yet)."""

    baseline: float | None = None

    def advanced(self, value: float) -> tuple[bool, Progress]:
        """Has `value` moved past the baseline? The first reading without one becomes it."""
        if self.baseline is None:
            return False, Progress(value)
        return value > self.baseline, self


def judge(reading: HealthReading, progress: Progress) -> tuple[bool, str, Progress]:
    """(healthy, why not, progress to carry to the next reading); see the module doc."""
    if reading.has_endpoint:
        if reading.up is None:
            return False, "no health probe since the action", progress
        if reading.up != 1:
            return False, "endpoint not up", progress
        if reading.stalled == 1:
            return False, "engine stalled: requests running, no tokens generated", progress
        if reading.requests_running is not None and reading.requests_running > 0:
            if reading.progress_total is None:
                return False, f"{reading.requests_running:g} requests running, no progress yet", progress
            moved, progress = progress.advanced(reading.progress_total)
            if not moved:
                return False, f"{reading.requests_running:g} requests running, no progress yet", progress
        return True, "", progress
    if reading.process_up is not None:
        return (True, "", progress) if reading.process_up == 1 else (False, "no process of the worker found", progress)
    if reading.unit_error:
        return False, f"backend state unavailable: {reading.unit_error}", progress
    if reading.unit is None:
        return True, "", progress  # nothing to ask: the action's own success is all there is
    if reading.unit.running:
        return True, "", progress
    return False, f"unit {reading.unit.state}: {reading.unit.detail}", progress
