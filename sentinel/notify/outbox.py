"""The durable outbox: notifications wait in SQLite until their receiver accepts them.

One file (`notifications.sqlite` in the state dir, WAL journal) holds the rows of every
receiver. A row is inserted, and the insert committed with `synchronous=FULL` (fsynced),
before `enqueue` returns, and deleted only after the receiver accepted it, so a crash or a
`kill -9` at any moment loses nothing and at worst repeats a delivery (at-least-once).
`(receiver, dedup_key)` is unique: enqueueing the same notification twice keeps one
row, and a *coalescing* enqueue replaces the queued row, for receivers where only the
latest state of an alert matters (Alertmanager).

Each receiver's queue is bounded: beyond `max_length` the oldest rows are dropped and
reported to the caller, never silently.

SQLite calls block, so they all run in one dedicated thread, which also serialises
them (the connection belongs to that thread) and keeps enqueues in call order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = ["EnqueueResult", "Item", "Outbox", "Row"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    receiver     TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    created      REAL    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL    NOT NULL,
    last_error   TEXT,
    UNIQUE (receiver, dedup_key)
);
CREATE INDEX IF NOT EXISTS outbox_receiver_id ON outbox (receiver, id);
"""

_COLUMNS = "id, receiver, dedup_key, payload, created, attempts, next_attempt, last_error"


@dataclass(frozen=True)
class Item:
    """A notification to enqueue for one receiver."""

    receiver: str
    dedup_key: str
    payload: str
    coalesce: bool = False  # replace a queued row with the same key: the latest state wins


@dataclass(frozen=True)
class Row:
    """A queued notification."""

    id: int
    receiver: str
    dedup_key: str
    payload: str
    created: float  # Unix seconds
    attempts: int
    next_attempt: float
    last_error: str | None


@dataclass
class EnqueueResult:
    """What one enqueue did, per receiver."""

    inserted: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # oldest rows removed to stay within the bound


