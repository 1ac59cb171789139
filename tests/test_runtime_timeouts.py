"""sentinel.runtime.timeouts.wait_for: bounded waits that never swallow a cancellation."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import sentinel
from sentinel.runtime.timeouts import wait_for


async def test_a_cancellation_that_meets_the_result_is_not_swallowed() -> None:
    """Python 3.11's asyncio.wait_for returns the result here and the task runs on
    (CPython gh-86296): a plan driver kept going for 20 s after it was cancelled."""
    changed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    rounds = 0

    async def waiting_loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await wait_for(asyncio.shield(changed), 5)
            await asyncio.sleep(3600)  # reached only when the cancellation was lost

    task = asyncio.ensure_future(waiting_loop())
    await asyncio.sleep(0)
    changed.set_result(1)  # done in the same loop iteration as the cancellation
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait_for(task, 5)
    assert rounds == 1


async def test_it_returns_the_result_and_times_out_like_asyncio() -> None:
    assert await wait_for(asyncio.sleep(0, "ready"), 1) == "ready"
    assert await wait_for(asyncio.sleep(0, "no limit"), None) == "no limit"
    slow = asyncio.ensure_future(asyncio.sleep(3600))
    with pytest.raises(asyncio.TimeoutError):
        await wait_for(slow, 0.01)
    assert slow.cancelled()  # what timed out is cancelled, as asyncio.wait_for does


async def test_a_shielded_wait_leaves_the_shielded_work_running() -> None:
    work = asyncio.ensure_future(asyncio.sleep(0.05, "finished"))
    with pytest.raises(asyncio.TimeoutError):
        await wait_for(asyncio.shield(work), 0.001)
    assert await work == "finished"


def test_the_package_waits_only_through_it() -> None:
    """One `asyncio.wait_for` left in the daemon brings the swallowed cancellation back."""
    package = Path(sentinel.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "timeouts.py" and path.parent.name == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            called = isinstance(node, ast.Attribute) and node.attr == "wait_for"
            if called and isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, "use sentinel.runtime.timeouts.wait_for: " + ", ".join(found)
