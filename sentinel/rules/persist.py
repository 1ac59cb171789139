"""Alert state that survives a restart (SQLite in the state dir).

Prometheus keeps `for` state in the `ALERTS_FOR_STATE` series of its TSDB; Sentinel's
store is in memory, so the same facts go to SQLite: each active alert's labels,
state and times, and per group the time of the last evaluation (to measure how long
Sentinel was down). Written by the rule evaluation thread only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from sentinel.rules.state import Alert, AlertState

__all__ = ["AlertStateDB", "StoredAlert"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    group_key TEXT NOT NULL,
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    state TEXT NOT NULL,
    value REAL,
    active_at_ms INTEGER NOT NULL,
    fired_at_ms INTEGER,
    resolved_at_ms INTEGER,
    keep_firing_since_ms INTEGER,
    last_sent_at_ms INTEGER,
    PRIMARY KEY (group_key, rule, fingerprint)
);
CREATE TABLE IF NOT EXISTS groups (
    group_key TEXT PRIMARY KEY,
    last_evaluation_ms INTEGER NOT NULL
);
"""

StoredAlert = tuple[str, Alert]  # (rule name, alert)


class AlertStateDB:
    """A small SQLite file; every call is quick and meant for one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error:
            self._db.close()  # e.g. "file is not a database": no half-open connection
            raise

    def close(self) -> None:
        self._db.close()

    def save_group(self, group_key: str, evaluated_at_ms: int, alerts: Iterable[StoredAlert]) -> None:
        """Replace the stored alerts of a group with `alerts`, in one transaction."""
        rows = [
            (
                group_key,
                rule,
                a.fingerprint,
                json.dumps(a.labels, sort_keys=True),
                json.dumps(a.annotations),
                a.state.value,
                a.value,
                a.active_at_ms,
                a.fired_at_ms,
                a.resolved_at_ms,
                a.keep_firing_since_ms,
                a.last_sent_at_ms,
            )
            for rule, a in alerts
        ]
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM alerts WHERE group_key = ?", (group_key,))
            self._db.executemany("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            self._db.execute(
                "INSERT INTO groups VALUES (?, ?) ON CONFLICT(group_key) DO UPDATE SET "
                "last_evaluation_ms = excluded.last_evaluation_ms",
                (group_key, evaluated_at_ms),
            )

    def touch_group(self, group_key: str, evaluated_at_ms: int) -> None:
        self._db.execute(
            "INSERT INTO groups VALUES (?, ?) ON CONFLICT(group_key) DO UPDATE SET "
            "last_evaluation_ms = excluded.last_evaluation_ms",
            (group_key, evaluated_at_ms),
        )

    def load_group(self, group_key: str) -> tuple[int | None, list[StoredAlert]]:
        """The group's last evaluation time and its stored alerts."""
        row = self._db.execute("SELECT last_evaluation_ms FROM groups WHERE group_key = ?", (group_key,)).fetchone()
        alerts: list[StoredAlert] = []
        for r in self._db.execute(
            "SELECT rule, labels, annotations, state, value, active_at_ms, fired_at_ms, resolved_at_ms, "
            "keep_firing_since_ms, last_sent_at_ms FROM alerts WHERE group_key = ?",
            (group_key,),
        ):
            alerts.append(
                (
                    r[0],
                    Alert(
                        json.loads(r[1]),
                        json.loads(r[2]),
                        AlertState(r[3]),
                        r[4] if r[4] is not None else float("nan"),
                        r[5],
                        r[6],
                        r[7],
                        r[8],
                        r[9],
                    ),
                )
            )
        return (row[0] if row else None), alerts
