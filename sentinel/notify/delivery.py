"""The delivery loop of one receiver: take due rows from the outbox, send, delete or back off.

One scheduler job per receiver (`sentinel.runtime.scheduler`): each run sends at most
one batch and returns when the next run is due (at once after a delivery, the backoff
left, or never until rows are enqueued, which wakes it). A failed try holds the *whole receiver* back (a dead
Slack is dead for every row), for an exponential backoff with full jitter — a random
delay between 0 and min(max_backoff, min_backoff · 2^(failures-1)) — or longer when the
receiver sent Retry-After. Rows are deleted only once the receiver accepted them; a
row the receiver rejects for good (HTTP 400) is dropped and counted so that one bad
payload cannot block the queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from sentinel.notify.metrics import NotifyMetrics
from sentinel.notify.notices import Notice
from sentinel.notify.outbox import Outbox, Row
from sentinel.notify.secrets import Scrubber
from sentinel.notify.settings import OutboxConfig
from sentinel.notify.transport import SendResult
from sentinel.runtime.clock import wall_time
from sentinel.runtime.scheduler import Job, Scheduler

__all__ = ["Deliverer", "Sink", "backoff_delay"]

log = logging.getLogger(__name__)

FETCH_LIMIT = 256
EXPIRE_EVERY_S = 10.0
ERROR_PAUSE_S = 1.0


class Sink(Protocol):
    """A receiver as the delivery loop sees it."""

    @property
    def name(self) -> str:
        """The receiver's name: outbox key and `receiver` label."""
        ...

    @property
    def group_wait(self) -> float:
        """Seconds to wait after a first new row for others to join its message."""
        ...

    @property
    def min_interval(self) -> float:
        """Least seconds between two requests (Slack's one message a second)."""
        ...

    @property
    def coalesce(self) -> bool:
        """Whether a new notice replaces a queued one with the same key."""
        ...

    def accepts(self, notice: Notice) -> bool:
        """Whether this receiver wants the notice at all."""
        ...

    def key(self, notice: Notice) -> str:
        """The dedup key of a notice for this receiver."""
        ...

    def take(self, rows: Sequence[Row]) -> list[Row]:
        """The leading rows that go out together in one request (at least one)."""
        ...

    async def send(self, rows: Sequence[Row]) -> SendResult:
        """One request carrying `rows`."""
        ...


