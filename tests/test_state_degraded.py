"""A state directory that refuses writes: remediation and notifications go on, and say what they hold.

The disk fills up through SQLite's own limit (`PRAGMA max_page_count`), which fails
writes exactly as a full disk does ("database or disk is full", SQLITE_FULL); the
daemon-level test (test_state_daemon.py) fills it with a real file-size limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sentinel.notify.outbox import Outbox
from sentinel.notify.testing import RecordingReceiver, alert_event, running_notifier
from sentinel.remediation.journal import Journal
from tests.remediation_fakes import (
    Harness,
    close_harnesses,  # noqa: F401  (autouse: closes what a failed test left open)
    firing,
    policy,
    worker,
)
from tests.support import eventually_async as eventually


def fill(db: object) -> None:
    """Let the SQLite file grow no more: every write that needs a new page fails as on a full disk."""
    conn = db.conn  # type: ignore[attr-defined]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def unfill(db: object) -> None:
    db.conn.execute("PRAGMA max_page_count = 1073741823")  # type: ignore[attr-defined]


def journal_db(h: Harness) -> object:
    writer = h.remediator._journal  # the one way in for a fault: the engine's own connection
    assert writer is not None
    return writer.journal._db


async def test_a_full_disk_at_the_write_ahead_row_neither_wedges_the_worker_nor_the_host(tmp_path: Path) -> None:
    cfg = policy(max_concurrent=1, circuit_breaker={"max_ratio": 1.0})
    h = Harness(tmp_path, cfg, [worker("a", gpus=[0]), worker("b", gpus=[1])])
    await h.remediator.start()
    try:
        db = journal_db(h)
        fill(db)
        for i in range(30):  # use up the pages the file still had free
            h.remediator.on_alert(firing("Noise", worker="a", action="notify_only", active_at_ms=i))
        await h.remediator.wait_idle()
        assert h.health.store("journal").failing is not None

        h.remediator.on_alert(firing("EngineStalled", worker="a", action="restart", active_at_ms=100))
        await h.remediator.wait_idle()
        assert h.backend("a").calls == [("restart", "full")]
        workers = {w["name"]: w for w in h.remediator.workers_json()["workers"]}
        assert workers["a"]["state"] == "ok" and workers["a"]["in_flight"] is None  # not "acting" forever
        started = next(r for r in h.reports if r.action == "restart" and r.outcome == "started")
        assert "not journaled yet" in started.detail
        assert h.outcomes("a")[-1] == ("restart", "succeeded")
        # The host's only slot is free again: the other worker is healed too.
        h.remediator.on_alert(firing("EngineStalled", worker="b", action="restart", active_at_ms=100))
        await h.remediator.wait_idle()
        assert h.backend("b").calls == [("restart", "full")]
        held = h.health.store("journal").unsaved
        assert held > 0 and h.health.store("journal").degraded

        # Space is freed: the held writes land, in order, at the next tick.
        unfill(db)
        await h.remediator.tick()
        await h.remediator.wait_idle()
        assert h.health.store("journal").unsaved == 0 and not h.health.store("journal").degraded
        rows = [r for r in await h.remediator.actions_json(100) if r["action"] == "restart"]
        assert sorted((r["worker"], r["outcome"]) for r in rows) == [("a", "succeeded"), ("b", "succeeded")]
    finally:
        await h.remediator.close()
    reopened = Journal.in_dir(tmp_path)
    assert {r.worker for r in reopened.recent(100) if r.action == "restart"} == {"a", "b"}
    reopened.close()


async def test_notifications_are_delivered_from_memory_while_the_outbox_cannot_be_written(tmp_path: Path) -> None:
    async with RecordingReceiver() as receiver:
        config = {"webhook": [{"name": "hook", "url": receiver.url}]}
        async with running_notifier(config, tmp_path) as notifier:
            outbox: Outbox = notifier.outbox
            fill(outbox._db)
            for i in range(40):  # more than the free pages hold
                notifier.on_alert(alert_event("GpuHot", {"gpu": str(i)}))
            await notifier.flush()
            accepted = await receiver.wait_for(1)
            alerts = [a for r in accepted for a in r.json()["alerts"]]
            await eventually(
                lambda: len({a["labels"]["gpu"] for r in receiver.accepted() for a in r.json()["alerts"]}) == 40
            )
            assert alerts  # the firing notifications went out although the disk was full
            await eventually(lambda: outbox.length("hook") == 0, what="queue drained")
            unfill(outbox._db)
            notifier.on_alert(alert_event("GpuHot", {"gpu": "0"}, status="resolved"))
            await notifier.flush()
            rows = await outbox.rows("hook")
            assert all(r.id > 0 for r in rows)  # written to the file again
            await eventually(lambda: outbox.length("hook") == 0, what="resolved delivered")
            await asyncio.sleep(0)