class Outbox:
    """SQLite-backed queues, one per receiver name; every method is safe to await from the loop."""

    def __init__(self, path: Path, max_length: int, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_length = max_length
        self._clock = clock
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="notify-outbox")
        self._conn: sqlite3.Connection | None = None
        # Kept by the outbox thread, read by the loop: a stale read of an int is harmless.
        self._lengths: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file and count what is queued from before."""
        await self._run(self._open)

    async def close(self) -> None:
        """Close the database; queued rows stay for the next start."""
        if self._conn is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=False)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL for deletes and bookkeeping: losing one to a power cut only repeats a
        # delivery. Enqueues switch to FULL (see _enqueue), which also syncs these.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        self._lengths = dict(conn.execute("SELECT receiver, COUNT(*) FROM outbox GROUP BY receiver").fetchall())
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the outbox is not open")
        return self._conn

    # -- views --------------------------------------------------------------------------

    def length(self, receiver: str) -> int:
        return self._lengths.get(receiver, 0)

    def lengths(self) -> dict[str, int]:
        return dict(self._lengths)

    # -- enqueue -----------------------------------------------------------------------

    async def enqueue(self, items: Sequence[Item]) -> EnqueueResult:
        """Insert the items in one transaction; returns once they are on disk."""
        return await self._run(self._enqueue, list(items))

    def _enqueue(self, items: list[Item]) -> EnqueueResult:
        db = self._db()
        now = self._clock()
        result = EnqueueResult()
        delta: dict[str, int] = {}
        # FULL: the WAL is fsynced at COMMIT, so a row is on disk, not only in the page
        # cache, when enqueue returns; a crash or power cut after that cannot lose it.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                removed = 0
                if item.coalesce:
                    removed = db.execute(
                        "DELETE FROM outbox WHERE receiver = ? AND dedup_key = ?", (item.receiver, item.dedup_key)
                    ).rowcount
                cur = db.execute(
                    "INSERT INTO outbox (receiver, dedup_key, payload, created, next_attempt) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (receiver, dedup_key) DO NOTHING",
                    (item.receiver, item.dedup_key, item.payload, now, now),
                )
                if cur.rowcount == 1:
                    delta[item.receiver] = delta.get(item.receiver, 0) + 1 - removed
                    if not removed:
                        _add(result.inserted, item.receiver, 1)
                else:
                    _add(result.duplicates, item.receiver, 1)
            for receiver, change in delta.items():
                excess = self._lengths.get(receiver, 0) + change - self.max_length
                if excess > 0:
                    dropped = db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE receiver = ? ORDER BY id LIMIT ?)",
                        (receiver, excess),
                    ).rowcount
                    delta[receiver] = change - dropped
                    result.dropped[receiver] = dropped
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.execute("PRAGMA synchronous=NORMAL")
        for receiver, change in delta.items():
            self._lengths[receiver] = self._lengths.get(receiver, 0) + change
        return result

    # -- delivery side ---------------------------------------------------------------------

    async def due(self, receiver: str, limit: int) -> list[Row]:
        """The oldest rows of `receiver`, oldest first (a receiver's queue is strictly FIFO)."""
        return await self._run(self._due, receiver, limit)

    def _due(self, receiver: str, limit: int) -> list[Row]:
        rows = self._db().execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE receiver = ? ORDER BY id LIMIT ?", (receiver, limit)
        )
        return [Row(*r) for r in rows.fetchall()]

    async def backoff_state(self, receiver: str) -> tuple[int, float]:
        """(most failed tries of a queued row, latest next attempt): a restart resumes the backoff."""
        return await self._run(self._backoff_state, receiver)

    def _backoff_state(self, receiver: str) -> tuple[int, float]:
        row = (
            self._db()
            .execute(
                "SELECT MAX(attempts), MAX(next_attempt) FROM outbox WHERE receiver = ? AND attempts > 0", (receiver,)
            )
            .fetchone()
        )
        if row is None or row[0] is None:
            return 0, 0.0
        return int(row[0]), float(row[1])

    async def delete(self, receiver: str, ids: Sequence[int]) -> int:
        """Remove delivered (or abandoned) rows; rows already dropped or replaced are ignored."""
        return await self._run(self._delete, receiver, list(ids))

    def _delete(self, receiver: str, ids: list[int]) -> int:
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        removed = self._db().execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids).rowcount
        self._lengths[receiver] = max(0, self._lengths.get(receiver, 0) - removed)
        return removed

    async def record_failure(self, ids: Sequence[int], next_attempt: float, error: str) -> None:
        """Count a failed try on each row and note when the receiver will be tried again."""
        await self._run(self._record_failure, list(ids), next_attempt, error)

    def _record_failure(self, ids: list[int], next_attempt: float, error: str) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        self._db().execute(
            f"UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id IN ({marks})",
            [next_attempt, error[:2000], *ids],
        )

    async def expire(self, receiver: str, created_before: float) -> int:
        """Delete rows of `receiver` created before the cutoff; returns how many."""
        return await self._run(self._expire, receiver, created_before)

    def _expire(self, receiver: str, created_before: float) -> int:
        removed = (
            self._db().execute("DELETE FROM outbox WHERE receiver = ? AND created < ?", (receiver, created_before))
        ).rowcount
        if removed:
            self._lengths[receiver] = max(0, self._lengths.get(receiver, 0) - removed)
        return removed

    async def rows(self, receiver: str | None = None) -> list[Row]:
        """Every queued row (of one receiver), oldest first: for inspection and tests."""
        return await self._run(self._rows, receiver)

    def _rows(self, receiver: str | None) -> list[Row]:
        if receiver is None:
            cur = self._db().execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id")
        else:
            cur = self._db().execute(f"SELECT {_COLUMNS} FROM outbox WHERE receiver = ? ORDER BY id", (receiver,))
        return [Row(*r) for r in cur.fetchall()]


def _add(counts: dict[str, int], key: str, n: int) -> None:
    counts[key] = counts.get(key, 0) + n
