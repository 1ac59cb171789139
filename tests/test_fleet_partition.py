"""Partitions between a Sentinel and etcd, made with a real TCP proxy that the test cuts
or stalls: the slot policy (`hold` refuses at once and says why, `local` acts under local
limits), a slot whose lease lapsed during the cut is reported lost and is gone from etcd
when the host returns, and nothing a host did is done again when it reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sentinel.fleet import FleetCoordinator, FleetSetupError, HostStatus
from sentinel.fleet.events import FleetEvent
from sentinel.fleet.keys import Keys
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import coordinators, fleet_config, wait_for
from tests.fleet_workers import ProcessExecutor, WorkerProcess
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration
TTL = 3


@pytest.fixture
async def proxy(etcd1: EtcdCluster) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy("127.0.0.1", int(etcd1.endpoints[0].rsplit(":", 1)[1])).start()
    try:
        yield p
    finally:
        await p.close()


@pytest.mark.wallclock
@pytest.mark.parametrize("cut", ["cut", "stall"])
async def test_hold_refuses_a_disruptive_action_at_once_and_says_why(
    proxy: TcpProxy, fleet_name: str, cut: str
) -> None:
    cfg = fleet_config([proxy.url], fleet_name, "a", request_timeout=0.5)
    async with coordinators([cfg]) as (a,):
        getattr(proxy, cut)()
        started = time.monotonic()
        async with a.disruption_slot("w0", "restart", timeout=30) as slot:
            took = time.monotonic() - started
            assert not slot and slot.mode == "refused"
            assert "partition_policy is hold: no disruptive action without a fleet slot" in slot.reason
            assert took < 3, f"a partition cost {took:.1f}s of the healing path"
        await wait_for(lambda: not a.up, TTL + 3, "the session to lapse")
        started = time.monotonic()
        slot = await a.acquire_slot("w0", "restart", timeout=30)
        assert not slot and "no valid fleet session" in slot.reason
        assert time.monotonic() - started < 0.4  # known down: answered without trying (a try waits 0.5 s)
        proxy.heal()
        await wait_for(lambda: a.up, 20, "back in the fleet")
        async with a.disruption_slot("w0", "restart") as slot:
            assert slot and slot.mode == "fleet"


async def test_local_policy_acts_under_local_limits_when_cut_off(proxy: TcpProxy, fleet_name: str) -> None:
    cfg = fleet_config([proxy.url], fleet_name, "a", request_timeout=0.5, partition_policy="local")
    async with coordinators([cfg]) as (a,):
        proxy.cut()
        async with a.disruption_slot("w0", "restart", timeout=30) as slot:
            assert slot and slot.mode == "local"
            assert "partition_policy is local: acting under this host's own limits only" in slot.reason
        assert a.slot_outcomes["local"] == 1


async def test_a_slot_outliving_its_lease_is_reported_lost_and_gone_after_reconnect(
    proxy: TcpProxy, etcd1: EtcdCluster, fleet_name: str
) -> None:
    cut_off = fleet_config([proxy.url], fleet_name, "a", request_timeout=0.5, budget={"max_unavailable": 1})
    other = fleet_config(etcd1.endpoints, fleet_name, "b", budget={"max_unavailable": 1})
    events: list[FleetEvent] = []
    keys = Keys(f"/sentinel/{fleet_name}/")
    async with coordinators([cut_off, other]) as (a, b):
        a.subscribe(events.append)
        slot = await a.acquire_slot("w0", "restart")
        assert slot.mode == "fleet"
        proxy.stall()
        await wait_for(slot.lost.is_set, TTL + 2, "the slot to be reported lost")
        assert any(e.kind == "slot_lost" for e in events)
        # Meanwhile the fleet moved on: the lapsed lease freed the slot for b.
        got = await b.acquire_slot("w1", "restart", timeout=TTL + 10)
        assert got.mode == "fleet"
        await b.release_slot(got)
        proxy.heal()
        await wait_for(lambda: a.up and a.session.generation >= 2, 20, "a new session for a")
        await a.release_slot(slot)  # the action finished; its slot is not the one in etcd now
        assert (await b.client.range(keys.holders, prefix=True)).kvs == ()
        assert any(e.kind == "etcd_reachable" for e in events)


async def test_a_member_steps_run_once_even_when_its_watch_reconnects(
    proxy: TcpProxy, etcd1: EtcdCluster, fleet_name: str
) -> None:
    group = {
        "name": "g",
        "members": [{"member": "a:r0", "head": True}, {"member": "b:r1"}],
        "step_timeout": "20s",
    }
    wa, wb = WorkerProcess("r0"), WorkerProcess("r1")
    wa.start()
    wb.start()
    ex_a, ex_b = ProcessExecutor({"r0": wa}), ProcessExecutor({"r1": wb})
    slow_start = asyncio.Event()

    original_start = ex_b.start

    async def start_then_blip(worker: str):  # type: ignore[no-untyped-def]
        proxy.cut()  # b's link to etcd drops in the middle of its own step...
        await asyncio.sleep(0.5)
        proxy.heal()  # ...and comes back: its watch resumes from the last revision
        slow_start.set()
        return await original_start(worker)

    ex_b.start = start_then_blip  # type: ignore[method-assign]
    try:
        ca = fleet_config(etcd1.endpoints, fleet_name, "a", groups=[group])
        cb = fleet_config([proxy.url], fleet_name, "b", groups=[group], request_timeout=0.5)
        async with coordinators([ca, cb], executors={"a": ex_a, "b": ex_b}) as (a, _b):
            result = await a.run_group_action("g", "restart")
        assert result.ok, result.reason
        assert slow_start.is_set()
        b_steps = [kind for _, kind, _ in ex_b.log]
        assert b_steps == ["stop", "start", "verify"]  # once each, none repeated after the reconnect
    finally:
        wa.stop()
        wb.stop()


@pytest.mark.wallclock
async def test_an_unreachable_etcd_at_start_up_is_a_degraded_state_not_a_crash(fleet_name: str) -> None:
    from tests.etcd_cluster import free_port

    cfg = fleet_config([f"http://127.0.0.1:{free_port()}"], fleet_name, "a", request_timeout=0.3)
    coord = FleetCoordinator(cfg, status_source=lambda: HostStatus())
    started = time.monotonic()
    await coord.start()  # returns at once; joining goes on in the background
    assert time.monotonic() - started < 1
    try:
        assert not await coord.wait_ready(1.0)
        assert not coord.up and not coord.is_leader() and coord.leader_id() is None
        slot = await coord.acquire_slot("w0", "restart")
        assert not slot and "no valid fleet session" in slot.reason and "partition_policy is hold" in slot.reason
        samples = {s.name: s.value for s in coord.samples()}
        assert samples["sentinel_fleet_up"] == 0 and samples["sentinel_fleet_leader"] == 0
        await wait_for(lambda: coord.session.state == "unreachable", 5, "the session to say unreachable")
    finally:
        stopping = time.monotonic()
        await coord.stop()
        assert time.monotonic() - stopping < 5


async def test_unreadable_local_files_are_setup_errors(tmp_path: Path, fleet_name: str) -> None:
    missing = fleet_config(
        ["http://127.0.0.1:2379"], fleet_name, "a", user="sentinel", password_file=str(tmp_path / "nope")
    )
    with pytest.raises(FleetSetupError, match=r"fleet.password_file: cannot read .*nope: No such file"):
        await FleetCoordinator(missing, status_source=lambda: HostStatus()).start()
    no_ca = fleet_config(["https://127.0.0.1:2379"], fleet_name, "a", tls={"ca_file": str(tmp_path / "ca.pem")})
    with pytest.raises(FleetSetupError, match=r"fleet.tls.ca_file: .*ca.pem is not a readable file"):
        await FleetCoordinator(no_ca, status_source=lambda: HostStatus()).start()
