"""Generic webhook: Alertmanager's v4 payload, HMAC signature, dedup key; real loopback servers."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from pathlib import Path

import pytest

from sentinel.notify.actions import ActionReport
from sentinel.notify.testing import EXTERNAL_URL, RecordingReceiver, alert_event, running_notifier

V4_KEYS = {
    "version",
    "groupKey",
    "truncatedAlerts",
    "status",
    "receiver",
    "groupLabels",
    "commonLabels",
    "commonAnnotations",
    "externalURL",
    "alerts",
}
V4_ALERT_KEYS = {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def hook_config(secret_file: Path | None = None) -> dict[str, object]:
    # The URL comes from the environment, as a deployment would give it.
    hook: dict[str, object] = {"name": "pager", "url_env": "SENTINEL_TEST_HOOK_URL"}
    if secret_file is not None:
        hook["hmac_secret_file"] = str(secret_file)
    return {"webhook": [hook], "outbox": {"min_backoff": 0.05, "max_backoff": 0.5}}


async def test_webhook_posts_alertmanager_v4_payload_signed_with_hmac(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = b"s3cr3t-hmac-key"
    secret_file = tmp_path / "hmac"
    secret_file.write_bytes(secret + b"\n")  # as `echo` writes it: the newline is not part of the key
    async with RecordingReceiver() as hook:
        monkeypatch.setenv("SENTINEL_TEST_HOOK_URL", hook.url + "/alerts")
        async with running_notifier(
            hook_config(secret_file), tmp_path / "state", external_labels={"cluster": "gpu-a"}
        ) as notifier:
            event = alert_event(
                "CudaOOM",
                {"worker": "qwen3", "gpu": "0", "severity": "critical"},
                {"summary": "CUDA OOM on qwen3", "runbook_url": "https://runbooks.test/oom"},
                expr="increase(sentinel_probe_cuda_ooms_total[1m]) > 0",
            )
            notifier.on_alert(event)
            [request] = await hook.wait_for(1)

    body = request.json()
    assert set(body) == V4_KEYS
    assert body["version"] == "4"
    assert body["truncatedAlerts"] == 0
    assert body["status"] == "firing"
    assert body["receiver"] == "pager"
    assert body["externalURL"] == EXTERNAL_URL
    assert body["groupLabels"] == {"alertname": "CudaOOM"}
    labels = {"alertname": "CudaOOM", "worker": "qwen3", "gpu": "0", "severity": "critical", "cluster": "gpu-a"}
    assert body["commonLabels"] == labels
    assert body["commonAnnotations"] == {"summary": "CUDA OOM on qwen3", "runbook_url": "https://runbooks.test/oom"}
    [alert] = body["alerts"]
    assert set(alert) == V4_ALERT_KEYS
    assert alert["status"] == "firing"
    assert alert["labels"] == labels
    assert parse_rfc3339(alert["startsAt"]).timestamp() * 1000 == event.alert.fired_at_ms
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"  # Alertmanager's zero time for a firing alert
    assert alert["generatorURL"] == (
        EXTERNAL_URL + "graph?g0.expr=increase%28sentinel_probe_cuda_ooms_total%5B1m%5D%29+%3E+0&g0.tab=1"
    )
    assert len(alert["fingerprint"]) == 16

    # The receiver verifies the signature over the exact bytes with the shared secret.
    expected = "sha256=" + hmac.new(secret, request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Sentinel-Signature"], expected)
    tampered = request.body.replace(b"qwen3", b"qwen4")
    assert request.headers["X-Sentinel-Signature"] != "sha256=" + hmac.new(secret, tampered, hashlib.sha256).hexdigest()
    # The dedup key rides in the header and in groupKey.
    assert request.headers["X-Sentinel-Dedup-Key"] == body["groupKey"]
    assert body["groupKey"].startswith(alert["fingerprint"] + ":firing:")


async def test_webhook_resolved_alert_carries_resolution_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with RecordingReceiver() as hook:
        monkeypatch.setenv("SENTINEL_TEST_HOOK_URL", hook.url + "/alerts")
        async with running_notifier(hook_config(), tmp_path / "state") as notifier:
            firing = alert_event("XidError", {"gpu": "3"}, active_at_ms=1_700_000_000_000, at_ms=1_700_000_005_000)
            resolved = alert_event(
                "XidError", {"gpu": "3"}, status="resolved", active_at_ms=1_700_000_000_000, at_ms=1_700_000_065_000
            )
            notifier.on_alert(firing)
            notifier.on_alert(resolved)
            requests = await hook.wait_for(2)

    first, second = (r.json() for r in requests)
    assert first["status"] == "firing" and second["status"] == "resolved"
    assert "X-Sentinel-Signature" not in requests[0].headers  # no secret configured
    [alert] = second["alerts"]
    assert alert["status"] == "resolved"
    assert alert["endsAt"] == "2023-11-14T22:14:25.000Z"
    assert alert["startsAt"] == "2023-11-14T22:13:20.000Z"  # startsAt stays the firing time, as Prometheus sends
    assert first["groupKey"] != second["groupKey"]


async def test_webhook_ignores_pending_transitions_and_carries_action_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RecordingReceiver() as hook:
        monkeypatch.setenv("SENTINEL_TEST_HOOK_URL", hook.url + "/alerts")
        async with running_notifier(hook_config(), tmp_path / "state") as notifier:
            notifier.on_alert(alert_event("SlowTokens", {"worker": "qwen3"}, status="pending"))
            await notifier.report_action(
                ActionReport(
                    worker="qwen3",
                    action="restart",
                    outcome="failed",
                    timestamp_ms=1_700_000_000_000,
                    alertname="EngineDead",
                    detail="unit vllm@qwen3 failed to start",
                    severity="critical",
                )
            )
            [request] = await hook.wait_for(1)

    body = request.json()
    assert set(body) == V4_KEYS
    [alert] = body["alerts"]
    assert alert["labels"]["alertname"] == "SentinelAction"
    assert alert["labels"]["outcome"] == "failed"
    assert alert["status"] == "firing"  # a failed action needs someone
    assert alert["annotations"]["summary"] == (
        "failed to restart qwen3 after EngineDead: unit vllm@qwen3 failed to start"
    )
    assert len(hook.requests) == 1  # the pending transition sent nothing
