"""Runs API queries on a bounded thread pool of their own, each under a `QueryBudget`.

Queries are the one input an unauthenticated client can make arbitrarily expensive.
Run on asyncio's default executor, six slow ones used to occupy every thread the
collectors, rule reloads and command backends also need. So queries get their own
pool (`max_concurrency` threads; more callers wait their turn, up to their deadline),
every query a deadline (`timeout`) and a sample limit (`max_samples`), and a query
whose client disconnects, or that is running when Sentinel stops, is cancelled: the
evaluator sees the cancelled budget at its next step and ends.

Work done in the pool includes formatting the JSON answer (large results must not
stall the event loop), so `run` takes any function of the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from sentinel.promql.budget import CANCELLED, QueryBudget
from sentinel.promql.model import PromQLError
from sentinel.runtime.timeouts import wait_for

__all__ = ["QUEUE_TIMED_OUT", "QueryLimits", "QueryRunner"]

T = TypeVar("T")

QUEUE_TIMED_OUT = "query timed out in query queue"

_POLL_S = 0.1
"""How often a running query looks at its client's connection."""


@dataclass(frozen=True)
class QueryLimits:
    """Operator-facing bounds of the query API (the `query:` section of sentinel.yaml)."""

    timeout_s: float = 60.0
    max_samples: int = 1_000_000
    max_concurrency: int = 2


class QueryRunner:
    """A bounded pool for queries; `close` cancels what runs and stops the pool."""

    def __init__(self, limits: QueryLimits | None = None) -> None:
        self.limits = limits or QueryLimits()
        self._executor = ThreadPoolExecutor(
            max_workers=self.limits.max_concurrency, thread_name_prefix="sentinel-query"
        )
        self._slots: asyncio.Semaphore | None = None
        self._running: set[QueryBudget] = set()
        self._closed = False

    def budget(self) -> QueryBudget:
        return QueryBudget(self.limits.timeout_s, self.limits.max_samples)

    async def run(self, work: Callable[[QueryBudget], T], *, disconnected: Callable[[], bool] | None = None) -> T:
        """`work(budget)` in the pool; PromQLError on timeout, cancellation or too many samples.

        `disconnected` is polled while the work runs; when it says True the query is
        cancelled. Cancelling the awaiting task cancels the query too.
        """
        if self._closed:
            raise PromQLError(CANCELLED)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        budget = self.budget()
        try:
            await wait_for(self._slots.acquire(), timeout=self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise PromQLError(QUEUE_TIMED_OUT) from None
        self._running.add(budget)
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work, budget)
            try:
                while True:
                    done, _ = await asyncio.wait({future}, timeout=_POLL_S)
                    if done:
                        return future.result()
                    if disconnected is not None and disconnected():
                        budget.cancel()
            except asyncio.CancelledError:
                budget.cancel()
                raise
        finally:
            self._running.discard(budget)
            self._slots.release()

    def close(self) -> None:
        """Cancel every running query and stop the pool without waiting for it."""
        self._closed = True
        for budget in list(self._running):
            budget.cancel()
        with contextlib.suppress(RuntimeError):
            self._executor.shutdown(wait=False, cancel_futures=True)
