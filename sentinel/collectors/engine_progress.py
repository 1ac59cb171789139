"""What a worker's scraped engine counters say about its health beyond `/health`.

vLLM answers `/health` with 200 while an NCCL hang wedges every request, so a stall
has to be read from the engine's own counters: requests are running, yet neither the
generated-token counter nor the engine-step counter moves between two scrapes.
`ProgressTracker` turns successive scrapes into that verdict; `BalancednessTracker`
turns SGLang's cumulative `sglang:eplb_balancedness` summary into a recent value.
Both are pure state machines over (scrape, time), so they are tested without HTTP.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sentinel.collectors.promtext import ParsedMetrics

__all__ = [
    "BALANCEDNESS",
    "BALANCEDNESS_WINDOW_S",
    "PROGRESS_WATCH",
    "RUNNING_METRICS",
    "STEP_METRICS",
    "TOKEN_METRICS",
    "BalancednessTracker",
    "EngineSnapshot",
    "ProgressState",
    "ProgressTracker",
]

RUNNING_METRICS = ("vllm:num_requests_running", "sglang:num_running_reqs")
TOKEN_METRICS = ("vllm:generation_tokens_total", "sglang:generation_tokens_total")
# vLLM observes `iteration_tokens_total` once per engine step, so its `_count` is a
# heartbeat that also moves during long prefills, when no output token is produced.
STEP_METRICS = ("vllm:iteration_tokens_total_count",)

BALANCEDNESS = "sglang:eplb_balancedness"
BALANCEDNESS_WINDOW_S = 60.0

PROGRESS_WATCH = (
    *RUNNING_METRICS,
    *TOKEN_METRICS,
    *STEP_METRICS,
    f"{BALANCEDNESS}_sum",
    f"{BALANCEDNESS}_count",
)
"""Metric names whose samples the parser adds up for these trackers."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine counters of one scrape, each summed over all its label sets (None: absent)."""

    running: float | None
    tokens: float | None
    steps: float | None

    @classmethod
    def from_parsed(cls, parsed: ParsedMetrics) -> EngineSnapshot:
        return cls(_total(parsed, RUNNING_METRICS), _total(parsed, TOKEN_METRICS), _total(parsed, STEP_METRICS))

    @property
    def has_progress_counters(self) -> bool:
        return self.tokens is not None or self.steps is not None

    @property
    def busy(self) -> bool:
        return self.running is not None and self.running > 0


@dataclass(frozen=True)
class ProgressState:
    """The verdict after one scrape; see `ProgressTracker` for the meaning of each field."""

    progress_total: int
    stalled: bool
    last_progress_s: float


class ProgressTracker:
    """Decides from successive successful scrapes whether the engine is moving.

    - *advanced*: the token or step counter grew since the previous successful scrape
      (a counter that went down means the engine restarted: counted as advanced, since
      a restart is not a stall, and the new value becomes the baseline);
    - `progress_total`: scrapes that advanced (a counter for `increase()`);
    - `stalled`: requests were running at both scrapes and nothing advanced;
    - `last_progress_s`: the last time the engine advanced *or had nothing to do* (no
      running requests), so `time() - last_progress > 30 and requests_running > 0` reads
      "requests have waited 30 s on an engine that does not move", not "it was idle".
      The first scrape sets it: Sentinel has no evidence of a stall before it looked.

    Scrapes without any progress counter (a generic engine) are not judged: `observe`
    returns None and the tracker keeps its state. Sums over data-parallel engines mean
    one wedged engine among several busy ones is not seen; an NCCL hang in expert
    parallelism stops them all.

    An active canary (`sentinel.collectors.canary`) makes an idle engine judgeable: from
    `canary_started` until the canary succeeds or the counters advance, an idle scrape
    no longer counts as progress; a canary that timed out marks the engine stalled and
    pulls `last_progress_s` back to the moment it was sent. `last_advanced_s` is the
    last time the counters really moved (the canary's notion of "organic progress").
    """

    def __init__(self) -> None:
        self._previous: EngineSnapshot | None = None
        self.progress_total = 0
        self.last_progress_s: float | None = None
        self.last_advanced_s: float | None = None
        self._canary_pending_s: float | None = None  # a canary was sent then and has not succeeded
        self._canary_timed_out = False

    def canary_started(self, started_s: float) -> None:
        """A canary was sent at `started_s`: idle scrapes stop counting as progress until it answers."""
        if self._canary_pending_s is None:
            self._canary_pending_s = started_s

    def canary_finished(self, outcome: str, started_s: float, finished_s: float) -> None:
        """How the canary sent at `started_s` ended: "ok", "timeout" or "error"."""
        if outcome == "ok":
            self._clear_canary()
            self.last_progress_s = max(self.last_progress_s or finished_s, finished_s)
        elif outcome == "timeout":
            pending = self._canary_pending_s if self._canary_pending_s is not None else started_s
            self._canary_pending_s = pending
            self._canary_timed_out = True
            self.last_progress_s = pending if self.last_progress_s is None else min(self.last_progress_s, pending)
        else:  # the endpoint refused or errored: another rule's business, not a stall
            self._clear_canary()

    @property
    def canary_stalled(self) -> bool:
        """A canary timed out and nothing has moved since."""
        return self._canary_timed_out

    def _clear_canary(self) -> None:
        self._canary_pending_s = None
        self._canary_timed_out = False

    def observe(self, snapshot: EngineSnapshot, now_s: float) -> ProgressState | None:
        """Fold in one successful scrape; None when it carries no progress counter."""
        if not snapshot.has_progress_counters:
            return None
        previous = self._previous
        self._previous = snapshot
        if previous is None or self.last_progress_s is None:
            self.last_progress_s = self.last_advanced_s = now_s
            return ProgressState(self.progress_total, False, now_s)
        advanced = _advanced(previous, snapshot)
        if advanced:
            self.progress_total += 1
            self.last_advanced_s = now_s
            self._clear_canary()
        stalled = (previous.busy and snapshot.busy and not advanced) or self._canary_timed_out
        if advanced or (not snapshot.busy and self._canary_pending_s is None):
            self.last_progress_s = now_s
        return ProgressState(self.progress_total, stalled, self.last_progress_s)


