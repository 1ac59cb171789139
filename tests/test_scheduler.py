"""The one scheduler: monotonic ticks, missed ticks counted, a guard per run, early wake-up, dynamic delays."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable

import pytest

from sentinel.runtime.scheduler import Scheduler


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_a_job_runs_at_once_then_on_its_interval() -> None:
    scheduler = Scheduler()
    runs: list[float] = []

    async def run() -> None:
        runs.append(asyncio.get_running_loop().time())

    try:
        scheduler.add("j", run, 0.05)
        await until(lambda: len(runs) >= 4)
    finally:
        await scheduler.stop()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(g > 0.03 for g in gaps)  # no burst


async def test_an_overrunning_run_skips_and_counts_its_missed_ticks_instead_of_bursting() -> None:
    scheduler = Scheduler()
    starts: list[float] = []
    missed: list[int] = []

    async def slow() -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) == 1:
            await asyncio.sleep(0.35)  # overruns about three ticks of 0.1 s

    try:
        job = scheduler.add("slow", slow, 0.1, on_missed=missed.append)
        await until(lambda: len(starts) >= 3)
    finally:
        await scheduler.stop()
    assert job.missed_ticks_total == sum(missed) >= 2
    # The run after the overrun waits for the next tick of the grid: no catch-up burst.
    assert starts[2] - starts[1] > 0.05


async def test_a_run_that_raises_is_counted_logged_once_and_the_next_tick_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = Scheduler()
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("disk on fire")

    try:
        job = scheduler.add("broken", broken, 0.02)
        await until(lambda: calls >= 5)
    finally:
        await scheduler.stop()
    assert job.errors_total >= 5 and job.last_error == "RuntimeError: disk on fire"
    assert caplog.text.count("job broken failed") == 1


async def test_wake_runs_early_at_most_once_per_min_gap_and_keeps_the_grid() -> None:
    scheduler = Scheduler()
    runs: list[float] = []

    async def run() -> None:
        runs.append(asyncio.get_running_loop().time())

    try:
        job = scheduler.add("rules", run, 60.0, min_gap=0.2)
        await until(lambda: len(runs) == 1)  # the first run, at once
        for _ in range(20):  # a burst of events
            job.wake()
            await asyncio.sleep(0.01)
        await until(lambda: len(runs) >= 2)
        await asyncio.sleep(0.4)
    finally:
        await scheduler.stop()
    assert len(runs) <= 5  # twenty wake-ups over about 0.25 s became a few runs
    assert job.early_runs_total == len(runs) - 1
    early = runs[1:]
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(early))  # at most one per min_gap
    assert job.missed_ticks_total == 0


async def test_a_returned_delay_sets_the_next_run_and_inf_waits_for_a_wake_up() -> None:
    scheduler = Scheduler()
    runs = 0

    async def run() -> float:
        nonlocal runs
        runs += 1
        return math.inf

    try:
        job = scheduler.add("delivery", run, 0.01)
        await until(lambda: runs == 1)
        await asyncio.sleep(0.1)
        assert runs == 1  # nothing queued: asleep until woken
        job.wake()
        await until(lambda: runs == 2)
    finally:
        await scheduler.stop()


async def test_ticks_ignore_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scheduler never asks the wall clock: stepping it back an hour changes nothing.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    scheduler = Scheduler()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1

    try:
        scheduler.add("collector", run, 0.02)
        await until(lambda: runs >= 5, timeout=5)
    finally:
        await scheduler.stop()


async def test_names_are_unique_and_remove_cancels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    scheduler = Scheduler()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def long() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scheduler.add("x", long, 1.0)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add("x", long, 1.0)
    await started.wait()
    job = scheduler.remove("x")
    assert job is not None and scheduler.get("x") is None
    await asyncio.wait_for(cancelled.wait(), 5)
    await scheduler.stop()


async def test_a_job_that_keeps_overrunning_logs_once_not_per_skipped_tick(caplog: pytest.LogCaptureFixture) -> None:
    # APScheduler logged a warning for every skipped tick of a slow collector (issue 15, low).
    caplog.set_level(logging.DEBUG)
    scheduler = Scheduler()
    runs = 0

    async def slow() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.12)  # always longer than its 0.05 s interval

    try:
        job = scheduler.add("slow", slow, 0.05)
        await until(lambda: runs >= 6)
    finally:
        await scheduler.stop()
    assert job.missed_ticks_total >= 5
    assert caplog.text.count("job slow skipped") == 1
