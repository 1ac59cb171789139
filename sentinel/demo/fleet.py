"""`sentinel demo --fleet`: coordinated healing across four hosts on a real etcd, in about 3 minutes.

A 3-member etcd cluster on loopback (Debian's `etcd`), four Sentinel daemons — real
`sentinel run` processes, each with its own simulated 8-GPU host, state directory and
configuration — and six real worker processes (the light vLLM stand-in,
`sentinel.sim.lite`) under load, two of them one serving group spanning host-a and
host-b (`qwen3`, head on host-a). Every Sentinel notifies a local webhook sink. Host-c
reaches etcd through TCP proxies the demo can cut. Policy: `max_unavailable: 1`, the
fleet breaker at more than half the hosts within a minute, `partition_policy: hold`.

Faults, one after another:
1. `correlated-stall`: every host's standalone engine stalls at once (a bad driver
   push). Each host asks for a slot; the fleet breaker opens and pages once; the
   operator resumes it (`sentinel fleet resume EngineStalled`) and the hosts restart
   their workers one at a time under the budget.
2. `group-gpu-lost`: a GPU of host-b falls off (simulated NVML) and the group member
   on it dies: the whole group is restarted as one action — stop both, start the head,
   then the member, verify.
3. `sentinel-sigkill`: one Sentinel is killed with SIGKILL: the fleet leader raises one
   SentinelPeerDown within the lease TTL; the Sentinel is started again and rejoins.
4. `etcd-leader-kill`: a worker process exits and, as its host goes for a slot, the
   etcd raft leader is killed: the restart happens once, no slot is lost or held twice.
5. `partition-hold`: host-c is cut off from etcd and its worker's engine dies: under
   `hold` it takes no disruptive action and says why; once the network heals, the
   restart runs, once.

For each fault: when it was injected, when its alert reached the webhook sink, the
action, and when the workers were healthy again. `--json` prints one object:
`{"hosts", "max_unavailable", "faults": [{"fault", "injected_at", "detected_at",
"alert", "action", "recovered_at"}], "actions": [{"host", "worker", "action",
"started_at", "ended_at", "outcome"}], "peer_down_alerts"}`, times in seconds from the
start. `actions` has one entry per disruption slot held (as etcd saw it taken and given
back; a group action is one entry, host `group:qwen3`), so the budget can be checked
from that list alone. Rule `for:` durations are divided by `FOR_COMPRESSION`, as in
the single-host demo; thresholds and policies are the real ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from sentinel.daemon.logsetup import setup_logging
from sentinel.demo.common import FOR_COMPRESSION, FaultResult, compress_rules, repo_rules, results_table
from sentinel.demo.etcd import EtcdCluster, EtcdMissing
from sentinel.demo.fleet_hosts import (
    FLEET,
    GROUP,
    HostHandle,
    SlotHold,
    SlotRecorder,
    fleet_plan,
    group_section,
    worker_fault,
    worker_tokens,
)
from sentinel.demo.tcp_proxy import TcpProxy
from sentinel.fleet import FleetConfig
from sentinel.fleet.cli import read_fleet
from sentinel.fleet.etcd import EtcdClient, EtcdError
from sentinel.notify.testing import RecordingReceiver
from sentinel.sim.load import LoadGenerator

__all__ = ["FAULTS", "FleetDemo", "main"]

log = logging.getLogger(__name__)

LEASE_TTL_S = 10
MAX_UNAVAILABLE = 1
PARTITIONED = "host-c"
SLOT_ACTIONS = ("restart", "reduce_batch", "quantized_fallback", "stop")
PEER_DOWN, BREAKER_OPEN = "SentinelPeerDown", "FleetBreakerOpen"
_REPO = str(Path(__file__).resolve().parents[2])
FAULTS = ("correlated-stall", "group-gpu-lost", "sentinel-sigkill", "etcd-leader-kill", "partition-hold")


@dataclass
class Alert:
    """One alert notification the sink received."""

    at: float  # seconds of the demo, on arrival
    name: str
    status: str
    labels: dict[str, str]
    starts_at: str


@dataclass
class Timeline:
    started: float
    out: TextIO
    quiet: bool
    lines: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def say(self, what: str) -> None:
        line = f"  +{self.now():6.1f}s  {what}"
        self.lines.append(line)
        print(line, file=sys.stderr if self.quiet else self.out, flush=True)


class DemoFailed(Exception):
    pass


class FleetDemo:
    """Runs the fleet demo (module doc); `results`, `actions` and `peer_down_alerts` after `run`."""

    def __init__(self, faults: Sequence[str], out: TextIO, quiet: bool, keep: Path | None = None) -> None:
        self.faults = faults
        self.keep = keep  # a directory to run in and leave behind (configs, logs, state)
        self.host_log_level = "info"
        self.tl = Timeline(time.monotonic(), out, quiet)
        self.wall0 = time.time()
        self.results: list[FaultResult] = []
        self.hosts: dict[str, HostHandle] = {}
        self.proxies: list[TcpProxy] = []
        self.loads: list[LoadGenerator] = []
        self.alerts: list[Alert] = []
        self._seen_requests = 0
        self.slot_holds: list[SlotHold] = []
        self.slot_overwrites = 0
        self.slot_peak: dict[str, int] = {}
        self.actions: list[dict[str, Any]] = []
        self.peer_down_alerts = 0
        self.breaker_pages = 0

    # -- set-up and tear-down ------------------------------------------------------------

    async def run(self) -> None:
        with contextlib.ExitStack() as stack:
            if self.keep is not None:
                self.keep.mkdir(parents=True, exist_ok=True)
                root = Path(tempfile.mkdtemp(prefix="sentinel-fleet-demo-", dir=self.keep))
            else:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sentinel-fleet-demo-")))
            async with RecordingReceiver() as sink, aiohttp.ClientSession() as http:
                self.sink, self.http = sink, http
                await self._run(root)

    async def _run(self, root: Path) -> None:
        tl = self.tl
        self.etcd = EtcdCluster(3)
        try:
            await asyncio.to_thread(self.etcd.start)
        except EtcdMissing as exc:
            raise DemoFailed(f"a real etcd is needed: {exc}") from None
        tl.say(f"etcd: 3 members on loopback ({', '.join(self.etcd.endpoints)})")
        self.client = EtcdClient(self.etcd.endpoints, request_timeout=2.0)
        self.recorder = SlotRecorder(self.client, tl.now)
        try:
            await self._set_up(root)
            for name in self.faults:
                play: Callable[[FaultResult], Any] = getattr(self, "_" + name.replace("-", "_"))
                result = FaultResult(name)
                self.results.append(result)
                try:
                    await play(result)
                except DemoFailed as exc:
                    result.note = str(exc)
                    tl.say(f"{name}: {exc}")
                await self._settle()
            await self._collect()
        finally:
            await self._tear_down()

    async def _set_up(self, root: Path) -> None:
        tl = self.tl
        rules = compress_rules(repo_rules(), root / "rules", FOR_COMPRESSION)
        for m in self.etcd.members:
            proxy = await TcpProxy("127.0.0.1", m.client_port).start()
            self.proxies.append(proxy)
        fleet = {
            "name": FLEET,
            "lease_ttl": f"{LEASE_TTL_S}s",
            "request_timeout": "1s",
            "status_interval": "2s",
            "partition_policy": "hold",
            "budget": {"max_unavailable": MAX_UNAVAILABLE, "wait": "60s"},
            "breaker": {"share": 0.5, "window": "1m", "min_hosts": 3},
            "groups": [group_section()],
        }
        self.fleet_config = FleetConfig.model_validate({**fleet, "endpoints": self.etcd.endpoints, "host_id": "demo"})
        for name, workers in fleet_plan().items():
            endpoints = [p.url for p in self.proxies] if name == PARTITIONED else self.etcd.endpoints
            self.hosts[name] = HostHandle(
                name,
                workers,
                root,
                endpoints=endpoints,
                rule_files=rules,
                sink_url=self.sink.url,
                fleet=fleet,
                log_level=self.host_log_level,
            )
        self.recorder.start()
        for host in self.hosts.values():
            host.start()
        tl.say(
            "4 Sentinels started (sentinel run, simulated 8-GPU hosts), 6 workers (sentinel.sim.lite); "
            f"group {GROUP}: host-a:qwen3-r0 (head) + host-b:qwen3-r1; host-c reaches etcd through a proxy"
        )
        await self._until(lambda: self._all_ready(), 120, "every Sentinel to answer /-/ready")
        view = await self._until(self._fleet_formed, 120, "four hosts in the fleet, one leading")
        tl.say(f"fleet {FLEET}: {len(view.hosts)} hosts Ready, leader {view.leader}; max_unavailable {MAX_UNAVAILABLE}")
        await self._until(self._all_workers_progress, 120, "every worker to serve")
        for host in self.hosts.values():
            for w in host.workers:
                load = LoadGenerator(w.url, concurrency=2, prompt_len=8, max_tokens=24, timeout=60.0)
                load.start()
                self.loads.append(load)
        tl.say("every worker serving; load on each (2 clients)")

    async def _tear_down(self) -> None:
        for load in self.loads:
            with contextlib.suppress(Exception):
                await load.stop()
        await asyncio.gather(*(asyncio.to_thread(h.stop) for h in self.hosts.values()), return_exceptions=True)
        for host in self.hosts.values():
            host.kill_workers()
        with contextlib.suppress(Exception):
            await self.recorder.stop()
        with contextlib.suppress(Exception):
            await self.client.close()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.close()
        await asyncio.to_thread(self.etcd.close)

    # -- waiting ---------------------------------------------------------------------------

    async def _until(self, check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
        """Poll an (async) condition until it returns something truthy; DemoFailed after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                dead = [h.name for h in self.hosts.values() if h.proc is not None and not h.alive()]
                extra = f" (Sentinel exited on {', '.join(dead)})" if dead else ""
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
            await asyncio.sleep(every)

    async def _all_ready(self) -> bool:
        return all(await asyncio.gather(*(h.ready(self.http) for h in self.hosts.values())))

    async def _fleet_formed(self) -> Any:
        try:
            view = await read_fleet(self.client, self.fleet_config, 2.0)
        except EtcdError:
            return None
        ready = [h for h in view.hosts if h.status == "Ready"]
        return view if len(ready) == len(self.hosts) and view.leader else None

    async def _progress(self, workers: Sequence[Any]) -> bool:
        """Every worker's token counter moved within half a second."""
        first = await asyncio.gather(*(worker_tokens(self.http, w) for w in workers))
        await asyncio.sleep(0.5)
        second = await asyncio.gather(*(worker_tokens(self.http, w) for w in workers))
        return all(a is not None and b is not None and b > a for a, b in zip(first, second, strict=True))

    async def _all_workers_progress(self) -> bool:
        ok = all([await worker_tokens(self.http, w) is not None for h in self.hosts.values() for w in h.workers])
        if not ok:
            return False

        # Idle workers make no progress: send one request to each.
        async def poke(url: str) -> None:
            body = {"prompt": "hello", "max_tokens": 40}
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.http.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=5)):
                    pass

        workers = [w for h in self.hosts.values() for w in h.workers]
        pokes = [asyncio.ensure_future(poke(w.url)) for w in workers]
        try:
            return await self._progress(workers)
        finally:
            for p in pokes:
                p.cancel()

    def _read_sink(self) -> None:
        requests = self.sink.accepted()
        for req in requests[self._seen_requests :]:
            try:
                alerts = req.json().get("alerts", [])
            except (ValueError, AttributeError):
                continue
            for a in alerts:
                with contextlib.suppress(KeyError, TypeError, AttributeError):  # one odd entry, not the rest
                    labels = dict(a.get("labels", {}))
                    self.alerts.append(
                        Alert(req.wall - self.wall0, labels.get("alertname", ""), a["status"], labels, a["startsAt"])
                    )
        self._seen_requests = len(requests)

    def _alert_after(self, since: float, names: Sequence[str], **labels: str) -> Alert | None:
        self._read_sink()
        for a in self.alerts:
            matches = all(a.labels.get(k) == v for k, v in labels.items())
            if a.at >= since and a.name in names and a.status == "firing" and matches:
                return a
        return None

    async def _page(
        self, since: float, names: Sequence[str], timeout: float, what: str, sender: str, **labels: str
    ) -> Alert:
        """Wait for a firing page; on a timeout, say whether `sender`'s Sentinel fired it at all."""
        try:
            hit: Alert = await self._until(lambda: self._alert_after(since, names, **labels), timeout, what)
        except DemoFailed as exc:
            raise DemoFailed(f"{exc}; {await self._alert_state(sender, names, labels)}") from None
        return hit

    async def _alert_state(self, host: str, names: Sequence[str], labels: dict[str, str]) -> str:
        """What `host`'s Sentinel says of these alerts, and its notification queue (for a failed wait)."""
        handle = self.hosts[host]
        try:
            async with self.http.get(handle.base + "/api/v1/alerts", timeout=aiohttp.ClientTimeout(total=5)) as r:
                body = await r.json()
            found = [
                f"{a['labels'].get('alertname')} {a['state']} since {a.get('activeAt')}"
                for a in body["data"]["alerts"]
                if a["labels"].get("alertname") in names and all(a["labels"].get(k) == v for k, v in labels.items())
            ]
            async with self.http.get(handle.base + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
            queue = [line for line in text.splitlines() if line.startswith("sentinel_notification")]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
            return f"{host}'s Sentinel did not answer ({type(exc).__name__})"
        return f"{host}'s Sentinel has: {', '.join(found) or 'no such alert'}; " + "; ".join(queue[:8])

    def _resolved_after(self, since: float, name: str, **labels: str) -> Alert | None:
        self._read_sink()
        for a in self.alerts:
            matches = all(a.labels.get(k) == v for k, v in labels.items())
            if a.at >= since and a.name == name and a.status == "resolved" and matches:
                return a
        return None

    async def _rows(self, host: str, since_wall: float, worker: str | None = None) -> list[dict[str, Any]]:
        rows = await self.hosts[host].actions(self.http)
        return [r for r in rows if r["started"] >= since_wall and (worker is None or r["worker"] == worker)]

    def _wall(self, at: float) -> float:
        return self.wall0 + at

    async def _settle(self) -> None:
        """Between faults: every worker serving again and no slot held."""
        with contextlib.suppress(DemoFailed):
            await self._until(lambda: not self.recorder.open, 60, "every slot given back")
            await self._until(
                lambda: self._progress([w for h in self.hosts.values() for w in h.workers]), 60, "every worker to serve"
            )

    # -- 1. a correlated fault on every host --------------------------------------------

    async def _correlated_stall(self, r: FaultResult) -> None:
        tl = self.tl
        coders = [w for h in self.hosts.values() for w in h.workers if w.name.startswith("coder-")]
        tl.say("fault: every host's coder engine stalls at once (a bad driver push); /health stays 200")
        r.injected_at = round(tl.now(), 2)
        await asyncio.gather(*(worker_fault(self.http, w, {"kind": "stall", "seconds": 600}) for w in coders))
        first = await self._until(lambda: self._alert_after(r.injected_at or 0, ["EngineStalled"]), 90, "EngineStalled")
        r.detected_at, r.alert, r.action = round(first.at, 2), "EngineStalled", "restart"
        tl.say(f"FIRING    EngineStalled on {first.labels.get('sentinel_host')} (then the other hosts)")

        def breaker_or_all_acted() -> Any:
            page = self._alert_after(r.injected_at or 0, ["FleetBreakerOpen"])
            if page is not None:
                return page
            acted = {h.worker for h in self.recorder.holds if h.taken_at >= (r.injected_at or 0)}
            return "budget" if {w.name for w in coders} <= acted else None

        outcome = await self._until(breaker_or_all_acted, 60, "the fleet breaker or an action on every host")
        if isinstance(outcome, Alert):
            leader = outcome.labels.get("sentinel_host")
            tl.say(f"FIRING    FleetBreakerOpen{{alert=EngineStalled}} from the leader ({leader})")
            tl.say("operator: `sentinel fleet resume EngineStalled` (the hosts may act again, within the budget)")
            await self._fleet_cli("resume", "EngineStalled")
            r.note = "fleet breaker opened and paged once; resumed by the operator; restarts one at a time"
        else:
            r.note = "restarts one at a time under the budget"
        await self._until(lambda: self._progress(coders), 150, "every coder worker to serve again", every=1.0)
        r.recovered_at = round(tl.now(), 2)
        restarted = sorted({h.worker for h in self.recorder.holds if h.taken_at >= (r.injected_at or 0)})
        tl.say(f"recovered: every coder worker serving again (restarted: {', '.join(restarted) or 'none'})")

    async def _fleet_cli(self, *args: str) -> None:
        endpoints = ",".join(self.etcd.endpoints)
        argv = [sys.executable, "-m", "sentinel", "fleet", *args, "--endpoints", endpoints, "--fleet", FLEET]
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO
        proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60)
        if proc.returncode != 0:
            raise DemoFailed(f"sentinel fleet {' '.join(args)} failed: {proc.stderr.strip()}")

    # -- 2. a GPU lost under one member of the 2-host group -----------------------------

    async def _group_gpu_lost(self, r: FaultResult) -> None:
        tl = self.tl
        host_b, host_a = self.hosts["host-b"], self.hosts["host-a"]
        member = next(w for w in host_b.workers if w.name == "qwen3-r1")
        head = next(w for w in host_a.workers if w.name == "qwen3-r0")
        tl.say("fault: GPU 1 of host-b falls off; qwen3-r1's engine dies, the head hangs in NCCL")
        r.injected_at = round(tl.now(), 2)
        since_wall = self._wall(r.injected_at)
        host_b.set_lost_gpus([1])
        await worker_fault(self.http, member, {"kind": "die"})
        await worker_fault(self.http, head, {"kind": "stall", "seconds": 600})
        hit = await self._until(
            lambda: self._alert_after(r.injected_at or 0, ["EngineDead", "GPULost"], sentinel_host="host-b"),
            60,
            "EngineDead or GPULost on host-b",
        )
        r.detected_at, r.alert = round(hit.at, 2), hit.name
        tl.say(f"FIRING    {hit.name} on host-b")

        async def group_done() -> Any:
            for host in ("host-a", "host-b"):
                for row in await self._rows(host, since_wall):
                    own = row["worker"].startswith("qwen3") and row["trigger"] != "group"
                    if own and row["outcome"] and row["action"] in SLOT_ACTIONS:
                        return host, row
            return None

        initiator, row = await self._until(group_done, 90, "the group action to finish", every=0.5)
        r.action = row["action"]
        if row["outcome"] != "succeeded":
            raise DemoFailed(f"group action on {initiator}: {row['outcome']}: {row['error']}")
        r.recovered_at = round(row["finished"] - self.wall0, 2)
        others = [
            row2
            for host in ("host-a", "host-b")
            if host != initiator
            for row2 in await self._rows(host, since_wall)
            if row2["trigger"] == "group" and row2["outcome"] == "succeeded"
        ]
        tl.say(
            f"ACTION    group {GROUP} {row['action']} from {initiator}: stop both, start head, then member, "
            f"verified ({row['seconds_to_healthy'] or 0:.1f}s); journaled on {1 + len(others)} hosts"
        )
        r.note = f"one group action from {initiator}, journaled on both member hosts"
        host_b.set_lost_gpus([])  # the operator reset the GPU

    # -- 3. a Sentinel killed with SIGKILL -----------------------------------------------

    async def _sentinel_sigkill(self, r: FaultResult) -> None:
        tl = self.tl
        view = await self._until(self._fleet_formed, 60, "a formed fleet")
        victim = next(h for h in ("host-d", "host-c", "host-b") if h != view.leader)
        host = self.hosts[victim]
        tl.say(f"fault: the Sentinel of {victim} is killed with SIGKILL (leader: {view.leader})")
        r.injected_at = round(tl.now(), 2)
        await asyncio.to_thread(host.kill)
        hit = await self._page(
            r.injected_at or 0,
            ["SentinelPeerDown"],
            LEASE_TTL_S + 30,
            f"SentinelPeerDown for {victim}",
            view.leader,
            host=victim,
        )
        r.detected_at, r.alert = round(hit.at, 2), "SentinelPeerDown"
        tl.say(
            f"FIRING    SentinelPeerDown{{host={victim}}} from the leader {hit.labels.get('sentinel_host')} "
            f"{hit.at - r.injected_at:.1f}s after the kill (lease TTL {LEASE_TTL_S}s)"
        )
        host.start()
        await self._until(lambda: host.ready(self.http), 60, f"{victim}'s Sentinel to start again")
        back = await self._until(
            lambda: self._resolved_after(r.injected_at or 0, "SentinelPeerDown", host=victim),
            60,
            "SentinelPeerDown to resolve",
        )
        r.recovered_at = round(back.at, 2)
        tl.say(f"resolved  SentinelPeerDown{{host={victim}}}: its Sentinel rejoined (its worker kept running)")

    # -- 4. the etcd leader killed mid-run ------------------------------------------------

    async def _etcd_leader_kill(self, r: FaultResult) -> None:
        tl = self.tl
        host = self.hosts["host-a"]
        worker = next(w for w in host.workers if w.name == "coder-a")
        tl.say("fault: coder-a's process exits; as host-a goes for a slot, the etcd raft leader is killed")
        r.injected_at = round(tl.now(), 2)
        since_wall = self._wall(r.injected_at)
        await worker_fault(self.http, worker, {"kind": "exit", "code": 1})
        hit = await self._until(
            lambda: self._alert_after(r.injected_at or 0, ["WorkerDown", "EndpointDown"], worker="coder-a"),
            60,
            "WorkerDown on host-a",
        )
        r.detected_at, r.alert = round(hit.at, 2), hit.name
        leader = await asyncio.to_thread(self.etcd.leader_index)
        if leader is None:
            raise DemoFailed("etcd has no leader to kill")
        await asyncio.to_thread(self.etcd.kill, leader)
        tl.say(f"FIRING    {hit.name}{{worker=coder-a}}; etcd member m{leader} (the raft leader) killed")

        async def restarted() -> Any:
            rows = [x for x in await self._rows("host-a", since_wall, "coder-a") if x["action"] in SLOT_ACTIONS]
            done = [x for x in rows if x["outcome"] in ("succeeded", "failed")]
            return done[-1] if done else None

        row = await self._until(restarted, 90, "coder-a's restart", every=0.5)
        r.action = row["action"]
        r.recovered_at = round(row["finished"] - self.wall0, 2)
        await asyncio.to_thread(self.etcd.restart, leader)
        await asyncio.sleep(3)  # a repeat would come within the remediation tick
        rows = [x for x in await self._rows("host-a", since_wall, "coder-a") if x["action"] in SLOT_ACTIONS]
        ran = [x for x in rows if x["outcome"] in ("succeeded", "failed")]
        holds = [h for h in self.recorder.holds if h.worker == "coder-a" and h.taken_at >= r.injected_at]
        r.note = (
            f"{len(ran)} restart(s) of coder-a, {len(holds)} slot(s) held; "
            f"slot keys overwritten while held: {self.recorder.overwrites}"
        )
        tl.say(f"ACTION    restart coder-a: {row['outcome']}; etcd member m{leader} back; {r.note}")
        if len(ran) != 1 or len(holds) != 1 or self.recorder.overwrites:
            raise DemoFailed(f"not exactly once: {r.note}")

    # -- 5. one host cut off from etcd -------------------------------------------------------

    async def _partition_hold(self, r: FaultResult) -> None:
        tl = self.tl
        host = self.hosts[PARTITIONED]
        worker = host.workers[0]
        tl.say(f"fault: {PARTITIONED} is cut off from etcd (its proxies reset every connection); its engine dies")
        r.injected_at = round(tl.now(), 2)
        since_wall = self._wall(r.injected_at)
        cut_at = time.monotonic()
        for proxy in self.proxies:
            proxy.cut()
        await worker_fault(self.http, worker, {"kind": "die"})
        hit = await self._page(r.injected_at or 0, ["EngineDead"], 30, "EngineDead", PARTITIONED, worker=worker.name)
        r.detected_at, r.alert = round(hit.at, 2), "EngineDead"
        tl.say(f"FIRING    EngineDead{{worker={worker.name}}} on {PARTITIONED}")

        async def held_back() -> Any:
            rows = await self._rows(PARTITIONED, since_wall, worker.name)
            held = [x for x in rows if x["outcome"] == "skipped" and "partition_policy is hold" in x["error"]]
            return held[0] if held else None

        # Heal before the lease runs out: this is a network blip, not a host gone.
        budget = max(1.0, LEASE_TTL_S * 0.7 - (time.monotonic() - cut_at))
        skipped = None
        with contextlib.suppress(DemoFailed):
            skipped = await self._until(held_back, budget, "the refusal under hold", every=0.25)
        acted = [
            x
            for x in await self._rows(PARTITIONED, since_wall, worker.name)
            if x["action"] in SLOT_ACTIONS and x["outcome"] in ("succeeded", "failed")
        ]
        for proxy in self.proxies:
            proxy.heal()
        if skipped is None:
            raise DemoFailed("no refusal under hold was journaled while the host was cut off")
        tl.say(f"SKIPPED   {skipped['action']} {worker.name}: {skipped['error'][:110]}")
        if acted:
            raise DemoFailed(f"{PARTITIONED} acted while cut off: {acted[0]['action']}")
        tl.say(f"network healed after {time.monotonic() - cut_at:.1f}s; the restart waited for its fleet slot")

        async def restarted() -> Any:
            rows = [x for x in await self._rows(PARTITIONED, since_wall, worker.name) if x["action"] in SLOT_ACTIONS]
            done = [x for x in rows if x["outcome"] in ("succeeded", "failed")]
            return done[-1] if done else None

        row = await self._until(restarted, 90, f"{worker.name}'s restart after the heal", every=0.5)
        r.action = row["action"]
        r.recovered_at = round(row["finished"] - self.wall0, 2)
        await asyncio.sleep(3)
        rows = [x for x in await self._rows(PARTITIONED, since_wall, worker.name) if x["action"] in SLOT_ACTIONS]
        ran = [x for x in rows if x["outcome"] in ("succeeded", "failed")]
        r.note = f"held under partition_policy hold; {len(ran)} restart after the heal"
        tl.say(f"ACTION    {row['action']} {worker.name}: {row['outcome']} (once, after the heal)")
        if len(ran) != 1:
            raise DemoFailed(f"the restart ran {len(ran)} times")

    # -- the record --------------------------------------------------------------------------

    async def _collect(self) -> None:
        """Actions from the slots etcd saw held, outcomes from the journals; pages from the sink."""
        self._read_sink()
        rows: dict[str, list[dict[str, Any]]] = {}
        for name, host in self.hosts.items():
            # A loaded host may be slow to answer: the outcomes come from its journal, so ask again.
            deadline = time.monotonic() + 60
            journal = await host.read_actions(self.http, timeout=10)
            while journal is None and host.alive() and time.monotonic() < deadline:
                await asyncio.sleep(1)
                journal = await host.read_actions(self.http, timeout=10)
            rows[name] = journal or []
        self.slot_holds = list(self.recorder.holds)
        self.slot_overwrites = self.recorder.overwrites
        self.slot_peak = dict(self.recorder.peak)
        for hold in self.slot_holds:
            if hold.pool != "fleet":
                continue
            group = hold.worker.startswith("group:")
            worker = hold.worker
            outcome = None
            for row in rows.get(hold.host, []):
                if row["trigger"] == "group" or row["action"] != hold.action:
                    continue
                if group and self._group_member(row["worker"]) is None:
                    continue
                if not group and row["worker"] != hold.worker:
                    continue
                started = row["started"] - self.wall0
                finished = (row["finished"] or time.time()) - self.wall0
                if started - 1 <= hold.taken_at <= finished + 1:
                    outcome = row["outcome"]
                    worker = row["worker"] if group else worker
                    break
            self.actions.append(
                {
                    "host": hold.worker if group else hold.host,
                    "worker": worker,
                    "action": hold.action,
                    "started_at": round(hold.taken_at, 3),
                    "ended_at": round(hold.given_back_at, 3) if hold.given_back_at is not None else None,
                    "outcome": outcome,
                }
            )
        firing = [a for a in self.alerts if a.status == "firing"]
        # One page per alert episode (its labels and activeAt), however often it is re-sent.
        self.peer_down_alerts = len({(a.starts_at, a.labels.get("host")) for a in firing if a.name == PEER_DOWN})
        self.breaker_pages = len({(a.starts_at, a.labels.get("alert")) for a in firing if a.name == BREAKER_OPEN})

    def _group_member(self, worker: str) -> str | None:
        return GROUP if worker.startswith("qwen3-") else None


