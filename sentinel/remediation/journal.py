"""The remediation journal: every decision, its outcome and each worker's state, in SQLite.

`remediation.sqlite` in the state directory, in WAL mode with full sync: an action's
row is written (and on disk) before the backend is asked to do anything, so a crash
in the middle of an action leaves a row without a finish. On the next start
`mark_interrupted` finishes those rows as `interrupted` and flags their workers for
re-verification, and the row's episode key (alert fingerprint + activeAt) keeps the
same alert episode from triggering the same action again.

Every method is short and synchronous; the engine calls them from one worker thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FILENAME", "ActionRow", "Journal", "WorkerRecord", "episode_key"]

FILENAME = "remediation.sqlite"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker TEXT NOT NULL,
    action TEXT NOT NULL,
    mode TEXT NOT NULL,
    trigger TEXT NOT NULL,
    alertname TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    episode TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT,
    error TEXT NOT NULL DEFAULT '',
    profile_before TEXT NOT NULL DEFAULT '',
    profile_after TEXT NOT NULL DEFAULT '',
    seconds_to_healthy REAL,
    verify TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS actions_started ON actions (started);
CREATE INDEX IF NOT EXISTS actions_episode ON actions (episode, action);
CREATE INDEX IF NOT EXISTS actions_open ON actions (outcome) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    profile TEXT NOT NULL DEFAULT '',
    escalation INTEGER NOT NULL DEFAULT 0,
    needs_human INTEGER NOT NULL DEFAULT 0,
    needs_human_reason TEXT NOT NULL DEFAULT '',
    paused INTEGER NOT NULL DEFAULT 0,
    trouble_alerts TEXT NOT NULL DEFAULT '[]',
    last_trouble_at REAL NOT NULL DEFAULT 0,
    reverify INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Outcomes that are not an action having run: they never block an episode or use a budget.
NOT_ACTED = ("skipped",)


def episode_key(fingerprint: str, active_at_ms: int) -> str:
    """One alert episode: the same label set firing from the same activeAt."""
    return f"{fingerprint}@{active_at_ms}" if fingerprint else ""


@dataclass(frozen=True)
class ActionRow:
    """One journaled decision; `outcome` is None while the action runs."""

    worker: str
    action: str
    mode: str
    trigger: str
    started: float
    alertname: str = ""
    fingerprint: str = ""
    episode: str = ""
    finished: float | None = None
    outcome: str | None = None
    error: str = ""
    profile_before: str = ""
    profile_after: str = ""
    seconds_to_healthy: float | None = None
    verify: str = ""  # re-verification after an interruption: "passed" or "failed"
    id: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The row as the API shows it."""
        return asdict(self)


@dataclass(frozen=True)
class WorkerRecord:
    """A worker's persisted remediation state; the profile by name, so a changed ladder is safe."""

    profile: str = ""
    escalation: int = 0
    needs_human: bool = False
    needs_human_reason: str = ""
    paused: bool = False
    trouble_alerts: tuple[str, ...] = ()
    last_trouble_at: float = 0.0
    reverify: bool = False


_ROW_FIELDS = (
    "worker",
    "action",
    "mode",
    "trigger",
    "alertname",
    "fingerprint",
    "episode",
    "started",
    "finished",
    "outcome",
    "error",
    "profile_before",
    "profile_after",
    "seconds_to_healthy",
    "verify",
)
_SELECT = "SELECT id, " + ", ".join(_ROW_FIELDS) + " FROM actions"


def _row(values: tuple[Any, ...]) -> ActionRow:
    return ActionRow(id=values[0], **dict(zip(_ROW_FIELDS, values[1:], strict=True)))


