"""The fleet wired into real daemons: `sentinel run` processes on a real etcd.

- a serving group spanning two hosts is restarted as ONE action when a member dies:
  stop both, head first then the member, verified, journaled on both hosts; a member
  whose Sentinel never confirms its step fails the action, which escalates, and the
  group is not left half-started;
- the disruption budget holds across daemons when every host's worker dies at once
  (checked from the slot history etcd recorded), and a host cut off from etcd under
  `partition_policy: hold` takes no disruptive action, says so in its journal, and
  restarts its worker exactly once when the network heals.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from sentinel.demo.fleet_hosts import SlotRecorder, WorkerPlan
from tests.etcd_cluster import EtcdCluster
from tests.fleet_daemons import Fleet, dump_logs, running_fleet, until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

QWEN = {"model": "qwen3"}
CODER = {"model": "coder"}


def _fleet(name: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "lease_ttl": "10s",
        "request_timeout": "1s",
        "status_interval": "2s",
        "partition_policy": "hold",
        "budget": {"max_unavailable": 1, "wait": "60s"},
        "breaker": {"share": 0.9, "window": "1m", "min_hosts": 10},  # never systemic here
        **extra,
    }


def _pid(f: Fleet, host: str, worker: str) -> tuple[int, int]:
    """(pid, mtime of the pid file in ns) of a worker the process backend started."""
    path = f.hosts[host].state / "workers" / f"{worker}.pid"
    return int(path.read_text().split()[0]), path.stat().st_mtime_ns


async def test_group_restart_across_two_daemons_then_a_member_that_never_confirms(
    etcd1: EtcdCluster, fleet_name: str, tmp_path: Path
) -> None:
    group = {
        "name": "qwen3",
        "members": [{"member": "host-a:qwen3-r0", "head": True}, {"member": "host-b:qwen3-r1"}],
        "step_timeout": "8s",
        "verify_timeout": "30s",
    }
    # A long lease: the second half stops host-b's Sentinel (SIGSTOP) and needs its status
    # to stay in etcd meanwhile, so host-a starts the group action and waits on host-b.
    fleet = _fleet(fleet_name, groups=[group], lease_ttl="40s")
    plan = {
        "host-a": [WorkerPlan("qwen3-r0", (0, 1, 2, 3), QWEN)],
        "host-b": [WorkerPlan("qwen3-r1", (0, 1, 2, 3), QWEN)],
    }
    async with running_fleet(tmp_path, etcd1.endpoints, fleet, plan) as f:
        try:
            head0, member0 = _pid(f, "host-a", "qwen3-r0"), _pid(f, "host-b", "qwen3-r1")
            since = time.time()
            await f.fault("host-b", "qwen3-r1", {"kind": "exit", "code": 1})

            async def initiated() -> dict[str, object] | None:
                rows = [r for r in await f.rows("host-b", since, "qwen3-r1") if r["trigger"] != "group"]
                done = [r for r in rows if r["outcome"] in ("succeeded", "failed")]
                return done[0] if done else None

            row = await until(initiated, 120, "host-b's group action to end", every=0.5)
            assert row["outcome"] == "succeeded", row
            assert row["action"] == "restart"
            # Journaled on the head's host too, as a group action host-b started.
            mirrored = await until(
                lambda: _finished(f, "host-a", since, "qwen3-r0"), 30, "host-a's row of the group action"
            )
            assert mirrored["trigger"] == "group" and mirrored["outcome"] == "succeeded", mirrored
            assert mirrored["action"] == "restart"
            # Both restarted, the head first.
            head1, member1 = _pid(f, "host-a", "qwen3-r0"), _pid(f, "host-b", "qwen3-r1")
            assert head1[0] != head0[0] and member1[0] != member0[0]
            assert head1[1] < member1[1], "the member was started before the head"
            assert await f.serving([f.worker("host-a", "qwen3-r0"), f.worker("host-b", "qwen3-r1")])
            # One action: host-a did not start a group action of its own for the head's alerts.
            own_a = [r for r in await f.rows("host-a", since, "qwen3-r0") if r["trigger"] != "group"]
            assert not [r for r in own_a if r["outcome"] in ("succeeded", "failed")], own_a

            # -- a member host that never confirms: host-b's Sentinel frozen -------------------
            b = f.hosts["host-b"]
            assert b.proc is not None
            since = time.time()
            os.kill(b.proc.pid, signal.SIGSTOP)
            try:
                await f.fault("host-a", "qwen3-r0", {"kind": "exit", "code": 1})

                async def failed() -> dict[str, object] | None:
                    rows = [r for r in await f.rows("host-a", since, "qwen3-r0") if r["trigger"] != "group"]
                    return next((r for r in rows if r["outcome"] == "failed"), None)

                row = await until(failed, 120, "host-a's group action to fail", every=0.5)
                assert "host-b:qwen3-r1 did not confirm step 0 (stop)" in str(row["error"]), row
                # Escalated: the next step of the ladder is decided (and needs host-b too).
                await until(lambda: _escalated(f, since), 60, "an escalation after the failed group action", every=0.5)
                # Not half-started: the head stays stopped, never silently serving alone.
                assert not await f.serving([f.worker("host-a", "qwen3-r0")])
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
        except BaseException:
            dump_logs(f)
            raise


async def _finished(f: Fleet, host: str, since: float, worker: str) -> dict[str, object] | None:
    rows = [r for r in await f.rows(host, since, worker) if r["outcome"] in ("succeeded", "failed")]
    return rows[0] if rows else None


async def _escalated(f: Fleet, since: float) -> bool:
    rows = await f.rows("host-a", since, "qwen3-r0")
    return any(r["trigger"] == "escalation" for r in rows)


async def test_budget_across_daemons_one_restart_at_a_time(etcd1: EtcdCluster, fleet_name: str, tmp_path: Path) -> None:
    proxy = await TcpProxy("127.0.0.1", int(etcd1.endpoints[0].rsplit(":", 1)[1])).start()
    plan = {h: [WorkerPlan(f"coder-{h[-1]}", (0, 1, 2, 3), CODER)] for h in ("host-a", "host-b", "host-c")}
    recorder: SlotRecorder | None = None
    try:
        async with running_fleet(
            tmp_path, etcd1.endpoints, _fleet(fleet_name), plan, host_endpoints={"host-c": [proxy.url]}
        ) as f:
            recorder = SlotRecorder(f.client, time.monotonic, fleet=fleet_name)
            recorder.start()
            try:
                # -- every host's worker dies at once: one restart at a time, fleet-wide -------
                since = time.time()
                started = time.monotonic()
                for host, workers in plan.items():
                    await f.fault(host, workers[0].name, {"kind": "exit", "code": 1})
                every = [w for ws in plan.values() for w in ws]

                async def all_restarted() -> bool:
                    for host, workers in plan.items():
                        if await _finished(f, host, since, workers[0].name) is None:
                            return False
                    return True

                await until(all_restarted, 180, "every host to restart its worker", every=0.5)
                await until(lambda: f.serving(every), 60, "every worker to serve again", every=0.5)
                holds = [h for h in recorder.holds if h.taken_at >= started and h.pool == "fleet"]
                assert {h.worker for h in holds} == {w.name for w in every}, holds
                assert recorder.peak.get("fleet", 0) <= 1, (recorder.peak, holds)
                assert recorder.overwrites == 0
                spans = sorted((h.taken_at, h.given_back_at or float("inf")) for h in holds)
                for (_, end), (start, _) in itertools.pairwise(spans):
                    assert start >= end, f"two slots held at once: {spans}"
                for host, workers in plan.items():
                    rows = await f.rows(host, since, workers[0].name)
                    ran = [r for r in rows if r["outcome"] in ("succeeded", "failed")]
                    assert len(ran) == 1 and ran[0]["outcome"] == "succeeded", (host, rows)

            except BaseException:
                dump_logs(f)
                raise
    finally:
        if recorder is not None:
            await recorder.stop()
        await proxy.close()


async def test_hold_under_partition_takes_no_action_says_why_and_acts_once_after_the_heal(
    etcd1: EtcdCluster, fleet_name: str, tmp_path: Path
) -> None:
    # A fleet of its own: a fault left over from another scenario (an alert still firing
    # on its log window) would make the death below part of an episode already healed.
    proxy = await TcpProxy("127.0.0.1", int(etcd1.endpoints[0].rsplit(":", 1)[1])).start()
    plan = {h: [WorkerPlan(f"coder-{h[-1]}", (0, 1, 2, 3), CODER)] for h in ("host-a", "host-c")}
    recorder: SlotRecorder | None = None
    try:
        async with running_fleet(
            tmp_path, etcd1.endpoints, _fleet(fleet_name), plan, host_endpoints={"host-c": [proxy.url]}
        ) as f:
            recorder = SlotRecorder(f.client, time.monotonic, fleet=fleet_name)
            recorder.start()
            started = time.monotonic()
            every = [w for ws in plan.values() for w in ws]
            try:
                await until(lambda: f.serving(every), 60, "every worker to serve", every=0.5)
                since = time.time()
                proxy.cut()
                await f.fault("host-c", "coder-c", {"kind": "die"})

                async def held() -> dict[str, object] | None:
                    rows = await f.rows("host-c", since, "coder-c")
                    return next((r for r in rows if r["outcome"] == "skipped" and "hold" in str(r["error"])), None)

                skipped = await until(held, 90, "host-c to journal the refusal under hold", every=0.5)
                assert "partition_policy is hold" in str(skipped["error"]), skipped
                acted = await _finished(f, "host-c", since, "coder-c")
                assert acted is None, f"host-c acted while cut off: {acted}"
                proxy.heal()
                row = await until(
                    lambda: _finished(f, "host-c", since, "coder-c"), 120, "the restart after the heal", every=0.5
                )
                assert row["outcome"] == "succeeded", row
                await until(lambda: f.serving(every), 60, "every worker to serve again", every=0.5)
                # Exactly once: the restart took one slot and was journaled once.
                rows = await f.rows("host-c", since, "coder-c")
                ran = [r for r in rows if r["outcome"] in ("succeeded", "failed")]
                assert len(ran) == 1, rows
                again = [h for h in recorder.holds if h.worker == "coder-c" and h.taken_at >= started]
                assert len(again) == 1, again
            except BaseException:
                dump_logs(f)
                raise
    finally:
        if recorder is not None:
            await recorder.stop()
        await proxy.close()
