"""`wait_for`: asyncio.wait_for without the swallowed cancellation of Python < 3.12.

Before 3.12, `asyncio.wait_for` swallows a cancellation that arrives in the same loop
iteration as the completion of what it waits on (CPython gh-86296): the caller returns
the result and runs on as if it had never been cancelled. Found here when a cancelled
group action (the daemon stopping) kept driving its fleet plan for another 20 s; a loop
that waits this way can also keep a task from ever stopping.

This is 3.11's `wait_for` with that one thing changed: it waits with `asyncio.wait`,
which always lets a cancellation of the caller through. Everything else stays as the
rest of the daemon was built and tested against: the awaitable runs as a task of its
own (3.12's rebuild on `asyncio.timeout()` runs it in the caller's task instead, which
changes what `current_task()` and its cancel count mean to the code inside, aiohttp's
timers and `sentinel.fleet.etcd.reraise_if_cancelled` among them); on a timeout it is
cancelled and waited for, then TimeoutError is raised (or its result returned, when it
finished anyway); when the caller is cancelled, it is cancelled and waited for too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["wait_for"]


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """Await `aw` for at most `timeout` seconds (None: no limit); on timeout it is
    cancelled and TimeoutError raised. A cancellation of the caller always propagates."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        await _ended(fut)
        raise
    if fut in done:
        return fut.result()
    fut.cancel()
    await _ended(fut)
    if fut.cancelled():
        raise asyncio.TimeoutError
    return fut.result()  # it finished (or failed) on its own while being cancelled


async def _ended(fut: asyncio.Future[T]) -> None:
    """Wait until `fut` is done; a cancellation of the caller meanwhile propagates."""
    if not fut.done():
        await asyncio.wait({fut})