def backoff_delay(failures: int, min_backoff: float, max_backoff: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_backoff, min_backoff · 2^(failures-1))]."""
    ceiling = min(max_backoff, min_backoff * 2.0 ** min(max(failures - 1, 0), 60))
    return rng.uniform(0.0, ceiling)


class Deliverer:
    """Runs the delivery loop of one sink."""

    def __init__(
        self,
        sink: Sink,
        outbox: Outbox,
        metrics: NotifyMetrics,
        config: OutboxConfig,
        scrubber: Scrubber,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = wall_time,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.sink = sink
        self._outbox = outbox
        self._metrics = metrics
        self._config = config
        self._scrubber = scrubber
        self._rng = rng or random.Random()
        self._clock = clock
        self._scheduler = scheduler or Scheduler()
        self._job: Job | None = None
        self.failures = 0  # consecutive failed tries
        self.blocked_until = 0.0
        self.last_error = ""
        self._last_request = float("-inf")
        self._last_expire = float("-inf")

    @property
    def name(self) -> str:
        return self.sink.name

    async def start(self) -> None:
        """Resume the backoff a previous run left in the outbox, then start the loop."""
        attempts, next_attempt = await self._outbox.backoff_state(self.name)
        if attempts:
            self.failures = attempts
            self.blocked_until = min(next_attempt, self._clock() + self._config.max_backoff)
        self._job = self._scheduler.add(f"notify:{self.name}", self._run, ERROR_PAUSE_S)

    def wake(self) -> None:
        """New rows were enqueued."""
        if self._job is not None:
            self._job.wake()

    async def stop(self) -> None:
        """Cancel the loop; a request in flight is abandoned and its rows stay queued."""
        job, self._job = self._job, None
        if job is not None:
            if self._scheduler.get(job.name) is job:
                self._scheduler.remove(job.name)
            await job.stop()

    async def _run(self) -> float:
        try:
            return await self._step()
        except Exception as exc:  # a guard per run, scrubbed: a sick disk must not end delivery for good
            log.error("notify %s: delivery loop error: %s", self.name, self._scrubber.scrub(str(exc)))
            return ERROR_PAUSE_S

    async def _step(self) -> float:
        """Send what is due; returns the seconds until the next run (woken early by enqueues)."""
        now = self._clock()
        await self._expire(now)
        if self._outbox.length(self.name) == 0:
            return math.inf
        ready_at = max(self.blocked_until, self._last_request + self.sink.min_interval)
        if ready_at > now:
            return ready_at - now
        rows = await self._outbox.due(self.name, FETCH_LIMIT)
        if not rows:  # the count ran ahead of the table; never spin on it
            return ERROR_PAUSE_S
        fresh = [r.created for r in rows if r.attempts == 0]
        if self.sink.group_wait > 0 and len(fresh) == len(rows):
            # Let alerts that fire together join one message.
            gather_until = min(fresh) + self.sink.group_wait
            if gather_until > now:
                await asyncio.sleep(gather_until - now)
                rows = await self._outbox.due(self.name, FETCH_LIMIT)
                if not rows:
                    return 0.0
        await self._deliver(self.sink.take(rows))
        return 0.0

    async def _deliver(self, batch: list[Row]) -> None:
        self._last_request = self._clock()
        try:
            result = await self.sink.send(batch)
        except Exception as exc:
            # A payload the sink cannot render fails the same way every time: retrying it
            # would block the queue behind it, so it is dropped like a rejected one.
            log.exception("notify %s: cannot send %d notification(s)", self.name, len(batch))
            result = SendResult(False, error=f"{type(exc).__name__}: {exc}", permanent=True)
        now = self._clock()
        ids = [r.id for r in batch]
        error = self._scrubber.scrub(result.error)
        if result.ok:
            await self._outbox.delete(self.name, ids)
            self._metrics.delivered(self.name, len(batch), now - min(r.created for r in batch))
            if self.failures:
                log.info("notify %s: delivering again after %d failed tries", self.name, self.failures)
            self.failures, self.blocked_until, self.last_error = 0, 0.0, ""
        elif result.permanent:
            await self._outbox.delete(self.name, ids)
            self._metrics.count(self.name, "failed")
            self._metrics.count(self.name, "dropped", len(batch))
            self.last_error = error
            log.error(
                "notify %s: the receiver rejected %d notification(s) for good; dropped them: %s",
                self.name,
                len(batch),
                error,
            )
        else:
            self.failures += 1
            cfg = self._config
            delay = backoff_delay(self.failures, cfg.min_backoff, cfg.max_backoff, self._rng)
            if result.retry_after is not None:
                delay = max(delay, min(result.retry_after, cfg.max_backoff))
            self.blocked_until = now + delay
            self.last_error = error
            await self._outbox.record_failure(ids, self.blocked_until, error)
            self._metrics.count(self.name, "failed")
            # Once when a receiver starts failing, not on every try of a long outage.
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(
                level,
                "notify %s: delivery failed (try %d), retrying in %.1fs: %s",
                self.name,
                self.failures,
                delay,
                error,
            )
        self._metrics.publish()

    async def _expire(self, now: float) -> None:
        if now - self._last_expire < EXPIRE_EVERY_S:
            return
        self._last_expire = now
        expired = await self._outbox.expire(self.name, now - self._config.max_age)
        if expired:
            self._metrics.count(self.name, "expired", expired)
            self._metrics.publish()
            log.warning(
                "notify %s: gave up on %d notification(s) older than %.0fs", self.name, expired, self._config.max_age
            )
