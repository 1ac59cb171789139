"""Hardening findings that lived in the daemon's wiring, tested through a real `sentinel run`.

F5 is the lesson: the unit tests built the control API with their own token object and
passed while the running daemon refused every request. Whatever the daemon assembles
(routes, tokens, sockets, middlewares) is checked here on the process itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess

TOKEN = "control-token-0123456789abcdef"


@pytest.fixture
def controlled(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon with a control token file and one observe-only worker."""
    token_file = tmp_path / "control-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        "collectors:\n  nvml:\n    enabled: false\n  host:\n    enabled: false\n"
        "workers:\n  - name: qwen\n"
        f"control:\n  token_file: {token_file}\n"
    )
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state")
    try:
        daemon.wait_for_log(r"control API enabled", timeout=30)
        yield daemon
    finally:
        daemon.stop()


def test_pause_and_resume_work_in_the_running_daemon_with_the_token(controlled: DaemonProcess) -> None:
    # F5: HealingStack.start() replaced its token object after the routes had captured
    # the first one, so every request got 403 "the control API is disabled".
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = controlled.request("POST", "/api/v1/workers/qwen/pause", headers=auth)
    assert status == 200, body
    workers = {w["name"]: w for w in json.loads(body)["data"]["workers"]}
    assert workers["qwen"]["paused"] is True
    status, _, body = controlled.request("POST", "/api/v1/resume", headers=auth)
    assert status == 200, body
    assert {w["name"]: w for w in json.loads(body)["data"]["workers"]}["qwen"]["paused"] is False


def test_the_running_daemon_still_refuses_a_wrong_token(controlled: DaemonProcess) -> None:
    status, _, body = controlled.request("POST", "/api/v1/pause", headers={"Authorization": "Bearer wrong-token"})
    assert status == 403 and "wrong bearer token" in body
