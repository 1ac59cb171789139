"""`sentinel demo --fleet --json` end to end: a real 3-member etcd, four `sentinel run`
daemons and their workers, five faults; the JSON is checked on its own terms.

- every fault was detected and recovered from;
- no more than `max_unavailable` disruptive actions ever ran at once, computed from the
  `actions` list alone (each entry held a disruption slot, as etcd saw it);
- the 2-host serving group was restarted as one action (`host: group:qwen3`);
- exactly one SentinelPeerDown page for the Sentinel killed with SIGKILL;
- the etcd leader kill and the partition repeated nothing (one slot for each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.demo.fleet import FAULTS, max_concurrent
from tests.conftest import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(660)]

REPO = Path(__file__).resolve().parents[1]


def test_fleet_demo_json() -> None:
    require_tool("etcd", "etcd-server")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "sentinel", "demo", "--fleet", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-6000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1])
    print(json.dumps(result, indent=1))  # shown when an assertion below fails
    print(done.stderr[-4000:])
    assert set(result) == {"hosts", "max_unavailable", "faults", "actions", "peer_down_alerts"}
    assert result["hosts"] >= 4
    k = result["max_unavailable"]
    assert k >= 1

    faults = {f["fault"]: f for f in result["faults"]}
    assert list(faults) == list(FAULTS)
    for f in result["faults"]:
        assert set(f) == {"fault", "injected_at", "detected_at", "alert", "action", "recovered_at"}
        assert f["injected_at"] is not None and f["detected_at"] is not None, f
        assert f["recovered_at"] is not None and f["recovered_at"] >= f["injected_at"], f
    assert faults["sentinel-sigkill"]["alert"] == "SentinelPeerDown"
    assert faults["group-gpu-lost"]["action"] == "restart"

    actions = result["actions"]
    for a in actions:
        assert set(a) == {"host", "worker", "action", "started_at", "ended_at", "outcome"}
        assert a["action"] in ("restart", "reduce_batch", "quantized_fallback", "stop"), a
        assert a["ended_at"] is not None and a["ended_at"] >= a["started_at"], a
    assert max_concurrent(actions) <= k, actions
    # The group: one action for both members, from the group's slot.
    group = [a for a in actions if a["host"] == "group:qwen3"]
    assert len(group) == 1 and group[0]["outcome"] == "succeeded", group
    assert not [a for a in actions if str(a["worker"]).startswith("qwen3") and a["host"] != "group:qwen3"]

    # The etcd leader kill and the partition: one restart each, not repeated.
    def after(name: str) -> float:
        return float(faults[name]["injected_at"])

    coder_a = [a for a in actions if a["worker"] == "coder-a" and a["started_at"] >= after("etcd-leader-kill")]
    assert len(coder_a) == 1 and coder_a[0]["outcome"] == "succeeded", coder_a
    coder_c = [a for a in actions if a["worker"] == "coder-c" and a["started_at"] >= after("partition-hold")]
    assert len(coder_c) == 1 and coder_c[0]["outcome"] == "succeeded", coder_c

    assert result["peer_down_alerts"] == 1
