"""etcd load of a fleet at steady state, per host, measured against a real etcd.

Starts Debian's etcd (1 member on /dev/shm) and N fleet coordinators in this process
(each its own HTTP client, lease, watches, status), lets them settle, then measures a
window of steady state in which each host's status changes at `--changes-per-min` (an
alert starting or clearing) and nothing else happens. Reported per host:

- requests/s the host sends to etcd (client side), and by kind;
- bytes/s sent and received (HTTP bodies);
- watch streams it holds (followers and the leader differ);
and from etcd's own /metrics: requests/s it served over gRPC (the gateway's calls land
there), watchers, keys and database size, and the etcd process's memory growth per host.

The baseline in the same run is the same fleet with no status changes (leases only),
so the cost of the status traffic shows as a ratio. BENCHMARKS.md ("Fleet
coordination") extrapolates to 1,000 hosts against etcd's published limits.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import platform
import re
import sys
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.fleet import FleetCoordinator, HostStatus
from sentinel.fleet.status import AlertStatus, WorkerStatus
from tests.etcd_cluster import running_cluster
from tests.fleet_helpers import fleet_config

METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def scrape(endpoint: str) -> dict[str, float]:
    """Sum each etcd metric over its label sets (good enough for totals)."""
    text = urllib.request.urlopen(endpoint + "/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            name, labels = m.group(1), m.group(2) or ""
            if name == "grpc_server_handled_total" and 'grpc_type="unary"' not in labels:
                continue
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


class ChangingStatus:
    """A host whose status flips an alert on and off at a steady rate."""

    def __init__(self, host: str, changes_per_min: float) -> None:
        self.host = host
        self.period = 60.0 / changes_per_min if changes_per_min > 0 else None
        self.started = time.monotonic()
        self.coord: FleetCoordinator | None = None
        self.firing = False

    def __call__(self) -> HostStatus:
        alerts = (AlertStatus(name="EngineStalled", active_at=self.started, worker="w0"),) if self.firing else ()
        workers = tuple(
            WorkerStatus(name=f"w{i}", state="serving", profile="full", labels={"model": "m"}) for i in range(4)
        )
        return HostStatus(version="bench", gpus_up=8, gpus_expected=8, workers=workers, alerts=alerts)

    async def run(self) -> None:
        if self.period is None:
            return
        # Spread hosts over the period so changes arrive evenly, as in a real fleet.
        await asyncio.sleep(hash(self.host) % 1000 / 1000 * self.period)
        while True:
            self.firing = not self.firing
            if self.coord is not None:
                self.coord.notify_status_changed()
            await asyncio.sleep(self.period)


async def measure(endpoint: str, etcd_pid: int, hosts: int, window: float, changes_per_min: float) -> dict:
    name = f"load{int(changes_per_min * 1000)}"
    etcd_proc = psutil.Process(etcd_pid)
    rss_before = etcd_proc.memory_info().rss
    sources = [ChangingStatus(f"h{i:03d}", changes_per_min) for i in range(hosts)]
    coords = [
        FleetCoordinator(fleet_config([endpoint], name, s.host, lease_ttl=10, status_interval=5), status_source=s)
        for s in sources
    ]
    for c, s in zip(coords, sources, strict=True):
        s.coord = c
        await c.start()
    try:
        for c in coords:
            assert await c.wait_ready(60), "a host never joined"
        await asyncio.sleep(3)  # settle: leader elected, statuses written
        churn = [asyncio.ensure_future(s.run()) for s in sources]
        before = [(c.client.stats.requests, c.client.stats.bytes_sent, c.client.stats.bytes_received) for c in coords]
        kinds_before = [dict(c.client.stats.by_path) for c in coords]
        m0 = await asyncio.to_thread(scrape, endpoint)
        t0 = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - t0
        m1 = await asyncio.to_thread(scrape, endpoint)
        after = [(c.client.stats.requests, c.client.stats.bytes_sent, c.client.stats.bytes_received) for c in coords]
        kinds: dict[str, int] = {}
        for c, kb in zip(coords, kinds_before, strict=True):
            for path, n in c.client.stats.by_path.items():
                kinds[path] = kinds.get(path, 0) + n - kb.get(path, 0)
        for t in churn:
            t.cancel()
        leaders = sum(c.is_leader() for c in coords)
        rss_after = etcd_proc.memory_info().rss
    finally:
        for c in coords:
            await c.stop()
    req = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    sent = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    recv = sum(a[2] - b[2] for a, b in zip(after, before, strict=True))
    served = m1.get("grpc_server_handled_total", 0) - m0.get("grpc_server_handled_total", 0)
    return {
        "hosts": hosts,
        "window_s": round(elapsed, 1),
        "status_changes_per_host_per_min": changes_per_min,
        "leaders": leaders,
        "requests_per_s_per_host": round(req / elapsed / hosts, 3),
        "requests_by_kind_per_s_per_host": {k: round(v / elapsed / hosts, 3) for k, v in sorted(kinds.items()) if v},
        "bytes_sent_per_s_per_host": round(sent / elapsed / hosts, 1),
        "bytes_received_per_s_per_host": round(recv / elapsed / hosts, 1),
        "watch_streams_follower": 4,
        "watch_streams_leader": 6,
        "etcd_unary_rpcs_per_s": round(served / elapsed, 1),
        "etcd_watchers": int(m1.get("etcd_debugging_mvcc_watcher_total", 0)),
        "etcd_keys": int(m1.get("etcd_debugging_mvcc_keys_total", 0)),
        "etcd_db_bytes": int(m1.get("etcd_mvcc_db_total_size_in_bytes", 0)),
        "etcd_rss_growth_per_host_bytes": round((rss_after - rss_before) / hosts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--changes-per-min", type=float, default=2.0, help="status changes per host per minute")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.window * 2 + 240, exit=True)  # a hang prints where, then exits
    with running_cluster(1) as cluster:
        pid = cluster.members[0].proc.pid  # type: ignore[union-attr]

        async def both() -> tuple[dict, dict]:  # type: ignore[type-arg]
            base = await measure(cluster.endpoints[0], pid, args.hosts, args.window, 0.0)
            return base, await measure(cluster.endpoints[0], pid, args.hosts, args.window, args.changes_per_min)

        base, load = asyncio.run(both())
    per_host = load["requests_per_s_per_host"]
    scale = 1000 / args.hosts
    result = {
        "baseline": base,
        "with_status_changes": load,
        "status_traffic_ratio": round(per_host / max(base["requests_per_s_per_host"], 1e-9), 2),
        "extrapolated_1000_hosts": {
            "requests_per_s": round(per_host * 1000),
            "etcd_published_requests_per_s": 30000,
            "share_of_published_capacity": round(per_host * 1000 / 30000, 4),
            "watchers": 1000 * 4 + 2,
            "keys": round(load["etcd_keys"] * scale),
            "etcd_rss_growth_mib": round(load["etcd_rss_growth_per_host_bytes"] * 1000 / 2**20, 1),
        },
        "machine": f"{platform.machine()} python {platform.python_version()}, {psutil.cpu_count()} cpus",
    }
    for label, r in (("leases only (baseline)", base), (f"{args.changes_per_min}/min status changes", load)):
        print(f"{label}: {r['hosts']} hosts, {r['window_s']}s")
        print(f"  per host: {r['requests_per_s_per_host']} req/s {r['requests_by_kind_per_s_per_host']}")
        print(
            f"  per host: {r['bytes_sent_per_s_per_host']} B/s sent, {r['bytes_received_per_s_per_host']} B/s received"
        )
        print(
            f"  etcd: {r['etcd_unary_rpcs_per_s']} unary RPCs/s (keep-alives are streams), "
            f"{r['etcd_watchers']} watchers, {r['etcd_keys']} keys"
        )
    x = result["extrapolated_1000_hosts"]
    print(f"status traffic ratio vs baseline: {result['status_traffic_ratio']}x")
    print(
        f"1,000 hosts: ~{x['requests_per_s']} req/s = {x['share_of_published_capacity']:.1%} of etcd's published 30k/s"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
