"""The fleet disruption budget: a counting semaphore on etcd, like a PodDisruptionBudget.

A disruptive action (restart, reduce_batch that restarts, quantized_fallback, stop, a
group action) first takes a slot. Slots are counted in pools: `fleet` (every worker)
and, optionally, one pool per value of a label (`model=qwen3-480b`). Each pool's limit
comes from `max_unavailable`: a count, or a percentage of the workers that live hosts
report (rounded up, as a PodDisruptionBudget does).

How a grant stays within the limit under any concurrency:
- a holder is a key `slots/holders/<id>` under the holder's lease, listing its pools;
  the number held in a pool is the number of holder keys that list it;
- every grant also rewrites `slots/guards/<pool>` for each of its pools, in the same
  transaction, and that transaction compares each guard's mod_revision with the value
  read together with the holders. If any grant in a shared pool committed in between,
  the compare fails and the contender reads again. Releases and lease expiries only
  remove holders, so they can never push a pool over its limit;
- a grant also compares the fleet breaker key for the alert it acts on, so no slot is
  granted after the breaker opened.

Waiting is fair and bounded: a contender registers `slots/waiters/<id>` (under its
lease, so a dead waiter leaves the queue) and only tries when it is among the first
eligible waiters for the free slots of its pools; otherwise it sleeps on a watch of
`slots/` until something changes, or its deadline, then is refused with a reason that
names the holders.

A request whose transaction failed in a way that may have committed anyway (a timeout
after the request was sent) looks up its own holder key: the key is unique, so the
grant is confirmed or known not to exist — never granted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from sentinel.fleet.config import BudgetConfig, MaxUnavailable
from sentinel.fleet.etcd import (
    Compare,
    DeleteOp,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    PutOp,
    RangeOp,
    TxnOp,
)
from sentinel.fleet.keys import Keys
from sentinel.fleet.session import Session
from sentinel.fleet.status import HostStatus
from sentinel.fleet.watch import Informer

__all__ = [
    "FLEET_POOL",
    "Budget",
    "BudgetUnavailable",
    "BudgetView",
    "HolderRecord",
    "PoolState",
    "SlotDecision",
]

log = logging.getLogger(__name__)

FLEET_POOL = "fleet"
RECHECK_S = 2.0  # limits follow live hosts, which the slots/ watch does not see


class HolderRecord(BaseModel):
    """What a holder (or a waiter) key says about itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    holder: str
    host: str
    worker: str
    action: str
    pools: tuple[str, ...]
    alert: str | None = None
    at: float = 0.0


@dataclass
class SlotDecision:
    """The answer to a slot request. True when the action may run."""

    granted: bool
    mode: Literal["fleet", "local", "refused"]
    reason: str
    holder: str | None = None
    pools: tuple[str, ...] = ()
    waited_s: float = 0.0
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lease: int = 0

    def __bool__(self) -> bool:
        return self.granted


@dataclass(frozen=True)
class PoolState:
    name: str
    held: int
    limit: int
    holders: tuple[HolderRecord, ...]
    waiting: int


class BudgetUnavailable(Exception):
    """etcd could not give a definite answer. `uncertain`: a holder key that may exist."""

    def __init__(self, reason: str, uncertain: str | None = None) -> None:
        super().__init__(reason)
        self.uncertain = uncertain


@dataclass(frozen=True)
class _Snapshot:
    revision: int
    holders: tuple[tuple[KeyValue, HolderRecord], ...]
    waiters: tuple[tuple[KeyValue, HolderRecord], ...]
    guards: Mapping[str, int]
    hosts: tuple[HostStatus, ...]
    breaker: KeyValue | None


