"""Stepping the wall clock under the real daemon: nothing stalls, nothing fires, nothing acts (issue 15, F8).

libfaketime moves the wall clock of the daemon (and of everything it starts) while
leaving the monotonic clock alone (`DONT_FAKE_MONOTONIC=1`), which is what an NTP step
or `date -s` does. A fake vLLM endpoint makes steady progress the whole time, so any
EngineStalled alert or restart would be false.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_tool
from tests.daemon_process import DaemonProcess
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent


def libfaketime() -> str:
    require_tool("faketime", "faketime")
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        message = "libfaketime.so.1 not found: apt-get install faketime"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


class BusyEngine:
    """/health and a vLLM /metrics whose generated tokens grow at every scrape."""

    def __init__(self) -> None:
        tokens = itertools.count(1000, 37)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body = (
                        "# TYPE vllm:num_requests_running gauge\n"
                        'vllm:num_requests_running{model_name="m"} 2\n'
                        "# TYPE vllm:generation_tokens_total counter\n"
                        f'vllm:generation_tokens_total{{model_name="m"}} {next(tokens)}\n'
                    ).encode()
                else:
                    body = b"ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine() -> Iterator[BusyEngine]:
    e = BusyEngine()
    try:
        yield e
    finally:
        e.close()


def set_offset(path: Path, offset: str) -> None:
    # Atomically: libfaketime rereads the file at every clock read, and an empty file
    # caught mid-write would read as "no offset", a step of its own.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(offset + "\n")
    os.replace(tmp, path)


def last_success(daemon: DaemonProcess, collector: str) -> float:
    return daemon.metric("sentinel_collector_last_success_timestamp_seconds", collector=collector) or 0.0


def test_stepping_the_wall_clock_back_and_forward_stalls_nothing_and_triggers_nothing(
    tmp_path: Path, engine: BusyEngine
) -> None:
    preload = libfaketime()
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    restarts = tmp_path / "restarts"
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}, "endpoint": {"interval": "1s"}},
                "rules": {"files": [str(REPO / "rules" / "serving.yml"), str(REPO / "rules" / "sentinel.yml")]},
                "workers": [
                    {
                        "name": "w",
                        "engine": "vllm",
                        "endpoint": engine.url,
                        "backend": {
                            "type": "command",
                            "restart": [sys.executable, "-c", f"open({str(restarts)!r}, 'a').write('restart\\n')"],
                        },
                    }
                ],
                "remediation": {"mode": "act", "cooldown": 0},
            }
        )
    )
    env = {
        "LD_PRELOAD": preload,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1",  # reread the offset every second, not at every clock read
        "DONT_FAKE_MONOTONIC": "1",
    }
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state", env=env)
    try:
        eventually(lambda: daemon.metric("sentinel_endpoint_up", worker="w") == 1, timeout=60)
        for step in ("-1h", "+1h"):  # back one hour, then forward two
            set_offset(offset, step)
            before = last_success(daemon, "endpoint:w")
            # The endpoint collector (every second) keeps running on Sentinel's steady timestamps;
            # under APScheduler a backward step stopped it until the wall clock came back.
            eventually(lambda b=before: last_success(daemon, "endpoint:w") >= b + 10, timeout=60)
            assert daemon.metric("sentinel_collector_up", collector="endpoint:w") == 1
        assert daemon.metric("sentinel_clock_steps_total") == 2
        daemon.wait_for_log(r"the system clock stepped by -3600\.\ds")
        # Nothing fired, nothing acted.
        alerts = daemon.json("/api/v1/alerts")["alerts"]
        assert not [a for a in alerts if a["labels"]["alertname"] in ("EngineStalled", "EngineDead", "EndpointDown")]
        assert not restarts.exists()
        assert daemon.json("/api/v1/actions") == []
    finally:
        daemon.stop(timeout=20)
