"""WorkerThreads after its threads went idle and exited: work submitted then still runs.

A regression test: the pool counted a thread as idle once per finished call but was
told it was busy again only by `submit`, so after two calls in a row and an idle exit it
believed a thread was waiting when none was, and the next call sat in the queue until
another came (in the daemon: a notification held back until the next one, up to minutes).
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from sentinel.runtime.threads import WorkerThreads


@pytest.mark.parametrize("workers", [1, 2])
def test_work_after_an_idle_exit_runs(workers: int) -> None:
    pool = WorkerThreads("t", workers, idle_exit_s=0.05)
    try:
        for _ in range(3):
            futures = [pool.submit(time.sleep, 0.01) for _ in range(4)]  # calls in a row
            for f in futures:
                f.result(timeout=10)
            deadline = time.monotonic() + 10
            while pool._threads and time.monotonic() < deadline:  # every thread ended, idle
                time.sleep(0.01)
            assert not pool._threads
            try:
                assert pool.submit(lambda: 42).result(timeout=5) == 42
            except FutureTimeout:
                pytest.fail("a call submitted after the threads went idle was never run")
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_busy_and_idle_counts_stay_exact() -> None:
    pool = WorkerThreads("t", 2, idle_exit_s=5)
    try:
        for f in [pool.submit(time.sleep, 0.01) for _ in range(10)]:
            f.result(timeout=10)
        deadline = time.monotonic() + 5
        while pool.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.busy == 0
    finally:
        pool.shutdown(wait=True, timeout=5)
