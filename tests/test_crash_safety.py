"""kill -9 the real daemon while an action is in flight and the webhook receiver is down.

After a restart every notification is delivered and the action is not repeated for
the same alert episode: it is journaled as interrupted. The command the action was
running survives the crash; the restarted daemon waits for it before it verifies the
worker or starts another action on it (issue 15, C4).
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import DaemonProcess, Receiver
from tests.support import eventually

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Receiver, Path]]:
    receiver = Receiver()
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


def test_a_command_left_running_by_kill_9_is_waited_for_before_the_next_action(tmp_path: Path) -> None:
    log = tmp_path / "commands.log"
    # Each run of the restart verb writes when it begins and ends (on the system-wide monotonic clock).
    script = (
        "import time, sys; log = open(sys.argv[1], 'a', buffering=1); "
        "log.write(f'begin {time.monotonic()}\\n'); time.sleep(8); log.write(f'end {time.monotonic()}\\n')"
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n  - name: crash\n    rules:\n      - alert: WorkerWedged\n        expr: vector(1)\n"
        "        labels: {worker: w, action: restart, severity: critical}\n"
    )
    config = tmp_path / "sentinel.yaml"
    restart = [sys.executable, "-c", script, str(log)]
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}},
                "rules": {"files": [str(rules)]},
                "workers": [{"name": "w", "backend": {"type": "command", "restart": restart, "timeout": "60s"}}],
                "remediation": {"mode": "act", "cooldown": 0, "verify_timeout": "2s"},
            }
        )
    )
    state = tmp_path / "state"
    first = DaemonProcess("-c", str(config), state_dir=state)
    try:
        eventually(lambda: log.exists() and "begin" in log.read_text(), what="the restart command began")
        first.signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    second = DaemonProcess("-c", str(config), state_dir=state)
    try:
        second.wait_for_log(r"restart command \(pid \d+\) of the previous Sentinel still runs; waiting", timeout=30)
        workers = second.json("/api/v1/workers")["workers"]
        assert workers[0]["in_flight"]["phase"] == "settling"
        eventually(lambda: "end" in log.read_text(), timeout=30, what="the first command ended")
        second.wait_for_log("re-verified healthy|is not healthy after an interrupted action", timeout=30)
        time.sleep(2)  # the next decisions, if any
        events = [line.split() for line in log.read_text().splitlines()]
        # Never two runs at once: every run begins after the one before it ended.
        times = [(kind, float(t)) for kind, t in events]
        assert [k for k, _ in times] == ["begin", "end"] * (len(times) // 2) + ["begin"] * (len(times) % 2), times
        assert all(later >= earlier for (_, earlier), (_, later) in itertools.pairwise(times))
    finally:
        second.stop()
