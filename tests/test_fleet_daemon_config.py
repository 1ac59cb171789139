"""Bad fleet input to the daemon: each a clear error naming file, line and field, or a
clear degraded state, never a crash.

- `sentinel check config` on a `fleet:` naming a group member this host does not run,
  a group with two heads, a member worker without a backend;
- `sentinel run` whose etcd endpoint answers nothing: it starts, serves, says it
  cannot reach etcd, and reports `sentinel_fleet_up 0` (its local healing keeps going).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from sentinel.config.models import ConfigError, parse_config
from sentinel.demo.etcd import free_port
from tests.daemon_process import DaemonProcess
from tests.support import eventually

WORKERS = """\
workers:
  - name: qwen3-r0
    gpus: [0, 1]
    endpoint: http://127.0.0.1:9
    labels: {model: qwen3}
    backend: {type: process, argv: [/bin/true]}
"""


def _fleet(groups: str, host: str = "host-a") -> str:
    return f"""\
fleet:
  endpoints: [http://127.0.0.1:2379]
  host_id: {host}
  groups:
{groups}"""


def test_a_group_member_this_host_does_not_run_is_named_with_its_line(tmp_path: Path) -> None:
    text = WORKERS + _fleet(
        "    - name: qwen3\n"
        "      members:\n"
        "        - {member: 'host-a:qwen3-r9', head: true}\n"
        "        - {member: 'host-b:qwen3-r1'}\n"
    )
    path = tmp_path / "sentinel.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(text, str(path))
    message = str(info.value)
    assert f"{path}:13:" in message, message
    assert "fleet.groups.0.members.0.member" in message
    assert "no worker is named 'qwen3-r9' (workers: qwen3-r0)" in message
    # The same through the CLI: exit 1, the problem on stderr, no traceback.
    done = subprocess.run(
        [sys.executable, "-m", "sentinel", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "no worker is named 'qwen3-r9'" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_group_with_two_heads_is_refused_with_its_line(tmp_path: Path) -> None:
    text = WORKERS + _fleet(
        "    - name: qwen3\n"
        "      members:\n"
        "        - {member: 'host-a:qwen3-r0', head: true}\n"
        "        - {member: 'host-b:qwen3-r1', head: true}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "sentinel.yaml")
    message = str(info.value)
    assert "sentinel.yaml:" in message and "fleet.groups.0" in message
    assert "needs exactly one member with head: true (found host-a:qwen3-r0, host-b:qwen3-r1)" in message


def test_a_local_group_member_needs_a_backend() -> None:
    text = WORKERS.replace("    backend: {type: process, argv: [/bin/true]}\n", "") + _fleet(
        "    - name: qwen3\n"
        "      members:\n"
        "        - {member: 'host-a:qwen3-r0', head: true}\n"
        "        - {member: 'host-b:qwen3-r1'}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "sentinel.yaml")
    assert "sentinel.yaml:12:" in str(info.value)
    assert "worker 'qwen3-r0' has no backend" in str(info.value)


def test_worker_labels_are_checked() -> None:
    with pytest.raises(ConfigError, match="label name '9x'"):
        parse_config(WORKERS.replace("{model: qwen3}", "{9x: qwen3}"))
    config = parse_config(WORKERS)
    assert config.workers[0].labels == {"model": "qwen3"}
    assert config.fleet is None  # no fleet: section, no fleet


@pytest.mark.integration
def test_an_unreachable_etcd_at_start_is_a_degraded_state_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text(
        "fleet:\n"
        f"  endpoints: [http://127.0.0.1:{free_port()}]\n"
        "  host_id: lonely\n"
        "  request_timeout: 300ms\n"
        "  lease_ttl: 3s\n"
    )
    daemon = DaemonProcess("-c", str(path), "--simulate", "healthy-8gpu", state_dir=tmp_path / "state")
    try:
        daemon.wait_for_log(r"joining fleet default as lonely", timeout=60)
        daemon.wait_for_log(r"(?i)etcd.*(unreachable|cannot|refused)", timeout=60)
        # Ready in its own time (rules load after the fleet link starts): not held back by etcd.
        eventually(lambda: daemon.get("/-/ready")[0] == 200, 60, "/-/ready to answer 200")

        deadline = time.monotonic() + 30
        while fleet_up(daemon) != 0.0:
            assert time.monotonic() < deadline, "sentinel_fleet_up never said 0"
            time.sleep(0.2)
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in "".join(daemon.lines)


def fleet_up(daemon: DaemonProcess) -> float | None:
    q = urllib.parse.quote("sentinel_fleet_up")
    with urllib.request.urlopen(f"{daemon.base}/api/v1/query?query={q}", timeout=10) as r:
        result = json.load(r)["data"]["result"]
    return float(result[0]["value"][1]) if result else None
