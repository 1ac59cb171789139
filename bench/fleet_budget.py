"""Disruption budget under contention: 100 contenders against a real etcd.

Starts Debian's etcd (1 member on /dev/shm, or 3 with --members 3), then N lightweight
hosts in this process (own HTTP client, own lease each) with C contenders each. Every
contender asks for a slot of a fleet-wide budget of `--limit`, holds it for a few ms
(the action), and releases it, `--rounds` times. Measured:

- grant latency: from asking to holding, p50/p99, under contention;
- baseline in the same run: one contender alone (no queue), p50/p99 — the floor that
  etcd round-trips set (queue put, read txn, grant txn);
- violations: replaying etcd's own revision history of the holder keys, the most slots
  ever held at once. It must never exceed the limit.

Latest results are in BENCHMARKS.md ("Fleet coordination").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.fleet.config import BudgetConfig
from tests.etcd_cluster import running_cluster
from tests.fleet_helpers import budget_hosts, holder_history, max_concurrent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(endpoints: list[str], hosts: int, per_host: int, limit: int, rounds: int, hold_ms: float) -> dict:
    cfg = BudgetConfig(max_unavailable=limit)
    # Baseline: one contender, nobody else.
    async with budget_hosts(endpoints, "bench-baseline", cfg, count=1, ttl=10) as (solo,):
        alone = []
        for i in range(50):
            t = time.perf_counter()
            d = await solo.budget.acquire(worker=f"w{i}", action="restart", timeout=30)
            alone.append((time.perf_counter() - t) * 1000)
            assert d.granted
            await solo.budget.release(d)
    async with budget_hosts(endpoints, "bench", cfg, count=hosts, ttl=10) as all_hosts:
        start_rev = (await all_hosts[0].client.range("/")).revision + 1
        waits: list[float] = []
        refused = 0

        async def contender(h, worker: str) -> None:  # type: ignore[no-untyped-def]
            nonlocal refused
            for _ in range(rounds):
                t = time.perf_counter()
                d = await h.budget.acquire(worker=worker, action="restart", timeout=120)
                if not d.granted:
                    refused += 1
                    continue
                waits.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(random.uniform(0.5, 1.5) * hold_ms / 1000)
                await h.budget.release(d)

        wall = time.perf_counter()
        await asyncio.gather(*(contender(h, f"w{j}") for h in all_hosts for j in range(per_host)))
        wall = time.perf_counter() - wall
        history = await holder_history(all_hosts[0].client, "bench", start_rev)
        requests = sum(h.client.stats.requests for h in all_hosts)
        conflicts = sum(h.budget.cas_conflicts for h in all_hosts)
    peak = max_concurrent(history).get("fleet", 0)
    grants = len(waits)
    return {
        "contenders": hosts * per_host,
        "hosts": hosts,
        "limit": limit,
        "grants": grants,
        "refused": refused,
        "wall_s": round(wall, 2),
        "grants_per_s": round(grants / wall, 1),
        "grant_p50_ms": round(pct(waits, 0.5), 1),
        "grant_p99_ms": round(pct(waits, 0.99), 1),
        "ideal_wall_s": round(grants * hold_ms / 1000 / limit, 2),
        "baseline_p50_ms": round(pct(alone, 0.5), 2),
        "baseline_p99_ms": round(pct(alone, 0.99), 2),
        "uncontended_overhead_ms": round(statistics.median(alone), 2),
        "max_held_at_once": peak,
        "violations": max(0, peak - limit),
        "etcd_requests": requests,
        "requests_per_grant": round(requests / max(grants, 1), 1),
        "cas_conflicts": conflicts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--per-host", type=int, default=10)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hold-ms", type=float, default=20.0)
    parser.add_argument("--members", type=int, default=1, choices=(1, 3))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with running_cluster(args.members) as cluster:
        r = asyncio.run(measure(cluster.endpoints, args.hosts, args.per_host, args.limit, args.rounds, args.hold_ms))
    r["etcd_members"] = args.members
    r["machine"] = f"{platform.machine()}, python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    print(f"{r['contenders']} contenders on {r['hosts']} hosts, limit {r['limit']}, etcd members {args.members}")
    print(f"grants {r['grants']} in {r['wall_s']}s ({r['grants_per_s']}/s; {r['ideal_wall_s']}s if slots never idled)")
    print(f"refused {r['refused']}")
    print(f"grant latency under contention p50 {r['grant_p50_ms']} ms  p99 {r['grant_p99_ms']} ms")
    print(f"baseline (one contender alone)  p50 {r['baseline_p50_ms']} ms  p99 {r['baseline_p99_ms']} ms")
    print(f"most slots held at once (from etcd's history): {r['max_held_at_once']} -> violations {r['violations']}")
    print(
        f"etcd requests {r['etcd_requests']} ({r['requests_per_grant']} per grant), CAS conflicts {r['cas_conflicts']}"
    )
    if args.json:
        print(json.dumps(r))
    return 0 if r["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
