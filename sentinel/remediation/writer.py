"""Journal writes that never stop remediation: in order, on one thread, held while the disk fails.

Every write the engine makes while running goes through `JournalWriter`: the
write-ahead row of an action, its finish, a decision that finishes at once, a
worker's state, the global pause. They run on the journal's own thread, strictly in
the order they were made. When one fails (a full or broken disk), it and everything
after it are *held in memory*, in order, and tried again on the next write and on
every remediation tick, until the disk takes them; nothing is reordered, so a finish
never lands before its row. The engine never sees the failure as an exception: it
goes on deciding and acting, with one-action-per-worker, cooldowns and budgets kept in
memory (issue 15, F7: a failed insert used to leave the worker `acting` forever and,
with `max_concurrent: 1`, every other worker of the host unhealable).

Acting without the write-ahead row on disk loses one guarantee: after a crash in that
window the action is not known to have been interrupted. Healing the worker is worth
more than that; the loss is said (the action's report names it), logged once and
counted (`sentinel_state_write_failures_total{store="journal"}`,
`sentinel_state_unsaved{store="journal"}`), and beyond `max_held` writes the oldest are
given up and counted in `sentinel_state_lost_total`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sentinel.remediation.journal import STORE, ActionRow, Journal, WorkerRecord
from sentinel.runtime.threads import WorkerThreads
from sentinel.state.health import StateHealth

__all__ = ["MAX_HELD", "Entry", "JournalWriter"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_HELD = 10_000

_DISK_ERRORS = (sqlite3.Error, OSError)


@dataclass
class Entry:
    """An action's journal row: `id` once it is on disk."""

    row: ActionRow
    id: int | None = None

    @property
    def on_disk(self) -> bool:
        return self.id is not None


@dataclass
class _Write:
    what: str
    apply: Callable[[Journal], object]


class JournalWriter:
    """Ordered, never-failing writes to a `Journal` (module doc)."""

    def __init__(
        self,
        journal: Journal,
        threads: WorkerThreads,
        health: StateHealth,
        *,
        max_held: int = MAX_HELD,
    ) -> None:
        self.journal = journal
        self._threads = threads
        self._health = health
        self._max_held = max_held
        self._queue: collections.deque[_Write] = collections.deque()  # touched on the journal thread only

    @property
    def held(self) -> int:
        """Writes waiting in memory for the disk (a stale read from the loop is harmless)."""
        return len(self._queue)

    # -- writes -----------------------------------------------------------------------
    # Each is handed to the journal thread when called (so writes keep call order), and
    # returns an awaitable that resolves once the write was tried; none ever raises for
    # the disk.

    async def begin(self, row: ActionRow) -> Entry:
        """The write-ahead row of an action; on disk when this returns, unless the disk refused it."""
        entry = Entry(row)

        def insert(journal: Journal) -> None:
            entry.id = journal.insert(row)

        await self._write(f"the start of {row.action} on {row.worker}", insert)
        return entry

    def finish(self, entry: Entry, outcome: str, finished: float, **fields: Any) -> asyncio.Future[None]:
        """How an action ended (written after its row, whenever that reaches the disk)."""

        def finish(journal: Journal) -> None:
            assert entry.id is not None  # the row was written first: writes keep their order
            journal.finish(entry.id, outcome, finished, **fields)

        return self._write(f"the outcome of {entry.row.action} on {entry.row.worker}", finish)

    def record(self, row: ActionRow) -> asyncio.Future[None]:
        """A decision that finished at once (a skip, would_act, needs_human, notify_only)."""
        return self._write(f"a {row.outcome} decision on {row.worker}", lambda journal: journal.insert(row))

    def save_worker(self, name: str, record: WorkerRecord) -> asyncio.Future[None]:
        return self._write(f"the state of worker {name}", lambda journal: journal.save_worker(name, record))

    def set_meta(self, key: str, value: str) -> asyncio.Future[None]:
        return self._write(f"the setting {key}", lambda journal: journal.set_meta(key, value))

    def set_verify(self, row_id: int, verify: str) -> asyncio.Future[None]:
        return self._write("a re-verification", lambda journal: journal.set_verify(row_id, verify))

    def prune(self, before: float) -> asyncio.Future[None]:
        return self._write("the pruning of old rows", lambda journal: journal.prune(before))

    async def retry(self) -> None:
        """Try the held writes again (each remediation tick)."""
        if self._queue:
            await self._threads.run(self._drain)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read of the journal on its thread (after every write made before it); raises on errors."""
        return await self._threads.run(fn, *args)

    def close(self) -> None:
        """On the journal thread, at shutdown: one last try; what is still held is lost, and counted."""
        self._drain()
        if self._queue:
            self._health.lost(STORE, len(self._queue), "journal write(s) held in memory at shutdown")
            self._queue.clear()
        self.journal.close()

    # -- the queue --------------------------------------------------------------------

    def _write(self, what: str, apply: Callable[[Journal], object]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._threads, self._enqueue, _Write(what, apply))

    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        if len(self._queue) > self._max_held:
            dropped = self._queue.popleft()
            self._health.lost(STORE, 1, f"journal write ({dropped.what})")
        self._drain()

    def _drain(self) -> None:
        wrote = False
        while self._queue:
            write = self._queue[0]
            try:
                write.apply(self.journal)
            except _DISK_ERRORS as exc:
                self._health.write_failed(STORE, write.what, exc)
                break
            except Exception:
                # A bug, not the disk: retrying cannot help, and must not block what follows.
                log.exception("journal: cannot write %s; dropped", write.what)
            self._queue.popleft()
            wrote = True
        if wrote and not self._queue:
            self._health.write_ok(STORE)
        self._health.set_unsaved(STORE, len(self._queue))
