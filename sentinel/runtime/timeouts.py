"""`wait_for`: asyncio.wait_for as Python 3.12 has it, on 3.10 and 3.11 too.

Before 3.12, `asyncio.wait_for` swallows a cancellation that arrives in the same loop
iteration as the completion of what it waits on (CPython gh-86296): the caller returns
the result and runs on as if it had never been cancelled. Found here when a cancelled
group action (the daemon stopping) kept driving its fleet plan for another 20 s; a loop
that waits this way can also keep a task from ever stopping. Python 3.12 rebuilt
`wait_for` on `asyncio.timeout()`, which counts cancellations (`Task.uncancel`) and so
tells its own timeout from a cancellation from outside. This module is that rebuild:
`asyncio.timeout` on 3.11, aio-libs' `async-timeout` (what aiohttp uses there) on 3.10,
and the standard library's own `wait_for` from 3.12 on.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["wait_for"]

if sys.version_info >= (3, 12):
    wait_for = asyncio.wait_for
else:
    if sys.version_info >= (3, 11):
        from asyncio import timeout as _timeout
    else:  # pragma: no cover - Python 3.10
        from async_timeout import timeout as _timeout

    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """Await `aw` for at most `timeout` seconds (None: no limit); on timeout it is
        cancelled and TimeoutError raised. A cancellation from outside always propagates."""
        async with _timeout(timeout):
            return await aw
