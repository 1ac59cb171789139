"""Real `sentinel run` daemons in a fleet on a real etcd, for the end-to-end fleet tests.

Each host is the fleet demo's `HostHandle` (its own config, state directory, simulated
8-GPU host and `sentinel.sim.lite` workers under the process backend), so the tests and
the demo exercise the same wiring. `running_fleet` starts them, waits on readiness
(every /-/ready, every host Ready in etcd with a leader, every worker serving) and
always stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from sentinel.demo.common import FOR_COMPRESSION, compress_rules, repo_rules
from sentinel.demo.fleet_hosts import HostHandle, WorkerPlan, worker_fault, worker_tokens
from sentinel.fleet import FleetConfig
from sentinel.fleet.cli import read_fleet
from sentinel.fleet.etcd import EtcdClient, EtcdError
from sentinel.notify.testing import RecordingReceiver

T = TypeVar("T")

__all__ = ["Fleet", "running_fleet", "until"]


async def until(
    check: Callable[[], Awaitable[T | None] | T | None], timeout: float, what: str, every: float = 0.25
) -> T:
    """Poll a (possibly async) condition until it is truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class Fleet:
    hosts: dict[str, HostHandle]
    http: aiohttp.ClientSession
    client: EtcdClient
    config: FleetConfig  # for read_fleet (host_id is the reader's)
    sink: RecordingReceiver

    def worker(self, host: str, name: str) -> WorkerPlan:
        return next(w for w in self.hosts[host].workers if w.name == name)

    async def rows(self, host: str, since_wall: float, worker: str | None = None) -> list[dict[str, Any]]:
        """The host's journal rows started since `since_wall`, oldest first."""
        rows = await self.hosts[host].actions(self.http)
        mine = [r for r in rows if r["started"] >= since_wall and (worker is None or r["worker"] == worker)]
        return sorted(mine, key=lambda r: float(r["started"]))

    async def fault(self, host: str, worker: str, body: dict[str, Any]) -> None:
        assert await worker_fault(self.http, self.worker(host, worker), body), f"fault {body} on {worker}"

    async def serving(self, workers: Sequence[WorkerPlan]) -> bool:
        """Every worker answers and generates tokens (one request each to make it work)."""

        async def poke(url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                body = {"prompt": "hello", "max_tokens": 20}
                async with self.http.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=5)):
                    pass

        first = await asyncio.gather(*(worker_tokens(self.http, w) for w in workers))
        if any(v is None for v in first):
            return False
        await asyncio.gather(*(poke(w.url) for w in workers))
        second = await asyncio.gather(*(worker_tokens(self.http, w) for w in workers))
        return all(a is not None and b is not None and b > a for a, b in zip(first, second, strict=True))

    async def formed(self) -> bool:
        try:
            view = await read_fleet(self.client, self.config, 2.0)
        except EtcdError:
            return False
        ready = {h.host for h in view.hosts if h.status == "Ready"}
        return ready >= set(self.hosts) and view.leader is not None


@contextlib.asynccontextmanager
async def running_fleet(
    root: Path,
    endpoints: Sequence[str],
    fleet: dict[str, Any],
    plan: dict[str, list[WorkerPlan]],
    host_endpoints: dict[str, list[str]] | None = None,
) -> AsyncIterator[Fleet]:
    """Start one `sentinel run` per host of `plan` in fleet `fleet["name"]`; always stop them."""
    rules = compress_rules(repo_rules(), root / "rules", FOR_COMPRESSION)
    hosts: dict[str, HostHandle] = {}
    config = FleetConfig.model_validate({**fleet, "endpoints": list(endpoints), "host_id": "test-reader"})
    client = EtcdClient(list(endpoints), request_timeout=2.0)
    async with RecordingReceiver() as sink, aiohttp.ClientSession() as http:
        try:
            for name, workers in plan.items():
                eps = (host_endpoints or {}).get(name, list(endpoints))
                hosts[name] = HostHandle(
                    name, workers, root, endpoints=eps, rule_files=rules, sink_url=sink.url, fleet=fleet
                )
            for host in hosts.values():
                host.start()
            f = Fleet(hosts, http, client, config, sink)

            async def all_ready() -> bool:
                return all(await asyncio.gather(*(h.ready(http) for h in hosts.values())))

            try:
                await until(all_ready, 120, "every Sentinel to answer /-/ready")
                await until(f.formed, 120, "every host Ready in the fleet, one leading")
                workers = [w for ws in plan.values() for w in ws]
                await until(lambda: f.serving(workers), 120, "every worker to serve", every=0.5)
            except AssertionError:
                for host in hosts.values():
                    print(f"--- {host.name} ---\n{host.log_tail(60)}")
                raise
            yield f
        finally:
            await asyncio.gather(*(asyncio.to_thread(h.stop) for h in hosts.values()), return_exceptions=True)
            for host in hosts.values():
                host.kill_workers()
            await client.close()


def dump_logs(f: Fleet, lines: int = 80) -> None:
    """Print each host's log tail (pytest shows it when the test fails)."""
    for host in f.hosts.values():
        print(f"--- {host.name} ---\n{host.log_tail(lines)}")
