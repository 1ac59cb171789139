"""`sentinel fleet status|resume|forget`, run as a real subprocess against a real etcd
with live coordinators: every host alive or not, its workers and alerts, the budget, the
breaker and groups; clear exits for an unreachable etcd and a bad config."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentinel.fleet.status import AlertStatus, HostStatus, WorkerStatus
from tests.etcd_cluster import EtcdCluster, free_port
from tests.fleet_helpers import coordinators, crash, fleet_config, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel.fleet.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def status_of(host: str) -> HostStatus:
    alerts = (AlertStatus(name="EngineStalled", active_at=time.time(), worker="r1"),) if host == "b" else ()
    return HostStatus(
        version="0.9.0",
        gpus_up=8 if host != "b" else 7,
        gpus_expected=8,
        workers=(WorkerStatus(name=f"r-{host}", state="serving", profile="full", needs_human=host == "b"),),
        alerts=alerts,
    )


async def test_status_shows_every_host_alive_or_not(etcd1: EtcdCluster, fleet_name: str, tmp_path: Path) -> None:
    configs = [fleet_config(etcd1.endpoints, fleet_name, h, budget={"max_unavailable": 2}) for h in "abc"]
    sources = {h: (lambda h=h: status_of(h)) for h in "abc"}
    async with (
        coordinators(configs[:1], status_source=sources["a"]) as (a,),
        coordinators(configs[1:2], status_source=sources["b"]) as (b,),
        coordinators(configs[2:], status_source=sources["c"]) as (c,),
    ):
        slot = await a.acquire_slot("r-a", "restart")
        await crash(c)
        await wait_for(lambda: a.is_leader() or b.is_leader(), 15, "a leader")
        leader = a if a.is_leader() else b
        await wait_for(
            lambda: any(
                s.name == "sentinel_fleet_peer_up" and s.labels["host"] == "c" and s.value == 0
                for s in leader.samples()
            ),
            20,
            "c marked down",
        )
        yaml_file = tmp_path / "sentinel.yaml"
        yaml_file.write_text(
            f"workers: []\nfleet:\n  endpoints: {json.dumps(etcd1.endpoints)}\n  name: {fleet_name}\n"
            "  budget: {max_unavailable: 2}\n"
        )
        done = await asyncio.to_thread(fleet_cli, "status", "--json", "-c", str(yaml_file))
        text = await asyncio.to_thread(fleet_cli, "status", "--endpoints", etcd1.endpoints[0], "--fleet", fleet_name)
        await a.release_slot(slot)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    hosts = {h["host"]: h for h in view["hosts"]}
    assert {h: hosts[h]["status"] for h in "abc"} == {"a": "Ready", "b": "Ready", "c": "NotReady"}
    assert view["leader"] in ("a", "b") and hosts[view["leader"]]["leader"]
    assert hosts["c"]["workers"][0]["name"] == "r-c"  # last known status of a host that is gone
    assert hosts["b"]["alerts"][0]["name"] == "EngineStalled" and hosts["b"]["needs_human"] == ["r-b"]
    [pool] = view["budget"]
    assert (pool["pool"], pool["held"], pool["limit"]) == ("fleet", 1, 2)
    assert pool["holders"][0]["worker"] == "r-a"
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    header = next(line for line in lines if line.startswith("HOST"))
    assert header.split() == ["HOST", "STATUS", "ROLE", "AGE", "VERSION", "GPUS", "WORKERS", "ALERTS"]
    row_b = next(line for line in lines if line.startswith("b "))
    assert "7/8" in row_b and "r-b=serving(full)" in row_b and "EngineStalled,needs_human:r-b" in row_b
    assert next(line for line in lines if line.startswith("c ")).split()[1] == "NotReady"
    assert any(line.startswith("fleet ") and "r-a restart" in line for line in lines)


async def test_resume_and_forget(etcd1: EtcdCluster, fleet_name: str) -> None:
    from sentinel.fleet.etcd import EtcdClient
    from sentinel.fleet.keys import Keys

    keys = Keys(f"/sentinel/{fleet_name}/")
    ep = etcd1.endpoints[0]
    async with EtcdClient(etcd1.endpoints) as c:
        record = {"alert": "EngineStalled", "state": "open", "opened_at": time.time(), "hosts": ["a", "b", "c"]}
        await c.put(keys.breaker("EngineStalled"), json.dumps(record).encode())
        await c.put(keys.member("gone"), json.dumps({"host": "gone", "joined_at": 0, "state": "down"}).encode())
        done = await asyncio.to_thread(fleet_cli, "resume", "EngineStalled", "--endpoints", ep, "--fleet", fleet_name)
        assert done.returncode == 0 and "resumed EngineStalled" in done.stdout
        kv = await c.get(keys.breaker("EngineStalled"))
        assert kv is not None and json.loads(kv.value)["state"] == "resumed"
        again = await asyncio.to_thread(fleet_cli, "resume", "Nope", "--endpoints", ep, "--fleet", fleet_name)
        assert again.returncode == 1 and "no fleet breaker for Nope" in again.stderr
        forgot = await asyncio.to_thread(fleet_cli, "forget", "gone", "--endpoints", ep, "--fleet", fleet_name)
        assert forgot.returncode == 0 and await c.get(keys.member("gone")) is None


def test_an_unreachable_etcd_is_a_clear_exit_1() -> None:
    done = fleet_cli("status", "--endpoints", f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    assert done.returncode == 1
    assert done.stderr.startswith("cannot read the fleet from etcd: etcd unavailable")
    assert "Traceback" not in done.stderr


def test_a_bad_config_is_a_clear_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text("fleet:\n  endpoints: [http://127.0.0.1:2379]\n  groups:\n    - name: g\n      members:\n"
                    "        - {member: a:w0, head: true}\n        - {member: b:w1, head: true}\n")  # fmt: skip
    done = fleet_cli("status", "-c", str(path))
    assert done.returncode == 2
    assert f"{path}:4:7: fleet.groups.0: group 'g' needs exactly one member with head: true" in done.stderr
    missing = fleet_cli("status", "-c", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