@dataclass
class Journal:
    """The SQLite file; safe to call from any one thread at a time (a lock guards it)."""

    path: Path
    _db: sqlite3.Connection = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed "action started" row must survive a power cut too, or a
            # reboot could repeat the action for the same episode.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=2000")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self.path} was written by a newer Sentinel (schema {version}, this one knows {SCHEMA_VERSION})"
                )
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error:
            self._db.close()  # e.g. "file is not a database": no half-open connection
            raise

    @classmethod
    def in_dir(cls, state_dir: Path) -> Journal:
        """The journal of a state directory (created if needed)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(state_dir / FILENAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- actions ------------------------------------------------------------------------

    def insert(self, row: ActionRow) -> int:
        """Write a row (finished or not) and return its id."""
        values = [getattr(row, name) for name in _ROW_FIELDS]
        with self._lock:
            cur = self._db.execute(
                f"INSERT INTO actions ({', '.join(_ROW_FIELDS)}) VALUES ({', '.join('?' * len(_ROW_FIELDS))})",
                values,
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish(
        self,
        row_id: int,
        outcome: str,
        finished: float,
        *,
        error: str = "",
        profile_after: str | None = None,
        seconds_to_healthy: float | None = None,
    ) -> None:
        """Record how an action ended (only once: a row already finished is left alone)."""
        with self._lock:
            self._db.execute(
                "UPDATE actions SET outcome = ?, finished = ?, error = ?, seconds_to_healthy = ?,"
                " profile_after = COALESCE(?, profile_after) WHERE id = ? AND outcome IS NULL",
                (outcome, finished, error, seconds_to_healthy, profile_after, row_id),
            )

    def set_verify(self, row_id: int, verify: str, seconds_to_healthy: float | None = None) -> None:
        """The result of re-verifying an interrupted action's worker."""
        with self._lock:
            self._db.execute(
                "UPDATE actions SET verify = ?, seconds_to_healthy = COALESCE(?, seconds_to_healthy) WHERE id = ?",
                (verify, seconds_to_healthy, row_id),
            )

    def get(self, row_id: int) -> ActionRow | None:
        with self._lock:
            found = self._db.execute(_SELECT + " WHERE id = ?", (row_id,)).fetchone()
        return _row(found) if found else None

    def recent(self, limit: int = 50, worker: str | None = None) -> list[ActionRow]:
        """The newest rows first."""
        with self._lock:
            if worker is None:
                rows = self._db.execute(_SELECT + " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    _SELECT + " WHERE worker = ? ORDER BY id DESC LIMIT ?", (worker, limit)
                ).fetchall()
        return [_row(r) for r in rows]

    def acted_since(self, since: float) -> list[ActionRow]:
        """Rows of actions that ran (or would have) after `since`, oldest first: budgets and cooldowns."""
        with self._lock:
            rows = self._db.execute(
                _SELECT + " WHERE started > ? AND (outcome IS NULL OR outcome NOT IN (?, 'needs_human'))"
                " ORDER BY started",
                (since, *NOT_ACTED),
            ).fetchall()
        return [_row(r) for r in rows]

    def acted_episodes(self, since: float) -> dict[tuple[str, str], float]:
        """(episode, action) pairs that already led to an action (or would have, in observe mode), and when."""
        with self._lock:
            rows = self._db.execute(
                "SELECT episode, action, MAX(started) FROM actions WHERE episode != '' AND started > ?"
                " AND (outcome IS NULL OR outcome NOT IN (?)) GROUP BY episode, action",
                (since, *NOT_ACTED),
            ).fetchall()
        return {(e, a): float(t) for e, a, t in rows}

    def mark_interrupted(self, now: float, error: str) -> list[ActionRow]:
        """Finish every unfinished row as `interrupted` and flag its worker for re-verification."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = [_row(r) for r in self._db.execute(_SELECT + " WHERE outcome IS NULL").fetchall()]
                for row in rows:
                    self._db.execute(
                        "UPDATE actions SET outcome = 'interrupted', finished = ?, error = ? WHERE id = ?",
                        (now, error, row.id),
                    )
                    self._db.execute("INSERT OR IGNORE INTO workers (name) VALUES (?)", (row.worker,))
                    self._db.execute("UPDATE workers SET reverify = 1 WHERE name = ?", (row.worker,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rows

    def awaiting_reverify(self, worker: str) -> list[ActionRow]:
        """Interrupted rows of `worker` whose re-verification has not been recorded yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                _SELECT + " WHERE worker = ? AND outcome = 'interrupted' AND verify = '' ORDER BY id", (worker,)
            ).fetchall()
        return [_row(r) for r in rows]

    def prune(self, before: float) -> int:
        """Forget finished rows older than `before`; returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM actions WHERE started < ? AND outcome IS NOT NULL", (before,))
            return cur.rowcount

    # -- workers ------------------------------------------------------------------------

    def load_workers(self) -> dict[str, WorkerRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, profile, escalation, needs_human, needs_human_reason, paused, trouble_alerts,"
                " last_trouble_at, reverify FROM workers"
            ).fetchall()
        out = {}
        for name, profile, escalation, needs, reason, paused, alerts, trouble_at, reverify in rows:
            out[name] = WorkerRecord(
                profile=profile,
                escalation=int(escalation),
                needs_human=bool(needs),
                needs_human_reason=reason,
                paused=bool(paused),
                trouble_alerts=tuple(json.loads(alerts)),
                last_trouble_at=float(trouble_at),
                reverify=bool(reverify),
            )
        return out

    def save_worker(self, name: str, record: WorkerRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO workers (name, profile, escalation, needs_human, needs_human_reason, paused,"
                " trouble_alerts, last_trouble_at, reverify) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET profile = excluded.profile, escalation = excluded.escalation,"
                " needs_human = excluded.needs_human, needs_human_reason = excluded.needs_human_reason,"
                " paused = excluded.paused, trouble_alerts = excluded.trouble_alerts,"
                " last_trouble_at = excluded.last_trouble_at, reverify = excluded.reverify",
                (
                    name,
                    record.profile,
                    record.escalation,
                    int(record.needs_human),
                    record.needs_human_reason,
                    int(record.paused),
                    json.dumps(sorted(record.trouble_alerts)),
                    record.last_trouble_at,
                    int(record.reverify),
                ),
            )

    def save_workers(self, records: Iterable[tuple[str, WorkerRecord]]) -> None:
        for name, record in records:
            self.save_worker(name, record)

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str, default: str = "") -> str:
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(found[0]) if found else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
