"""Each store opens a file written by the previous schema (Sentinel 0.1) and keeps what it held.

The DDL below is copied verbatim from the 0.1 sources: it is the fixture of "the
previous schema", so a change to today's schema cannot quietly rewrite it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from sentinel.notify.outbox import Outbox
from sentinel.remediation.journal import Journal
from sentinel.rules.persist import AlertStateDB
from sentinel.rules.state import AlertState

JOURNAL_V1 = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, worker TEXT NOT NULL, action TEXT NOT NULL, mode TEXT NOT NULL,
    trigger TEXT NOT NULL, alertname TEXT NOT NULL DEFAULT '', fingerprint TEXT NOT NULL DEFAULT '',
    episode TEXT NOT NULL DEFAULT '', started REAL NOT NULL, finished REAL, outcome TEXT,
    error TEXT NOT NULL DEFAULT '', profile_before TEXT NOT NULL DEFAULT '', profile_after TEXT NOT NULL DEFAULT '',
    seconds_to_healthy REAL, verify TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS actions_started ON actions (started);
CREATE INDEX IF NOT EXISTS actions_episode ON actions (episode, action);
CREATE INDEX IF NOT EXISTS actions_open ON actions (outcome) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY, profile TEXT NOT NULL DEFAULT '', escalation INTEGER NOT NULL DEFAULT 0,
    needs_human INTEGER NOT NULL DEFAULT 0, needs_human_reason TEXT NOT NULL DEFAULT '',
    paused INTEGER NOT NULL DEFAULT 0, trouble_alerts TEXT NOT NULL DEFAULT '[]',
    last_trouble_at REAL NOT NULL DEFAULT 0, reverify INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
PRAGMA user_version=1;
"""

ALERTS_V1 = """
CREATE TABLE IF NOT EXISTS alerts (
    group_key TEXT NOT NULL, rule TEXT NOT NULL, fingerprint TEXT NOT NULL, labels TEXT NOT NULL,
    annotations TEXT NOT NULL, state TEXT NOT NULL, value REAL, active_at_ms INTEGER NOT NULL,
    fired_at_ms INTEGER, resolved_at_ms INTEGER, keep_firing_since_ms INTEGER, last_sent_at_ms INTEGER,
    PRIMARY KEY (group_key, rule, fingerprint)
);
CREATE TABLE IF NOT EXISTS groups (group_key TEXT PRIMARY KEY, last_evaluation_ms INTEGER NOT NULL);
"""

OUTBOX_V1 = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, receiver TEXT NOT NULL, dedup_key TEXT NOT NULL, payload TEXT NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_error TEXT,
    UNIQUE (receiver, dedup_key)
);
CREATE INDEX IF NOT EXISTS outbox_receiver_id ON outbox (receiver, id);
"""

T = 1_700_000_000.0


def write(path: Path, ddl: str, *rows: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(ddl)
        for sql, values in rows:
            db.execute(sql, values)


def test_a_version_1_journal_is_upgraded_and_keeps_its_rows_and_workers(tmp_path: Path) -> None:
    write(
        tmp_path / "remediation.sqlite",
        JOURNAL_V1,
        (
            "INSERT INTO actions (worker, action, mode, trigger, started, finished, outcome, episode)"
            " VALUES ('qwen', 'restart', 'act', 'alert', ?, ?, 'succeeded', 'abc@1')",
            (T, T + 5),
        ),
        (
            "INSERT INTO workers (name, profile, escalation, trouble_alerts, last_trouble_at)"
            " VALUES ('qwen', 'reduced', 2, '[\"CudaOOM\"]', ?)",
            (T,),
        ),
        ("INSERT INTO meta VALUES ('paused', '1')", ()),
    )
    journal = Journal.in_dir(tmp_path)
    (row,) = journal.recent()
    assert (row.worker, row.action, row.outcome, row.episode, row.boot_id) == (
        "qwen",
        "restart",
        "succeeded",
        "abc@1",
        "",
    )
    record = journal.load_workers()["qwen"]
    assert (record.profile, record.escalation, record.trouble_alerts, record.last_trouble_at) == (
        "reduced",
        2,
        ("CudaOOM",),
        T,
    )
    assert record.last_trouble_steady is None  # from before: read back by wall time
    assert journal.get_meta("paused") == "1"
    assert set(journal.acted_episodes(T - 1)) == {("abc@1", "restart")}
    journal.close()
    assert sqlite3.connect(tmp_path / "remediation.sqlite").execute("PRAGMA user_version").fetchone()[0] == 2


def test_an_unversioned_alert_state_file_is_upgraded_and_restores_its_alerts(tmp_path: Path) -> None:
    labels = {"alertname": "GpuHot", "gpu": "0"}
    write(
        tmp_path / "alerts.sqlite",
        ALERTS_V1,
        (
            "INSERT INTO alerts VALUES"
            " ('g.yml;g', 'GpuHot', 'fp', ?, '{}', 'pending', 91.0, ?, NULL, NULL, NULL, NULL)",
            (json.dumps(labels), int(T * 1000)),
        ),
        ("INSERT INTO groups VALUES ('g.yml;g', ?)", (int(T * 1000) + 5000,)),
    )

    class Clocks:
        def wall(self) -> float:
            return T + 65  # a minute after the last evaluation

        def steady(self) -> float:
            return 10.0

        def boot_id(self) -> str:
            return "this-boot"

    db = AlertStateDB(tmp_path / "alerts.sqlite", clocks=Clocks())
    down_at, alerts = db.load_group("g.yml;g")
    assert down_at == int(T * 1000) + 5000  # no steady reading from before: by wall time
    ((rule, alert),) = alerts
    assert (rule, alert.labels, alert.state, alert.value) == ("GpuHot", labels, AlertState.PENDING, 91.0)
    db.close()
    assert sqlite3.connect(tmp_path / "alerts.sqlite").execute("PRAGMA user_version").fetchone()[0] == 2


def test_an_unversioned_outbox_is_stamped_and_its_queued_rows_stay(tmp_path: Path) -> None:
    write(
        tmp_path / "notifications.sqlite",
        OUTBOX_V1,
        (
            "INSERT INTO outbox (receiver, dedup_key, payload, created, next_attempt)"
            " VALUES ('hook', 'k1', '{}', ?, ?)",
            (T, T),
        ),
    )

    async def check() -> None:
        outbox = Outbox(tmp_path / "notifications.sqlite", 100)
        await outbox.open()
        try:
            assert outbox.length("hook") == 1
            (row,) = await outbox.due("hook", 10)
            assert (row.dedup_key, row.created) == ("k1", T)
        finally:
            await outbox.close()

    asyncio.run(check())
    assert sqlite3.connect(tmp_path / "notifications.sqlite").execute("PRAGMA user_version").fetchone()[0] == 1