def _advanced(before: EngineSnapshot, after: EngineSnapshot) -> bool:
    compared = False
    for old, new in ((before.tokens, after.tokens), (before.steps, after.steps)):
        if old is None or new is None:
            continue
        compared = True
        if new != old:  # up is progress; down is a restarted engine, not a stall
            return True
    # A counter that appeared or vanished between scrapes (engine restarted with other
    # flags) gives nothing to compare: no evidence of a stall.
    return not compared


class BalancednessTracker:
    """A recent value of SGLang's expert-parallel balancedness (1.0 = perfectly balanced).

    Newer SGLang exports `sglang:eplb_balancedness` as a prometheus-client Summary: only
    `_sum` and `_count`, cumulative over the server's life, one series per forward mode.
    The value reported is the mean over the forward passes of the last
    `BALANCEDNESS_WINDOW_S` seconds, all forward modes together, i.e. `increase(_sum) /
    increase(_count)` over the window. Until the window has filled, the lifetime mean
    stands in; once it has, a window without a single pass gives no value (nothing was
    measured). A plain gauge (older builds) is averaged over its series; a summary with
    quantiles but no `_sum`/`_count` (another client library) gives its 0.5 quantile.
    """

    def __init__(self, window_s: float = BALANCEDNESS_WINDOW_S) -> None:
        self._window_s = window_s
        self._history: deque[tuple[float, float, float]] = deque()  # (time, sum, count)
        self._first_seen_s: float | None = None

    def observe(self, parsed: ParsedMetrics, now_s: float) -> float | None:
        """The value for this scrape, or None when the scrape carries no measurement."""
        total_sum = parsed.sums.get(f"{BALANCEDNESS}_sum")
        total_count = parsed.sums.get(f"{BALANCEDNESS}_count")
        if total_sum is not None and total_count is not None:
            return self._windowed(total_sum, total_count, now_s)
        self._history.clear()
        self._first_seen_s = None
        if BALANCEDNESS not in parsed.names:
            return None
        plain: list[float] = []
        median: list[float] = []
        for labels, value in parsed.by_name(BALANCEDNESS):
            if value != value:
                continue
            quantile = dict(labels).get("quantile")
            if quantile is None:
                plain.append(value)
            elif _is_median(quantile):
                median.append(value)
        chosen = plain or median
        return sum(chosen) / len(chosen) if chosen else None

    def _windowed(self, total_sum: float, total_count: float, now_s: float) -> float | None:
        history = self._history
        if history and total_count < history[-1][2]:
            history.clear()  # the engine restarted: its summary started again from zero
            self._first_seen_s = None
        if self._first_seen_s is None:
            self._first_seen_s = now_s
        history.append((now_s, total_sum, total_count))
        # Keep the newest sample at least as old as the window, as the window's base.
        while len(history) > 1 and history[1][0] <= now_s - self._window_s:
            history.popleft()
        _, base_sum, base_count = history[0]
        if total_count > base_count:
            return (total_sum - base_sum) / (total_count - base_count)
        if now_s - self._first_seen_s < self._window_s and total_count > 0:
            return total_sum / total_count
        return None


def _is_median(quantile: str) -> bool:
    try:
        return float(quantile) == 0.5
    except ValueError:  # a label value from the wire: anything may be there
        return False


def _total(parsed: ParsedMetrics, names: tuple[str, ...]) -> float | None:
    found = [parsed.sums[name] for name in names if name in parsed.sums]
    return sum(found) if found else None
