"""The runtime's costs: Sentinel's wall clock per reading, and the scheduler per tick.

- `now_ms()` reads `SteadyWallClock` (a lock, CLOCK_BOOTTIME and the system clock),
  against `int(time.time() * 1000)`, what it replaced, measured in the same run;
- the scheduler: 200 jobs at 20 Hz for a few seconds, CPU per run, against 200 bare
  `while True: await asyncio.sleep(...)` loops (what rule groups and the remediation
  tick used before), measured in the same run.

`--json` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import timeit
from collections.abc import Callable

from sentinel.runtime.clock import now_ms
from sentinel.runtime.scheduler import Scheduler

JOBS = 200
INTERVAL_S = 0.05


def per_call_ns(fn: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e9


def system_ms() -> int:
    return int(time.time() * 1000)


async def scheduled(seconds: float) -> tuple[float, int]:
    scheduler = Scheduler()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1

    for i in range(JOBS):
        scheduler.add(f"job{i}", run, INTERVAL_S)
    c0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - c0
    await scheduler.stop()
    return cpu, runs


async def bare_loops(seconds: float) -> tuple[float, int]:
    runs = 0

    async def loop() -> None:
        nonlocal runs
        while True:
            runs += 1
            await asyncio.sleep(INTERVAL_S)

    tasks = [asyncio.get_running_loop().create_task(loop()) for _ in range(JOBS)]
    c0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - c0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cpu, runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clock_ns = per_call_ns(now_ms, 200_000)
    time_ns = per_call_ns(system_ms, 200_000)
    sched_cpu, sched_runs = asyncio.run(scheduled(args.seconds))
    bare_cpu, bare_runs = asyncio.run(bare_loops(args.seconds))
    sched_us = sched_cpu / max(sched_runs, 1) * 1e6
    bare_us = bare_cpu / max(bare_runs, 1) * 1e6
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "now_ms_ns": round(clock_ns, 1),
        "time_time_ns": round(time_ns, 1),
        "now_ms_ratio": round(clock_ns / time_ns, 2),
        "scheduler_us_per_run": round(sched_us, 2),
        "bare_loop_us_per_run": round(bare_us, 2),
        "scheduler_ratio": round(sched_us / bare_us, 2),
        "scheduler_runs": sched_runs,
        "bare_runs": bare_runs,
    }
    print(f"machine: {result['machine']}")
    print(
        f"now_ms(): {clock_ns:.0f} ns per reading; int(time.time() * 1000): {time_ns:.0f} ns; "
        f"ratio {clock_ns / time_ns:.2f}"
    )
    print(
        f"scheduler: {sched_us:.1f} us CPU per run ({sched_runs} runs of {JOBS} jobs at {1 / INTERVAL_S:g} Hz); "
        f"bare sleep loops: {bare_us:.1f} us ({bare_runs} runs); ratio {sched_us / bare_us:.2f}"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
