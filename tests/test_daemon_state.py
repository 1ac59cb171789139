"""The state directory on a bad day, through the real daemon: a second daemon, corrupt files, a full disk.

Each is a clear error or a degraded mode that keeps detecting, alerting and acting,
with what could not be written counted (issue 15: C5, C6, F7 and build item 6).
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, Receiver
from tests.support import eventually

pytestmark = pytest.mark.timeout(180)

# The restart verb leaves an empty file per run: an empty file is all a full disk allows.
RESTART = (
    "import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); d.mkdir(exist_ok=True); "
    "(d / f'restart-{time.monotonic_ns()}').touch()"
)


def write_config(tmp_path: Path, receiver: Receiver, token: str, *, for_: str = "0s") -> Path:
    runs = tmp_path / "runs"
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n  - name: wedge\n    rules:\n      - alert: WorkerWedged\n        expr: vector(1)\n"
        f"        for: {for_}\n"
        "        labels: {worker: w, action: restart, severity: critical}\n"
    )
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}, "host": {"interval": "1s"}},
                "rules": {"files": [str(rules)]},
                "workers": [
                    {
                        "name": "w",
                        # A process that runs all along: verification finds the worker up.
                        "process": {"cmdline": token},
                        "backend": {"type": "command", "restart": [sys.executable, "-c", RESTART, str(runs)]},
                    }
                ],
                "remediation": {"mode": "act", "cooldown": 0, "verify_timeout": "20s"},
                "notify": {"webhook": [{"name": "hook", "url": receiver.url}]},
            }
        )
    )
    return config


def restarts(tmp_path: Path) -> int:
    runs = tmp_path / "runs"
    return len(list(runs.iterdir())) if runs.exists() else 0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = DaemonProcess(state_dir=state)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "sentinel", "run", "--listen", "127.0.0.1:0"],
            env={**os.environ, "STATE_DIRECTORY": str(state)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"is in use by another Sentinel (pid {first.proc.pid})" in second.stderr
        assert "listening on" not in second.stderr  # refused before it served or acted
        assert first.proc.poll() is None
    finally:
        first.stop()


def test_corrupt_journal_outbox_and_alert_state_are_moved_aside_and_sentinel_keeps_watching(
    tmp_path: Path, receiver: Receiver, sleeper: tuple[subprocess.Popen[bytes], str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for name in ("remediation.sqlite", "notifications.sqlite", "alerts.sqlite"):
        (state / name).write_bytes(b"not a database, a disk that lied" * 512)
    config = write_config(tmp_path, receiver, sleeper[1])
    daemon = DaemonProcess("-c", str(config), state_dir=state)
    try:
        for name in ("remediation.sqlite", "notifications.sqlite", "alerts.sqlite"):
            daemon.wait_for_log(rf"{name} is unusable \(file is not a database\); moved it aside to .*corrupt-", 30)
        for store in ("journal", "outbox", "alert_state"):
            eventually(lambda s=store: daemon.metric("sentinel_state_files_moved_aside_total", store=s) == 1)
        # It still detects, acts and notifies, with fresh files.
        eventually(lambda: restarts(tmp_path) >= 1, what="the restart")
        eventually(lambda: receiver.alerts("WorkerWedged", "firing"), what="the firing notification")
        rows = eventually(lambda: [r for r in daemon.json("/api/v1/actions") if r["action"] == "restart"])
        assert rows[0]["worker"] == "w"
    finally:
        daemon.stop()
    assert len(list(state.glob("*.corrupt-*"))) == 3
    assert sqlite3.connect(state / "remediation.sqlite").execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_full_disk_neither_wedges_remediation_nor_drops_notifications(
    tmp_path: Path, receiver: Receiver, sleeper: tuple[subprocess.Popen[bytes], str]
) -> None:
    state = tmp_path / "state"
    # The alert fires 15 s after start, once the disk is full.
    config = write_config(tmp_path, receiver, sleeper[1], for_="15s")
    daemon = DaemonProcess("-c", str(config), state_dir=state)
    try:
        daemon.wait_for_log("evaluating 1 rule group", 30)
        # The disk fills up: no file of the daemon (or of the commands it starts) may grow.
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        eventually(lambda: restarts(tmp_path) >= 1, timeout=60, what="the restart")
        workers = eventually(
            lambda: [w for w in daemon.json("/api/v1/workers")["workers"] if w["in_flight"] is None], timeout=60
        )
        assert workers[0]["last_action"]["outcome"] == "succeeded"  # finished, not "acting" forever
        eventually(lambda: receiver.alerts("WorkerWedged", "firing"), what="the firing notification")
        eventually(lambda: (daemon.metric("sentinel_state_unsaved", store="journal") or 0) > 0)
        assert daemon.metric("sentinel_state_degraded", store="journal") == 1
        assert (daemon.metric("sentinel_state_write_failures_total", store="journal") or 0) > 0
        # The action's report says it was not journaled yet.
        started = eventually(
            lambda: [
                a
                for b in list(receiver.bodies)
                for a in b.get("alerts", [])
                if a["labels"].get("alertname") == "SentinelAction" and a["labels"].get("outcome") == "started"
            ],
            what="the action's report",
        )
        assert "not journaled yet" in started[0]["annotations"]["description"]
        # Said once, not four times a second.
        failures = [line for line in daemon.lines if "cannot write" in line]
        assert 0 < len(failures) <= 6, failures
        assert not [line for line in daemon.lines if "cannot rollback" in line]

        # Space is freed: what was held lands on disk.
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        eventually(lambda: daemon.metric("sentinel_state_unsaved", store="journal") == 0, timeout=30)
        eventually(lambda: daemon.metric("sentinel_state_degraded", store="journal") == 0, timeout=30)
        assert [r["outcome"] for r in daemon.json("/api/v1/actions") if r["action"] == "restart"][:1] == ["succeeded"]
    finally:
        daemon.stop()
