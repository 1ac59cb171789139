"""The bounds of one query's evaluation: a deadline, a sample limit and cancellation.

Prometheus bounds each query with `--query.timeout` (2 min) and `--query.max-samples`
(50 million samples in memory at once) and cancels it when its client goes away.
`QueryBudget` carries the same three for Sentinel's evaluator, which checks it at
every step of a range query or subquery and at every selection, so a runaway query
(`max_over_time(x[100y:1ms])`) ends within a step of its deadline or its client's
disconnection. The messages are Prometheus's.

Samples are counted as Prometheus counts them, roughly: those a query holds at one
time — the points of its result so far and of the subquery being built (`hold`,
`release`), plus those of the selection being read (`peek`).

A budget belongs to one query; `cancel` may be called from any thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sentinel.promql.model import PromQLError

__all__ = ["CANCELLED", "TIMED_OUT", "TOO_MANY_SAMPLES", "QueryBudget"]

TIMED_OUT = "query timed out in query execution"
CANCELLED = "query was canceled in query execution"
TOO_MANY_SAMPLES = "query processing would load too many samples into memory in query execution"


class QueryBudget:
    """Deadline, sample limit and cancellation flag of one query."""

    __slots__ = ("_cancelled", "_clock", "deadline", "held", "max_samples")

    def __init__(
        self,
        timeout_s: float | None = None,
        max_samples: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.deadline = None if timeout_s is None else clock() + timeout_s
        self.max_samples = max_samples
        self.held = 0
        self._cancelled: str | None = None

    def cancel(self, reason: str = CANCELLED) -> None:
        """Make the query fail at its next check (thread-safe: one attribute write)."""
        self._cancelled = reason

    @property
    def cancelled(self) -> bool:
        return self._cancelled is not None

    def check(self) -> None:
        """Raise PromQLError if the query was cancelled or is past its deadline."""
        if self._cancelled is not None:
            raise PromQLError(self._cancelled)
        if self.deadline is not None and self._clock() > self.deadline:
            self._cancelled = TIMED_OUT
            raise PromQLError(TIMED_OUT)

    def peek(self, samples: int) -> None:
        """`samples` more are read for a moment (a selection); raise if that is too many."""
        if self.max_samples is not None and self.held + samples > self.max_samples:
            raise PromQLError(TOO_MANY_SAMPLES)
        self.check()

    def hold(self, samples: int) -> None:
        """`samples` more are kept (result points); raise if that is too many."""
        self.held += samples
        if self.max_samples is not None and self.held > self.max_samples:
            raise PromQLError(TOO_MANY_SAMPLES)

    def release(self, samples: int) -> None:
        self.held -= samples
