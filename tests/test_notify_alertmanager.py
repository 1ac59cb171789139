"""Alertmanager push: a real Alertmanager on loopback, and Prometheus's resend/endsAt semantics."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sentinel.notify.testing import EXTERNAL_URL, RecordingReceiver, Reply, alert_event, running_notifier
from sentinel.rules.rulefile import Rule
from sentinel.rules.state import Alert, AlertState
from tests.conftest import require_tool

AM_CONFIG = """
global:
  resolve_timeout: 5m
route:
  receiver: hook
  group_by: [alertname]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {url}
        send_resolved: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


@pytest.fixture
async def hook() -> AsyncIterator[RecordingReceiver]:
    async with RecordingReceiver() as receiver:
        yield receiver


@pytest.fixture
async def alertmanager(tmp_path: Path, hook: RecordingReceiver) -> AsyncIterator[str]:
    """A real Alertmanager (cluster off) that forwards everything to `hook`."""
    binary = require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    config = tmp_path / "alertmanager.yml"
    config.write_text(AM_CONFIG.format(url=hook.url + "/am"))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("wb")  # a file, not a pipe nobody drains
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, proc, tmp_path / "alertmanager.log")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _wait_ready(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"alertmanager exited with {proc.returncode}:\n{await asyncio.to_thread(log.read_text)}"
                )
            try:
                async with session.get(url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("alertmanager did not become ready in 30s")


@pytest.mark.integration
async def test_alertmanager_forwards_firing_then_resolved_pushed_by_sentinel(
    tmp_path: Path, alertmanager: str, hook: RecordingReceiver
) -> None:
    config = {"alertmanager": [{"urls": [alertmanager], "resend_delay": "1m"}]}
    labels = {"worker": "qwen3", "gpu": "2", "severity": "critical"}
    annotations = {"summary": "GPU 2 fell off the bus"}
    async with running_notifier(config, tmp_path / "state", external_labels={"host": "gpu-node-3"}) as notifier:
        start = int(time.time() * 1000) - 5000
        notifier.on_alert(alert_event("GpuFellOffTheBus", labels, annotations, active_at_ms=start, expr="xid == 79"))
        [firing] = await hook.wait_for(1, timeout=30)
        notifier.on_alert(
            alert_event(
                "GpuFellOffTheBus", labels, annotations, status="resolved", active_at_ms=start, expr="xid == 79"
            )
        )
        requests = await hook.wait_for(2, timeout=30)

    first, second = firing.json(), requests[1].json()
    assert first["version"] == "4"
    assert first["status"] == "firing"
    [alert] = first["alerts"]
    assert alert["labels"] == {**labels, "alertname": "GpuFellOffTheBus", "host": "gpu-node-3"}
    assert alert["annotations"] == annotations
    assert alert["generatorURL"] == EXTERNAL_URL + "graph?g0.expr=xid+%3D%3D+79&g0.tab=1"
    assert second["status"] == "resolved"
    [resolved] = second["alerts"]
    assert resolved["status"] == "resolved"
    assert resolved["labels"] == alert["labels"]
    assert ms(resolved["endsAt"]) <= time.time() * 1000


@pytest.mark.wallclock
async def test_push_carries_endsat_from_resend_delay_and_resends_firing_alerts(tmp_path: Path) -> None:
    async with RecordingReceiver() as am:
        config = {"alertmanager": [{"name": "am", "urls": [am.url + "/prefix/"], "resend_delay": 0.4}]}
        async with running_notifier(config, tmp_path / "state", eval_interval_s=0.1) as notifier:
            notifier.on_alert(alert_event("HotExpert", {"worker": "qwen3"}, expr="balancedness < 0.5"))
            requests = await am.wait_for(3, timeout=10)

    assert {r.path for r in requests} == {"/prefix/api/v2/alerts"}
    for request in requests:
        [alert] = request.json()
        assert set(alert) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
        assert alert["labels"] == {"alertname": "HotExpert", "worker": "qwen3"}
        # endsAt = send time + 4 * max(eval interval, resend_delay): here 1.6 s after the push.
        assert abs(ms(alert["endsAt"]) - (request.wall * 1000 + 1600)) < 400
    gaps = [b.at - a.at for a, b in itertools.pairwise(requests)]
    # Re-sent about every resend_delay (0.4 s), not every evaluation (0.1 s). Arrival times
    # carry delivery jitter on a loaded machine, so the mean is checked, not each gap.
    assert all(gap < 2.0 for gap in gaps) and sum(gaps) / len(gaps) > 0.3, gaps


async def test_alertmanager_outage_delivers_only_the_latest_state_per_alert(tmp_path: Path) -> None:
    script = [Reply(503, "unavailable", {"Retry-After": "1"})]
    async with RecordingReceiver(script) as am:
        config = {"alertmanager": [{"name": "am", "urls": [am.url], "resend_delay": "1m"}]}
        async with running_notifier(config, tmp_path / "state") as notifier:
            start = 1_700_000_000_000
            notifier.on_alert(alert_event("EngineDead", {"worker": "a"}, active_at_ms=start))
            await asyncio.sleep(0.3)  # the first push fails; Alertmanager asks for a second
            notifier.on_alert(alert_event("EngineDead", {"worker": "a"}, status="resolved", active_at_ms=start))
            notifier.on_alert(alert_event("EngineDead", {"worker": "b"}, active_at_ms=start))
            [accepted] = await am.wait_for(1, timeout=10)

    assert len(am.requests) == 2
    pushed = {a["labels"]["worker"]: a for a in accepted.json()}
    assert set(pushed) == {"a", "b"}  # one entry per alert, not a history
    assert ms(pushed["a"]["endsAt"]) < time.time() * 1000  # resolved: endsAt is the resolution time
    assert ms(pushed["b"]["endsAt"]) > time.time() * 1000  # firing: endsAt in the future


async def test_restarted_notifier_resends_alerts_the_rule_manager_restored(tmp_path: Path) -> None:
    rule = Rule(kind="alert", name="NcclHang", expr="nccl_stuck > 0", file="f", group="g", index=0, line=1)
    restored = Alert(
        labels={"alertname": "NcclHang", "worker": "coder"},
        annotations={},
        state=AlertState.FIRING,
        value=1.0,
        active_at_ms=1_700_000_000_000,
        fired_at_ms=1_700_000_060_000,
    )
    pending = Alert({"alertname": "Other"}, {}, AlertState.PENDING, 1.0, 1_700_000_000_000)

    def active_alerts() -> list[tuple[Any, Rule, Alert]]:
        return [(None, rule, restored), (None, rule, pending)]

    async with RecordingReceiver() as am:
        config = {"alertmanager": [{"name": "am", "urls": [am.url], "resend_delay": "1m"}]}
        async with running_notifier(config, tmp_path / "state", active_alerts=active_alerts):
            [request] = await am.wait_for(1, timeout=10)

    [alert] = request.json()  # the pending one is not sent
    assert alert["labels"] == {"alertname": "NcclHang", "worker": "coder"}
    assert alert["startsAt"] == "2023-11-14T22:14:20.000Z"  # StartsAt = FiredAt, as Prometheus sends
