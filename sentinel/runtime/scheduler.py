"""One way to run periodic work in the daemon: `Scheduler` and its `Job`s.

Everything that runs again and again goes through here: each collector (its own
interval), the store's trim, every rule group (its interval, and at once when an event
touches a metric it reads), the remediation tick, the notifier's re-send tick, each
receiver's delivery loop, and the systemd watchdog ping. Every job gets the same rules:

- **Monotonic time.** Ticks are placed on the event loop's clock (`time.monotonic`): a
  step of the wall clock, back or forward, moves no tick (issue 15, F8).
- **One run at a time.** A run that outlasts its interval does not overlap the next:
  the ticks that came due meanwhile are skipped and counted (`missed_ticks_total`,
  `on_missed`), not run in a burst afterwards. A late loop (blocked by something else)
  is counted the same way. The first miss after on-time runs is logged once.
- **A guard per run.** A run that raises is counted (`errors_total`, `last_error`) and
  logged with its traceback once per new error; the next tick comes as usual.
- **Early wake-up.** `wake()` runs the job soon without moving its regular ticks, at
  most once per `min_gap` (a burst of Xid events evaluates a rule group once).
- **Dynamic delay.** A run may return the seconds until the next one (a receiver in
  backoff, or with nothing to send: `math.inf` until woken); returning None keeps the
  interval's grid.

Why not APScheduler 3, which ran the collectors before: its triggers compute the next
fire time as an aware wall-clock `datetime`, and its asyncio scheduler sleeps for "next
fire time minus `datetime.now()`". Measured with APScheduler 3.11.3 under libfaketime
(`DONT_FAKE_MONOTONIC=1`, so only the wall clock moves, as NTP moves it), an interval
job of 0.2 s on a loaded 2-core machine: stepped back one hour, it ran once in the 20 s
after the step (7 times in the 2 s before); stepped forward one hour, 21 times in 20 s
instead of 100, with a "skipped: maximum number of running instances reached" warning
for each skipped tick. This scheduler ran it 100 times in those 20 s either way. The
other loops (rule groups, delivery, watchdog) also needed early wake-ups and dynamic
delays APScheduler does not offer. See docs/operations.md ("Clocks").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

from sentinel.runtime.timeouts import wait_for

__all__ = ["Job", "JobFn", "Scheduler"]

log = logging.getLogger(__name__)

JobFn = Callable[[], Awaitable[float | None]]
"""One run of a job; returns the seconds until the next run, or None for the next tick."""

MissedFn = Callable[[int], None]


class Job:
    """A periodic piece of work; built by `Scheduler.add`."""

    def __init__(
        self,
        name: str,
        run: JobFn,
        interval: float,
        *,
        first_run_in: float = 0.0,
        min_gap: float = 0.0,
        on_missed: MissedFn | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"job {name}: the interval must be positive, not {interval!r}")
        self.name = name
        self.interval = interval
        self.min_gap = min_gap
        self._run = run
        self._first_run_in = first_run_in
        self._on_missed = on_missed
        self._woken = False  # wake() was called since the last run began
        self._waiter: asyncio.Future[bool] | None = None  # the sleep in progress, resolved by a tick or wake()
        self._task: asyncio.Task[None] | None = None
        self._last_early = -math.inf
        self._late = False  # missing ticks now (logged once per episode)
        self.running = False
        self.early_runs_total = 0
        self.missed_ticks_total = 0
        self.errors_total = 0
        self.last_error: str | None = None

    def wake(self) -> None:
        """Run soon (within `min_gap` of the last early run), keeping the regular ticks."""
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def cancel(self) -> None:
        """Stop the job; a run in progress is cancelled."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self, timeout: float | None = None) -> None:
        """Cancel the job and wait (up to `timeout` seconds) until its run has ended."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await wait_for(task, timeout)

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"job:{self.name}")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._first_run_in
        while True:
            early = await self._wait_until(next_tick)
            if early:
                await self._respect_min_gap(next_tick)
            started = loop.time()
            if started < next_tick:
                self.early_runs_total += 1
                self._last_early = started
            delay = await self._run_once()
            now = loop.time()
            if delay is not None:
                next_tick = now + max(0.0, delay)
                continue
            if next_tick > now:
                continue  # an early run: the regular tick still comes
            due = math.floor((now - next_tick) / self.interval) + 1
            served = 1 if next_tick <= started else 0
            next_tick += due * self.interval
            self._count_missed(due - served)

    async def _wait_until(self, deadline: float) -> bool:
        """Sleep until `deadline` or a wake-up; True when woken before the deadline.

        One future and one timer handle per sleep (no task, unlike `wait_for`): a tick
        costs about what a bare `asyncio.sleep` loop costs (bench/runtime_bench.py).
        """
        loop = asyncio.get_running_loop()
        if self._woken:
            return deadline > loop.time()
        if deadline <= loop.time():
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = None if math.isinf(deadline) else loop.call_at(deadline, _settle, waiter, False)
        self._waiter = waiter
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _respect_min_gap(self, next_tick: float) -> None:
        loop = asyncio.get_running_loop()
        gap = self._last_early + self.min_gap - loop.time()
        if gap > 0:
            await asyncio.sleep(min(gap, max(0.0, next_tick - loop.time())))
        # Wake-ups that came while waiting are served by this run.
        self._woken = False

    async def _run_once(self) -> float | None:
        self._woken = False
        self.running = True
        try:
            delay = await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.errors_total += 1
            if message != self.last_error:
                log.exception("job %s failed (the next tick comes as usual)", self.name)
            else:
                log.debug("job %s failed again: %s", self.name, message)
            self.last_error = message
            return None
        else:
            if self.last_error is not None:
                log.info("job %s runs again after %s", self.name, self.last_error)
                self.last_error = None
            return delay
        finally:
            self.running = False

    def _count_missed(self, missed: int) -> None:
        if missed <= 0:
            self._late = False
            return
        self.missed_ticks_total += missed
        if not self._late:
            self._late = True
            log.info(
                "job %s skipped %d tick(s) of %gs: its run or the event loop was late (counted, not logged again "
                "until it keeps time)",
                self.name,
                missed,
                self.interval,
            )
        if self._on_missed is not None:
            try:
                self._on_missed(missed)
            except Exception:
                log.exception("job %s: the missed-tick callback failed", self.name)


def _settle(waiter: asyncio.Future[bool], woken: bool) -> None:
    if not waiter.done():
        waiter.set_result(woken)


class Scheduler:
    """The daemon's periodic jobs, by name (see the module doc)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def add(
        self,
        name: str,
        run: JobFn,
        interval: float,
        *,
        first_run_in: float = 0.0,
        min_gap: float = 0.0,
        on_missed: MissedFn | None = None,
    ) -> Job:
        """Start a job on the running loop; its first run comes after `first_run_in` seconds."""
        if name in self._jobs and self._jobs[name].active:
            raise ValueError(f"a job named {name!r} is already scheduled")
        job = Job(name, run, interval, first_run_in=first_run_in, min_gap=min_gap, on_missed=on_missed)
        job._start()
        self._jobs[name] = job
        return job

    def remove(self, name: str) -> Job | None:
        """Cancel and forget a job (None when there is none by that name)."""
        job = self._jobs.pop(name, None)
        if job is not None:
            job.cancel()
        return job

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name)

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    async def stop(self, timeout: float | None = None) -> None:
        """Cancel every job and wait (up to `timeout` seconds in all) for their runs to end."""
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.cancel()
        if jobs:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(asyncio.gather(*(job.stop() for job in jobs)), timeout)
