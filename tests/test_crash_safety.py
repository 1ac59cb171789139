"""kill -9 the real daemon while an action is in flight and the webhook receiver is down.

After a restart every notification is delivered and the action is not repeated for
the same alert episode: it is journaled as interrupted.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on a fixed port that can be started late (it is 'down' before)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Receiver, Path]]:
    receiver = Receiver(free_port())
    marker = tmp_path / "restarts.log"
    # The restart verb takes 30 s: the daemon is killed while it runs.
    restart = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('restart\\n'); import time; time.sleep(30)"]
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n  - name: crash\n    rules:\n      - alert: WorkerWedged\n        expr: vector(1)\n"
        "        labels: {worker: w, action: restart, severity: critical}\n"
    )
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}},
                "rules": {"files": [str(rules)]},
                "workers": [{"name": "w", "backend": {"type": "command", "restart": restart, "timeout": "60s"}}],
                "remediation": {"mode": "act", "cooldown": 0},
                "notify": {"webhook": [{"name": "hook", "url": f"http://127.0.0.1:{receiver.port}/"}]},
            }
        )
    )
    yield config, receiver, marker
    receiver.stop()


def actions(daemon: DaemonProcess) -> list[dict[str, Any]]:
    _, _, body = daemon.get("/api/v1/actions?limit=50")
    rows: list[dict[str, Any]] = json.loads(body)["data"] if '"data"' in body else json.loads(body)
    return rows


def test_kill_9_mid_action_with_receiver_down_loses_nothing_and_repeats_nothing(
    tmp_path: Path, setup: tuple[Path, Receiver, Path]
) -> None:
    config, receiver, marker = setup
    state = tmp_path / "state"
    first = DaemonProcess("-c", str(config), state_dir=state)
    try:
        # The alert fires, the restart verb starts, the webhook is unreachable.
        eventually(lambda: marker.exists() and marker.read_text().count("restart") == 1)
        eventually(lambda: any(r["action"] == "restart" and r["outcome"] is None for r in actions(first)))
        first.signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    receiver.start()
    second = DaemonProcess("-c", str(config), state_dir=state)
    try:
        # The firing notification queued before the crash is delivered now.
        delivered = eventually(
            lambda: [
                a
                for b in receiver.bodies
                for a in b.get("alerts", [])
                if a["labels"].get("alertname") == "WorkerWedged" and a["status"] == "firing"
            ],
            timeout=60,
        )
        assert delivered
        # The interrupted action is journaled as such; the same episode is not acted on again.
        eventually(lambda: [r for r in actions(second) if r["action"] == "restart"] or None)
        time.sleep(3)  # several rule evaluations and remediation ticks after the restart
        rows = [r for r in actions(second) if r["action"] == "restart"]
        assert [r["outcome"] for r in rows] == ["interrupted"], rows
        assert marker.read_text().count("restart") == 1
    finally:
        second.stop()
