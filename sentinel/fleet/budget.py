"""The fleet disruption budget: a counting semaphore on etcd, like a PodDisruptionBudget.

A disruptive action (restart, reduce_batch that restarts, quantized_fallback, stop, a
group action) first takes a slot. Slots are counted in pools: `fleet` (every worker)
and, optionally, one pool per value of a label (`model=qwen3-480b`). Each pool's limit
comes from `max_unavailable`: a count, or a percentage of the workers that live hosts
report (rounded up, as a PodDisruptionBudget does).

How a grant stays within the limit under any concurrency. A pool of limit L has slots
numbered 0..L-1; holding one is a key `slots/holders/<pool>/<slot>` under the holder's
lease. A grant is one transaction that, for each of its pools,
- creates its slot key only if absent (`create_revision == 0`): one holder per slot;
- compares that *no* key exists at a slot number >= L (one range compare): then every
  holder sits on a distinct slot below L, so at most L are held — also when the limit
  just shrank (hosts died under a percentage) and old holders still sit above it: no
  new grant until they leave.
- and compares the fleet breaker key for the alert it acts on, so no slot is granted
  after the breaker opened.
Releases and lease expiries only remove keys, so they can never push a pool over.
Contenders that pick different free slots do not conflict, which keeps grants flowing
under contention (bench/fleet_budget.py).

Waiting is fair, bounded and cheap: a contender registers `slots/waiters/<id>` (under
its lease, so a dead waiter leaves the queue), then judges its turn on this host's
watch mirror of `slots/` — the k-th eligible waiter in arrival order takes the k-th
free slot — and only sends the transaction when it is its turn; a stale mirror makes
the transaction fail, never succeed wrongly. At its deadline it is refused with a
reason that names the holders.

A grant whose transaction failed in a way that may have committed anyway (a timeout
after the request was sent) looks up its slot key and checks the holder id in it:
the grant is confirmed or known not to exist — never granted twice. Releases delete a
slot key only if it is still the one this grant created.
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
    prefix_end,
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
    """What a slot key (or a waiter key) says about its request."""

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
    slot_keys: tuple[str, ...] = ()
    revision: int = 0

    def __bool__(self) -> bool:
        return self.granted


@dataclass(frozen=True)
class PoolState:
    name: str
    held: int
    limit: int
    holders: tuple[HolderRecord, ...]
    waiting: int
    free_slots: tuple[int, ...] = ()

    @property
    def free(self) -> int:
        return len(self.free_slots)


class BudgetUnavailable(Exception):
    """etcd could not give a definite answer. `uncertain`: slot keys that may exist."""

    def __init__(self, reason: str, uncertain: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.uncertain = uncertain


@dataclass(frozen=True)
class _Snapshot:
    revision: int
    slots: Mapping[str, Mapping[int, HolderRecord]]  # pool -> slot -> holder
    waiters: tuple[tuple[KeyValue, HolderRecord], ...]
    hosts: tuple[HostStatus, ...]
    breaker: KeyValue | None


class BudgetView:
    """Pools, limits and holders computed from what etcd holds (no I/O): shared by the
    budget itself, the leader's series and `sentinel fleet status`."""

    def __init__(self, keys: Keys, config: BudgetConfig) -> None:
        self.keys = keys
        self.config = config
        # key -> (mod_revision, record): each value is parsed once, however many waiters look.
        self._records: dict[str, tuple[int, HolderRecord | None]] = {}

    def _record_of(self, kv: KeyValue) -> HolderRecord | None:
        cached = self._records.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        record = _record(kv)
        if len(self._records) > 10_000:
            self._records.clear()
        self._records[kv.key] = (kv.mod_revision, record)
        return record

    def all_pools(self, slots: Sequence[KeyValue], hosts: Sequence[HostStatus]) -> dict[str, PoolState]:
        return self._all_pools(self._parse(0, slots, hosts, None))

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
        held: dict[str, dict[int, HolderRecord]] = {}
        waiters = []
        for kv in slots:
            if kv.key.startswith(self.keys.waiters):
                if (record := self._record_of(kv)) is not None:
                    waiters.append((kv, record))
                continue
            where = self.keys.slot_of(kv.key)
            if where is not None and (record := self._record_of(kv)) is not None:
                held.setdefault(where[0], {})[where[1]] = record
        waiters.sort(key=lambda item: item[0].create_revision)
        return _Snapshot(revision, held, tuple(waiters), tuple(hosts), breaker)

    def _all_pools(self, snap: _Snapshot) -> dict[str, PoolState]:
        names = {FLEET_POOL, *snap.slots}
        for _, rec in snap.waiters:
            names.update(rec.pools)
        for b in self.config.per_label:
            for h in snap.hosts:
                names.update(f"{b.label}={w.labels[b.label]}" for w in h.workers if b.label in w.labels)
        return {name: self._pool_state(name, snap) for name in sorted(names)}

    def _pool_state(self, name: str, snap: _Snapshot) -> PoolState:
        slots = snap.slots.get(name, {})
        limit = self.limit(name, snap.hosts)[0]
        waiting = sum(1 for _, rec in snap.waiters if name in rec.pools)
        # A holder above the limit (it shrank) blocks every new grant until it leaves.
        free = () if any(i >= limit for i in slots) else tuple(i for i in range(limit) if i not in slots)
        holders = tuple(slots[i] for i in sorted(slots))
        return PoolState(name, len(slots), limit, holders, waiting, free)


