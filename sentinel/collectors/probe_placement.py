"""The daemon's half of the placement control channel: token windows, placements sent and acknowledged.

`ProbeRegistry` feeds every validated report to `PlacementControl.on_report` and
merges `reply(worker)` into its answer. Per worker it keeps:

- a rolling window of routed tokens per (layer, expert), summed in 5-second buckets
  from the reports' `expert_tokens` (at most `WINDOW_MAX_S`; never series: 128 experts
  x 48 layers would be 6,144 series per worker): the planner's input;
- a short history of each report's measured load per layer (tokens, balancedness) and
  the placement version it ran, from which verification computes the *measured*
  balancedness after a rebalance (sum of per-layer mean loads over the sum of per-layer
  maxima; a layer's mean over max is its balancedness, so the max is tokens / (GPUs x
  balancedness));
- the placement the worker runs (version, digest, and the layers, which the probe sends
  when they change; `want_placement` in the reply asks for them when unknown);
- the placement Sentinel wants it to run. The reply carries it until a report
  answers: inline when its JSON is under `INLINE_PLACEMENT_BYTES` (the probe reads at
  most 64 KiB of reply), else as an `href` the probe GETs
  (`GET /api/v1/probe/placement?worker=...&version=...`, same transport and token).

`set_placement` resolves when a report shows the version and digest running, raises
`PlacementRejected` when the worker answers `refused` or `timed_out`, and
`BackendError` when no report acknowledges it in time or the probe goes away. A new
`probe_id` (the worker restarted, back to its default placement) drops everything
about the old process. See docs/expert-balancing.md, "Protocol".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sentinel.collectors.probe_schema import PlacementAnswer, ProbeReport
from sentinel.moe import Placement, PlacementError
from sentinel.remediation.backend import BackendError
from sentinel.runtime.timeouts import wait_for

__all__ = [
    "INLINE_PLACEMENT_BYTES",
    "PLACEMENT_PATH",
    "WINDOW_MAX_S",
    "MeasuredLoad",
    "PlacementControl",
    "PlacementRejected",
    "RunningPlacement",
    "measured_balancedness",
]

log = logging.getLogger(__name__)

PLACEMENT_PATH = "/api/v1/probe/placement"
INLINE_PLACEMENT_BYTES = 48 * 1024
WINDOW_MAX_S = 900.0
_BUCKET_S = 5.0
_HISTORY = 2048


class PlacementRejected(BackendError):
    """The worker answered a placement with `refused` or `timed_out`; `answer` has its reason."""

    def __init__(self, worker: str, answer: PlacementAnswer) -> None:
        verb = "refused" if answer.status == "refused" else "did not apply (timed out)"
        super().__init__(f"worker {worker} {verb} placement version {answer.requested_version}: {answer.reason}")
        self.answer = answer


@dataclass(frozen=True)
class RunningPlacement:
    """What a worker's probe last said it runs."""

    version: int
    digest: str
    placement: Placement | None  # None until the probe sent the layers of this version
    step: int | None = None


@dataclass(frozen=True)
class MeasuredLoad:
    """One report's measured load: per layer (tokens, balancedness), and the placement version it ran."""

    at: float  # monotonic
    interval_s: float
    version: int | None
    layers: tuple[tuple[int, float | None], ...]

    @property
    def tokens(self) -> int:
        return sum(tokens for tokens, _ in self.layers)


def measured_balancedness(loads: Sequence[MeasuredLoad]) -> float | None:
    """Balancedness over several reports and layers: sum of mean loads over sum of maxima (None: no traffic)."""
    total, peaks = 0.0, 0.0
    for load in loads:
        for tokens, balancedness in load.layers:
            if tokens > 0 and balancedness is not None and balancedness > 0:
                total += tokens
                peaks += tokens / balancedness
    return total / peaks if peaks > 0 else None


@dataclass
class _Desired:
    version: int
    digest: str
    timeout_s: float
    message: dict[str, Any]  # {"version", "timeout_s", "placement"}
    inline: bool
    answered: bool = False
    waiters: list[asyncio.Future[PlacementAnswer]] = field(default_factory=list)


