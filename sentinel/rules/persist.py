"""Alert state that survives a restart (SQLite in the state dir, `alerts.sqlite`).

Prometheus keeps `for` state in the `ALERTS_FOR_STATE` series of its TSDB; Sentinel's
store is in memory, so the same facts go to SQLite: each active alert's labels, state
and times, and per group when it was last evaluated, to measure how long Sentinel was
down. Written by the rule evaluation thread only.

The last evaluation is persisted as an `Instant` (wall time, boot id, steady clock):
within one boot the outage is measured on the steady clock, so a wall-clock step while
Sentinel was down neither fires a pending alert at once nor drops the restored state;
`load_group` shifts the stored alert times into today's clock by the same amount. From
another boot the wall clock is used, and a last evaluation in the "future" counts as now.

Schema versions (see `sentinel.state.sqlite`): 1, the unversioned file of Sentinel 0.1;
2 adds the boot id and steady reading of the last evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from sentinel.rules.state import Alert, AlertState
from sentinel.runtime.clock import Clocks, Instant, SystemClocks, elapsed_since
from sentinel.state.health import StateHealth
from sentinel.state.sqlite import Schema, open_database

__all__ = ["FILENAME", "SCHEMA", "AlertStateDB", "StoredAlert"]

FILENAME = "alerts.sqlite"

SCHEMA = Schema(
    store="alert_state",
    version=2,
    create="""
CREATE TABLE alerts (
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
CREATE TABLE groups (
    group_key TEXT PRIMARY KEY,
    last_evaluation_ms INTEGER NOT NULL,
    boot_id TEXT NOT NULL DEFAULT '',
    last_evaluation_steady REAL
);
""",
    migrations={
        2: """
ALTER TABLE groups ADD COLUMN boot_id TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN last_evaluation_steady REAL;
""",
    },
    legacy_version=1,
    synchronous="NORMAL",
)

StoredAlert = tuple[str, Alert]  # (rule name, alert)

_TIME_FIELDS = ("active_at_ms", "fired_at_ms", "resolved_at_ms", "keep_firing_since_ms", "last_sent_at_ms")


class AlertStateDB:
    """A small SQLite file; every call is quick and meant for one worker thread."""

    def __init__(self, path: Path, *, health: StateHealth | None = None, clocks: Clocks | None = None) -> None:
        self.path = path
        self._clocks = clocks or SystemClocks()
        self._db = open_database(path, SCHEMA, health)

    @property
    def durable(self) -> bool:
        return self._db.durable

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
        # The steady clock's reading at `evaluated_at_ms` (a few ms before this call).
        steady_then = self._clocks.steady() - max(0.0, self._clocks.wall() - evaluated_at_ms / 1000)
        with self._db.transaction() as db:
            db.execute("DELETE FROM alerts WHERE group_key = ?", (group_key,))
            db.executemany("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute(
                "INSERT INTO groups (group_key, last_evaluation_ms, boot_id, last_evaluation_steady)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(group_key) DO UPDATE SET"
                " last_evaluation_ms = excluded.last_evaluation_ms, boot_id = excluded.boot_id,"
                " last_evaluation_steady = excluded.last_evaluation_steady",
                (group_key, evaluated_at_ms, self._clocks.boot_id(), steady_then),
            )

    def load_group(self, group_key: str) -> tuple[int | None, list[StoredAlert]]:
        """When the group was last evaluated and its stored alerts, both in today's clock (module doc)."""
        row = self._db.execute(
            "SELECT last_evaluation_ms, boot_id, last_evaluation_steady FROM groups WHERE group_key = ?",
            (group_key,),
        ).fetchone()
        shift_ms = 0
        down_at: int | None = None
        if row is not None:
            stored_ms, boot, steady_then = int(row[0]), str(row[1]), row[2]
            now_ms = int(self._clocks.wall() * 1000)
            outage_s = elapsed_since(Instant(stored_ms / 1000, boot, steady_then), self._clocks)
            down_at = now_ms - int(outage_s * 1000)
            shift_ms = down_at - stored_ms
        alerts: list[StoredAlert] = []
        for r in self._db.execute(
            "SELECT rule, labels, annotations, state, value, active_at_ms, fired_at_ms, resolved_at_ms, "
            "keep_firing_since_ms, last_sent_at_ms FROM alerts WHERE group_key = ?",
            (group_key,),
        ):
            alert = Alert(
                json.loads(r[1]),
                json.loads(r[2]),
                AlertState(r[3]),
                r[4] if r[4] is not None else float("nan"),
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
            )
            alerts.append((r[0], _shifted(alert, shift_ms)))
        return down_at, alerts


def _shifted(alert: Alert, shift_ms: int) -> Alert:
    if not shift_ms:
        return alert
    moved = {f: getattr(alert, f) + shift_ms for f in _TIME_FIELDS if getattr(alert, f) is not None}
    return replace(alert, **moved)
