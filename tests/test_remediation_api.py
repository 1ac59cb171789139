"""The remediation HTTP API and the operator CLI, against a real aiohttp server on port 0."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sentinel.api.control import ControlToken, remediation_routes
from sentinel.api.prometheus import prometheus_api_routes
from sentinel.api.server import ServerContext, start_server
from sentinel.cli import ops as opscli
from sentinel.rules.state import Alert, AlertState
from tests.remediation_fakes import (
    Harness,
    Wall,
    close_harnesses,  # noqa: F401  (autouse: closes what a failed test left open)
    firing,
    policy,
    worker,
)

TOKEN = "s3cret-token-0123456789abcdef"
GPUS = [
    {
        "index": 0,
        "up": True,
        "utilization": 0.5,
        "memory_used_bytes": 40 * 2**30,
        "temperature_celsius": 61,
        "power_watts": 250,
        "name": "NVIDIA H100 80GB HBM3",
        "problem": None,
    },
    {"index": 1, "up": False, "name": "NVIDIA H100 80GB HBM3", "problem": "GPU is lost (Xid 79)"},
]


class FiringRules:
    """Just enough of a RuleManager for /api/v1/alerts."""

    def active_alerts(self) -> list[tuple[Any, Any, Alert]]:
        alert = Alert(
            labels={"alertname": "CudaOOM", "worker": "qwen", "severity": "critical"},
            annotations={"summary": "CUDA out of memory on qwen"},
            state=AlertState.FIRING,
            value=1.0,
            active_at_ms=int((time.time() - 120) * 1000),
        )
        return [(None, None, alert)]


@dataclass
class Served:
    harness: Harness
    token: ControlToken
    token_file: Path
    url: str


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    token_file = tmp_path / "control-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    token = ControlToken(str(token_file))
    await token.reload()
    workers = [worker("qwen", gpus=[0]), worker("llama", gpus=[1])]
    h = Harness(tmp_path / "state", policy(), workers, wall=Wall(time.time()))
    await h.remediator.start()
    routes = remediation_routes(lambda: h.remediator, token)
    routes += prometheus_api_routes(lambda: None, lambda: FiringRules())  # type: ignore[arg-type,return-value]
    ctx = ServerContext(h.store, lambda: True, lambda: GPUS, lambda: [], extra_routes=routes)
    runner, port = await start_server(ctx, "127.0.0.1", 0)
    try:
        yield Served(h, token, token_file, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await h.remediator.close()


async def call(method: str, url: str, token: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


# -- the API -------------------------------------------------------------------------------


async def test_reads_and_metrics_are_open(served: Served) -> None:
    status, body, _ = await call("GET", served.url + "/api/v1/workers")
    assert status == 200 and [w["name"] for w in body["data"]["workers"]] == ["qwen", "llama"]
    status, body, _ = await call("GET", served.url + "/api/v1/actions?limit=5")
    assert status == 200 and body["data"] == []
    async with aiohttp.ClientSession() as session, session.get(served.url + "/metrics") as resp:
        assert resp.status == 200 and "sentinel_worker_profile" in await resp.text()


async def test_mutating_endpoints_need_the_bearer_token(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = served.url + "/api/v1/workers/qwen/pause"
    status, body, headers = await call("POST", url)
    assert status == 401 and "Bearer" in headers.get("WWW-Authenticate", "") and body["status"] == "error"
    status, body, _ = await call("POST", url, "not-the-token-at-all-000")
    assert status == 403 and body["error"] == "wrong bearer token"
    status, _, _ = await call("POST", url, TOKEN[:-1])
    assert status == 403
    assert not served.harness.remediator.workers_json()["workers"][0]["paused"]

    status, body, _ = await call("POST", url, TOKEN)
    assert status == 200
    assert [w["paused"] for w in body["data"]["workers"]] == [True, False]
    status, body, _ = await call("POST", served.url + "/api/v1/workers/qwen/resume", TOKEN)
    assert status == 200 and not body["data"]["workers"][0]["paused"]
    status, body, _ = await call("POST", served.url + "/api/v1/pause", TOKEN)
    assert status == 200 and body["data"]["paused"]
    status, body, _ = await call("POST", served.url + "/api/v1/resume", TOKEN)
    assert status == 200 and not body["data"]["paused"]
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text
    assert "refused POST /api/v1/workers/qwen/pause" in caplog.text


async def test_unknown_worker_is_404_and_only_after_authentication(served: Served) -> None:
    status, _, _ = await call("POST", served.url + "/api/v1/workers/ghost/pause")
    assert status == 401
    status, body, _ = await call("POST", served.url + "/api/v1/workers/ghost/pause", TOKEN)
    assert status == 404 and "ghost" in body["error"]


async def test_without_a_token_file_the_mutating_api_is_disabled(served: Served) -> None:
    await served.token.reload(str(served.token_file.parent / "missing"))
    status, body, _ = await call("POST", served.url + "/api/v1/pause", TOKEN)
    assert status == 403 and "disabled" in body["error"] and "cannot read" in body["error"]
    disabled = ControlToken(None)
    disabled.load()
    assert disabled.refusal(f"Bearer {TOKEN}") == (
        403,
        "the control API is disabled: set control.token_file in sentinel.yaml",
    )
    status, _, _ = await call("GET", served.url + "/api/v1/workers")
    assert status == 200
    await served.token.reload(None)  # control.token_file removed from the config
    status, body, _ = await call("POST", served.url + "/api/v1/pause", TOKEN)
    assert status == 403 and "set control.token_file" in body["error"]


async def test_reload_reads_a_rotated_token(served: Served) -> None:
    served.token_file.write_text("a-brand-new-token-0123456789\n")
    await served.token.reload()
    status, _, _ = await call("POST", served.url + "/api/v1/pause", TOKEN)
    assert status == 403
    status, _, _ = await call("POST", served.url + "/api/v1/pause", "a-brand-new-token-0123456789")
    assert status == 200


def test_a_short_token_disables_the_api_and_repr_never_shows_it(tmp_path: Path) -> None:
    short = tmp_path / "t"
    short.write_text("abc")
    token = ControlToken(str(short))
    token.load()
    assert not token.enabled and "shorter than 16" in (token.refusal("Bearer abc") or (0, ""))[1]
    short.write_text(TOKEN)
    token.load()
    assert token.enabled and TOKEN not in repr(token)
    assert token.refusal(f"Basic {TOKEN}") == (401, "this endpoint needs Authorization: Bearer <token>")


async def test_actions_endpoint_lists_the_journal_and_checks_limit(served: Served) -> None:
    served.harness.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await served.harness.remediator.wait_idle()
    status, body, _ = await call("GET", served.url + "/api/v1/actions?limit=1")
    assert status == 200 and [(r["worker"], r["action"], r["outcome"]) for r in body["data"]] == [
        ("qwen", "restart", "succeeded")
    ]
    status, body, _ = await call("GET", served.url + "/api/v1/actions?worker=llama")
    assert status == 200 and body["data"] == []
    for bad in ("abc", "0", "100000"):
        status, body, _ = await call("GET", served.url + f"/api/v1/actions?limit={bad}")
        assert status == 400 and body["errorType"] == "bad_data"


# -- the operator CLI ------------------------------------------------------------------------


async def ops(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(opscli.main, list(argv), out)
    return code, out.getvalue()


async def test_status_prints_gpus_workers_firing_alerts_and_recent_actions(served: Served) -> None:
    served.harness.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await served.harness.remediator.wait_idle()
    code, text = await ops("status", "--url", served.url)
    print(text)  # shown with -s: what an operator sees
    assert code == 0, text
    assert "remediation: act mode, 0 action(s) in flight" in text
    assert "GPUs\nGPU  STATE" in text and "LOST" in text and "40.0 GiB" in text and "Xid 79" in text
    workers = text.split("Workers\n")[1].split("\n\n")[0].splitlines()
    assert workers[0].split()[:3] == ["WORKER", "STATE", "PROFILE"]
    assert workers[1].split()[:4] == ["qwen", "degraded", "reduced", "(2/3)"]
    assert "reduce_batch succeeded" in workers[1]
    assert workers[2].split()[:3] == ["llama", "ok", "full"]
    alerts = text.split("Firing alerts\n")[1].split("\n\n")[0]
    assert "CudaOOM" in alerts and "critical" in alerts and "m ago" in alerts
    recent = text.split("Recent actions\n")[1]
    assert "reduce_batch" in recent and "full -> reduced" in recent


async def test_history_prints_the_journal(served: Served) -> None:
    for i in range(3):
        served.harness.remediator.on_alert(
            firing("EngineStalled", worker="llama", action="restart", active_at_ms=i + 1)
        )
        await served.harness.remediator.wait_idle()
    code, text = await ops("history", "--url", served.url, "--limit", "2")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["ID", "STARTED", "WORKER", "ACTION"]
    assert len(lines) == 3 and all("llama" in line and "succeeded" in line for line in lines[1:])


async def test_pause_and_resume_through_the_cli_with_a_token_file(served: Served, tmp_path: Path) -> None:
    code, text = await ops("pause", "qwen", "--url", served.url, "--token-file", str(served.token_file))
    assert code == 0 and "paused remediation on worker qwen" in text
    assert served.harness.remediator.workers_json()["workers"][0]["paused"]
    os.environ["SENTINEL_TOKEN_FILE"] = str(served.token_file)
    try:
        code, text = await ops("resume", "--url", served.url)
    finally:
        del os.environ["SENTINEL_TOKEN_FILE"]
    assert code == 0 and "resumed remediation on all workers" in text
    assert not served.harness.remediator.workers_json()["workers"][0]["paused"]


async def test_cli_reports_a_wrong_or_missing_token_and_an_unreachable_daemon(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SENTINEL_TOKEN_FILE", raising=False)
    monkeypatch.delenv("SENTINEL_CONFIG", raising=False)
    wrong = tmp_path / "wrong"
    wrong.write_text("definitely-not-the-token")
    code, _ = await ops("pause", "--url", served.url, "--token-file", str(wrong))
    assert code == 1 and "wrong bearer token" in capsys.readouterr().err
    code, _ = await ops("pause", "--url", served.url, "-c", str(tmp_path / "absent.yaml"))
    assert code == 2
    config = tmp_path / "sentinel.yaml"
    config.write_text("listen: 127.0.0.1:9\n")
    code, _ = await ops("pause", "--url", served.url, "-c", str(config))
    assert code == 2 and "no control token" in capsys.readouterr().err
    code, _ = await ops("status", "-c", str(config), "--timeout", "2")
    assert code == 2 and "cannot reach Sentinel at http://127.0.0.1:9" in capsys.readouterr().err


async def test_cli_takes_url_and_token_file_from_the_config(served: Served, tmp_path: Path) -> None:
    port = served.url.rsplit(":", 1)[1]
    config = tmp_path / "sentinel.yaml"
    config.write_text(f"listen: 0.0.0.0:{port}\ncontrol:\n  token_file: {served.token_file}\n")
    code, text = await ops("pause", "llama", "-c", str(config))
    assert code == 0, text
    assert served.harness.remediator.workers_json()["workers"][1]["paused"]


async def test_status_still_shows_workers_when_gpus_and_alerts_are_not_served(tmp_path: Path) -> None:
    h = Harness(tmp_path, policy(), [worker()], wall=Wall(time.time()))
    await h.remediator.start()
    token = ControlToken(None)
    token.load()
    ctx = ServerContext(
        h.store, lambda: True, lambda: [], lambda: [], extra_routes=remediation_routes(lambda: h.remediator, token)
    )
    runner, port = await start_server(ctx, "127.0.0.1", 0)
    try:
        code, text = await ops("status", "--url", f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await h.remediator.close()
    assert code == 0, text
    assert "(no GPUs seen)" in text and "Firing alerts\n  (unavailable: GET" in text and "HTTP 404" in text
    assert "qwen    ok     full (1/3)  active" in text