def max_concurrent(actions: Sequence[dict[str, Any]]) -> int:
    """The most actions of the list in progress at once (an open end counts as still running)."""
    edges = []
    for a in actions:
        edges.append((a["started_at"], 1))
        edges.append((a["ended_at"] if a["ended_at"] is not None else float("inf"), -1))
    peak = running = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += delta
        peak = max(peak, running)
    return peak


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="sentinel demo --fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", choices=["all", *FAULTS], help="one fault, or all in turn")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")
    parser.add_argument("--verbose", action="store_true", help="show the demo's own log")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="run in a new directory under DIR and leave it (configs, logs, state)"
    )
    args = parser.parse_args(argv)
    setup_logging("text", "info" if args.verbose else "error")
    faults = [f for f in FAULTS if args.scenario in ("all", f)]
    demo = FleetDemo(faults, out, quiet=args.json, keep=args.keep)
    if args.verbose:
        demo.host_log_level = "debug"  # the Sentinels' logs too (under --keep DIR)
    if not args.json:
        print("Sentinel fleet demo: four hosts coordinated on a real 3-member etcd, faults one after another", file=out)
        print(f"(rule `for:` durations divided by {FOR_COMPRESSION}; lease TTL {LEASE_TTL_S}s).", file=out, flush=True)
    started = time.monotonic()
    try:
        asyncio.run(demo.run())
    except DemoFailed as exc:
        print(f"sentinel demo --fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        faults_json = [{k: v for k, v in asdict(r).items() if k != "note"} for r in demo.results]
        print(
            json.dumps(
                {
                    "hosts": len(demo.hosts),
                    "max_unavailable": MAX_UNAVAILABLE,
                    "faults": faults_json,
                    "actions": demo.actions,
                    "peer_down_alerts": demo.peer_down_alerts,
                }
            ),
            file=out,
        )
    else:
        peak = max_concurrent(demo.actions)
        print(f"\n{results_table(demo.results)}\n", file=out)
        print(
            f"disruptive actions that held a slot: {len(demo.actions)}, at most {peak} at once "
            f"(max_unavailable {MAX_UNAVAILABLE}; slot keys overwritten while held: {demo.slot_overwrites}); "
            f"SentinelPeerDown pages: {demo.peer_down_alerts}; FleetBreakerOpen pages: {demo.breaker_pages}",
            file=out,
        )
        print(f"finished in {time.monotonic() - started:.0f}s", file=out)
    failed = [r for r in demo.results if r.detected_at is None or r.recovered_at is None]
    return 1 if failed else 0
