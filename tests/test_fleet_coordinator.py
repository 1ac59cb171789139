"""The coordinator as the daemon and the remediation engine use it, against a real etcd:
the fleet breaker trips from the hosts' own statuses and pages once, every host refuses
actions on that alert, an operator resumes it, it closes once the alert is gone; fleet
series land in the real store with staleness when leadership moves."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from sentinel.fleet import FleetCoordinator, metrics
from sentinel.fleet import cli as fleet_cli
from sentinel.fleet.events import FleetEvent
from sentinel.fleet.status import AlertStatus, HostStatus, WorkerStatus
from sentinel.store import LabelMatcher, MatchOp, Store
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import coordinators, crash, fleet_config, wait_for

pytestmark = pytest.mark.integration


class Statuses:
    """Each host's alerts, changed by the test as a fault would change them."""

    def __init__(self) -> None:
        self.firing: dict[str, dict[str, float]] = {}

    def source(self, host: str):  # type: ignore[no-untyped-def]
        def status() -> HostStatus:
            alerts = tuple(AlertStatus(name=a, active_at=t) for a, t in self.firing.get(host, {}).items())
            return HostStatus(workers=(WorkerStatus(name="w0", state="serving"),), alerts=alerts)

        return status


async def test_breaker_trips_on_a_systemic_alert_pages_once_and_resumes(etcd1: EtcdCluster, fleet_name: str) -> None:
    statuses = Statuses()
    breaker = {"share": 0.5, "window": "4s", "min_hosts": 3}
    configs = [fleet_config(etcd1.endpoints, fleet_name, f"h{i}", breaker=breaker, budget={"max_unavailable": 4})
               for i in range(4)]  # fmt: skip
    events: list[tuple[str, FleetEvent]] = []
    coords = []
    try:
        for cfg in configs:
            c = FleetCoordinator(cfg, status_source=statuses.source(cfg.host_id))
            c.subscribe(lambda e, h=cfg.host_id: events.append((h, e)))
            await c.start()
            coords.append(c)
        for c in coords:
            assert await c.wait_ready(30)
        now = time.time()
        for host in ("h0", "h1", "h2"):  # a bad rollout: 3 of 4 hosts stall within seconds
            statuses.firing[host] = {"EngineStalled": now}
        for c in coords:
            c.notify_status_changed()
        await wait_for(lambda: all(c.breaker("EngineStalled") for c in coords), 15, "every host to see the breaker")
        # The leader announces after etcd answers its transaction; the watches that show
        # every host the breaker may arrive first.
        await wait_for(lambda: any(e.kind == "breaker_open" for _, e in events), 10, "the breaker_open event")
        opened = [(h, e) for h, e in events if e.kind == "breaker_open"]
        assert len(opened) == 1 and opened[0][1].labels == {"alert": "EngineStalled"}
        assert "EngineStalled started on 3 of 4 hosts" in opened[0][1].message
        for c in coords:
            async with c.disruption_slot("w0", "restart", alert="EngineStalled") as slot:
                assert not slot and "fleet breaker open for EngineStalled" in slot.reason
        async with coords[3].disruption_slot("w0", "restart", alert="CudaOOM") as slot:
            assert slot and slot.mode == "fleet"  # other alerts still act
        leader = next(c for c in coords if c.is_leader())
        await wait_for(
            lambda: any(s.name == "sentinel_fleet_breaker_open" and s.value == 1 for s in leader.samples()), 5, "series"
        )

        args = ["resume", "EngineStalled", "--endpoints", etcd1.endpoints[0], "--fleet", fleet_name]
        assert await asyncio.to_thread(fleet_cli.main, args) == 0
        await wait_for(lambda: all(c.breaker("EngineStalled") is None for c in coords), 10, "the resume to spread")
        async with coords[0].disruption_slot("w0", "restart", alert="EngineStalled") as slot:
            assert slot and slot.mode == "fleet"

        statuses.firing.clear()  # the rollout is rolled back
        for c in coords:
            c.notify_status_changed()
        await wait_for(lambda: any(e.kind == "breaker_closed" for _, e in events), 20, "the breaker to close")
        assert len([e for _, e in events if e.kind == "breaker_closed"]) == 1
        assert len([e for _, e in events if e.kind == "breaker_open"]) == 1  # never re-opened
    finally:
        for c in coords:
            await c.stop()


async def test_fleet_series_in_the_store_follow_leadership(etcd1: EtcdCluster, fleet_name: str) -> None:
    configs = [fleet_config(etcd1.endpoints, fleet_name, f"h{i}") for i in range(2)]
    stores = [Store(), Store()]
    for s in stores:
        metrics.declare(s)
    async with coordinators(configs) as coords:
        await wait_for(lambda: sum(c.is_leader() for c in coords) == 1, 10, "a leader")
        leader = next(i for i, c in enumerate(coords) if c.is_leader())
        await wait_for(lambda: any(s.name == "sentinel_fleet_peer_up" for s in coords[leader].samples()), 10, "series")
        t0 = int(time.time() * 1000)
        for c, s in zip(coords, stores, strict=True):
            metrics.commit(s, c.samples(), t0)
        peer_up = [LabelMatcher("__name__", MatchOp.EQ, "sentinel_fleet_peer_up")]
        assert len(stores[leader].instant(peer_up, t0)) == 2 and stores[1 - leader].instant(peer_up, t0) == []
        assert stores[leader].meta("sentinel_fleet_peer_up") is not None
        await crash(coords[leader])  # the leader dies; the other takes over
        other = coords[1 - leader]
        await wait_for(other.is_leader, 15, "the survivor to lead")
        await wait_for(
            lambda: any(s.name == "sentinel_fleet_peer_up" and s.value == 0 for s in other.samples()), 15, "peer down"
        )
        t1 = t0 + 30_000
        metrics.commit(stores[1 - leader], other.samples(), t1)
        up = {dict(s.labels)["host"]: s.value for s in stores[1 - leader].instant(peer_up, t1)}
        assert up == {coords[leader].host: 0.0, other.host: 1.0}
        # On the old leader's store (had it lived on as a follower) the series go stale at once:
        metrics.commit(stores[leader], [], t1)
        series = stores[leader].get(stores[leader].instant(peer_up, t0)[0].labels)
        assert series is not None and math.isnan(series.last_value or 0.0)