class BudgetView:
    """Pools, limits and holders computed from what etcd holds (no I/O): shared by the
    budget itself, the leader's series and `sentinel fleet status`."""

    def __init__(self, keys: Keys, config: BudgetConfig) -> None:
        self.keys = keys
        self.config = config

    def snapshot(self, slots: Sequence[KeyValue], hosts: Sequence[HostStatus], revision: int = 0) -> _Snapshot:
        return self._parse(revision, slots, hosts, None)

    def all_pools(self, slots: Sequence[KeyValue], hosts: Sequence[HostStatus]) -> dict[str, PoolState]:
        return self._all_pools(self.snapshot(slots, hosts))

    def pools_for(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        pools = [FLEET_POOL]
        pools += [f"{b.label}={labels[b.label]}" for b in self.config.per_label if b.label in labels]
        return tuple(pools)

    def _rule(self, pool: str) -> MaxUnavailable | None:
        if pool == FLEET_POOL:
            return self.config.max_unavailable
        label = pool.split("=", 1)[0]
        return next((b.max_unavailable for b in self.config.per_label if b.label == label), None)

    def limit(self, pool: str, hosts: Sequence[HostStatus]) -> tuple[int, int]:
        """(limit, live workers counted) for a pool."""
        rule = self._rule(pool)
        if rule is None:
            return 0, 0
        if pool == FLEET_POOL:
            live = sum(len(h.workers) for h in hosts)
        else:
            label, _, value = pool.partition("=")
            live = sum(1 for h in hosts for w in h.workers if w.labels.get(label) == value)
        return rule.limit(live), live

    def _parse(
        self, revision: int, slots: Sequence[KeyValue], hosts: Sequence[HostStatus], breaker: KeyValue | None
    ) -> _Snapshot:
        holders, waiters, guards = [], [], {}
        for kv in slots:
            if kv.key.startswith(self.keys.guards):
                guards[kv.key] = kv.mod_revision
                continue
            record = _record(kv)
            if record is None:
                continue
            if kv.key.startswith(self.keys.holders):
                holders.append((kv, record))
            elif kv.key.startswith(self.keys.waiters):
                waiters.append((kv, record))
        waiters.sort(key=lambda item: item[0].create_revision)
        return _Snapshot(revision, tuple(holders), tuple(waiters), guards, tuple(hosts), breaker)

    def _all_pools(self, snap: _Snapshot) -> dict[str, PoolState]:
        names = {FLEET_POOL}
        for _, rec in (*snap.holders, *snap.waiters):
            names.update(rec.pools)
        for b in self.config.per_label:
            for h in snap.hosts:
                names.update(f"{b.label}={w.labels[b.label]}" for w in h.workers if b.label in w.labels)
        return {name: self._pool_state(name, snap) for name in sorted(names)}

    def _pool_state(self, name: str, snap: _Snapshot) -> PoolState:
        holders = tuple(rec for _, rec in snap.holders if name in rec.pools)
        waiting = sum(1 for _, rec in snap.waiters if name in rec.pools)
        return PoolState(name, len(holders), self.limit(name, snap.hosts)[0], holders, waiting)


class Budget(BudgetView):
    """Slots for this host's disruptive actions. `start()` it once on the event loop."""

    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        config: BudgetConfig,
        session: Session,
        host: str,
    ) -> None:
        super().__init__(keys, config)
        self.client = client
        self.session = session
        self.host = host
        self.informer = Informer(client, keys.slots)
        self._task: asyncio.Task[None] | None = None
        self.held: dict[str, SlotDecision] = {}
        self.pending_release: set[str] = set()
        self.last_pools: dict[str, PoolState] = {}
        self.grants = 0
        self.refusals = 0
        self.cas_conflicts = 0
        session.on_lost(self._lease_lost)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.informer.run())

    async def stop(self) -> None:
        if self._task is not None:
            await self.informer.stop(self._task)
            self._task = None

    # -- reading --------------------------------------------------------------------------

    async def _read(self, alert: str | None, timeout: float | None = None) -> _Snapshot:
        """Holders, waiters, guards, live hosts and the breaker, all at one revision."""
        ops = [RangeOp(self.keys.slots, prefix=True), RangeOp(self.keys.hosts, prefix=True)]
        if alert:
            ops.append(RangeOp(self.keys.breaker(alert)))
        result = await self.client.txn([], ops, timeout=timeout)
        hosts = []
        for kv in result.range(1).kvs:
            with contextlib.suppress(ValidationError, ValueError):
                hosts.append(HostStatus.model_validate_json(kv.value))
        breaker = result.range(2).kvs[0] if alert and result.range(2).kvs else None
        return self._parse(result.revision, result.range(0).kvs, hosts, breaker)

    async def pools(self, timeout: float | None = None) -> dict[str, PoolState]:
        """Every pool in use or configured, with holders and limits, read from etcd now."""
        return self._all_pools(await self._read(None, timeout))

    def live_pools(self, hosts: Sequence[HostStatus]) -> list[PoolState]:
        """The same from this host's watch of slots/ (no request): for the leader's series."""
        snap = self._parse(self.informer.revision, list(self.informer.items.values()), hosts, None)
        return list(self._all_pools(snap).values())

    # -- acquire / release ----------------------------------------------------------------

    async def acquire(
        self,
        *,
        worker: str,
        action: str,
        labels: Mapping[str, str] | None = None,
        alert: str | None = None,
        timeout: float | None = None,
    ) -> SlotDecision:
        """A slot, or a refusal with a reason. Raises BudgetUnavailable without etcd."""
        self.start()
        pools = self.pools_for(labels or {})
        wait_s = self.config.wait if timeout is None else timeout
        started = time.monotonic()
        deadline = started + wait_s
        lease = self.session.lease_id
        if lease is None or not self.session.valid():
            raise BudgetUnavailable("no valid fleet session (etcd unreachable or lease lost)")
        holder = f"{self.host}.{worker.replace(':', '_')}.{uuid.uuid4().hex[:12]}"
        record = HolderRecord(
            holder=holder, host=self.host, worker=worker, action=action, pools=pools, alert=alert, at=time.time()
        )
        value = record.model_dump_json().encode()
        waiter_key, holder_key = self.keys.waiter(holder), self.keys.holder(holder)
        try:
            await self.client.put(waiter_key, value, lease=lease)
        except EtcdError as exc:
            raise BudgetUnavailable(f"could not queue for a slot: {exc}") from exc
        granted = False
        try:
            while True:
                version = self.informer.version
                try:
                    snap = await self._read(alert)
                except EtcdError as exc:
                    raise BudgetUnavailable(f"could not read the budget: {exc}") from exc
                refusal = self._breaker_refusal(alert, snap)
                if refusal:
                    self.refusals += 1
                    return SlotDecision(False, "refused", refusal, pools=pools, waited_s=time.monotonic() - started)
                states = {p: self._pool_state(p, snap) for p in pools}
                zero = [s for s in states.values() if s.limit <= 0]
                if zero:
                    self.refusals += 1
                    self.last_pools.update(states)
                    return SlotDecision(False, "refused", self._no_budget_reason(zero[0], snap), pools=pools)
                if self._my_turn(holder, pools, snap, states):
                    decision = await self._try_grant(record, value, lease, snap, alert, holder_key, waiter_key)
                    if decision is not None:
                        decision.waited_s = time.monotonic() - started
                        self.last_pools.update(
                            {p: PoolState(p, s.held + 1, s.limit, s.holders, s.waiting) for p, s in states.items()}
                        )
                        granted = True
                        return decision
                    self.cas_conflicts += 1
                    continue  # someone committed first: read again at once
                self.last_pools.update(states)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refusals += 1
                    full = [s for s in states.values() if s.held >= s.limit] or list(states.values())
                    reason = f"{_exhausted(full[0])}; waited {wait_s:.0f}s"
                    return SlotDecision(False, "refused", reason, pools=pools, waited_s=time.monotonic() - started)
                await self.informer.wait_changed(version, min(left, RECHECK_S))
        finally:
            if not granted:
                with contextlib.suppress(EtcdError):
                    await self.client.delete(waiter_key)

    def _breaker_refusal(self, alert: str | None, snap: _Snapshot) -> str:
        if not alert or snap.breaker is None:
            return ""
        state = snap.breaker.json() or {}
        if state.get("state") == "resumed":
            return ""
        hosts = state.get("hosts", [])
        return (
            f"fleet breaker open for {alert}: it fired on {len(hosts)} hosts within the window "
            f"({', '.join(hosts[:5])}{'...' if len(hosts) > 5 else ''}); "
            f"resume with `sentinel fleet resume {alert}` once the cause is fixed"
        )

    def _no_budget_reason(self, state: PoolState, snap: _Snapshot) -> str:
        limit, live = self.limit(state.name, snap.hosts)
        return (
            f"the disruption budget allows no action in pool {state.name}: max_unavailable "
            f"{self._rule(state.name)} of {live} live workers is {limit}"
        )

    def _my_turn(self, holder: str, pools: tuple[str, ...], snap: _Snapshot, states: dict[str, PoolState]) -> bool:
        """FIFO among eligible waiters: try only when the free slots reach this request."""
        free_cache: dict[str, int] = {}

        def free(pool: str) -> int:
            if pool not in free_cache:
                free_cache[pool] = (
                    states[pool].limit - states[pool].held
                    if pool in states
                    else self._pool_state(pool, snap).limit - self._pool_state(pool, snap).held
                )
            return free_cache[pool]

        if any(free(p) <= 0 for p in pools):
            return False
        ahead = {p: 0 for p in pools}
        for _kv, rec in snap.waiters:
            if rec.holder == holder:
                return all(ahead[p] < free(p) for p in pools)
            if all(free(p) > 0 for p in rec.pools):
                for p in pools:
                    if p in rec.pools:
                        ahead[p] += 1
        # Our waiter key is not in this snapshot (its put is newer): wait for our turn.
        return False

    async def _try_grant(
        self,
        record: HolderRecord,
        value: bytes,
        lease: int,
        snap: _Snapshot,
        alert: str | None,
        holder_key: str,
        waiter_key: str,
    ) -> SlotDecision | None:
        compare = [Compare(holder_key, "create", "=", 0)]
        compare += [
            Compare(self.keys.guard(p), "mod", "=", snap.guards.get(self.keys.guard(p), 0)) for p in record.pools
        ]
        if alert:
            compare.append(
                Compare(self.keys.breaker(alert), "mod", "=", snap.breaker.mod_revision if snap.breaker else 0)
            )
        success: list[TxnOp] = [PutOp(holder_key, value, lease), DeleteOp(waiter_key)]
        success += [PutOp(self.keys.guard(p), record.holder.encode()) for p in record.pools]
        try:
            result = await self.client.txn(compare, success)
            ok = result.succeeded
        except EtcdUnavailable as exc:
            if not exc.maybe_applied:
                raise BudgetUnavailable(f"could not take a slot: {exc}") from exc
            ok = await self._confirm(holder_key, exc)
        except EtcdError as exc:
            raise BudgetUnavailable(f"could not take a slot: {exc}") from exc
        if not ok:
            return None
        decision = SlotDecision(
            True,
            "fleet",
            f"slot granted in {', '.join(record.pools)}",
            holder=record.holder,
            pools=record.pools,
            lease=lease,
        )
        self.held[record.holder] = decision
        self.grants += 1
        if lease != self.session.lease_id:
            self._lease_lost(lease, "lease replaced while the slot was being granted")
        return decision

    async def _confirm(self, holder_key: str, exc: EtcdUnavailable) -> bool:
        """After an uncertain transaction: did our unique holder key get written?"""
        try:
            return await self.client.get(holder_key) is not None
        except EtcdError as again:
            raise BudgetUnavailable(
                f"could not tell whether a slot was taken ({exc}; then {again})", uncertain=holder_key
            ) from again

    async def release(self, decision: SlotDecision) -> None:
        """Give a fleet slot back; retried later (or freed by the lease) if etcd is away."""
        if decision.holder is None or decision.mode != "fleet":
            return
        self.held.pop(decision.holder, None)
        key = self.keys.holder(decision.holder)
        try:
            await self.client.delete(key)
        except EtcdError as exc:
            log.warning("fleet: could not release slot %s now (%s); will retry", decision.holder, exc)
            self.pending_release.add(key)

    async def forget_uncertain(self, key: str) -> None:
        self.pending_release.add(key)
        await self.retry_releases()

    async def retry_releases(self) -> None:
        for key in sorted(self.pending_release):
            try:
                await self.client.delete(key)
            except EtcdError:
                return
            self.pending_release.discard(key)

    def _lease_lost(self, lease: int, reason: str) -> None:
        for holder, decision in list(self.held.items()):
            if decision.lease == lease:
                decision.lost.set()
                log.warning("fleet: slot %s lost with its lease (%s)", holder, reason)


def _record(kv: KeyValue) -> HolderRecord | None:
    try:
        return HolderRecord.model_validate_json(kv.value)
    except (ValidationError, ValueError):
        log.warning("fleet: ignoring unreadable slot key %s", kv.key)
        return None


def _exhausted(state: PoolState) -> str:
    now = time.time()
    who = ", ".join(f"{h.host}/{h.worker} {h.action} for {now - h.at:.0f}s" for h in state.holders[:5])
    return f"budget exhausted in pool {state.name}: {state.held}/{state.limit} slots held ({who or 'no holder'})"
