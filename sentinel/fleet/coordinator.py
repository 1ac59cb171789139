"""The fleet coordinator: the one object the daemon and the remediation engine talk to.

    coordinator = FleetCoordinator(config.fleet, status_source=daemon.fleet_status, executor=backends)
    await coordinator.start()            # never waits for etcd; degraded until it answers

    # before a disruptive action (restart, reduce_batch that restarts, quantized_fallback, stop):
    async with coordinator.disruption_slot(worker, action, labels=worker_labels, alert=alertname) as slot:
        if not slot:
            journal(slot.reason)         # refused: budget exhausted, breaker open, etcd away under `hold`
            return
        ...run the action...             # slot.mode is "fleet" (held in etcd) or "local" (policy `local`)

    # a fault on a member of a serving group:
    result = await coordinator.run_group_action("qwen3-480b", "restart", profile=None, reason=alertname)

    coordinator.subscribe(callback)      # FleetEvent: peer_down, breaker_open, group_failed...
    coordinator.samples()                # series for the store (events.FLEET_METRICS)
    await coordinator.stop()             # leaves the fleet cleanly (no SentinelPeerDown)

Nothing here blocks the local healing path for long: every etcd call has a deadline,
waiting for a slot is bounded by `budget.wait`, and without a valid session the answer
is immediate (the partition policy). docs/fleet.md describes each failure case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from sentinel.fleet.breaker import BreakerRecord
from sentinel.fleet.budget import Budget, BudgetUnavailable, SlotDecision
from sentinel.fleet.config import FleetConfig, GroupConfig
from sentinel.fleet.election import Election
from sentinel.fleet.etcd import Compare, DeleteOp, EtcdClient, EtcdError, PutOp, RangeOp, cancel_and_wait
from sentinel.fleet.events import FleetEvent, FleetSample
from sentinel.fleet.groups import GroupActionResult, GroupMemberRunner, LocalExecutor, run_plan
from sentinel.fleet.keys import Keys
from sentinel.fleet.leader import LeaderDuties
from sentinel.fleet.session import Session
from sentinel.fleet.status import HostStatus, MemberRecord, StatusSource
from sentinel.fleet.watch import Informer
from sentinel.runtime.timeouts import wait_for

__all__ = ["DISRUPTIVE_ACTIONS", "FleetCoordinator", "FleetSetupError"]

log = logging.getLogger(__name__)

DISRUPTIVE_ACTIONS = frozenset({"restart", "reduce_batch", "quantized_fallback", "stop"})
FleetListener = Callable[[FleetEvent], None]


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class FleetSetupError(Exception):
    """A local problem that no retry fixes: an unreadable password or TLS file."""


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise FleetSetupError(f"fleet.password_file: cannot read {path}: {exc.strerror}") from exc


def build_client(config: FleetConfig, password: str | None) -> EtcdClient:
    tls = config.tls
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name) if tls else None
        if path is not None and not Path(path).is_file():
            raise FleetSetupError(f"fleet.tls.{name}: {path} is not a readable file")
    try:
        return EtcdClient(
            config.endpoints,
            request_timeout=config.request_timeout,
            user=config.user,
            password=password,
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.cert_file if tls else None,
            key_file=tls.key_file if tls else None,
        )
    except (OSError, ValueError) as exc:
        raise FleetSetupError(f"fleet.tls: {exc}") from exc


class FleetCoordinator:
    def __init__(
        self,
        config: FleetConfig,
        *,
        status_source: StatusSource,
        executor: LocalExecutor | None = None,
        version: str = "",
        client: EtcdClient | None = None,
    ) -> None:
        self.config = config
        self.host = config.host_id
        self.keys = Keys(config.prefix)
        self.status_source = status_source
        self.executor = executor
        self.version = version
        self._client = client
        self._listeners: list[FleetListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at = time.time()
        self._last_written: dict[str, object] | None = None
        self._written_lease = 0
        self._status_dirty = asyncio.Event()
        self._leader: LeaderDuties | None = None
        self.slot_outcomes = {"granted": 0, "local": 0, "refused": 0}
        self.started = False

    # -- wiring ---------------------------------------------------------------------------

    @property
    def client(self) -> EtcdClient:
        assert self._client is not None, "start() the coordinator first"
        return self._client

    async def start(self) -> None:
        """Set up and join in the background. Raises FleetSetupError for local mistakes only."""
        if self._client is None:
            password = None
            if self.config.password_file is not None:
                password = await asyncio.to_thread(read_secret, self.config.password_file)
            self._client = await asyncio.to_thread(build_client, self.config, password)
        client = self._client
        self.session = Session(client, self.config.lease_ttl)
        self.election = Election(client, self.keys.election, self.host, self.session)
        self.budget = Budget(client, self.keys, self.config.budget, self.session, self.host)
        self.runner = GroupMemberRunner(client, self.keys, self.host, self.executor)
        self.groups = Informer(client, self.keys.groups, on_change=lambda inf, _: self.runner.on_change(inf))
        self.breakers = Informer(client, self.keys.breakers)
        self.session.on_lease(self._joined)
        self.session.on_lost(self._lease_lost)
        for coro in (
            self.session.run(),
            self.election.informer.run(),
            self.groups.run(),
            self.breakers.run(),
            self._status_loop(),
            self._leader_loop(),
            self._health_loop(),
        ):
            self._tasks.append(asyncio.ensure_future(coro))
        self.budget.start()
        self.started = True

    async def wait_ready(self, timeout: float) -> bool:
        """True once the session is up and the mirrors are in sync (tests, the CLI)."""
        deadline = time.monotonic() + timeout
        if not await self.session.wait_valid(timeout):
            return False
        for informer in (self.election.informer, self.groups, self.breakers, self.budget.informer):
            left = deadline - time.monotonic()
            try:
                await wait_for(informer.synced.wait(), max(0.01, left))
            except asyncio.TimeoutError:
                return False
        return True

    async def stop(self, *, leave: bool = True, timeout: float | None = None) -> None:
        """Leave the fleet: mark this member `left` (no peer-down alert), then revoke the lease.

        `timeout` bounds the etcd calls of leaving (a daemon stops within its stop budget);
        what does not make it in time is left to the lease, which lapses by itself."""
        if not self.started:
            return
        self.started = False
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.05, deadline - time.monotonic())

        if leave and self.session.valid():
            with contextlib.suppress(EtcdError, asyncio.TimeoutError):
                await wait_for(self._mark_left(), left())
        session_task = self._tasks[0]
        for task in self._tasks[1:]:
            await cancel_and_wait(task)
        await self.budget.stop()
        await self.runner.close()
        await self.session.close(session_task, timeout=left())
        self._tasks.clear()
        await self.client.close()

    def subscribe(self, listener: FleetListener) -> Callable[[], None]:
        """Hear FleetEvents (on the event loop). Returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, event: FleetEvent) -> None:
        log.info("fleet event %s: %s", event.kind, event.message)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("fleet listener failed on %s", event.kind)

    def notify_status_changed(self) -> None:
        """Ask for the status to be read and written now (e.g. an alert started firing)."""
        self._status_dirty.set()

    # -- state ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.started and self.session.valid()

    def is_leader(self) -> bool:
        return self.started and self.election.is_leader()

    def leader_id(self) -> str | None:
        return self.election.leader_id() if self.started else None

    def breaker(self, alert: str | None) -> BreakerRecord | None:
        """The open fleet breaker for an alert, as this host's mirror sees it."""
        if not alert or not self.started:
            return None
        kv = self.breakers.items.get(self.keys.breaker(alert))
        if kv is None:
            return None
        try:
            record = BreakerRecord.model_validate_json(kv.value)
        except (ValidationError, ValueError):
            return None
        return record if record.state == "open" else None

    # -- membership and status ------------------------------------------------------------

    def _status(self) -> HostStatus:
        try:
            status = self.status_source()
        except Exception:
            log.exception("fleet: the status callback failed; publishing a bare status")
            status = HostStatus()
        return status.model_copy(
            update={"host": self.host, "version": status.version or self.version, "started_at": self._started_at}
        )

    async def _write_status(self, lease: int, *, force: bool = False) -> None:
        status = self._status()
        content = status.content()
        if not force and content == self._last_written and lease == self._written_lease:
            return
        status = status.model_copy(update={"updated_at": time.time()})
        await self.client.put(self.keys.host(self.host), status.model_dump_json().encode(), lease=lease)
        self._last_written, self._written_lease = content, lease

    async def _joined(self, lease: int) -> None:
        """Under each new lease: publish the status, register as a member, campaign."""
        await self._write_status(lease, force=True)
        key = self.keys.member(self.host)
        record = MemberRecord(host=self.host, joined_at=time.time(), state="alive", since=time.time())
        await self.client.txn([Compare(key, "create", "=", 0)], [PutOp(key, record.model_dump_json().encode())])
        await self.election.campaign(lease)

    async def _mark_left(self) -> None:
        key = self.keys.member(self.host)
        current = await self.client.get(key)
        record = MemberRecord.model_validate_json(current.value) if current else None
        now = time.time()
        left = (record or MemberRecord(host=self.host, joined_at=now)).model_copy(
            update={"state": "left", "since": now, "last_status": self._status()}
        )
        await self.client.put(key, left.model_dump_json().encode())

    def _lease_lost(self, lease: int, reason: str) -> None:
        for holder, decision in self.budget.held.items():
            if decision.lease == lease:
                self._emit(FleetEvent("slot_lost", f"slot {holder} lost with the lease: {reason}", {"holder": holder}))

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._status_dirty.wait(), self.config.status_interval)
            self._status_dirty.clear()
            lease = self.session.lease_id
            if lease is None or not self.session.valid():
                continue
            try:
                await self._write_status(lease)
            except EtcdError as exc:
                log.debug("fleet: status not written: %s", exc)

    async def _health_loop(self) -> None:
        """Announce reachability changes; after an outage, resume watches and releases."""
        last = "connecting"
        while True:
            await self.session.wait_changed(1.0)
            state = "up" if self.session.valid() else self.session.state
            if state == last:
                continue
            if state == "up":
                if last == "unreachable":
                    self._emit(FleetEvent("etcd_reachable", "etcd reachable again", metrics=("sentinel_fleet_up",)))
                    # A black-holed watch never breaks by itself: reconnect them all now.
                    for informer in (self.election.informer, self.groups, self.breakers, self.budget.informer):
                        informer.kick()
                await self.budget.retry_releases()
            elif state == "unreachable":
                self._emit(
                    FleetEvent(
                        "etcd_unreachable",
                        f"etcd unreachable ({self.session.last_error}); "
                        f"partition_policy {self.config.partition_policy}",
                        metrics=("sentinel_fleet_up",),
                    )
                )
            last = state

    async def _leader_loop(self) -> None:
        while True:
            await self.election.wait_elected()
            self._leader = LeaderDuties(self, self._emit)
            self._emit(FleetEvent("leader_elected", f"{self.host} leads the fleet", metrics=("sentinel_fleet_leader",)))
            duties = asyncio.ensure_future(self._leader.run())
            try:
                reason = await self.election.wait_deposed()
            finally:
                # Deposed, or this coordinator stopping: the duties end now, either way.
                self._leader = None
                await cancel_and_wait(duties)
            self._emit(
                FleetEvent(
                    "leader_deposed", f"{self.host} stopped leading: {reason}", metrics=("sentinel_fleet_leader",)
                )
            )

    # -- disruption slots -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def disruption_slot(
        self,
        worker: str,
        action: str,
        *,
        labels: Mapping[str, str] | None = None,
        alert: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[SlotDecision]:
        """Hold a slot for the duration of the block; the decision is falsy when refused."""
        decision = await self.acquire_slot(worker, action, labels=labels, alert=alert, timeout=timeout)
        try:
            yield decision
        finally:
            await self.release_slot(decision)

    async def acquire_slot(
        self,
        worker: str,
        action: str,
        *,
        labels: Mapping[str, str] | None = None,
        alert: str | None = None,
        timeout: float | None = None,
    ) -> SlotDecision:
        """A slot or a refusal with a reason; pair a grant with `release_slot`."""
        decision = await self._decide(worker, action, labels, alert, timeout)
        outcome = "refused" if not decision.granted else decision.mode if decision.mode == "local" else "granted"
        self.slot_outcomes[outcome] += 1
        return decision

    async def _decide(
        self, worker: str, action: str, labels: Mapping[str, str] | None, alert: str | None, timeout: float | None
    ) -> SlotDecision:
        open_breaker = self.breaker(alert)
        if open_breaker is not None:
            return SlotDecision(
                False,
                "refused",
                f"fleet breaker open for {alert} since {_clock(open_breaker.opened_at)} "
                f"({len(open_breaker.hosts)} hosts): systemic, not acting; `sentinel fleet resume {alert}` to resume",
            )
        if not self.up:
            return self._partition("no valid fleet session")
        try:
            return await self.budget.acquire(worker=worker, action=action, labels=labels, alert=alert, timeout=timeout)
        except BudgetUnavailable as exc:
            if exc.uncertain:
                self.budget.pending_release.update(exc.uncertain)
            return self._partition(str(exc))

    def _partition(self, detail: str) -> SlotDecision:
        since = self.session.unreachable_since
        when = f" since {_clock(since)}" if since else ""
        if self.config.partition_policy == "hold":
            return SlotDecision(
                False,
                "refused",
                f"etcd unreachable{when} ({detail}); "
                "partition_policy is hold: no disruptive action without a fleet slot",
            )
        return SlotDecision(
            True,
            "local",
            f"etcd unreachable{when} ({detail}); partition_policy is local: acting under this host's own limits only",
        )

    async def release_slot(self, decision: SlotDecision) -> None:
        if decision.granted and decision.mode == "fleet":
            await self.budget.release(decision)

    # -- group actions --------------------------------------------------------------------

    def group(self, name: str) -> GroupConfig:
        group = next((g for g in self.config.groups if g.name == name), None)
        if group is None:
            raise ValueError(f"no serving group named {name!r} in fleet.groups")
        return group

    async def run_group_action(
        self,
        group_name: str,
        action: str,
        *,
        profile: str | None = None,
        reason: str = "",
        alert: str | None = None,
        slot_timeout: float | None = None,
    ) -> GroupActionResult:
        """Restart a serving group in order across hosts; the outcome (etcd trouble included)
        is returned, not raised. ValueError only for a group the configuration lacks."""
        group = self.group(group_name)
        started = time.time()

        def result(
            outcome: Literal["done", "failed", "refused", "busy"],
            why: str,
            plan_id: str | None = None,
            steps: dict[str, float] | None = None,
        ) -> GroupActionResult:
            done = GroupActionResult(
                outcome == "done", group.name, action, plan_id, outcome, why, started, time.time(), steps or {}
            )
            if outcome in ("done", "failed"):
                self._emit(
                    FleetEvent(
                        "group_done" if outcome == "done" else "group_failed",
                        f"group {group.name} {action}: {why}",
                        {"group": group.name},
                        metrics=("sentinel_fleet_group_phase",),
                    )
                )
            return done

        lease = self.session.lease_id
        if lease is None or not self.up:
            return result("refused", "no valid fleet session: a group action needs every member through etcd")
        plan_id = uuid.uuid4().hex[:12]
        lock = self.keys.group_lock(group.name)
        body = {"plan": plan_id, "host": self.host, "action": action, "at": time.time()}
        try:
            taken = await self.client.txn(
                [Compare(lock, "create", "=", 0)], [PutOp(lock, json.dumps(body).encode(), lease)], [RangeOp(lock)]
            )
        except EtcdError as exc:
            return result("refused", f"could not take the group lock: {exc}")
        if not taken.succeeded:
            holder = taken.range(0).kvs[0].json() if taken.range(0).kvs else {}
            return result(
                "busy",
                f"a group action is already running on {group.name} "
                f"(host {holder.get('host')}, {holder.get('action')}, plan {holder.get('plan')})",
            )
        lock_rev = taken.revision
        try:
            slot = await self.acquire_slot(
                f"group:{group.name}", action, labels=group.labels, alert=alert, timeout=slot_timeout
            )
            if not slot or slot.mode != "fleet":
                await self.release_slot(slot)
                return result("refused", slot.reason if not slot else "a group action needs a fleet slot")
            try:
                if profile is None:
                    profile = await self._head_profile(group)
                plan, steps = await run_plan(
                    self.client, self.keys, self.groups, group,
                    action=action, profile=profile, initiator=self.host, lease=lease,
                    reason=reason, lock_rev=lock_rev, plan_id=plan_id,
                )  # fmt: skip
            except EtcdError as exc:
                return result("failed", f"lost etcd during the group action: {exc}", plan_id)
            finally:
                await self.release_slot(slot)
            if plan.phase == "done":
                return result(
                    "done", f"all {len(group.members)} members restarted in order and verified", plan.id, steps
                )
            return result("failed", plan.failure, plan.id, steps)
        finally:
            with contextlib.suppress(EtcdError):
                await self.client.txn([Compare(lock, "create", "=", lock_rev)], [DeleteOp(lock)])

    async def _head_profile(self, group: GroupConfig) -> str | None:
        """The head's current profile, so every member runs the same one."""
        kv = await self.client.get(self.keys.host(group.head.host))
        if kv is None:
            return None
        try:
            status = HostStatus.model_validate_json(kv.value)
        except (ValidationError, ValueError):
            return None
        return next((w.profile for w in status.workers if w.name == group.head.worker), None)

    # -- series ---------------------------------------------------------------------------

    def samples(self) -> list[FleetSample]:
        """Series for the store: this host's own, plus the fleet-wide ones while leading."""
        if not self.started:
            return []
        stats = self.client.stats
        out = [
            FleetSample("sentinel_fleet_up", {}, 1.0 if self.up else 0.0),
            FleetSample("sentinel_fleet_leader", {}, 1.0 if self.is_leader() else 0.0),
            FleetSample("sentinel_fleet_etcd_requests_total", {}, float(stats.requests)),
            FleetSample("sentinel_fleet_etcd_request_failures_total", {}, float(stats.failures)),
        ]
        out += [
            FleetSample("sentinel_fleet_slot_requests_total", {"outcome": k}, float(v))
            for k, v in self.slot_outcomes.items()
        ]
        if self._leader is not None and self.is_leader():
            out += self._leader.samples
        return out
