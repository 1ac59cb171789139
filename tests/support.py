"""What many tests need: waiting on a condition, and a clock moved by hand.

Tests wait on readiness, never on fixed sleeps, and the deadlines are generous because
CI is a loaded 2-core machine: a deadline only bounds how long a *failing* test takes,
so a long one costs nothing while the test passes. One implementation, so a fix to how
we wait (or what a timeout says) lands everywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT", "FakeClock", "eventually", "eventually_async"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


def _expired(what: str, timeout: float, last_error: AssertionError | None) -> AssertionError:
    message = f"{what} not met within {timeout:g}s"
    if last_error is not None:
        message += f" (last: {last_error})"
    return AssertionError(message)


def _attempt(check: Callable[[], T]) -> tuple[T | None, AssertionError | None]:
    """One look: the check's value, or the assertion it failed (counted as "not yet")."""
    try:
        return check(), None
    except AssertionError as exc:
        return None, exc


def eventually(
    check: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, what: str = "condition", interval: float = 0.1
) -> T:
    """Poll `check` until it returns something truthy, and return that.

    An AssertionError raised by `check` counts as "not yet"; past the deadline the last
    one is named in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value, last_error = _attempt(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise _expired(what, timeout, last_error)
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, what: str = "condition", interval: float = 0.02
) -> T:
    """`eventually` for async tests: sleeps on the event loop so the code under test runs."""
    deadline = time.monotonic() + timeout
    while True:
        value, last_error = _attempt(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise _expired(what, timeout, last_error)
        await asyncio.sleep(interval)


class FakeClock:
    """Scenario time the test moves by hand; call it to read it, as code under test does."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    @property
    def now(self) -> float:
        return self.t

    @now.setter
    def now(self, value: float) -> None:
        self.t = value
