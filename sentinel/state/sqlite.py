"""One way to open the state directory's SQLite files: versions, migrations, timeouts, bad files.

The three stores (the remediation journal, the notification outbox, the alert state)
open their files with `open_database(path, schema, health)`, which gives every one:

- WAL, the schema's `synchronous` level, and `busy_timeout` on every connection;
- a schema version in `PRAGMA user_version`. A fresh file gets `Schema.create` and the
  current version; an older file runs each migration from its version up, in one
  transaction; a file without a version but with tables predates versioning and is
  taken as `Schema.legacy_version` (the outbox and the alert state before 0.2);
- a corrupt file ("file is not a database", a failing `quick_check`) or one written by a
  newer Sentinel is moved aside, never deleted (`<file>.corrupt-<UTC time>`, its WAL
  with it), and a fresh file takes its place: a damaged journal must not keep a host
  unwatched (issue 15, C6);
- a file that cannot be opened or created at all (read-only or missing directory, no
  space left): an in-memory database with the same schema, `Database.durable` False.

`StateHealth` is told about each of these (see `sentinel.state.health`).

`Database.transaction()` is BEGIN IMMEDIATE ... COMMIT that rolls back only while a
transaction is open. SQLite ends the transaction by itself when a COMMIT fails for lack
of space; an unconditional ROLLBACK then raises "cannot rollback - no transaction is
active" and hides the real error, as the journal did on a full disk (issue 15, F7).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sentinel.state.health import StateHealth

__all__ = ["BUSY_TIMEOUT_MS", "Database", "Schema", "open_database"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000

_CORRUPT_NAMES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_CORRUPT_TEXT = ("file is not a database", "malformed", "file is encrypted")


@dataclass(frozen=True)
class Schema:
    """What a store's file holds, and how older files are brought up to date."""

    store: str  # the store's name in logs and in the `store` label
    version: int
    create: str  # DDL of `version`, for a fresh file
    migrations: Mapping[int, str] = field(default_factory=dict)  # SQL taking version v-1 to v
    legacy_version: int = 1  # a file with tables but no user_version
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    def __post_init__(self) -> None:
        missing = [v for v in range(self.legacy_version + 1, self.version + 1) if v not in self.migrations]
        if missing:
            raise ValueError(f"{self.store}: no migration to schema version(s) {missing}")


class _Unusable(Exception):
    """The file is there but cannot be used as it is: corrupt, or from a newer Sentinel."""

    def __init__(self, kind: Literal["corrupt", "newer"], reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class Database:
    """An open store file (or its in-memory stand-in); one thread at a time, as the stores use it."""

    def __init__(self, conn: sqlite3.Connection, path: Path, schema: Schema, *, durable: bool) -> None:
        self.conn = conn
        self.path = path
        self.schema = schema
        self.durable = durable

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; the original error survives a failed COMMIT (module doc)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def open_database(path: Path, schema: Schema, health: StateHealth | None = None) -> Database:
    """Open (create, migrate, or replace) a store's file; never raises for a bad file (module doc)."""
    health = health if health is not None else StateHealth()
    try:
        db = Database(_open_file(path, schema), path, schema, durable=True)
    except _Unusable as exc:
        moved = _move_aside(path, exc.kind)
        health.moved_aside(schema.store, path, moved, str(exc))
        try:
            db = Database(_open_file(path, schema), path, schema, durable=True)
        except (sqlite3.Error, OSError, _Unusable) as again:
            return _in_memory(path, schema, health, again)
    except (sqlite3.Error, OSError) as exc:
        return _in_memory(path, schema, health, exc)
    health.opened(schema.store, path, durable=True)
    return db


def _open_file(path: Path, schema: Schema) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _check_readable(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={schema.synchronous}")
        _bring_up_to_date(conn, path, schema)
    except sqlite3.Error as exc:
        conn.close()
        if _is_corruption(exc):
            raise _Unusable("corrupt", str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def _check_readable(conn: sqlite3.Connection) -> None:
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:3])
        raise _Unusable("corrupt", f"quick_check failed: {problems}")


def _bring_up_to_date(conn: sqlite3.Connection, path: Path, schema: Schema) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > schema.version:
        raise _Unusable(
            "newer", f"written by a newer Sentinel (schema {version}; this one knows up to {schema.version})"
        )
    if version == 0:
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if not tables:
            _run_script(conn, schema.create, schema.version)
            return
        version = schema.legacy_version
        if version == schema.version:
            _run_script(conn, "", version)  # stamp the version a pre-versioning file has
    for target in range(version + 1, schema.version + 1):
        _run_script(conn, schema.migrations[target], target)
        log.info("%s: upgraded %s to schema version %d", schema.store, path, target)


def _run_script(conn: sqlite3.Connection, sql: str, version: int) -> None:
    script = f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {int(version)};\nCOMMIT;"
    try:
        conn.executescript(script)
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _is_corruption(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name in _CORRUPT_NAMES or name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(exc).lower()
    return any(marker in text for marker in _CORRUPT_TEXT)


def _move_aside(path: Path, kind: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{kind}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{stamp}.{n}")
    path.rename(target)
    for suffix in ("-wal", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            with contextlib.suppress(OSError):
                side.rename(target.with_name(target.name + suffix))
    with contextlib.suppress(OSError):
        path.with_name(path.name + "-shm").unlink(missing_ok=True)  # derived from the WAL; rebuilt
    return target


def _in_memory(path: Path, schema: Schema, health: StateHealth, why: BaseException) -> Database:
    conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    _run_script(conn, schema.create, schema.version)
    health.opened(schema.store, path, durable=False, problem=str(why) or type(why).__name__)
    return Database(conn, path, schema, durable=False)
