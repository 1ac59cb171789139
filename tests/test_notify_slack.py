"""Slack incoming webhook against a local server playing Slack (ok, 429 + Retry-After, 500)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from sentinel.notify.actions import ActionReport
from sentinel.notify.delivery import backoff_delay
from sentinel.notify.testing import RecordingReceiver, Reply, alert_event, running_notifier, wait_drained
from sentinel.store import Store, labels_from


def slack_config(url: str, **overrides: object) -> dict[str, Any]:
    slack = {"name": "ops", "url": url + "/services/T000/B000/XXXX", "group_wait": 0.3, "min_interval": 0.0}
    slack.update(overrides)
    return {"slack": [slack], "outbox": {"min_backoff": 0.2, "max_backoff": 2.0}}


def report(worker: str = "qwen3", ts: int = 1_700_000_000_000, **kw: Any) -> ActionReport:
    fields: dict[str, Any] = {
        "worker": worker,
        "action": "reduce_batch",
        "outcome": "succeeded",
        "timestamp_ms": ts,
        "from_profile": "full",
        "to_profile": "reduced",
        "alertname": "CudaOOM",
        "seconds_to_healthy": 41.0,
    }
    fields.update(kw)
    return ActionReport(**fields)


def sections(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in message["blocks"] if b["type"] == "section"]


async def test_slack_groups_alerts_that_fire_together_into_one_block_kit_message(tmp_path: Path) -> None:
    async with (
        RecordingReceiver() as slack,
        running_notifier(
            slack_config(slack.url), tmp_path / "state", external_labels={"host": "gpu-node-7"}
        ) as notifier,
    ):
        notifier.on_alert(
            alert_event(
                "CudaOOM",
                {"worker": "qwen3", "gpu": "0", "severity": "critical"},
                {"summary": "CUDA out of memory on GPU 0", "runbook_url": "https://runbooks.test/cuda-oom"},
                value=3,
            )
        )
        notifier.on_alert(alert_event("CudaOOM", {"worker": "qwen3", "gpu": "1", "severity": "critical"}))
        notifier.on_alert(alert_event("GpuFellOffTheBus", {"gpu": "5"}, {"summary": "Xid 79 on GPU 5"}))
        [request] = await slack.wait_for(1)
        assert len(slack.requests) == 1

    message = request.json()
    assert set(message) == {"text", "blocks"}
    assert message["text"].startswith("[FIRING:3]")
    assert [b["type"] for b in message["blocks"]] == ["header"] + ["section", "context"] * 3
    header = message["blocks"][0]
    assert header["text"]["type"] == "plain_text"
    assert "3 firing on gpu-node-7" in header["text"]["text"]
    first = sections(message)[0]
    assert first["text"]["type"] == "mrkdwn"
    assert "*CudaOOM* (critical)" in first["text"]["text"]
    assert "CUDA out of memory on GPU 0" in first["text"]["text"]
    assert "<https://runbooks.test/cuda-oom|Runbook>" in first["text"]["text"]
    fields = [f["text"] for f in first["fields"]]
    assert fields == ["*Host*\ngpu-node-7", "*Worker*\nqwen3", "*GPU*\n0", "*Value*\n3"]
    # Each alert's dedup key is its block_id and travels in a header too.
    keys = [s["block_id"] for s in sections(message)]
    assert request.headers["X-Sentinel-Dedup-Key"] == ",".join(keys)
    assert len(set(keys)) == 3


async def test_slack_resolved_alert_gets_its_own_message(tmp_path: Path) -> None:
    async with (
        RecordingReceiver() as slack,
        running_notifier(slack_config(slack.url, group_wait=0), tmp_path / "state") as notifier,
    ):
        start = 1_700_000_000_000
        worker = {"worker": "qwen3"}
        notifier.on_alert(alert_event("EngineStalled", worker, active_at_ms=start, at_ms=start + 30_000))
        await slack.wait_for(1)
        notifier.on_alert(
            alert_event(
                "EngineStalled",
                worker,
                status="resolved",
                active_at_ms=start,
                fired_at_ms=start + 30_000,
                at_ms=start + 222_000,
            )
        )
        requests = await slack.wait_for(2)

    resolved = requests[1].json()
    assert resolved["text"].startswith("[RESOLVED] Resolved: EngineStalled")
    [section] = sections(resolved)
    assert "Resolved: *EngineStalled*" in section["text"]["text"]
    assert "Resolved after 3m 12s." in section["text"]["text"]


async def test_slack_action_report_reads_as_a_sentence(tmp_path: Path) -> None:
    async with (
        RecordingReceiver() as slack,
        running_notifier(slack_config(slack.url), tmp_path / "state") as notifier,
    ):
        await notifier.report_action(report())
        [request] = await slack.wait_for(1)

    message = request.json()
    assert message["text"] == "reduced batch on qwen3 from full to reduced after CudaOOM; healthy again in 41 s"
    [section] = sections(message)
    assert section["text"]["text"] == (
        ":white_check_mark: reduced batch on qwen3 from full to reduced after CudaOOM; healthy again in 41 s"
    )
    assert "*Profile*\nfull → reduced" in [f["text"] for f in section["fields"]]


async def test_slack_rate_limit_spaces_messages_about_one_second_apart(tmp_path: Path) -> None:
    async with (
        RecordingReceiver() as slack,
        running_notifier(slack_config(slack.url, min_interval=1.0), tmp_path / "state") as notifier,
    ):
        for i in range(3):
            notifier.report_action(report(worker=f"w{i}", ts=1_700_000_000_000 + i))
        requests = await slack.wait_for(3, timeout=15)

    gaps = [b.at - a.at for a, b in itertools.pairwise(requests)]
    assert all(gap >= 0.95 for gap in gaps), gaps
    assert all(gap < 2.5 for gap in gaps), gaps  # the limit spaces messages; it does not stall them
    # Reports go out in the order they were made.
    assert [r.json()["text"].split()[3] for r in requests] == ["w0", "w1", "w2"]


async def test_slack_retries_with_backoff_and_honours_retry_after(tmp_path: Path) -> None:
    script = [Reply(200, "ok"), Reply(429, "rate_limited", {"Retry-After": "1"}), Reply(500, "internal_error")]
    store = Store()
    seed = 1234
    async with (
        RecordingReceiver(script) as slack,
        running_notifier(
            slack_config(slack.url, group_wait=0), tmp_path / "state", store=store, rng=random.Random(seed)
        ) as notifier,
    ):
        await notifier.report_action(report(worker="a"))
        await slack.wait_for(1)
        await notifier.report_action(report(worker="b"))
        await slack.wait_for(2, timeout=15)
        await wait_drained(notifier)
        assert notifier.queue_lengths() == {"ops": 0}

    _first, limited, failed, retried = slack.requests
    assert [r.status for r in slack.requests] == [200, 429, 500, 200]
    assert limited.body == failed.body == retried.body  # the same message, tried again
    assert failed.at - limited.at >= 0.95  # Retry-After: 1 outranks a shorter jittered backoff
    # Full jitter: the second failure waits uniform(0, min(max_backoff, 0.2 * 2)); same seed, same draw.
    rng = random.Random(seed)
    backoff_delay(1, 0.2, 2.0, rng)
    second_delay = backoff_delay(2, 0.2, 2.0, rng)
    assert retried.at - failed.at >= second_delay * 0.9
    assert retried.at - failed.at < second_delay + 1.0

    def count(outcome: str) -> float | None:
        series = store.get(labels_from("sentinel_notifications_total", receiver="ops", outcome=outcome))
        return None if series is None else series.last_value

    assert count("sent") == 2
    assert count("failed") == 2  # each failed try counts
    assert count("dropped") == 0
    latency = store.get(labels_from("sentinel_notification_latency_seconds", receiver="ops"))
    assert latency is not None and latency.last_value is not None and latency.last_value >= 0.95
    queue = store.get(labels_from("sentinel_notification_queue_length", receiver="ops"))
    assert queue is not None and queue.last_value == 0


async def test_slack_payload_rejected_for_good_is_dropped_and_counted(tmp_path: Path) -> None:
    store = Store()
    async with (
        RecordingReceiver([Reply(400, "invalid_blocks")]) as slack,
        running_notifier(slack_config(slack.url), tmp_path / "state", store=store) as notifier,
    ):
        await notifier.report_action(report(worker="a"))
        await notifier.report_action(report(worker="b"))
        [accepted] = await slack.wait_for(1)

    assert [r.status for r in slack.requests] == [400, 200]  # the queue went on past the bad one
    assert accepted.json()["text"].startswith("reduced batch on b ")
    dropped = store.get(labels_from("sentinel_notifications_total", receiver="ops", outcome="dropped"))
    assert dropped is not None and dropped.last_value == 1