class Budget(BudgetView):
    """Slots for this host's disruptive actions. `start()` it once on the event loop."""

    def __init__(self, client: EtcdClient, keys: Keys, config: BudgetConfig, session: Session, host: str) -> None:
        super().__init__(keys, config)
        self.client = client
        self.session = session
        self.host = host
        self.informer = Informer(client, keys.slots, on_change=lambda _inf, _events: self._sweep_orphans())
        self._task: asyncio.Task[None] | None = None
        # Holder ids of this host's requests in flight or held: any other key of this host
        # in slots/ is an orphan of a write that timed out here and landed late.
        self._mine: set[str] = set()
        self._sweeping: set[str] = set()
        self._sweep_tasks: set[asyncio.Task[None]] = set()
        self.orphans_removed = 0
        self.held: dict[str, SlotDecision] = {}
        self.pending_release: set[tuple[str, str]] = set()  # (slot key, holder id)
        self.last_pools: dict[str, PoolState] = {}
        self._hosts_cache: dict[str | None, tuple[float, tuple[HostStatus, ...], KeyValue | None]] = {}
        self._snap_memo: tuple[tuple[int, int, int], _Snapshot] | None = None
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

    async def pools(self, timeout: float | None = None) -> dict[str, PoolState]:
        """Every pool in use or configured, with holders and limits, read from etcd now."""
        ops = [RangeOp(self.keys.slots, prefix=True), RangeOp(self.keys.hosts, prefix=True)]
        result = await self.client.txn([], ops, timeout=timeout)
        hosts = _statuses(result.range(1).kvs)
        return self._all_pools(self._parse(result.revision, result.range(0).kvs, hosts, None))

    def live_pools(self, hosts: Sequence[HostStatus]) -> list[PoolState]:
        """The same from this host's watch of slots/ (no request): for the leader's series."""
        snap = self._parse(self.informer.revision, list(self.informer.items.values()), hosts, None)
        return list(self._all_pools(snap).values())

    async def _hosts(self, alert: str | None) -> tuple[tuple[HostStatus, ...], KeyValue | None]:
        """Live hosts (for percentage limits) and the alert's breaker key, read together;
        cached for RECHECK_S so that many waiters share one read."""
        now = time.monotonic()
        cached = self._hosts_cache.get(alert)
        if cached is not None and now - cached[0] < RECHECK_S:
            return cached[1], cached[2]
        ops = [RangeOp(self.keys.hosts, prefix=True)]
        if alert:
            ops.append(RangeOp(self.keys.breaker(alert)))
        result = await self.client.txn([], ops)
        hosts = tuple(_statuses(result.range(0).kvs))
        breaker = result.range(1).kvs[0] if alert and result.range(1).kvs else None
        self._hosts_cache[alert] = (now, hosts, breaker)
        return hosts, breaker

    # -- acquire ----------------------------------------------------------------------------

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
        waiter_key = self.keys.waiter(holder)
        self._mine.add(holder)
        try:
            queued_at = await self.client.put(waiter_key, record.model_dump_json().encode(), lease=lease)
            hosts, breaker = await self._hosts(alert)
        except EtcdError as exc:
            self._mine.discard(holder)
            raise BudgetUnavailable(f"could not queue for a slot: {exc}") from exc
        granted = False
        try:
            while True:
                version = self.informer.version
                left = deadline - time.monotonic()
                if self.informer.revision < queued_at:
                    # Our own queue entry is not in the mirror yet: judge nothing before it is.
                    if not await self.informer.wait_changed(version, min(max(left, 0.5), 5.0)):
                        raise BudgetUnavailable("the watch of slots/ is not following etcd")
                    continue
                snap = self._mirror_snapshot(hosts, breaker)
                refusal = self._breaker_refusal(alert, snap)
                if refusal:
                    self.refusals += 1
                    return SlotDecision(False, "refused", refusal, pools=pools, waited_s=time.monotonic() - started)
                states = {p: self._pool_state(p, snap) for p in pools}
                self.last_pools.update(states)
                zero = [st for st in states.values() if st.limit <= 0]
                if zero:
                    self.refusals += 1
                    return SlotDecision(False, "refused", self._no_budget_reason(zero[0], snap), pools=pools)
                chosen = self._my_slots(holder, pools, snap, states)
                if chosen is not None:
                    decision, breaker = await self._try_grant(record, lease, states, chosen, snap, waiter_key)
                    if decision is not None:
                        decision.waited_s = time.monotonic() - started
                        granted = True
                        return decision
                    self.cas_conflicts += 1
                    await self.informer.wait_changed(version, 0.25)  # the mirror was behind
                    continue
                if left <= 0:
                    self.refusals += 1
                    full = [st for st in states.values() if st.free == 0] or list(states.values())
                    reason = f"{_exhausted(full[0])}; waited {wait_s:.0f}s"
                    return SlotDecision(False, "refused", reason, pools=pools, waited_s=time.monotonic() - started)
                if not await self.informer.wait_changed(version, min(left, RECHECK_S)):
                    try:
                        hosts, breaker = await self._hosts(alert)  # limits follow live hosts
                    except EtcdError as exc:
                        raise BudgetUnavailable(f"could not read live hosts: {exc}") from exc
        finally:
            if not granted:
                with contextlib.suppress(EtcdError):
                    await self.client.delete(waiter_key)
                self._mine.discard(holder)

    def _mirror_snapshot(self, hosts: tuple[HostStatus, ...], breaker: KeyValue | None) -> _Snapshot:
        """The mirror as a snapshot, computed once per change for all local waiters."""
        memo_key = (self.informer.version, id(hosts), breaker.mod_revision if breaker else 0)
        if self._snap_memo is not None and self._snap_memo[0] == memo_key:
            return self._snap_memo[1]
        snap = self._parse(self.informer.revision, list(self.informer.items.values()), hosts, breaker)
        self._snap_memo = (memo_key, snap)
        return snap

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

    def _my_slots(
        self, holder: str, pools: tuple[str, ...], snap: _Snapshot, states: dict[str, PoolState]
    ) -> dict[str, int] | None:
        """FIFO among eligible waiters: the k-th eligible waiter of a pool takes its k-th
        free slot. None when it is not this request's turn (or nothing is free)."""
        cache = dict(states)

        def state(pool: str) -> PoolState:
            if pool not in cache:
                cache[pool] = self._pool_state(pool, snap)
            return cache[pool]

        if any(state(p).free == 0 for p in pools):
            return None
        ahead = dict.fromkeys(pools, 0)
        for _, rec in snap.waiters:
            if rec.holder == holder:
                if all(ahead[p] < state(p).free for p in pools):
                    return {p: state(p).free_slots[ahead[p]] for p in pools}
                return None
            if all(state(p).free > 0 for p in rec.pools):
                for p in pools:
                    if p in rec.pools:
                        ahead[p] += 1
        return None  # our waiter key is not in this snapshot

    async def _try_grant(
        self,
        record: HolderRecord,
        lease: int,
        states: Mapping[str, PoolState],
        chosen: Mapping[str, int],
        snap: _Snapshot,
        waiter_key: str,
    ) -> tuple[SlotDecision | None, KeyValue | None]:
        """The transaction; (grant or None, the breaker key as etcd has it now)."""
        value = record.model_dump_json().encode()
        slot_keys = tuple(self.keys.slot(p, chosen[p]) for p in record.pools)
        compare = []
        for pool, key in zip(record.pools, slot_keys, strict=True):
            compare.append(Compare(key, "create", "=", 0))
            above = self.keys.slot(pool, states[pool].limit)
            compare.append(Compare(above, "version", "=", 0, range_end=prefix_end(self.keys.pool(pool))))
        failure: list[TxnOp] = []
        alert = record.alert
        if alert:
            breaker_mod = snap.breaker.mod_revision if snap.breaker else 0
            compare.append(Compare(self.keys.breaker(alert), "mod", "=", breaker_mod))
            failure.append(RangeOp(self.keys.breaker(alert)))
        success: list[TxnOp] = [PutOp(k, value, lease) for k in slot_keys]
        success.append(DeleteOp(waiter_key))
        breaker = snap.breaker
        try:
            result = await self.client.txn(compare, success, failure)
            ok, revision = result.succeeded, result.revision
            if not ok and alert:
                kvs = result.range(0).kvs
                breaker = kvs[0] if kvs else None
                self._hosts_cache.pop(alert, None)
        except EtcdUnavailable as exc:
            if not exc.maybe_applied:
                raise BudgetUnavailable(f"could not take a slot: {exc}") from exc
            ok, revision = await self._confirm(slot_keys, record.holder, exc)
        except EtcdError as exc:
            raise BudgetUnavailable(f"could not take a slot: {exc}") from exc
        if not ok:
            return None, breaker
        decision = SlotDecision(
            True,
            "fleet",
            f"slot granted in {', '.join(f'{p}#{chosen[p]}' for p in record.pools)}",
            holder=record.holder,
            pools=record.pools,
            lease=lease,
            slot_keys=slot_keys,
            revision=revision,
        )
        self.held[record.holder] = decision
        self.grants += 1
        if lease != self.session.lease_id:
            self._lease_lost(lease, "lease replaced while the slot was being granted")
        return decision, breaker

    async def _confirm(self, slot_keys: tuple[str, ...], holder: str, exc: EtcdUnavailable) -> tuple[bool, int]:
        """After an uncertain transaction: do our slot keys hold our holder id?"""
        try:
            kv = await self.client.get(slot_keys[0])
        except EtcdError as again:
            raise BudgetUnavailable(
                f"could not tell whether a slot was taken ({exc}; then {again})",
                uncertain=tuple((k, holder) for k in slot_keys),
            ) from again
        record = _record(kv) if kv is not None else None
        if kv is not None and record is not None and record.holder == holder:
            return True, kv.create_revision
        return False, 0

    # -- release ----------------------------------------------------------------------------

    async def release(self, decision: SlotDecision) -> None:
        """Give a fleet slot back; retried later (or freed by the lease) if etcd is away."""
        if decision.holder is None or decision.mode != "fleet":
            return
        self.held.pop(decision.holder, None)
        for key in decision.slot_keys:
            self.pending_release.add((key, decision.holder))
        await self.retry_releases()
        if not any(h == decision.holder for _, h in self.pending_release):
            self._mine.discard(decision.holder)

    async def retry_releases(self) -> None:
        """Delete each slot key still pending — only if it still holds our holder id, so a
        slot reused by someone after our lease lapsed is never freed by mistake."""
        for key, holder in sorted(self.pending_release):
            try:
                kv = await self.client.get(key)
                record = _record(kv) if kv is not None else None
                if kv is not None and record is not None and record.holder == holder:
                    await self.client.txn([Compare(key, "mod", "=", kv.mod_revision)], [DeleteOp(key)])
            except EtcdError as exc:
                log.warning("fleet: could not release slot %s now (%s); will retry", key, exc)
                return
            self.pending_release.discard((key, holder))

    def _sweep_orphans(self) -> None:
        """Delete this host's waiter and slot keys that no request here owns any more.

        Only keys under this session's own lease: a late write can only land under a
        lease that is still valid, and keys under any other lease (a crashed previous
        run, a misconfigured twin with the same host_id) are left to that lease."""
        lease = self.session.lease_id
        for key, kv in list(self.informer.items.items()):
            if key in self._sweeping or not (key.startswith(self.keys.waiters) or key.startswith(self.keys.holders)):
                continue
            if lease is None or kv.lease != lease:
                continue
            record = self._record_of(kv)
            if record is None or record.host != self.host or record.holder in self._mine:
                continue
            self._sweeping.add(key)
            task = asyncio.ensure_future(self._remove_orphan(key, kv.mod_revision))
            self._sweep_tasks.add(task)
            task.add_done_callback(self._sweep_tasks.discard)

    async def _remove_orphan(self, key: str, mod: int) -> None:
        try:
            result = await self.client.txn([Compare(key, "mod", "=", mod)], [DeleteOp(key)])
            if result.succeeded:
                self.orphans_removed += 1
                log.warning("fleet: removed %s, left by a write that timed out here and landed late", key)
        except EtcdError:
            pass  # the next change (or the lease) takes care of it
        finally:
            self._sweeping.discard(key)

    def _lease_lost(self, lease: int, reason: str) -> None:
        for holder, decision in list(self.held.items()):
            if decision.lease == lease:
                decision.lost.set()
                log.warning("fleet: slot %s lost with its lease (%s)", holder, reason)


def _statuses(kvs: Sequence[KeyValue]) -> list[HostStatus]:
    out = []
    for kv in kvs:
        with contextlib.suppress(ValidationError, ValueError):
            out.append(HostStatus.model_validate_json(kv.value))
    return out


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
