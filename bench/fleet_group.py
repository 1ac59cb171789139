"""A serving group restarted across hosts: how much of the time is coordination.

Three hosts (in this process, each its own etcd client, lease and watches) and one
real worker process per host (a small HTTP server that reports progress, from
tests/fleet_workers.py). Each round runs `run_group_action` — stop all, apply the
profile, start the head then the others, verify the head makes progress — and splits
its duration into:

- the workers' own time: per step, the slowest member's executor call (the critical
  path: members of a step run in parallel);
- coordination: everything else — plan writes, watch delivery to each member,
  acknowledgements, the initiator noticing them.

Detection (alert firing) is the daemon's and measured by bench/event_to_alert.py.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.fleet import FleetCoordinator
from tests.etcd_cluster import running_cluster
from tests.fleet_helpers import fleet_config, simple_status
from tests.fleet_workers import ProcessExecutor, WorkerProcess

HOSTS = ("a", "b", "c")


class TimedExecutor(ProcessExecutor):
    """Records each call's duration: (kind, worker, seconds)."""

    durations: list[tuple[str, str, float]]

    async def _timed(self, kind: str, worker: str, coro):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = await coro
        self.durations.append((kind, worker, time.perf_counter() - t))
        return out

    async def stop(self, worker: str):  # type: ignore[no-untyped-def]
        return await self._timed("stop", worker, super().stop(worker))

    async def apply_profile(self, worker: str, profile: str):  # type: ignore[no-untyped-def]
        return await self._timed("apply_profile", worker, super().apply_profile(worker, profile))

    async def start(self, worker: str):  # type: ignore[no-untyped-def]
        return await self._timed("start", worker, super().start(worker))

    async def verify(self, worker: str, *, head: bool, deadline_s: float):  # type: ignore[no-untyped-def]
        return await self._timed("verify", worker, super().verify(worker, head=head, deadline_s=deadline_s))


async def measure(endpoints: list[str], rounds: int) -> dict:  # type: ignore[type-arg]
    group = {
        "name": "g",
        "members": [{"member": "a:r0", "head": True}, {"member": "b:r1"}, {"member": "c:r2"}],
    }
    workers = {h: WorkerProcess(f"r{i}") for i, h in enumerate(HOSTS)}
    for w in workers.values():
        w.start()
    executors = {h: TimedExecutor({workers[h].name: workers[h]}) for h in HOSTS}
    for ex in executors.values():
        ex.durations = []
    coords = [
        FleetCoordinator(
            fleet_config(endpoints, "bench-group", h, groups=[group]),
            status_source=simple_status(workers[h].name),
            executor=executors[h],
        )
        for h in HOSTS
    ]
    totals, coordination, own = [], [], []
    try:
        for c in coords:
            await c.start()
        for c in coords:
            assert await c.wait_ready(60)
        for _ in range(rounds):
            for ex in executors.values():
                ex.durations.clear()
            t = time.perf_counter()
            result = await coords[1].run_group_action("g", "restart", profile="full")
            total = time.perf_counter() - t
            assert result.ok, result.reason
            calls = [d for ex in executors.values() for d in ex.durations]
            critical = 0.0
            for kind in ("stop", "apply_profile", "verify"):
                critical += max((s for k, _, s in calls if k == kind), default=0.0)
            critical += sum(s for k, _, s in calls if k == "start")  # starts run one after another
            totals.append(total)
            own.append(critical)
            coordination.append(total - critical)
    finally:
        for c in coords:
            await c.stop()
        for w in workers.values():
            w.stop()
    return {
        "rounds": rounds,
        "members": len(HOSTS),
        "steps": 6,
        "total_p50_s": round(statistics.median(totals), 3),
        "workers_own_p50_s": round(statistics.median(own), 3),
        "coordination_p50_s": round(statistics.median(coordination), 3),
        "coordination_per_step_p50_ms": round(statistics.median(coordination) / 6 * 1000, 1),
        "coordination_share": round(statistics.median(coordination) / statistics.median(totals), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with running_cluster(1) as cluster:
        r = asyncio.run(measure(cluster.endpoints, args.rounds))
    r["machine"] = f"{platform.machine()}, python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    print(f"group of {r['members']} members across hosts, {r['steps']} steps, {r['rounds']} rounds")
    print(f"group action p50 {r['total_p50_s']} s = workers' own {r['workers_own_p50_s']} s")
    print(f"  + coordination {r['coordination_p50_s']} s ({r['coordination_per_step_p50_ms']} ms per step)")
    print(f"coordination share: {r['coordination_share']:.0%}")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