@dataclass
class _Worker:
    probe_id: str
    running: RunningPlacement | None = None
    buckets: deque[tuple[float, dict[int, list[int]]]] = field(default_factory=deque)
    history: deque[MeasuredLoad] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    desired: _Desired | None = None
    last_answer: PlacementAnswer | None = None


class PlacementControl:
    """Per-worker placement state for `ProbeRegistry` (module doc)."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._workers: dict[str, _Worker] = {}

    # -- reports -----------------------------------------------------------------------

    def on_report(self, report: ProbeReport) -> None:
        """Take one interval report: window, history, running placement, acknowledgements."""
        if report.kind != "interval":
            return
        state = self._workers.get(report.worker)
        if state is None or state.probe_id != report.probe_id:
            if state is not None:
                self._fail(state, f"worker {report.worker} restarted (new probe); its placement is back to default")
            state = self._workers[report.worker] = _Worker(report.probe_id)
        now = self._monotonic()
        self._add_tokens(state, now, report)
        placement = report.placement
        state.history.append(
            MeasuredLoad(
                now,
                report.interval_s,
                placement.version if placement is not None else None,
                tuple((layer.tokens, layer.balancedness) for layer in report.layers),
            )
        )
        if placement is None:
            return
        layers: Placement | None = None
        if placement.layers is not None and placement.num_experts is not None:
            try:
                layers = Placement.from_json(
                    {"num_experts": placement.num_experts, "layers": [list(map(list, lay)) for lay in placement.layers]}
                )
            except PlacementError as exc:
                log.warning("worker %s reported a placement Sentinel cannot read: %s", report.worker, exc)
        previous = state.running
        if layers is None and previous is not None and previous.version == placement.version:
            layers = previous.placement
        state.running = RunningPlacement(placement.version, placement.digest, layers, placement.step)
        if placement.last is not None:
            state.last_answer = placement.last
        self._acknowledge(report.worker, state)

    def _add_tokens(self, state: _Worker, now: float, report: ProbeReport) -> None:
        counts = {layer.layer: list(layer.expert_tokens) for layer in report.layers if layer.expert_tokens}
        if not counts:
            return
        if state.buckets and now - state.buckets[-1][0] < _BUCKET_S:
            bucket = state.buckets[-1][1]
            for layer, row in counts.items():
                have = bucket.get(layer)
                if have is None or len(have) != len(row):
                    bucket[layer] = row
                else:
                    bucket[layer] = [a + b for a, b in zip(have, row, strict=True)]
        else:
            state.buckets.append((now, counts))
        while state.buckets and now - state.buckets[0][0] > WINDOW_MAX_S:
            state.buckets.popleft()

    def _acknowledge(self, worker: str, state: _Worker) -> None:
        desired, running, answer = state.desired, state.running, state.last_answer
        if desired is None or desired.answered or running is None:
            return
        if running.version == desired.version and running.digest == desired.digest:
            result = (
                answer
                if answer is not None and answer.requested_version == desired.version
                else PlacementAnswer(requested_version=desired.version, status="applied", version=running.version)
            )
            desired.answered = True
            log.info("worker %s acknowledged placement version %d", worker, desired.version)
            for waiter in desired.waiters:
                if not waiter.done():
                    waiter.set_result(result)
        elif answer is not None and answer.requested_version == desired.version and answer.status != "applied":
            desired.answered = True
            for waiter in desired.waiters:
                if not waiter.done():
                    waiter.set_exception(PlacementRejected(worker, answer))
        elif running.version >= desired.version:
            # A newer placement runs (another controller?) or this version runs with another digest.
            desired.answered = True
            error = BackendError(
                f"worker {worker} runs placement version {running.version} ({running.digest}), "
                f"not version {desired.version} ({desired.digest})"
            )
            for waiter in desired.waiters:
                if not waiter.done():
                    waiter.set_exception(error)

    def reply(self, worker: str) -> dict[str, Any]:
        """What the answer to this worker's report adds: the wanted placement, a request for the layers."""
        state = self._workers.get(worker)
        if state is None:
            return {}
        out: dict[str, Any] = {}
        running = state.running
        if running is not None and running.placement is None:
            out["want_placement"] = True
        desired = state.desired
        if desired is not None and not desired.answered:
            if desired.inline:
                out["placement"] = desired.message
            else:
                out["placement"] = {
                    "version": desired.version,
                    "timeout_s": desired.timeout_s,
                    "href": f"{PLACEMENT_PATH}?worker={worker}&version={desired.version}",
                }
        return out

    # -- what the rebalancer asks --------------------------------------------------------

    def running(self, worker: str) -> RunningPlacement | None:
        state = self._workers.get(worker)
        return state.running if state is not None else None

    def token_window(self, worker: str, seconds: float) -> tuple[dict[int, list[int]], float]:
        """Routed tokens per (layer, expert) over about the last `seconds`, and the seconds covered."""
        state = self._workers.get(worker)
        if state is None or not state.buckets:
            return {}, 0.0
        now = self._monotonic()
        out: dict[int, list[int]] = {}
        oldest = now
        for start, bucket in state.buckets:
            if now - start > seconds:
                continue
            oldest = min(oldest, start)
            for layer, row in bucket.items():
                have = out.get(layer)
                out[layer] = (
                    list(row)
                    if have is None or len(have) != len(row)
                    else [a + b for a, b in zip(have, row, strict=True)]
                )
        return out, max(0.0, now - oldest)

    def loads_since(self, worker: str, since: float, version: int | None = None) -> list[MeasuredLoad]:
        """Reports received after `since` (monotonic), only those running `version` when given."""
        state = self._workers.get(worker)
        if state is None:
            return []
        return [m for m in state.history if m.at > since and (version is None or m.version == version)]

    def message(self, worker: str, version: int) -> dict[str, Any] | None:
        """The placement message of `version` while it is wanted (the GET route)."""
        state = self._workers.get(worker)
        desired = state.desired if state is not None else None
        return desired.message if desired is not None and desired.version == version else None

    def next_version(self, worker: str) -> int:
        state = self._workers.get(worker)
        if state is None:
            return 1
        running = state.running.version if state.running is not None else 0
        wanted = state.desired.version if state.desired is not None else 0
        return max(running, wanted) + 1

    async def set_placement(
        self, worker: str, placement: Placement, *, version: int, timeout_s: float, ack_timeout_s: float
    ) -> PlacementAnswer:
        """Send `placement` as `version` until a report answers; see the module doc for the outcomes."""
        state = self._workers.get(worker)
        if state is None or state.running is None:
            raise BackendError(f"worker {worker}: its probe does not report a placement")
        if state.desired is not None and not state.desired.answered:
            self._fail(state, f"superseded by placement version {version}")
        message = {"version": version, "timeout_s": timeout_s, "placement": placement.to_json()}
        size = len(json.dumps(message, separators=(",", ":")))
        desired = _Desired(version, placement.digest(), timeout_s, message, inline=size < INLINE_PLACEMENT_BYTES)
        waiter: asyncio.Future[PlacementAnswer] = asyncio.get_running_loop().create_future()
        desired.waiters.append(waiter)
        state.desired = desired
        try:
            return await wait_for(asyncio.shield(waiter), ack_timeout_s)
        except asyncio.TimeoutError:
            desired.answered = True  # stop sending it; a later version replaces it
            raise BackendError(
                f"worker {worker}: no acknowledgement of placement version {version} within {ack_timeout_s:.1f}s"
            ) from None

    # -- the end of a probe ---------------------------------------------------------------

    def probe_down(self, worker: str) -> None:
        """The probe stopped reporting: nothing it was sent will be acknowledged."""
        state = self._workers.get(worker)
        if state is not None:
            self._fail(state, f"worker {worker}: the probe stopped reporting")

    def close(self, why: str) -> None:
        for state in self._workers.values():
            self._fail(state, why)

    def _fail(self, state: _Worker, why: str) -> None:
        desired = state.desired
        if desired is None:
            return
        desired.answered = True
        for waiter in desired.waiters:
            if not waiter.done():
                waiter.set_exception(BackendError(why))

    def status(self, worker: str) -> Mapping[str, Any] | None:
        """For the probe status: the placement version running and wanted."""
        state = self._workers.get(worker)
        if state is None or state.running is None:
            return None
        desired = state.desired
        return {
            "version": state.running.version,
            "digest": state.running.digest,
            "desired_version": desired.version if desired is not None and not desired.answered else None,
        }
