"""Live `rebalance_experts`: plan from the probe's counts, send, wait for the ack, measure, roll back.

One run (`LiveRebalancer.run`), in order:

1. **Inputs.** The placement the worker runs (its probe sends the layers), and the
   routed tokens per (layer, expert) over the last `window` (the probe's
   `expert_tokens`, summed by `PlacementControl`). The measured balancedness and routed
   tokens/s over that same window are the "before".
2. **Plan.** `sentinel.moe.plan_rebalance` in a thread (tens of milliseconds of CPU for
   a large model: never on the event loop). A plan the limits refuse (`max_copies`,
   slots) fails the action with the planner's reason; so does a plan that changes
   nothing.
3. **Send and acknowledge.** The new placement goes out as the next version in the
   reply to the probe's reports (`PlacementControl.set_placement`); the worker stages
   the copies, swaps at a step boundary and acknowledges with the version and digest
   it runs. A refusal (shape, slots, memory budget) fails the action with the
   worker's reason; nothing to roll back, the old placement never stopped running.
4. **Verify, measured.** Reports under the new version, after the acknowledgement: once
   `min_reports` of them carried traffic, their measured balancedness (per physical
   slot, by the probe) must be at least `threshold`, and their routed tokens/s at least
   `min_throughput_ratio` of the before; otherwise, at `verify_timeout`, it failed.
5. **Roll back** when the acknowledgement did not come in time or verification failed:
   the previous placement is sent as a *newer* version (versions only grow, so a late
   first swap can never land after it; if the first never landed, the worker answers
   "already runs this placement" and copies nothing). The action then fails, and the
   engine escalates (a critical report; restarts do not heal a routing skew).

Series (source-less gauges, per worker): `sentinel_moe_rebalance_balancedness{stage}`
with stage `before` (measured), `predicted`, `after` (measured, or the last reading at
the deadline); `sentinel_moe_predicted_balancedness{layer}`;
`sentinel_moe_rebalance_copies`, `sentinel_moe_rebalance_copy_bytes`,
`sentinel_moe_rebalance_apply_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sentinel.collectors.probe_placement import (
    MeasuredLoad,
    PlacementRejected,
    RunningPlacement,
    measured_balancedness,
)
from sentinel.collectors.probe_schema import PlacementAnswer
from sentinel.moe import Placement, PlacementError, PlannerSettings, PlanRefused, plan_rebalance
from sentinel.moe import Plan as PlacementPlan
from sentinel.remediation.backend import BackendError
from sentinel.remediation.rebalance_params import RebalanceSettings
from sentinel.store import Store

__all__ = ["REBALANCE_METRICS", "LiveRebalancer", "PlacementChannel", "RebalanceOutcome", "declare_rebalance_metrics"]

log = logging.getLogger(__name__)

_VERIFY_POLL_S = 0.5

REBALANCE_METRICS: tuple[tuple[str, str, str], ...] = (
    (
        "sentinel_moe_rebalance_balancedness",
        "gauge",
        "Balancedness around the last rebalance_experts: stage=before (measured), predicted, after (measured).",
    ),
    ("sentinel_moe_predicted_balancedness", "gauge", "Balancedness the last rebalance plan predicted for the layer."),
    ("sentinel_moe_rebalance_copies", "gauge", "Expert weight copies of the last rebalance plan."),
    ("sentinel_moe_rebalance_copy_bytes", "gauge", "Bytes of expert weights the last rebalance plan copied."),
    (
        "sentinel_moe_rebalance_apply_seconds",
        "gauge",
        "Seconds the worker took to stage and swap in the last placement (its own measure).",
    ),
)


def declare_rebalance_metrics(store: Store) -> None:
    for name, type_, help_ in REBALANCE_METRICS:
        store.set_meta(name, type_, help_)


class PlacementChannel(Protocol):
    """What the rebalancer needs of the probe registry (`PlacementControl` provides it)."""

    def running(self, worker: str) -> RunningPlacement | None: ...

    def token_window(self, worker: str, seconds: float) -> tuple[dict[int, list[int]], float]: ...

    def loads_since(self, worker: str, since: float, version: int | None = None) -> list[MeasuredLoad]: ...

    def next_version(self, worker: str) -> int: ...

    async def set_placement(
        self, worker: str, placement: Placement, *, version: int, timeout_s: float, ack_timeout_s: float
    ) -> PlacementAnswer: ...


@dataclass(frozen=True)
class RebalanceOutcome:
    """What a successful rebalance did, measured."""

    version: int
    copies: int
    copy_bytes: int
    predicted_before: float | None
    predicted_after: float | None
    measured_before: float | None
    measured_after: float | None
    throughput_before: float | None
    throughput_after: float | None
    apply_seconds: float

    def describe(self) -> str:
        return (
            f"placement version {self.version}: {self.copies} expert copies in {self.apply_seconds:.2f}s; "
            f"balancedness {_fmt(self.measured_before)} -> {_fmt(self.measured_after)} measured "
            f"({_fmt(self.predicted_after)} predicted); routed tokens/s {_fmt(self.throughput_before, 0)} -> "
            f"{_fmt(self.throughput_after, 0)}"
        )


def throughput(loads: Sequence[MeasuredLoad]) -> float | None:
    """Routed tokens per second over the reports (sum of tokens over sum of their intervals)."""
    seconds = sum(m.interval_s for m in loads)
    return sum(m.tokens for m in loads) / seconds if seconds > 0 else None


class LiveRebalancer:
    """Carries out one live rebalance on a worker (module doc)."""

    def __init__(
        self,
        channel: PlacementChannel,
        store: Store,
        *,
        interval_of: Callable[[str], float],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._store = store
        self._interval_of = interval_of
        self._monotonic = monotonic
        declare_rebalance_metrics(store)

    async def run(self, worker: str, settings: RebalanceSettings) -> RebalanceOutcome:
        """Plan, apply, verify; raises `BackendError` with the reason (after a rollback when one is due)."""
        channel = self._channel
        running = channel.running(worker)
        if running is None or running.placement is None:
            raise BackendError(f"worker {worker}: its probe has not reported the placement it runs yet")
        current = running.placement
        counts, covered = channel.token_window(worker, settings.window_s)
        tokens = _table(counts, current, worker)
        now = self._monotonic()
        before_loads = [m for m in channel.loads_since(worker, now - settings.window_s) if m.tokens > 0]
        measured_before = measured_balancedness(before_loads)
        throughput_before = throughput(before_loads)
        planner = PlannerSettings(max_copies=settings.max_copies)
        try:
            plan = await asyncio.to_thread(plan_rebalance, tokens, current, planner)
        except (PlanRefused, PlacementError) as exc:
            raise BackendError(f"worker {worker}: no rebalance plan: {exc}") from None
        self._write_plan(worker, plan, measured_before)
        if not plan.changed:
            raise BackendError(
                f"worker {worker}: the planner finds no better placement for the last {covered:.0f}s of routing "
                f"({plan.describe()}); the imbalance is not one replicas can fix"
            )
        log.warning("worker %s: rebalancing experts: %s", worker, plan.describe())
        version = channel.next_version(worker)
        interval = self._interval_of(worker)
        ack_timeout = settings.apply_timeout_s + 3 * interval + 2.0
        sent = self._monotonic()
        try:
            answer = await channel.set_placement(
                worker, plan.placement, version=version, timeout_s=settings.apply_timeout_s, ack_timeout_s=ack_timeout
            )
        except PlacementRejected:
            raise  # the old placement never stopped running: nothing to roll back
        except BackendError as exc:
            await self._roll_back(worker, current, settings, ack_timeout)
            raise BackendError(f"{exc}; rolled back to the previous placement") from None
        acked = self._monotonic()
        apply_seconds = answer.seconds if answer.seconds is not None else acked - sent
        self._store.add("sentinel_moe_rebalance_apply_seconds", apply_seconds, {"worker": worker})
        ok, measured_after, throughput_after, why = await self._verify(
            worker, version, acked, settings, throughput_before
        )
        self._store.add(
            "sentinel_moe_rebalance_balancedness",
            measured_after if measured_after is not None else float("nan"),
            {"worker": worker, "stage": "after"},
        )
        outcome = RebalanceOutcome(
            version=version,
            copies=len(plan.copies),
            copy_bytes=answer.copy_bytes if answer.copy_bytes is not None else plan.copy_bytes,
            predicted_before=plan.balancedness_before,
            predicted_after=plan.balancedness_after,
            measured_before=measured_before,
            measured_after=measured_after,
            throughput_before=throughput_before,
            throughput_after=throughput_after,
            apply_seconds=apply_seconds,
        )
        if not ok:
            await self._roll_back(worker, current, settings, ack_timeout)
            raise BackendError(f"worker {worker}: {why} ({outcome.describe()}); rolled back to the previous placement")
        log.warning("worker %s: experts rebalanced: %s", worker, outcome.describe())
        return outcome

    async def _verify(
        self, worker: str, version: int, since: float, settings: RebalanceSettings, before: float | None
    ) -> tuple[bool, float | None, float | None, str]:
        """(ok, measured balancedness, routed tokens/s, why not) over the reports since the ack."""
        deadline = since + settings.verify_timeout_s
        measured: float | None = None
        rate: float | None = None
        why = "no report with traffic under the new placement"
        while True:
            loads = [m for m in self._channel.loads_since(worker, since, version) if m.tokens > 0]
            measured, rate = measured_balancedness(loads), throughput(loads)
            if len(loads) >= settings.min_reports and measured is not None:
                low_rate = before is not None and rate is not None and rate < settings.min_throughput_ratio * before
                if measured >= settings.threshold and not low_rate:
                    return True, measured, rate, ""
                if measured < settings.threshold:
                    why = f"measured balancedness {measured:.3f} below {settings.threshold:g}"
                else:
                    why = (
                        f"routed tokens/s fell from {before:.0f} to {rate:.0f} "
                        f"(below {settings.min_throughput_ratio:g}x)"
                    )
            elif loads:
                why = f"only {len(loads)} report(s) with traffic under the new placement"
            if self._monotonic() >= deadline:
                return False, measured, rate, f"not balanced within {settings.verify_timeout_s:g}s: {why}"
            await asyncio.sleep(_VERIFY_POLL_S)

    async def _roll_back(self, worker: str, previous: Placement, settings: RebalanceSettings, ack: float) -> None:
        version = self._channel.next_version(worker)
        log.warning("worker %s: rolling the expert placement back (as version %d)", worker, version)
        try:
            await self._channel.set_placement(
                worker, previous, version=version, timeout_s=settings.apply_timeout_s, ack_timeout_s=ack
            )
        except BackendError as exc:
            log.error("worker %s: rolling the expert placement back failed: %s", worker, exc)

    def _write_plan(self, worker: str, plan: PlacementPlan, measured_before: float | None) -> None:
        store, labels = self._store, {"worker": worker}
        nan = float("nan")
        store.add(
            "sentinel_moe_rebalance_balancedness",
            measured_before if measured_before is not None else nan,
            {**labels, "stage": "before"},
        )
        predicted = plan.balancedness_after
        store.add(
            "sentinel_moe_rebalance_balancedness",
            predicted if predicted is not None else nan,
            {**labels, "stage": "predicted"},
        )
        for layer in plan.layers:
            if layer.balancedness_after is not None:
                store.add(
                    "sentinel_moe_predicted_balancedness",
                    layer.balancedness_after,
                    {**labels, "layer": str(layer.layer)},
                )
        store.add("sentinel_moe_rebalance_copies", float(len(plan.copies)), labels)
        store.add("sentinel_moe_rebalance_copy_bytes", float(plan.copy_bytes), labels)


def _table(counts: dict[int, list[int]], current: Placement, worker: str) -> list[list[float]]:
    """The window's counts as `tokens[layer][expert]` in the placement's layer order."""
    layers = sorted(counts)
    if not layers:
        raise BackendError(f"worker {worker}: no routed tokens in the window to plan from")
    if len(layers) != current.num_layers:
        raise BackendError(
            f"worker {worker}: counts for {len(layers)} MoE layers, but its placement has {current.num_layers}"
        )
    table: list[list[float]] = []
    for layer in layers:
        row = counts[layer]
        if len(row) != current.num_experts:
            raise BackendError(
                f"worker {worker}: layer {layer} reports {len(row)} experts, its placement {current.num_experts}"
            )
        table.append([float(n) for n in row])
    return table


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
