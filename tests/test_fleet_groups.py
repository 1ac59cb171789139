"""Serving groups across hosts against a real etcd and real worker processes: restarted
in order (stop all, same profile, head first, verify), a member that does not confirm
fails the whole action, one action at a time, and an initiator that dies mid-plan gets
its plan failed by the leader for everyone."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import pytest

from sentinel.fleet.config import FleetConfig
from sentinel.fleet.groups import parse_plan
from sentinel.fleet.keys import Keys
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import coordinators, crash, fleet_config, simple_status, wait_for
from tests.fleet_workers import ProcessExecutor, WorkerProcess

pytestmark = pytest.mark.integration

GROUP = {
    "name": "qwen3-480b",
    "members": [{"member": "b:r1"}, {"member": "a:r0", "head": True}, {"member": "c:r2"}],
    "step_timeout": "20s",
    "verify_timeout": "20s",
}


@pytest.fixture
def workers() -> Iterator[dict[str, dict[str, WorkerProcess]]]:
    procs = {"a": {"r0": WorkerProcess("r0")}, "b": {"r1": WorkerProcess("r1")}, "c": {"r2": WorkerProcess("r2")}}
    for host in procs.values():
        for w in host.values():
            w.start()
    try:
        yield procs
    finally:
        for host in procs.values():
            for w in host.values():
                w.stop()


def configs(endpoints: list[str], name: str, group: dict[str, object] = GROUP) -> list[FleetConfig]:
    return [fleet_config(endpoints, name, h, groups=[group], budget={"max_unavailable": 1}) for h in "abc"]


async def test_group_restart_runs_in_order_across_hosts_and_is_verified(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    executors = {h: ProcessExecutor(workers[h]) for h in "abc"}
    pids = {w.name: w.proc.pid for ws in workers.values() for w in ws.values() if w.proc}
    async with coordinators(configs(etcd1.endpoints, fleet_name), executors=executors) as coords:
        result = await coords[1].run_group_action("qwen3-480b", "quantized_fallback", profile="fp8", reason="GPULost")
    assert result.ok, result.reason
    assert result.outcome == "done" and "3 members restarted in order and verified" in result.reason
    steps = sorted((t, kind, w) for ex in executors.values() for t, kind, w in ex.log)
    kinds = [k for _, k, _ in steps]
    assert kinds[:3] == ["stop"] * 3 and kinds[3:6] == ["apply_profile"] * 3
    assert [(k, w) for _, k, w in steps[6:9]] == [("start", "r0"), ("start", "r1"), ("start", "r2")]  # head first
    assert kinds[9:] == ["verify"] * 3 and len(steps) == 12  # every step exactly once
    for ws in workers.values():
        for w in ws.values():
            assert w.alive() and w.profile == "fp8" and w.proc and w.proc.pid != pids[w.name]
    assert set(result.step_seconds) == {"0:stop", "1:apply_profile", "2:start", "3:start", "4:start", "5:verify"}


async def test_a_member_that_does_not_confirm_fails_the_action(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    # Long enough for the members that do start to start on a loaded 2-core machine:
    # only c's hang may fail the step.
    group = {**GROUP, "step_timeout": "10s"}
    executors = {h: ProcessExecutor(workers[h]) for h in "abc"}
    executors["c"].hang_step = "start"
    async with coordinators(configs(etcd1.endpoints, fleet_name, group), executors=executors) as coords:
        result = await coords[0].run_group_action("qwen3-480b", "restart", reason="EngineStalled")
        keys = Keys(f"/sentinel/{fleet_name}/")
        plan = parse_plan(await coords[0].client.get(keys.group_plan("qwen3-480b")))
        holders = await coords[0].client.range(keys.holders, prefix=True)
        lock = await coords[0].client.get(keys.group_lock("qwen3-480b"))
    assert not result.ok and result.outcome == "failed"
    # No profile known, so no apply step: stop is step 0, the starts are steps 1-3.
    assert result.reason == "c:r2 failed step 3 (start): start did not finish within 10s", result.reason
    assert plan is not None and plan.phase == "failed" and plan.failure == result.reason
    assert holders.kvs == () and lock is None  # slot and lock given back
    assert not [k for _, k, _ in executors["a"].log if k == "verify"]  # nobody went on past the failure


async def test_a_silent_member_host_fails_the_step_by_deadline(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    """Host c is in the group but runs no Sentinel: nobody acknowledges its steps."""
    group = {**GROUP, "step_timeout": "1s"}
    executors = {h: ProcessExecutor(workers[h]) for h in "ab"}
    async with coordinators(configs(etcd1.endpoints, fleet_name, group)[:2], executors=executors) as coords:
        result = await coords[0].run_group_action("qwen3-480b", "restart")
    assert not result.ok
    assert result.reason == "c:r2 did not confirm step 0 (stop) within 1s"


async def test_one_group_action_at_a_time(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    executors = {h: ProcessExecutor(workers[h]) for h in "abc"}
    async with coordinators(configs(etcd1.endpoints, fleet_name), executors=executors) as coords:
        first = asyncio.ensure_future(coords[0].run_group_action("qwen3-480b", "restart"))
        keys = Keys(f"/sentinel/{fleet_name}/")
        await wait_for(lambda: keys.group_lock("qwen3-480b") in coords[1].groups.items, 10, "the lock")
        second = await coords[1].run_group_action("qwen3-480b", "restart")
        assert second.outcome == "busy"  # the caller treats the fault as being handled
        assert "a group action is already running on qwen3-480b (host a, restart" in second.reason
        assert (await first).ok


async def test_an_initiator_that_dies_mid_plan_gets_its_plan_failed_by_the_leader(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    executors = {h: ProcessExecutor(workers[h]) for h in "abc"}
    executors["b"].hang_step = "start"  # the plan stays on a start step until we kill the initiator
    async with coordinators(configs(etcd1.endpoints, fleet_name), executors=executors) as coords:
        await wait_for(lambda: sum(c.is_leader() for c in coords) == 1, 10, "a leader")
        initiator = next(c for c in coords if not c.is_leader() and c.host != "b")
        failed: list[str] = []
        for c in coords:
            c.subscribe(lambda e: failed.append(e.message) if e.kind == "group_failed" else None)
        run = asyncio.ensure_future(initiator.run_group_action("qwen3-480b", "restart"))
        keys = Keys(f"/sentinel/{fleet_name}/")

        def on_b_start() -> bool:
            plan = parse_plan(initiator.groups.items.get(keys.group_plan("qwen3-480b")))
            return plan is not None and plan.current >= 0 and plan.steps[plan.current].members == ("b:r1",)

        await wait_for(on_b_start, 30, "the plan to reach b's start")
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await crash(initiator)
        survivor = next(c for c in coords if c is not initiator)
        await wait_for(lambda: bool(failed), 3 + 15, "the leader to fail the plan")
        plan = parse_plan(await survivor.client.get(keys.group_plan("qwen3-480b")))
    assert plan is not None and plan.phase == "failed"
    assert plan.failure == f"initiator {initiator.host} lost its lease during step 2 (start)"
    assert len(failed) == 1


async def test_status_and_plan_are_plain_json_in_etcd(
    etcd1: EtcdCluster, fleet_name: str, workers: dict[str, dict[str, WorkerProcess]]
) -> None:
    executors = {h: ProcessExecutor(workers[h]) for h in "abc"}
    cfgs = configs(etcd1.endpoints, fleet_name)
    async with coordinators(cfgs, executors=executors, status_source=simple_status("r0", profile="full")) as coords:
        assert (await coords[0].run_group_action("qwen3-480b", "restart")).ok
        kv = await coords[0].client.get(Keys(f"/sentinel/{fleet_name}/").group_plan("qwen3-480b"))
    assert kv is not None
    plan = json.loads(kv.value)
    assert plan["phase"] == "done" and plan["profile"] == "full"  # the head's current profile, for every member
    assert [s["kind"] for s in plan["steps"]] == ["stop", "apply_profile", "start", "start", "start", "verify"]
