"""The durable outbox: kill -9 loses nothing, the bound drops the oldest loudly, backoff stays in bounds."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentinel.notify.actions import ActionReport
from sentinel.notify.delivery import backoff_delay
from sentinel.notify.outbox import Item, Outbox, Row
from sentinel.notify.testing import RecordingReceiver, alert_event, running_notifier, wait_drained
from sentinel.store import Store, labels_from
from tests.support import eventually_async as eventually

REPO = Path(__file__).resolve().parent.parent

# A notifier that enqueues notifications to a receiver that is down, printing each key
# once `report_action`'s future says it is on disk, until it is killed.
ENQUEUER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from sentinel.notify.actions import ActionReport
    from sentinel.notify.dispatcher import Notifier
    from sentinel.notify.settings import NotifyConfig
    from sentinel.notify.testing import alert_event
    from sentinel.store import Store

    async def main() -> None:
        state, url, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        config = NotifyConfig.model_validate(
            {"webhook": [{"name": "hook", "url": url}], "outbox": {"min_backoff": 0.05, "max_backoff": 0.3}}
        )
        notifier = Notifier(config, Store(), state, "http://sentinel.test/", {}, 1.0)
        await notifier.start()
        for i in range(count):
            if i % 2:
                report = ActionReport(worker=f"w{i}", action="restart", outcome="succeeded", timestamp_ms=i)
                await notifier.report_action(report)
                key = report.dedup_key
            else:
                event = alert_event("Probe", {"n": str(i)}, active_at_ms=1000 + i)
                notifier.on_alert(event)
                await notifier.flush()
                key = f"{event.alert.fingerprint}:firing:{1000 + i}"
            print(key, flush=True)
        print("done", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counter(store: Store, receiver: str, outcome: str) -> float | None:
    series = store.get(labels_from("sentinel_notifications_total", receiver=receiver, outcome=outcome))
    return None if series is None else series.last_value


async def test_notifications_survive_kill_9_and_arrive_at_least_once(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here until the first notifier is dead
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ENQUEUER,
        str(state),
        f"http://127.0.0.1:{port}/hook",
        "400",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    durable: list[str] = []
    try:
        assert proc.stdout is not None
        # Kill it in the middle of enqueueing: after 60 keys were confirmed on disk.
        while len(durable) < 60:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the enqueuer died"
            durable.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -signal.SIGKILL

    config = {"webhook": [{"name": "hook", "url": f"http://127.0.0.1:{port}/hook"}]}
    async with RecordingReceiver(port=port) as hook, running_notifier(config, state) as notifier:
        await hook.wait_for(len(durable), timeout=30)
        await wait_drained(notifier)
        assert notifier.queue_lengths() == {"hook": 0}

    received = [r.headers["X-Sentinel-Dedup-Key"] for r in hook.accepted()]
    assert set(durable) <= set(received)  # none confirmed is lost
    # Whatever repeats is recognisable as a repeat by its key (and groupKey says the same).
    assert all(r.json()["groupKey"] == r.headers["X-Sentinel-Dedup-Key"] for r in hook.accepted())
    assert len(set(received)) >= len(durable)


async def test_queue_bound_drops_oldest_counts_them_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store()
    config = {
        "webhook": [{"name": "hook", "url": f"http://127.0.0.1:{free_port()}/down"}],
        "outbox": {"max_length": 5, "min_backoff": 5, "max_backoff": 10},
    }
    caplog.set_level(logging.INFO, logger="sentinel.notify")
    async with running_notifier(config, tmp_path / "state", store=store) as notifier:
        reports = [ActionReport(worker=f"w{i}", action="restart", outcome="started", timestamp_ms=i) for i in range(8)]
        for r in reports:
            await notifier.report_action(r)
        assert notifier.queue_lengths() == {"hook": 5}
        rows = await notifier.outbox.rows("hook")
        assert [row.dedup_key for row in rows] == [r.dedup_key for r in reports[3:]]  # the newest five
        assert counter(store, "hook", "dropped") == 3
        queue = store.get(labels_from("sentinel_notification_queue_length", receiver="hook"))
        assert queue is not None and queue.last_value == 5

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "queue full" in r.getMessage()]
    assert len(warnings) == 1
    assert 'outcome="dropped"' in warnings[0].getMessage()


async def test_same_dedup_key_is_queued_once_and_coalescing_keeps_the_latest(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_length=100)
    await outbox.open()
    try:
        first = await outbox.enqueue([Item("r", "k1", '{"v": 1}'), Item("r", "k1", '{"v": 2}')])
        assert first.inserted == {"r": 1} and first.duplicates == {"r": 1}
        await outbox.enqueue([Item("am", "fp", '{"state": "firing"}', coalesce=True)])
        await outbox.enqueue([Item("am", "fp", '{"state": "resolved"}', coalesce=True)])
        assert [r.payload for r in await outbox.rows("r")] == ['{"v": 1}']
        assert [r.payload for r in await outbox.rows("am")] == ['{"state": "resolved"}']
        assert outbox.lengths() == {"r": 1, "am": 1}
    finally:
        await outbox.close()
    # The counts come back from the file after a restart.
    reopened = Outbox(tmp_path / "o.sqlite", max_length=100)
    await reopened.open()
    try:
        assert reopened.lengths() == {"r": 1, "am": 1}
    finally:
        await reopened.close()


async def test_restart_resumes_backoff_and_keeps_order(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "webhook": [{"name": "hook", "url": f"http://127.0.0.1:{port}/hook"}],
        "outbox": {"min_backoff": 0.05, "max_backoff": 0.2},
    }
    state = tmp_path / "state"
    async with running_notifier(config, state) as notifier:
        for i in range(3):
            await notifier.report_action(ActionReport(worker=f"w{i}", action="stop", outcome="started", timestamp_ms=i))
        await eventually(lambda: notifier.deliverer("hook").failures >= 2, what="failed tries")  # receiver down
    rows = await _rows(state)
    assert rows[0].attempts >= 1 and rows[0].last_error
    async with RecordingReceiver(port=port) as hook, running_notifier(config, state) as notifier:
        requests = await hook.wait_for(3)
        await wait_drained(notifier)
    assert [r.json()["alerts"][0]["labels"]["worker"] for r in requests] == ["w0", "w1", "w2"]


async def _rows(state: Path) -> list[Row]:
    outbox = Outbox(state / "notifications.sqlite", max_length=10)
    await outbox.open()
    try:
        return list(await outbox.rows())
    finally:
        await outbox.close()


@given(
    failures=st.integers(min_value=1, max_value=200),
    min_backoff=st.floats(min_value=0.001, max_value=60),
    max_backoff=st.floats(min_value=60, max_value=3600),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_full_jitter_under_a_doubling_ceiling(
    failures: int, min_backoff: float, max_backoff: float, seed: int
) -> None:
    delay = backoff_delay(failures, min_backoff, max_backoff, random.Random(seed))
    assert 0 <= delay <= min(max_backoff, min_backoff * 2 ** (failures - 1))


def test_backoff_ceiling_doubles_until_the_cap() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    assert [backoff_delay(n, 1.0, 10.0, Top()) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


async def test_pending_alert_events_are_not_queued(tmp_path: Path) -> None:
    config = {"webhook": [{"name": "hook", "url": f"http://127.0.0.1:{free_port()}/x"}]}
    async with running_notifier(config, tmp_path / "state") as notifier:
        notifier.on_alert(alert_event("Slow", status="pending"))
        await notifier.flush()
        assert notifier.queue_lengths() == {"hook": 0}


async def test_unreadable_row_is_dropped_and_the_queue_goes_on(tmp_path: Path) -> None:
    store = Store()
    state = tmp_path / "state"
    outbox = Outbox(state / "notifications.sqlite", max_length=10)
    await outbox.open()
    await outbox.enqueue([Item("hook", "garbage", "{not json")])  # e.g. written by a future version
    await outbox.close()
    async with RecordingReceiver() as hook:
        config = {"webhook": [{"name": "hook", "url": hook.url}]}
        async with running_notifier(config, state, store=store) as notifier:
            await notifier.report_action(ActionReport(worker="w", action="restart", outcome="started", timestamp_ms=1))
            [request] = await hook.wait_for(1)
            await wait_drained(notifier)
    assert request.json()["alerts"][0]["labels"]["worker"] == "w"
    assert counter(store, "hook", "dropped") == 1
