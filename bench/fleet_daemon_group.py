"""From a group member's fault to the group serving again, through real daemons.

Two `sentinel run` daemons (host-a, host-b) on a real etcd (one member), each with its
own simulated host; a serving group `qwen3` spanning them (head host-a:qwen3-r0,
member host-b:qwen3-r1) and a standalone worker on host-a (coder-a), all light vLLM
stand-ins (`sentinel.sim.lite`) under the process backend. Each round kills the
group member's process and times, from the fault:

- detection: until host-b's engine decided to act (the journal row's start): the
  alert's rule (`for:` divided by the demo's compression, as in `sentinel demo`), the
  rule interval and the engine's tick;
- the group action, until the plan was verified (the row's end), split into the
  workers' own time — per step, the slowest member's step as it acknowledged it in
  etcd (start and end times the member host wrote), summed over the plan's steps — and
  coordination: the rest (lock, slot, plan writes, watch delivery, acknowledgements,
  the initiator noticing them, the member status read).

Baseline in the same run: the standalone worker's restart under the fleet gate (one
slot, no group) after the same fault; the ratio is the group action against it.
Latest results are in BENCHMARKS.md ("Fleet coordination").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.demo.fleet_hosts import WorkerPlan
from sentinel.fleet.groups import GroupPlan, StepAck
from sentinel.fleet.keys import Keys
from tests.etcd_cluster import running_cluster
from tests.fleet_daemons import Fleet, running_fleet, until

FLEET = "bench-daemon-group"


def _config() -> dict[str, Any]:
    group = {
        "name": "qwen3",
        "members": [{"member": "host-a:qwen3-r0", "head": True}, {"member": "host-b:qwen3-r1"}],
        "step_timeout": "20s",
        "verify_timeout": "30s",
    }
    return {
        "name": FLEET,
        "lease_ttl": "10s",
        "request_timeout": "1s",
        "status_interval": "2s",
        "budget": {"max_unavailable": 1, "wait": "60s"},
        "groups": [group],
    }


async def _finished(f: Fleet, host: str, since: float, worker: str) -> dict[str, Any] | None:
    rows = [r for r in await f.rows(host, since, worker) if r["trigger"] != "group"]
    done = [r for r in rows if r["outcome"] in ("succeeded", "failed")]
    return done[0] if done else None


async def _plan_split(f: Fleet) -> tuple[float, int]:
    """(workers' own seconds on the critical path, steps) of the group's last plan, from etcd."""
    keys = Keys(f"/sentinel/{FLEET}/")
    plan_kv = await f.client.get(keys.group_plan("qwen3"))
    assert plan_kv is not None
    plan = GroupPlan.model_validate_json(plan_kv.value)
    acks = await f.client.range(keys.group_acks("qwen3", plan.id), prefix=True)
    by_step: dict[int, list[StepAck]] = {}
    for kv in acks.kvs:
        step = int(kv.key.rsplit("/", 2)[-2])
        by_step.setdefault(step, []).append(StepAck.model_validate_json(kv.value))
    own = sum(max(a.ended_at - a.started_at for a in step) for step in by_step.values())
    return own, len(plan.steps)


async def _round(f: Fleet, host: str, worker: str) -> dict[str, float]:
    await until(lambda: f.serving([w for h in f.hosts.values() for w in h.workers]), 90, "every worker serving", 0.5)
    since = time.time()
    await f.fault(host, worker, {"kind": "exit", "code": 1})
    row = await until(lambda: _finished(f, host, since, worker), 180, f"{worker}'s action to end", every=0.2)
    assert row["outcome"] == "succeeded", row
    return {
        "detection": float(row["started"]) - since,
        "action": float(row["finished"]) - float(row["started"]),
        "total": float(row["finished"]) - since,
    }


async def measure(endpoints: list[str], rounds: int) -> dict[str, Any]:
    plan = {
        "host-a": [WorkerPlan("qwen3-r0", (0, 1, 2, 3), {"model": "qwen3"}), WorkerPlan("coder-a", (4, 5), {})],
        "host-b": [WorkerPlan("qwen3-r1", (0, 1, 2, 3), {"model": "qwen3"})],
    }
    group: list[dict[str, float]] = []
    solo: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-daemon-") as tmp:
        async with running_fleet(Path(tmp), endpoints, _config(), plan) as f:
            steps = 0
            for _ in range(rounds):
                r = await _round(f, "host-b", "qwen3-r1")
                own, steps = await _plan_split(f)
                r["workers_own"] = own
                r["coordination"] = r["action"] - own
                group.append(r)
                solo.append(await _round(f, "host-a", "coder-a"))

    def p50(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    return {
        "rounds": rounds,
        "steps": steps,
        "group_total_p50_s": p50(group, "total"),
        "group_detection_p50_s": p50(group, "detection"),
        "group_action_p50_s": p50(group, "action"),
        "group_workers_own_p50_s": p50(group, "workers_own"),
        "group_coordination_p50_s": p50(group, "coordination"),
        "coordination_share_of_total": round(p50(group, "coordination") / p50(group, "total"), 3),
        "coordination_share_of_action": round(p50(group, "coordination") / p50(group, "action"), 3),
        "baseline_solo_total_p50_s": p50(solo, "total"),
        "baseline_solo_action_p50_s": p50(solo, "action"),
        "group_vs_solo_action_ratio": round(p50(group, "action") / p50(solo, "action"), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    with running_cluster(1) as cluster:
        r = asyncio.run(measure(cluster.endpoints, args.rounds))
    r["machine"] = f"{platform.machine()}, python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    print(f"group of 2 members on 2 daemons, {r['steps']} steps, {r['rounds']} rounds (p50)")
    print(f"fault -> group serving again: {r['group_total_p50_s']} s")
    print(f"  detection (alert, rule interval, engine tick): {r['group_detection_p50_s']} s")
    print(f"  group action: {r['group_action_p50_s']} s = workers' own {r['group_workers_own_p50_s']} s")
    print(f"    + coordination {r['group_coordination_p50_s']} s")
    print(
        f"coordination share: {r['coordination_share_of_total']:.0%} of the total, "
        f"{r['coordination_share_of_action']:.0%} of the action"
    )
    print(
        f"baseline, a standalone worker's restart under the fleet gate: {r['baseline_solo_total_p50_s']} s "
        f"(action {r['baseline_solo_action_p50_s']} s); group action / solo action: {r['group_vs_solo_action_ratio']}x"
    )
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
