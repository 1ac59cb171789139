"""The disruption budget against a real etcd: the limit holds under contention (proved
from etcd's own history), dead holders free their slots, refusals say why."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from sentinel.fleet.budget import SlotDecision
from sentinel.fleet.config import BudgetConfig
from sentinel.fleet.keys import Keys
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import (
    budget_hosts,
    granted_holders,
    holder_history,
    max_concurrent,
    publish_status,
    wait_for,
    workers,
)

pytestmark = pytest.mark.integration


async def contend(host, worker: str, rounds: int, log: list[tuple[float, float, str]], timeout: float = 90) -> int:  # type: ignore[no-untyped-def]
    granted = 0
    for _ in range(rounds):
        d = await host.budget.acquire(worker=worker, action="restart", timeout=timeout)
        assert d.granted, d.reason
        start = time.monotonic()
        await asyncio.sleep(random.uniform(0.01, 0.05))
        log.append((start, time.monotonic(), d.holder))
        await host.budget.release(d)
        granted += 1
    return granted


async def test_many_concurrent_contenders_never_exceed_the_limit(etcd1: EtcdCluster, fleet_name: str) -> None:
    cfg = BudgetConfig(max_unavailable=3)
    async with budget_hosts(etcd1.endpoints, fleet_name, cfg, count=4) as hosts:
        start_rev = (await hosts[0].client.range("/")).revision + 1
        log: list[tuple[float, float, str]] = []
        tasks = [contend(h, f"w{j}", 2, log) for h in hosts for j in range(8)]
        assert sum(await asyncio.gather(*tasks)) == 64
        history = await holder_history(hosts[0].client, fleet_name, start_rev)
    creates = granted_holders(history)
    assert len(creates) == 64 == len(set(creates))  # every grant once, none twice
    assert sorted(creates) == sorted(h for _, _, h in log)
    assert max_concurrent(history) == {"fleet": 3}  # the limit, reached and never exceeded
    # The clients' own view agrees: never more than 3 actions in flight at once.
    edges = sorted([(s, 1) for s, _, _ in log] + [(e, -1) for _, e, _ in log])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 3


async def test_percentage_of_live_workers_and_per_label_pools(etcd1: EtcdCluster, fleet_name: str) -> None:
    cfg = BudgetConfig.model_validate(
        {"max_unavailable": "50%", "per_label": [{"label": "model", "max_unavailable": 1}], "wait": 0.5}
    )
    async with budget_hosts(etcd1.endpoints, fleet_name, cfg, count=2) as (a, b):
        await publish_status(
            a.client,
            fleet_name,
            "host-0",
            workers(("w0", {"model": "big"}), ("w1", {"model": "big"})),
            a.session.lease_id or 0,
        )
        await publish_status(
            b.client, fleet_name, "host-1", workers(("w2", {"model": "small"}), ("w3", {})), b.session.lease_id or 0
        )
        first = await a.budget.acquire(worker="w0", action="restart", labels={"model": "big"})
        assert first.granted and first.pools == ("fleet", "model=big")
        assert first.reason == "slot granted in fleet#0, model=big#0"
        same_model = await a.budget.acquire(worker="w1", action="restart", labels={"model": "big"})
        assert not same_model.granted
        assert "budget exhausted in pool model=big: 1/1 slots held (host-0/w0 restart" in same_model.reason
        other_model = await b.budget.acquire(worker="w2", action="restart", labels={"model": "small"})
        assert other_model.granted  # 50% of 4 live workers = 2 fleet slots
        third = await b.budget.acquire(worker="w3", action="restart", labels={})
        assert not third.granted and "pool fleet: 2/2" in third.reason and "waited 0s" in third.reason
        pools = await a.budget.pools()
        assert {(p.name, p.held, p.limit) for p in pools.values()} == {
            ("fleet", 2, 2),
            ("model=big", 1, 1),
            ("model=small", 1, 1),
        }
        for d in (first, other_model):
            await a.budget.release(d)


async def test_no_live_workers_means_no_disruption_for_a_percentage(etcd1: EtcdCluster, fleet_name: str) -> None:
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable="10%"), count=1) as (a,):
        d = await a.budget.acquire(worker="w0", action="restart", timeout=5)
        assert not d.granted
        assert "allows no action in pool fleet: max_unavailable 10% of 0 live workers is 0" in d.reason


@pytest.mark.wallclock
async def test_a_dead_holders_slot_frees_itself_with_its_lease(etcd1: EtcdCluster, fleet_name: str) -> None:
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=1), count=2, ttl=2) as (a, b):
        held = await a.budget.acquire(worker="w0", action="restart")
        assert held.granted
        waiter = asyncio.ensure_future(b.budget.acquire(worker="w1", action="restart", timeout=30))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        crashed_at = time.monotonic()
        await a.crash()
        got: SlotDecision = await waiter
        assert got.granted
        # The slot came back when the lease lapsed: no sooner, and within TTL plus slack.
        assert 1.0 < time.monotonic() - crashed_at < 2 + 4


@pytest.mark.wallclock
async def test_refusal_after_a_bounded_wait_names_the_holders(etcd1: EtcdCluster, fleet_name: str) -> None:
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=1), count=2) as (a, b):
        held = await a.budget.acquire(worker="w0", action="quantized_fallback")
        started = time.monotonic()
        refused = await b.budget.acquire(worker="w9", action="restart", timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 5
        assert not refused.granted and refused.mode == "refused"
        assert "host-0/w0 quantized_fallback" in refused.reason and "waited 1s" in refused.reason
        keys = Keys(f"/sentinel/{fleet_name}/")
        assert (await b.client.range(keys.waiters, prefix=True)).kvs == ()  # the waiter left the queue
        await a.budget.release(held)


async def test_waiters_are_served_in_arrival_order(etcd1: EtcdCluster, fleet_name: str) -> None:
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=1), count=1) as (a,):
        held = await a.budget.acquire(worker="w0", action="restart")
        order: list[str] = []

        async def wait(name: str) -> None:
            d = await a.budget.acquire(worker=name, action="restart", timeout=30)
            order.append(name)
            await asyncio.sleep(0.05)
            await a.budget.release(d)

        tasks = []
        for name in ("first", "second", "third"):
            tasks.append(asyncio.ensure_future(wait(name)))
            await wait_for(lambda n=name: any(n in k for k in a.budget.informer.items), 10, f"{name} queued")
        await a.budget.release(held)
        await asyncio.gather(*tasks)
        assert order == ["first", "second", "third"]


async def test_an_open_breaker_key_refuses_slots_for_that_alert_only(etcd1: EtcdCluster, fleet_name: str) -> None:
    keys = Keys(f"/sentinel/{fleet_name}/")
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=5), count=1) as (a,):
        record = {"alert": "EngineStalled", "state": "open", "opened_at": time.time(), "hosts": ["h1", "h2", "h3"]}
        import json

        await a.client.put(keys.breaker("EngineStalled"), json.dumps(record).encode())
        refused = await a.budget.acquire(worker="w0", action="restart", alert="EngineStalled")
        assert not refused.granted and "fleet breaker open for EngineStalled" in refused.reason
        other = await a.budget.acquire(worker="w0", action="restart", alert="CudaOOM")
        assert other.granted
        await a.budget.release(other)


async def test_killing_the_etcd_leader_mid_run_loses_and_doubles_no_slot(etcd3: EtcdCluster, fleet_name: str) -> None:
    """Contenders run while the raft leader is SIGKILLed: the limit holds across the
    failover, every grant a client believed in is in etcd's history exactly once, and
    nothing is left held at the end."""
    cfg = BudgetConfig(max_unavailable=2)
    async with budget_hosts(etcd3.endpoints, fleet_name, cfg, count=3, ttl=5) as hosts:
        start_rev = (await hosts[0].client.range("/")).revision + 1
        granted: list[str] = []
        unavailable = 0
        stop_at = time.monotonic() + 8

        async def run(h, worker: str) -> None:  # type: ignore[no-untyped-def]
            nonlocal unavailable
            from sentinel.fleet.budget import BudgetUnavailable

            while time.monotonic() < stop_at:
                try:
                    d = await h.budget.acquire(worker=worker, action="restart", timeout=10)
                except BudgetUnavailable:
                    unavailable += 1
                    await asyncio.sleep(0.1)
                    continue
                if d.granted:
                    granted.append(d.holder)
                    await asyncio.sleep(0.02)
                    await h.budget.release(d)

        tasks = [asyncio.ensure_future(run(h, f"w{j}")) for h in hosts for j in range(4)]
        await asyncio.sleep(2)
        leader = etcd3.leader_index()
        assert leader is not None
        etcd3.kill(leader)
        await asyncio.gather(*tasks)
        for h in hosts:  # releases that failed during the election are retried now
            await h.budget.retry_releases()
        survivor = hosts[0].client
        history = await holder_history(survivor, fleet_name, start_rev)
        left = await survivor.range(Keys(f"/sentinel/{fleet_name}/").holders, prefix=True)
    creates = granted_holders(history)
    assert len(creates) == len(set(creates))  # no holder written twice
    assert set(granted) <= set(creates)  # every grant a client believed in really happened
    assert len(granted) > 10  # and work went on across the failover
    assert max_concurrent(history)["fleet"] <= 2
    assert left.kvs == ()


async def test_no_grant_while_holders_sit_above_a_limit_that_shrank(etcd1: EtcdCluster, fleet_name: str) -> None:
    """Three slots held under limit 3; the limit drops to 2 (hosts died under a
    percentage). Freeing slot 0 must not let a new holder in while slot 2 is held:
    etcd itself refuses the grant (range compare), even for a requester whose view of
    the pool is stale."""
    async with budget_hosts(etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=3), count=1) as (wide,):
        held = [await wide.budget.acquire(worker=f"w{i}", action="restart") for i in range(3)]
        assert [d.reason for d in held] == [f"slot granted in fleet#{i}" for i in range(3)]
        async with budget_hosts(
            etcd1.endpoints, fleet_name, BudgetConfig(max_unavailable=2), count=1, name="narrow"
        ) as (narrow,):
            await wide.budget.release(held[0])
            refused = await narrow.budget.acquire(worker="x", action="restart", timeout=1.0)
            assert not refused.granted and "2/2 slots held" in refused.reason  # slot 2 sits above the new limit
            # A stale requester sends the transaction anyway (slot 0 looks free to it):
            from sentinel.fleet.budget import HolderRecord

            states = await narrow.budget.pools()
            record = HolderRecord(holder="stale", host="narrow-0", worker="x", action="restart", pools=("fleet",))
            snap = narrow.budget._parse(0, [], [], None)
            decision, _ = await narrow.budget._try_grant(
                record, narrow.session.lease_id or 0, states, {"fleet": 0}, snap, "/none"
            )
            assert decision is None
            await wide.budget.release(held[2])  # the holder above the new limit leaves
            got = await narrow.budget.acquire(worker="x", action="restart", timeout=10)
            assert got.granted and got.reason == "slot granted in fleet#0"
            for d in (held[1], got):
                await wide.budget.release(d)
