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

A bad disk never stops notifications (issue 15, F7 and build item 6). The file is opened
by `sentinel.state.sqlite`: a corrupt one is moved aside, an unopenable one replaced by
an in-memory database. When a write fails at run time (disk full, I/O error), the rows
it carried are *held in memory* (same dedup, coalescing and bound) and delivered from
there; every later call tries to write them to the file again, in order. A row
delivered but not yet deleted from the file is remembered, so it is not sent again
every second while the disk is full. What is held is reported to `StateHealth`
(`sentinel_state_unsaved{store="outbox"}`) and lost at a restart only.

SQLite calls block, so they all run in one dedicated thread, which also serialises
them (the connection belongs to that thread) and keeps enqueues in call order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from sentinel.runtime.clock import wall_time
from sentinel.runtime.threads import WorkerThreads
from sentinel.state.health import StateHealth
from sentinel.state.sqlite import Database, Schema, open_database

__all__ = ["SCHEMA", "STORE", "EnqueueResult", "Item", "Outbox", "Row"]

T = TypeVar("T")

STORE = "outbox"

SCHEMA = Schema(
    store=STORE,
    version=1,
    create="""
CREATE TABLE outbox (
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
CREATE INDEX outbox_receiver_id ON outbox (receiver, id);
""",
    # Version 1 is the file of Sentinel 0.1, which had no user_version yet.
    legacy_version=1,
    synchronous="NORMAL",
)

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
    """A queued notification; a negative id is a row held in memory (module doc)."""

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

    def __init__(
        self,
        path: Path,
        max_length: int,
        *,
        clock: Callable[[], float] = wall_time,
        health: StateHealth | None = None,
    ) -> None:
        self.path = path
        self.max_length = max_length
        self._clock = clock
        self._health = health if health is not None else StateHealth()
        self._threads = WorkerThreads("notify-outbox", 1)
        self._db: Database | None = None
        # Kept by the outbox thread, read by the loop: a stale read of an int is harmless.
        self._lengths: dict[str, int] = {}
        # Rows the file could not take (held in memory, negative ids, oldest first) ...
        self._held: list[Row] = []
        self._coalescing: set[int] = set()  # held ids that replace a queued row with their key
        self._next_held_id = -1
        self._moved: dict[int, int] = {}  # ... and where held rows went once written: held id -> row id
        self._delivered: set[int] = set()  # row ids accepted by the receiver but not yet deleted

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file and count what is queued from before."""
        await self._run(self._open)

    async def close(self) -> None:
        """Close the database; queued rows stay for the next start (held ones are lost, and counted)."""
        if self._db is not None:
            await self._run(self._close)
        self._threads.shutdown(wait=False)

    @property
    def durable(self) -> bool:
        return self._db is not None and self._db.durable

    def _open(self) -> None:
        db = open_database(self.path, SCHEMA, self._health)
        self._lengths = dict(db.execute("SELECT receiver, COUNT(*) FROM outbox GROUP BY receiver").fetchall())
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._write_held()
            if self._held:
                self._health.lost(STORE, len(self._held), "notification(s) held in memory at shutdown")
            self._db.close()
            self._db = None

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._threads.run(fn, *args)

    def _database(self) -> Database:
        if self._db is None:
            raise RuntimeError("the outbox is not open")
        return self._db

    # -- views --------------------------------------------------------------------------

    def length(self, receiver: str) -> int:
        return self._lengths.get(receiver, 0)

    def lengths(self) -> dict[str, int]:
        return dict(self._lengths)

    @property
    def held(self) -> int:
        """Rows held in memory because the file could not take them."""
        return len(self._held)

    # -- enqueue -----------------------------------------------------------------------

    async def enqueue(self, items: Sequence[Item]) -> EnqueueResult:
        """Insert the items in one transaction; returns once they are on disk (or held, module doc)."""
        return await self._run(self._enqueue, list(items))

    def _enqueue(self, items: list[Item]) -> EnqueueResult:
        now = self._clock()
        self._write_held()
        if not self._held:
            try:
                result, delta = self._insert(items, now)
            except sqlite3.Error as exc:
                self._health.write_failed(STORE, f"{len(items)} notification(s) to {self.path}", exc)
            else:
                self._health.write_ok(STORE)
                for receiver, change in delta.items():
                    self._lengths[receiver] = self._lengths.get(receiver, 0) + change
                return result
        # The file cannot take them (or older rows still wait): hold them, in order.
        result = self._hold(items, now)
        self._health.set_unsaved(STORE, len(self._held))
        return result

    def _insert(self, items: list[Item], now: float) -> tuple[EnqueueResult, dict[str, int]]:
        db = self._database()
        result = EnqueueResult()
        delta: dict[str, int] = {}
        # FULL: the WAL is fsynced at COMMIT, so a row is on disk, not only in the page
        # cache, when enqueue returns; a crash or power cut after that cannot lose it.
        db.execute("PRAGMA synchronous=FULL")
        try:
            with db.transaction():
                for item in items:
                    removed = 0
                    if item.coalesce:
                        removed = db.execute(
                            "DELETE FROM outbox WHERE receiver = ? AND dedup_key = ?", (item.receiver, item.dedup_key)
                        ).rowcount
                    cur = db.execute(
                        "INSERT INTO outbox (receiver, dedup_key, payload, created, next_attempt)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (receiver, dedup_key) DO NOTHING",
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
                            "DELETE FROM outbox WHERE id IN"
                            " (SELECT id FROM outbox WHERE receiver = ? ORDER BY id LIMIT ?)",
                            (receiver, excess),
                        ).rowcount
                        delta[receiver] = change - dropped
                        result.dropped[receiver] = dropped
        finally:
            db.execute("PRAGMA synchronous=NORMAL")
        return result, delta

    def _hold(self, items: list[Item], now: float) -> EnqueueResult:
        result = EnqueueResult()
        for item in items:
            same = [r.id for r in self._held if r.receiver == item.receiver and r.dedup_key == item.dedup_key]
            if same and not item.coalesce:
                _add(result.duplicates, item.receiver, 1)
                continue
            if same:
                self._drop_held(same)
            else:
                _add(result.inserted, item.receiver, 1)
                self._lengths[item.receiver] = self._lengths.get(item.receiver, 0) + 1
            row = Row(self._next_held_id, item.receiver, item.dedup_key, item.payload, now, 0, now, None)
            self._next_held_id -= 1
            self._held.append(row)
            if item.coalesce:
                self._coalescing.add(row.id)
            excess = self._lengths.get(item.receiver, 0) - self.max_length
            if excess > 0:
                # Only held rows can be dropped while the file refuses writes.
                oldest = [r.id for r in self._held if r.receiver == item.receiver][:excess]
                self._drop_held(oldest)
                self._lengths[item.receiver] -= len(oldest)
                _add(result.dropped, item.receiver, len(oldest))
        return result

    def _drop_held(self, ids: Sequence[int]) -> None:
        gone = set(ids)
        self._held = [r for r in self._held if r.id not in gone]
        self._coalescing -= gone

    def _write_held(self) -> None:
        """Move held rows into the file, oldest first, in one transaction (kept held if it fails)."""
        if self._db is None:
            return
        if self._delivered:
            self._forget_delivered()
        if not self._held:
            return
        db = self._db
        moved: dict[int, int] = {}
        duplicates: dict[str, int] = {}
        try:
            with db.transaction():
                for row in self._held:
                    if row.id in self._coalescing:
                        db.execute(
                            "DELETE FROM outbox WHERE receiver = ? AND dedup_key = ?", (row.receiver, row.dedup_key)
                        )
                    cur = db.execute(
                        "INSERT INTO outbox (receiver, dedup_key, payload, created, attempts, next_attempt,"
                        " last_error) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (receiver, dedup_key) DO NOTHING",
                        (
                            row.receiver,
                            row.dedup_key,
                            row.payload,
                            row.created,
                            row.attempts,
                            row.next_attempt,
                            row.last_error,
                        ),
                    )
                    if cur.rowcount == 1 and cur.lastrowid is not None:
                        moved[row.id] = cur.lastrowid
                    else:
                        _add(duplicates, row.receiver, 1)  # queued in the file already
        except sqlite3.Error as exc:
            self._health.write_failed(STORE, f"{len(self._held)} held notification(s) to {self.path}", exc)
            return
        self._moved.update(moved)
        for receiver, n in duplicates.items():
            self._lengths[receiver] = max(0, self._lengths.get(receiver, 0) - n)
        self._held, self._coalescing = [], set()
        self._health.write_ok(STORE)
        self._health.set_unsaved(STORE, 0)

    def _forget_delivered(self) -> None:
        ids = sorted(self._delivered)
        try:
            self._database().execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)
        except sqlite3.Error:
            return
        self._delivered.clear()

    # -- delivery side ---------------------------------------------------------------------

    async def due(self, receiver: str, limit: int) -> list[Row]:
        """The oldest rows of `receiver`, oldest first (a receiver's queue is strictly FIFO)."""
        return await self._run(self._due, receiver, limit)

    def _due(self, receiver: str, limit: int) -> list[Row]:
        self._write_held()
        rows = self._database().execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE receiver = ? ORDER BY id LIMIT ?",
            (receiver, limit + len(self._delivered)),
        )
        found = [Row(*r) for r in rows.fetchall() if r[0] not in self._delivered]
        found += [r for r in self._held if r.receiver == receiver]
        return found[:limit]

    async def backoff_state(self, receiver: str) -> tuple[int, float]:
        """(most failed tries of a queued row, latest next attempt): a restart resumes the backoff."""
        return await self._run(self._backoff_state, receiver)

    def _backoff_state(self, receiver: str) -> tuple[int, float]:
        row = (
            self._database()
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
        held_ids = {i for i in ids if i < 0 and i not in self._moved}
        removed = 0
        if held_ids:
            before = len(self._held)
            self._drop_held(list(held_ids))
            removed += before - len(self._held)
            self._health.set_unsaved(STORE, len(self._held))
        on_disk = [self._moved.pop(i, i) for i in ids if i not in held_ids]
        if on_disk:
            marks = ",".join("?" * len(on_disk))
            try:
                removed += self._database().execute(f"DELETE FROM outbox WHERE id IN ({marks})", on_disk).rowcount
            except sqlite3.Error as exc:
                # Delivered: never send them again, delete them once the file takes writes.
                self._delivered.update(on_disk)
                removed += len(on_disk)
                self._health.write_failed(STORE, "the deletion of delivered notifications", exc)
        self._lengths[receiver] = max(0, self._lengths.get(receiver, 0) - removed)
        return removed

    async def record_failure(self, ids: Sequence[int], next_attempt: float, error: str) -> None:
        """Count a failed try on each row and note when the receiver will be tried again."""
        await self._run(self._record_failure, list(ids), next_attempt, error)

    def _record_failure(self, ids: list[int], next_attempt: float, error: str) -> None:
        if not ids:
            return
        failed = set(ids)
        self._held = [
            replace(r, attempts=r.attempts + 1, next_attempt=next_attempt, last_error=error[:2000])
            if r.id in failed
            else r
            for r in self._held
        ]
        on_disk = [self._moved.get(i, i) for i in ids if i >= 0 or i in self._moved]
        if not on_disk:
            return
        marks = ",".join("?" * len(on_disk))
        try:
            self._database().execute(
                f"UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id IN ({marks})",
                [next_attempt, error[:2000], *on_disk],
            )
        except sqlite3.Error as exc:  # the delivery loop keeps its own backoff in memory
            self._health.write_failed(STORE, "the backoff of notifications", exc)

    async def expire(self, receiver: str, created_before: float) -> int:
        """Delete rows of `receiver` created before the cutoff; returns how many."""
        return await self._run(self._expire, receiver, created_before)

    def _expire(self, receiver: str, created_before: float) -> int:
        old = [r.id for r in self._held if r.receiver == receiver and r.created < created_before]
        self._drop_held(old)
        removed = len(old)
        try:
            removed += (
                self._database().execute(
                    "DELETE FROM outbox WHERE receiver = ? AND created < ?", (receiver, created_before)
                )
            ).rowcount
        except sqlite3.Error as exc:
            self._health.write_failed(STORE, "the expiry of old notifications", exc)
        if removed:
            self._lengths[receiver] = max(0, self._lengths.get(receiver, 0) - removed)
        return removed

    async def rows(self, receiver: str | None = None) -> list[Row]:
        """Every queued row (of one receiver), oldest first, held ones last: for inspection and tests."""
        return await self._run(self._rows, receiver)

    def _rows(self, receiver: str | None) -> list[Row]:
        if receiver is None:
            cur = self._database().execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id")
        else:
            cur = self._database().execute(f"SELECT {_COLUMNS} FROM outbox WHERE receiver = ? ORDER BY id", (receiver,))
        found = [Row(*r) for r in cur.fetchall() if r[0] not in self._delivered]
        return found + [r for r in self._held if receiver is None or r.receiver == receiver]


def _add(counts: dict[str, int], key: str, n: int) -> None:
    counts[key] = counts.get(key, 0) + n
