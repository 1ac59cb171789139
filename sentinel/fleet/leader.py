"""What only the leader does: peer liveness, the fleet breaker, orphaned group plans,
and the fleet-wide series.

Runs while this host leads and is cancelled the moment it stops (coordinator.py). Every
write is a compare-and-swap that also carries the election fence, so:
- a transition (alive -> down) is written once, by one leader, and the event that
  announces it is emitted only by the writer whose transaction succeeded — a new leader
  after a failover finds `down` already recorded and does not announce it again;
- a deposed leader that has not noticed yet cannot write at all.

Peer liveness: `members/<host>` remembers every host that joined (no lease);
`hosts/<host>` exists while its lease lives. A member without a host key is down. A
host that leaves cleanly marks itself `left` first, so a planned stop raises nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sentinel.fleet.breaker import BreakerDecision, BreakerRecord, BreakerTracker
from sentinel.fleet.etcd import Compare, DeleteOp, EtcdError, KeyValue, PutOp, cancel_and_wait
from sentinel.fleet.events import FleetEvent, FleetSample
from sentinel.fleet.groups import parse_plan
from sentinel.fleet.status import HostStatus, MemberRecord
from sentinel.fleet.watch import Informer
from sentinel.runtime.timeouts import wait_for

if TYPE_CHECKING:
    from sentinel.fleet.coordinator import FleetCoordinator

__all__ = ["LeaderDuties"]

log = logging.getLogger(__name__)

TICK_S = 1.0
_BREAKER_SERIES = ("sentinel_fleet_breaker_open",)


class LeaderDuties:
    def __init__(self, coord: FleetCoordinator, emit: Callable[[FleetEvent], None]) -> None:
        self.coord = coord
        self.emit = emit
        self.keys = coord.keys
        self.client = coord.client
        self.hosts = Informer(coord.client, coord.keys.hosts)
        self.members = Informer(coord.client, coord.keys.members)
        self.tracker = BreakerTracker(coord.config.breaker)
        self.last_status: dict[str, HostStatus] = {}
        self.samples: list[FleetSample] = []
        self.evaluations = 0

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self.hosts.run()), asyncio.ensure_future(self.members.run())]
        try:
            for informer in (self.hosts, self.members):
                await wait_for(informer.synced.wait(), 30)
            while True:
                mirrors = (self.hosts, self.members, self.coord.groups, self.coord.breakers)
                versions = [m.version for m in mirrors]
                try:
                    await self.evaluate()
                except EtcdError as exc:
                    log.warning("fleet leader: evaluation incomplete: %s", exc)
                waiters = [
                    asyncio.ensure_future(m.wait_changed(v, TICK_S)) for m, v in zip(mirrors, versions, strict=True)
                ]
                _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
        finally:
            self.samples = []
            for t in tasks:
                await cancel_and_wait(t)

    def _statuses(self) -> dict[str, HostStatus]:
        out = {}
        for key, kv in self.hosts.items.items():
            with contextlib.suppress(ValidationError, ValueError):
                out[key[len(self.keys.hosts) :]] = HostStatus.model_validate_json(kv.value)
        return out

    def _members(self) -> dict[str, tuple[KeyValue, MemberRecord]]:
        out = {}
        for key, kv in self.members.items.items():
            with contextlib.suppress(ValidationError, ValueError):
                out[key[len(self.keys.members) :]] = (kv, MemberRecord.model_validate_json(kv.value))
        return out

    async def _cas(self, key: str, mod: int, ops: list[PutOp | DeleteOp]) -> bool:
        """A fenced compare-and-swap: only the current leader, only if `key` is unchanged."""
        fence = self.coord.election.fence()
        result = await self.client.txn([fence, Compare(key, "mod", "=", mod)], ops)
        return result.succeeded

    async def evaluate(self) -> None:
        self.evaluations += 1
        statuses = self._statuses()
        self.last_status.update(statuses)
        members = self._members()
        now = time.time()
        await self._peers(statuses, members, now)
        await self._breakers(statuses, now)
        await self._orphaned_plans()
        self.samples = self._series(statuses, self._members())

    async def _peers(
        self, statuses: dict[str, HostStatus], members: dict[str, tuple[KeyValue, MemberRecord]], now: float
    ) -> None:
        for host, status in statuses.items():
            if host not in members:
                record = MemberRecord(host=host, joined_at=status.started_at or now, state="alive", since=now)
                key = self.keys.member(host)
                await self._cas(key, 0, [PutOp(key, record.model_dump_json().encode())])
        for host, (kv, record) in members.items():
            host_kv = self.hosts.items.get(self.keys.host(host))
            new: MemberRecord | None = None
            if (host_kv is not None and record.state == "down") or (
                host_kv is not None and record.state == "left" and host_kv.create_revision > kv.mod_revision
            ):
                new = record.model_copy(update={"state": "alive", "since": now})
            elif host_kv is None and record.state == "alive":
                new = record.model_copy(
                    update={"state": "down", "since": now, "last_status": self.last_status.get(host)}
                )
            if new is None:
                continue
            if not await self._cas(kv.key, kv.mod_revision, [PutOp(kv.key, new.model_dump_json().encode())]):
                continue
            if new.state == "down":
                self.emit(
                    FleetEvent(
                        "peer_down",
                        f"fleet member {host} lost its lease (no keep-alive for {self.coord.config.lease_ttl:.0f}s)",
                        {"host": host},
                        metrics=("sentinel_fleet_peer_up",),
                    )
                )
            elif record.state == "down":
                down_for = now - record.since
                self.emit(
                    FleetEvent(
                        "peer_up",
                        f"fleet member {host} is back after {down_for:.0f}s",
                        {"host": host},
                        metrics=("sentinel_fleet_peer_up",),
                    )
                )

    def _breaker_records(self) -> dict[str, tuple[KeyValue, BreakerRecord]]:
        out = {}
        for key, kv in self.coord.breakers.items.items():
            with contextlib.suppress(ValidationError, ValueError):
                out[self.keys.alert_of(key)] = (kv, BreakerRecord.model_validate_json(kv.value))
        return out

    async def _breakers(self, statuses: dict[str, HostStatus], now: float) -> None:
        records = self._breaker_records()
        decisions = self.tracker.decide(statuses, {a: r for a, (_, r) in records.items()}, now)
        for d in decisions:
            await self._apply_breaker(d, records.get(d.alert), len(statuses), now)

    async def _apply_breaker(
        self, d: BreakerDecision, current: tuple[KeyValue, BreakerRecord] | None, live: int, now: float
    ) -> None:
        key = self.keys.breaker(d.alert)
        mod = current[0].mod_revision if current else 0
        if d.kind == "open":
            record = BreakerRecord(
                alert=d.alert,
                opened_at=now,
                hosts=d.hosts,
                live_hosts=live,
                share=len(d.hosts) / max(live, 1),
            )
            if await self._cas(key, mod, [PutOp(key, record.model_dump_json().encode())]):
                log.warning("fleet: breaker open for %s: %s", d.alert, d.reason)
                self.emit(
                    FleetEvent("breaker_open", d.reason, {"alert": d.alert}, metrics=("sentinel_fleet_breaker_open",))
                )
        elif await self._cas(key, mod, [DeleteOp(key)]):
            log.info("fleet: breaker closed for %s: %s", d.alert, d.reason)
            self.emit(
                FleetEvent("breaker_closed", d.reason, {"alert": d.alert}, metrics=("sentinel_fleet_breaker_open",))
            )

    async def _orphaned_plans(self) -> None:
        """A running plan whose initiator lost its lock (its lease) is failed for everyone."""
        items = self.coord.groups.items
        for key, kv in list(items.items()):
            if not key.endswith("/plan"):
                continue
            plan = parse_plan(kv)
            if plan is None or plan.phase != "running":
                continue
            lock = items.get(self.keys.group_lock(plan.group))
            lock_plan = (lock.json() or {}).get("plan") if lock is not None else None
            if lock is not None and lock_plan in (plan.id, None):
                continue
            step = plan.steps[plan.current].kind if 0 <= plan.current < len(plan.steps) else "setup"
            failed = plan.model_copy(
                update={
                    "phase": "failed",
                    "failure": f"initiator {plan.initiator} lost its lease during step {plan.current} ({step})",
                    "finished_at": time.time(),
                }
            )
            if await self._cas(key, kv.mod_revision, [PutOp(key, failed.model_dump_json().encode())]):
                self.emit(
                    FleetEvent(
                        "group_failed",
                        failed.failure,
                        {"group": plan.group},
                        metrics=("sentinel_fleet_group_phase",),
                    )
                )

    def _series(
        self, statuses: dict[str, HostStatus], members: dict[str, tuple[KeyValue, MemberRecord]]
    ) -> list[FleetSample]:
        out: list[FleetSample] = []
        counts = {"alive": 0, "down": 0, "left": 0}
        for host, (_, record) in sorted(members.items()):
            alive = self.keys.host(host) in self.hosts.items
            state = "alive" if alive else ("left" if record.state == "left" else "down")
            counts[state] += 1
            if state != "left":
                out.append(FleetSample("sentinel_fleet_peer_up", {"host": host}, 1.0 if alive else 0.0))
        out += [FleetSample("sentinel_fleet_peers", {"state": s}, float(n)) for s, n in counts.items()]
        for alert, (_, breaker) in sorted(self._breaker_records().items()):
            out.append(
                FleetSample("sentinel_fleet_breaker_open", {"alert": alert}, 1.0 if breaker.state == "open" else 0.0)
            )
        for key, kv in sorted(self.coord.groups.items.items()):
            if key.endswith("/plan") and (plan := parse_plan(kv)) is not None:
                for phase in ("running", "done", "failed"):
                    out.append(
                        FleetSample(
                            "sentinel_fleet_group_phase",
                            {"group": plan.group, "phase": phase},
                            float(plan.phase == phase),
                        )
                    )
        budget = self.coord.budget
        pools = budget.live_pools(list(statuses.values()))
        for pool in pools:
            out.append(FleetSample("sentinel_fleet_slots_held", {"pool": pool.name}, float(pool.held)))
            out.append(FleetSample("sentinel_fleet_slots_limit", {"pool": pool.name}, float(pool.limit)))
            out.append(FleetSample("sentinel_fleet_slot_waiters", {"pool": pool.name}, float(pool.waiting)))
        return out
