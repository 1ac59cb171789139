"""The one SQLite helper: versions and migrations, busy_timeout, bad files moved aside or kept in memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sentinel.state.health import StateHealth
from sentinel.state.sqlite import BUSY_TIMEOUT_MS, Schema, open_database

V1 = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
SCHEMA = Schema(
    store="things",
    version=2,
    create="CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, colour TEXT NOT NULL DEFAULT 'red');",
    migrations={2: "ALTER TABLE items ADD COLUMN colour TEXT NOT NULL DEFAULT 'red';"},
    legacy_version=1,
)


def test_a_fresh_file_gets_the_current_schema_wal_and_busy_timeout(tmp_path: Path) -> None:
    db = open_database(tmp_path / "s" / "things.sqlite", SCHEMA)
    assert db.durable and db.version == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    db.execute("INSERT INTO items (name) VALUES ('a')")
    assert db.execute("SELECT colour FROM items").fetchone()[0] == "red"
    db.close()


def test_a_file_of_the_previous_schema_is_migrated_with_its_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "things.sqlite"
    with sqlite3.connect(path) as old:  # before versions existed: no user_version
        old.executescript(V1 + "INSERT INTO items (name) VALUES ('kept');")
    caplog.set_level("INFO")
    db = open_database(path, SCHEMA)
    assert db.version == 2
    assert db.execute("SELECT name, colour FROM items").fetchall() == [("kept", "red")]
    assert "upgraded" in caplog.text
    db.close()


def test_a_corrupt_file_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "things.sqlite"
    path.write_bytes(b"\x00garbage" * 4096)
    health = StateHealth()
    db = open_database(path, SCHEMA, health)
    assert db.durable and db.version == 2
    (moved,) = tmp_path.glob("things.sqlite.corrupt-*")
    assert moved.read_bytes().startswith(b"\x00garbage")  # kept for a post-mortem, never deleted
    assert health.store("things").moved_aside_total == 1
    db.close()


def test_a_file_that_cannot_be_opened_runs_in_memory_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "things.sqlite"
    path.mkdir()  # something that is not a file stands where the database should be
    health = StateHealth()
    db = open_database(path, SCHEMA, health)
    assert not db.durable
    db.execute("INSERT INTO items (name) VALUES ('x')")  # the store keeps working, in memory
    assert health.store("things").degraded and "keeping it in memory only" in caplog.text
    db.close()


def test_a_failed_commit_on_a_full_disk_keeps_its_real_error(tmp_path: Path) -> None:
    db = open_database(tmp_path / "things.sqlite", SCHEMA)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full"
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"), db.transaction() as conn:
        for i in range(200):
            conn.execute("INSERT INTO items (name) VALUES (?)", ("x" * 400 + str(i),))
    assert not db.conn.in_transaction
    db.execute("PRAGMA max_page_count = 1000000")
    with db.transaction() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('after')")
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1
    db.close()


def test_a_schema_without_a_migration_to_each_version_is_refused() -> None:
    with pytest.raises(ValueError, match="no migration"):
        Schema(store="x", version=3, create="", migrations={2: ""}, legacy_version=1)
