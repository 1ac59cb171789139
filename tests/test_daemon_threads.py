"""Work that must keep moving never waits behind hung work, and SIGTERM always ends the daemon.

Queries that never end (issue 15, F4: a 1 ms subquery step over a century) fill
asyncio's default executor. Reloads, command-backend actions and the control token
must not depend on it, and a SIGTERM must still end the process: on Python 3.11,
`loop.shutdown_default_executor()` joined the stuck threads for good (build item 7).
Once queries have deadlines of their own (F4), the same requests end early and this
still holds.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess
from tests.support import eventually

pytestmark = pytest.mark.timeout(240)

ENDLESS = "max_over_time(sentinel_build_info[100y:1ms])"


def endless_query(base: str) -> None:
    body = urllib.parse.urlencode({"query": ENDLESS}).encode()
    # The daemon going away (OSError) is the point of the test.
    with contextlib.suppress(OSError), urllib.request.urlopen(base + "/api/v1/query", data=body, timeout=600) as reply:
        reply.read()


def test_hung_queries_block_neither_reload_nor_actions_nor_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "restarted"
    token = tmp_path / "token"
    token.write_text("a-control-token-of-enough-length\n")
    token.chmod(0o600)
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n  - name: g\n    rules:\n      - alert: Wedged\n        expr: vector(1)\n        for: 20s\n"
        "        labels: {worker: w, action: restart}\n"
    )
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}},
                "rules": {"files": [str(rules)]},
                "control": {"token_file": str(token)},
                "workers": [
                    {
                        "name": "w",
                        "backend": {
                            "type": "command",
                            "restart": [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
                        },
                    }
                ],
                "remediation": {"mode": "act", "cooldown": 0, "verify_timeout": "2s"},
            }
        )
    )
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state")
    try:
        daemon.wait_for_log("evaluating 1 rule group", 60)
        for _ in range(10):  # more than the default executor's threads
            threading.Thread(target=endless_query, args=(daemon.base,), daemon=True).start()
        time.sleep(3)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("configuration reloaded", 60)
        eventually(marker.exists, timeout=90, what="the restart command ran")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        rc = daemon.proc.wait(60)
        stopped_in = time.monotonic() - started
        assert rc == 0
        # The stop budget is 2 s; ten threads spinning on a loaded 2-core machine stretch it.
        assert stopped_in < 20, stopped_in
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
