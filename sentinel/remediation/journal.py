"""The remediation journal: every decision, its outcome and each worker's state, in SQLite.

`remediation.sqlite` in the state directory, in WAL mode with full sync: an action's
row is written (and on disk) before the backend is asked to do anything, so a crash
in the middle of an action leaves a row without a finish. On the next start
`mark_interrupted` finishes those rows as `interrupted` and flags their workers for
re-verification, and the row's episode key (alert fingerprint + activeAt) keeps the
same alert episode from triggering the same action again.

Times that feed durations (when an action started: cooldowns and budgets; when a
worker last had trouble: `stable_for`) are kept as an `Instant`: the wall time plus the
boot id and the steady clock's reading, so a restart within one boot reads them back
exactly whatever the wall clock did (see `sentinel.runtime.clock`).

Schema versions (`sentinel.state.sqlite`): 1, Sentinel 0.1; 2 adds `boot_id` and the
steady readings (`started_steady`, `last_trouble_steady`).

Every method is short and synchronous; the engine calls them from one worker thread,
through `JournalWriter` (`writer.py`) for everything it writes while running.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sentinel.state.health import StateHealth
from sentinel.state.sqlite import Database, Schema, open_database

__all__ = ["FILENAME", "SCHEMA", "STORE", "ActionRow", "Journal", "WorkerRecord", "episode_key"]

FILENAME = "remediation.sqlite"
STORE = "journal"

SCHEMA = Schema(
    store=STORE,
    version=2,
    create="""
CREATE TABLE actions (
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
    verify TEXT NOT NULL DEFAULT '',
    boot_id TEXT NOT NULL DEFAULT '',
    started_steady REAL
);
CREATE INDEX actions_started ON actions (started);
CREATE INDEX actions_episode ON actions (episode, action);
CREATE INDEX actions_open ON actions (outcome) WHERE outcome IS NULL;
CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    profile TEXT NOT NULL DEFAULT '',
    escalation INTEGER NOT NULL DEFAULT 0,
    needs_human INTEGER NOT NULL DEFAULT 0,
    needs_human_reason TEXT NOT NULL DEFAULT '',
    paused INTEGER NOT NULL DEFAULT 0,
    trouble_alerts TEXT NOT NULL DEFAULT '[]',
    last_trouble_at REAL NOT NULL DEFAULT 0,
    reverify INTEGER NOT NULL DEFAULT 0,
    boot_id TEXT NOT NULL DEFAULT '',
    last_trouble_steady REAL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
""",
    migrations={
        2: """
ALTER TABLE actions ADD COLUMN boot_id TEXT NOT NULL DEFAULT '';
ALTER TABLE actions ADD COLUMN started_steady REAL;
ALTER TABLE workers ADD COLUMN boot_id TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN last_trouble_steady REAL;
""",
    },
    legacy_version=1,
    # FULL: a committed "action started" row must survive a power cut too, or a reboot
    # could repeat the action for the same episode.
    synchronous="FULL",
)

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
    boot_id: str = ""  # the boot `started_steady` belongs to ("": unknown, use `started`)
    started_steady: float | None = None
    id: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The row as the API shows it."""
        data = asdict(self)
        del data["boot_id"], data["started_steady"]
        return data


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
    boot_id: str = ""  # the boot `last_trouble_steady` belongs to
    last_trouble_steady: float | None = None


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
    "boot_id",
    "started_steady",
)
_SELECT = "SELECT id, " + ", ".join(_ROW_FIELDS) + " FROM actions"
_WORKER_FIELDS = (
    "profile",
    "escalation",
    "needs_human",
    "needs_human_reason",
    "paused",
    "trouble_alerts",
    "last_trouble_at",
    "reverify",
    "boot_id",
    "last_trouble_steady",
)


def _row(values: tuple[Any, ...]) -> ActionRow:
    return ActionRow(id=values[0], **dict(zip(_ROW_FIELDS, values[1:], strict=True)))


@dataclass
class Journal:
    """The SQLite file; safe to call from any one thread at a time (a lock guards it).

    Opening never fails for a bad file: a corrupt one (or one from a newer Sentinel) is
    moved aside, and one that cannot be opened at all is replaced by an in-memory
    database (`durable` False); `health` is told either way.
    """

    path: Path
    health: StateHealth | None = None
    _db: Database = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._db = open_database(self.path, SCHEMA, self.health)

    @classmethod
    def in_dir(cls, state_dir: Path, health: StateHealth | None = None) -> Journal:
        """The journal of a state directory (created if needed)."""
        return cls(state_dir / FILENAME, health)

    @property
    def durable(self) -> bool:
        return self._db.durable

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

    def acted_since(self, since: float, boot_id: str = "") -> list[ActionRow]:
        """Rows of actions that ran (or would have) after `since` or in boot `boot_id`, oldest first.

        For budgets and cooldowns; rows of this boot are all returned, because only their
        steady readings say how old they are (the wall clock may have stepped since).
        """
        with self._lock:
            rows = self._db.execute(
                _SELECT + " WHERE (started > ? OR (boot_id != '' AND boot_id = ?))"
                " AND (outcome IS NULL OR outcome NOT IN (?, 'needs_human')) ORDER BY started",
                (since, boot_id, *NOT_ACTED),
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
        with self._lock, self._db.transaction() as db:
            rows = [_row(r) for r in db.execute(_SELECT + " WHERE outcome IS NULL").fetchall()]
            for row in rows:
                db.execute(
                    "UPDATE actions SET outcome = 'interrupted', finished = ?, error = ? WHERE id = ?",
                    (now, error, row.id),
                )
                db.execute("INSERT OR IGNORE INTO workers (name) VALUES (?)", (row.worker,))
                db.execute("UPDATE workers SET reverify = 1 WHERE name = ?", (row.worker,))
        return rows

    def unfinished(self) -> list[ActionRow]:
        """Rows without an outcome (actions that were running when Sentinel stopped), oldest first."""
        with self._lock:
            rows = self._db.execute(_SELECT + " WHERE outcome IS NULL ORDER BY id").fetchall()
        return [_row(r) for r in rows]

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
            rows = self._db.execute("SELECT name, " + ", ".join(_WORKER_FIELDS) + " FROM workers").fetchall()
        out = {}
        for name, profile, escalation, needs, reason, paused, alerts, trouble_at, reverify, boot, steady in rows:
            out[name] = WorkerRecord(
                profile=profile,
                escalation=int(escalation),
                needs_human=bool(needs),
                needs_human_reason=reason,
                paused=bool(paused),
                trouble_alerts=tuple(json.loads(alerts)),
                last_trouble_at=float(trouble_at),
                reverify=bool(reverify),
                boot_id=boot,
                last_trouble_steady=None if steady is None else float(steady),
            )
        return out

    def save_worker(self, name: str, record: WorkerRecord) -> None:
        values = (
            record.profile,
            record.escalation,
            int(record.needs_human),
            record.needs_human_reason,
            int(record.paused),
            json.dumps(sorted(record.trouble_alerts)),
            record.last_trouble_at,
            int(record.reverify),
            record.boot_id,
            record.last_trouble_steady,
        )
        updates = ", ".join(f"{f} = excluded.{f}" for f in _WORKER_FIELDS)
        with self._lock:
            self._db.execute(
                f"INSERT INTO workers (name, {', '.join(_WORKER_FIELDS)}) VALUES ({', '.join('?' * 11)})"
                f" ON CONFLICT (name) DO UPDATE SET {updates}",
                (name, *values),
            )

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
