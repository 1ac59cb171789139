"""Shared pieces of the fleet tests: sessions, coordinators, and proofs from etcd's history."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from sentinel.fleet.budget import Budget, HolderRecord
from sentinel.fleet.config import BudgetConfig, FleetConfig
from sentinel.fleet.coordinator import FleetCoordinator
from sentinel.fleet.etcd import EtcdClient, cancel_and_wait
from sentinel.fleet.keys import Keys
from sentinel.fleet.session import Session
from sentinel.fleet.status import HostStatus, WorkerStatus
from tests.support import eventually_async


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll a condition (no fixed sleeps); the seconds it took. Fails with `what`."""
    start = time.monotonic()
    await eventually_async(predicate, timeout, what)
    return time.monotonic() - start


@dataclass
class BudgetHost:
    client: EtcdClient
    session: Session
    budget: Budget
    task: asyncio.Task[None]

    async def crash(self) -> None:
        """Die without a word: no revoke, the lease must lapse."""
        await cancel_and_wait(self.task)
        await self.budget.stop()
        await self.client.close()

    async def close(self) -> None:
        await self.budget.stop()
        await self.session.close(self.task)
        await self.client.close()


@contextlib.asynccontextmanager
async def budget_hosts(
    endpoints: Sequence[str], fleet: str, config: BudgetConfig, count: int, ttl: float = 3.0, name: str = "host"
) -> AsyncIterator[list[BudgetHost]]:
    """`count` independent hosts (own client, own lease) sharing one budget, named
    `<name>-<i>` (host ids must be unique: a host removes its own orphaned keys)."""
    hosts = []
    try:
        for i in range(count):
            client = EtcdClient(endpoints, request_timeout=2.0)
            session = Session(client, ttl)
            task = asyncio.ensure_future(session.run())
            budget = Budget(client, Keys(f"/sentinel/{fleet}/"), config, session, f"{name}-{i}")
            hosts.append(BudgetHost(client, session, budget, task))
        for h in hosts:
            assert await h.session.wait_valid(20), "session never came up"
        yield hosts
    finally:
        for h in hosts:
            if not h.task.done():
                await h.close()


async def publish_status(client: EtcdClient, fleet: str, host: str, status: HostStatus, lease: int = 0) -> None:
    await client.put(Keys(f"/sentinel/{fleet}/").host(host), status.model_dump_json().encode(), lease=lease)


def workers(*specs: tuple[str, dict[str, str]]) -> HostStatus:
    return HostStatus(workers=tuple(WorkerStatus(name=n, state="serving", labels=lab) for n, lab in specs))


async def holder_history(
    client: EtcdClient, fleet: str, start_revision: int
) -> list[tuple[int, str, str, HolderRecord]]:
    """Every create and delete of a slot key since `start_revision`, from etcd's own log:
    (revision, PUT or DELETE, pool, holder)."""
    keys = Keys(f"/sentinel/{fleet}/")
    marker = f"/sentinel-test-markers/{fleet}/end-of-history"  # outside the fleet: nobody parses it
    await client.put(marker, b"marker")
    events: list[tuple[int, str, str, HolderRecord]] = []
    async for response in client.watch_stream("/", prefix=True, start_revision=start_revision, prev_kv=True):
        for e in response.events:
            if e.kv.key == marker:
                await client.delete(marker)
                return events
            if not e.kv.key.startswith(keys.holders):
                continue
            kv = e.prev_kv if e.type == "DELETE" else e.kv
            if kv is None:
                raise AssertionError(f"delete of {e.kv.key} at {e.kv.mod_revision} without prev_kv")
            if e.type == "PUT" and e.kv.version != 1:
                raise AssertionError(f"slot {e.kv.key} overwritten while held")
            where = keys.slot_of(e.kv.key)
            assert where is not None, e.kv.key
            events.append((e.kv.mod_revision, e.type, where[0], HolderRecord.model_validate_json(kv.value)))
    raise AssertionError("history ended before the marker")


def max_concurrent(history: list[tuple[int, str, str, HolderRecord]]) -> dict[str, int]:
    """The most holders any pool had at once, revision by revision (a txn is one revision)."""
    held: dict[str, set[str]] = {}
    peak: dict[str, int] = {}
    by_rev: dict[int, list[tuple[str, str, HolderRecord]]] = {}
    for rev, kind, pool, rec in history:
        by_rev.setdefault(rev, []).append((kind, pool, rec))
    for rev in sorted(by_rev):
        for kind, pool, rec in by_rev[rev]:
            holders = held.setdefault(pool, set())
            if kind == "PUT":
                holders.add(rec.holder)
            else:
                holders.discard(rec.holder)
        for pool, holders in held.items():
            peak[pool] = max(peak.get(pool, 0), len(holders))
    return peak


def granted_holders(history: list[tuple[int, str, str, HolderRecord]], pool: str = "fleet") -> list[str]:
    """Holder ids, once per grant, in the order etcd committed them."""
    return [rec.holder for _, kind, p, rec in history if kind == "PUT" and p == pool]


def fleet_config(endpoints: Sequence[str], name: str, host: str, **over: object) -> FleetConfig:
    base: dict[str, object] = {"endpoints": list(endpoints), "name": name, "host_id": host, "lease_ttl": 3}
    base.update(over)
    return FleetConfig.model_validate(base)


def simple_status(*names: str, profile: str = "full") -> Callable[[], HostStatus]:
    return lambda: HostStatus(workers=tuple(WorkerStatus(name=n, state="serving", profile=profile) for n in names))


@contextlib.asynccontextmanager
async def coordinators(configs: Sequence[FleetConfig], **kwargs: object) -> AsyncIterator[list[FleetCoordinator]]:
    started = []
    try:
        for cfg in configs:
            status = kwargs.get("status_source") or simple_status("w0")
            executor = kwargs.get("executors", {}).get(cfg.host_id) if kwargs.get("executors") else None  # type: ignore[attr-defined]
            c = FleetCoordinator(cfg, status_source=status, executor=executor)  # type: ignore[arg-type]
            await c.start()
            started.append(c)
        for c in started:
            assert await c.wait_ready(30), f"{c.host} never joined"
        yield started
    finally:
        for c in started:
            if c.started:
                await c.stop()


async def crash(coord: FleetCoordinator) -> None:
    """Kill a coordinator without leaving: its lease must lapse on its own."""
    coord.started = False
    for task in coord._tasks:
        await cancel_and_wait(task)
    await coord.budget.stop()
    await coord.runner.close()
    await coord.client.close()
