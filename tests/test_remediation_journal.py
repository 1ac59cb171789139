"""The remediation journal: a real SQLite file in WAL mode."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sentinel.remediation.journal import FILENAME, ActionRow, Journal, WorkerRecord, episode_key
from sentinel.state.health import StateHealth

T = 1_700_000_000.0


def row(**kw: object) -> ActionRow:
    base: dict[str, object] = {"worker": "qwen", "action": "restart", "mode": "act", "trigger": "alert", "started": T}
    base.update(kw)
    return ActionRow(**base)  # type: ignore[arg-type]


def test_journal_lives_in_the_state_dir_in_wal_mode(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path / "state")
    journal.close()
    db = sqlite3.connect(tmp_path / "state" / FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_unfinished_row_is_visible_to_another_connection_before_it_finishes(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    row_id = journal.insert(row(alertname="CudaOOM", episode=episode_key("abc", 5)))
    other = Journal.in_dir(tmp_path)  # as a restarted Sentinel would open it
    found = other.get(row_id)
    assert found is not None and found.outcome is None and found.episode == "abc@5"
    journal.close()
    other.close()


def test_mark_interrupted_finishes_open_rows_and_flags_workers_for_reverification(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    open_id = journal.insert(row(profile_before="full", profile_after="reduced", action="reduce_batch"))
    done_id = journal.insert(row(worker="other", outcome="succeeded", finished=T + 1))
    interrupted = journal.mark_interrupted(T + 10, "Sentinel stopped")
    assert [r.id for r in interrupted] == [open_id]
    again = journal.get(open_id)
    assert again is not None and again.outcome == "interrupted" and again.finished == T + 10
    assert journal.get(done_id).outcome == "succeeded"  # type: ignore[union-attr]
    assert journal.load_workers()["qwen"].reverify
    assert "other" not in journal.load_workers()
    # A late finish from the interrupted attempt does not rewrite history.
    journal.finish(open_id, "succeeded", T + 11)
    assert journal.get(open_id).outcome == "interrupted"  # type: ignore[union-attr]
    assert journal.mark_interrupted(T + 20, "again") == []
    journal.close()


def test_acted_episodes_and_history_leave_out_skipped_decisions(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    journal.insert(row(episode="a@1", outcome="skipped", finished=T))
    journal.insert(row(episode="b@1", outcome="interrupted", finished=T))
    journal.insert(row(episode="c@1", action="reduce_batch", mode="observe", outcome="would_act", finished=T))
    journal.insert(row(episode="", outcome="needs_human", finished=T))
    assert set(journal.acted_episodes(T - 1)) == {("b@1", "restart"), ("c@1", "reduce_batch")}
    assert [(r.action, r.outcome) for r in journal.acted_since(T - 1)] == [
        ("restart", "interrupted"),
        ("reduce_batch", "would_act"),
    ]
    assert journal.acted_since(T) == []
    journal.close()


def test_worker_state_round_trips(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    record = WorkerRecord(
        profile="fp8",
        escalation=4,
        needs_human=True,
        needs_human_reason="ladder exhausted",
        paused=True,
        trouble_alerts=("CudaOOM", "EngineStalled"),
        last_trouble_at=T,
    )
    journal.save_worker("qwen", record)
    journal.set_meta("paused", "1")
    journal.close()
    reopened = Journal.in_dir(tmp_path)
    assert reopened.load_workers() == {"qwen": record}
    assert reopened.get_meta("paused") == "1" and reopened.get_meta("absent", "x") == "x"
    reopened.close()


def test_recent_is_newest_first_and_filters_by_worker(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    for i in range(5):
        journal.insert(row(worker="a" if i % 2 else "b", started=T + i, outcome="succeeded"))
    assert [r.started for r in journal.recent(3)] == [T + 4, T + 3, T + 2]
    assert {r.worker for r in journal.recent(10, "a")} == {"a"}
    assert journal.prune(T + 2) == 2
    journal.close()


def test_a_journal_from_a_newer_sentinel_is_moved_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("PRAGMA user_version=99")
    db.close()
    health = StateHealth()
    journal = Journal.in_dir(tmp_path, health)
    assert journal.durable and journal.recent() == []
    journal.close()
    (moved,) = tmp_path.glob(f"{FILENAME}.newer-*")
    assert sqlite3.connect(moved).execute("PRAGMA user_version").fetchone()[0] == 99
    assert "written by a newer Sentinel (schema 99" in caplog.text
    assert health.store("journal").moved_aside_total == 1
