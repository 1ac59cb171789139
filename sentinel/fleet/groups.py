"""Serving groups that span hosts: one plan in etcd, each host executing its own steps.

A multi-host model (vLLM/SGLang with `--nnodes`) must be restarted as a whole: restart
one side and the ranks on the other hosts hang in NCCL. The host that decides on a
group action (the initiator) takes the group lock (under its lease) and one budget
slot, then writes a plan:

    stop (every member) -> apply_profile (every member, when a profile is set)
      -> start (head) -> start (next member) ... -> verify (every member)

and advances it one step at a time. Every host watches `groups/`; when the current step
names one of its own workers it runs it through its local `LocalExecutor` (the worker
backends: systemd, process, command), so no host needs credentials on another, and
acknowledges with a key of its own. The initiator moves on when every member of the
step acknowledged success; a failure or a missing acknowledgement past the step's
deadline fails the plan, which every member sees: a member host cancels a step of it
still running and stops each of its members that the plan had started, so a failed
group is never left half-started. Escalation (the ladder, then needs_human) is the
caller's: `run_group_action` returns the outcome. A `stop` action is one step: every
member stops (and stays stopped: a person decides what next).

An executor may also follow the plans it takes part in (`PlanObserver`): it hears of
each step before running it and of the plan's end, which is how each member host
journals its part of a group action and keeps its own healing off the worker meanwhile.

Nothing is done twice: a member runs a (plan, step) once per process, and not at all
when its acknowledgement already exists (after a restart of Sentinel); acknowledgements
are create-if-absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from sentinel.fleet.config import GroupConfig
from sentinel.fleet.etcd import Compare, DeleteOp, EtcdClient, EtcdError, KeyValue, PutOp, cancel_and_wait
from sentinel.fleet.keys import Keys
from sentinel.fleet.watch import Informer
from sentinel.runtime.timeouts import wait_for

__all__ = [
    "GroupActionResult",
    "GroupMemberRunner",
    "GroupPlan",
    "LocalExecutor",
    "PlanObserver",
    "PlanStep",
    "StepAck",
    "StepOutcome",
    "build_steps",
    "run_plan",
]

log = logging.getLogger(__name__)

StepKind = Literal["stop", "apply_profile", "start", "verify"]
ACK_GRACE_S = 3.0  # the initiator waits this much past a member's own step timeout


@dataclass(frozen=True)
class StepOutcome:
    ok: bool
    detail: str = ""


class LocalExecutor(Protocol):
    """How this host carries out group steps on its own workers (the lead wires the backends)."""

    async def stop(self, worker: str) -> StepOutcome: ...

    async def apply_profile(self, worker: str, profile: str) -> StepOutcome: ...

    async def start(self, worker: str) -> StepOutcome: ...

    async def verify(self, worker: str, *, head: bool, deadline_s: float) -> StepOutcome:
        """Head: serving and making progress; other members: alive. Poll until `deadline_s`."""
        ...


@runtime_checkable
class PlanObserver(Protocol):
    """An executor that also wants to know which plan a step belongs to, and how it ended."""

    async def plan_step(self, plan: GroupPlan, step: PlanStep, member: str) -> None:
        """Before this host runs `step` of `plan` on its `member` (host:worker)."""

    async def plan_ended(self, plan: GroupPlan, member: str, stopped: StepOutcome | None) -> None:
        """`plan` is done or failed; `stopped`: the stop this host ran after a failure, if any."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PlanStep(_Model):
    index: int
    kind: StepKind
    members: tuple[str, ...]
    timeout: float


class GroupPlan(_Model):
    id: str
    group: str
    action: str
    profile: str | None
    head: str
    initiator: str
    reason: str = ""
    created_at: float
    steps: tuple[PlanStep, ...]
    current: int = -1
    step_started_at: float = 0.0
    phase: Literal["running", "done", "failed"] = "running"
    failure: str = ""
    finished_at: float | None = None


class StepAck(_Model):
    member: str
    ok: bool
    detail: str = ""
    started_at: float
    ended_at: float


@dataclass
class GroupActionResult:
    ok: bool
    group: str
    action: str
    plan_id: str | None
    outcome: Literal["done", "failed", "refused", "busy"]  # busy: another host runs this group's action
    reason: str
    started_at: float
    ended_at: float
    step_seconds: dict[str, float]

    def __bool__(self) -> bool:
        return self.ok


def build_steps(group: GroupConfig, profile: str | None, action: str = "restart") -> tuple[PlanStep, ...]:
    everyone = tuple(m.member for m in group.members)
    kinds: list[tuple[StepKind, tuple[str, ...], float]] = [("stop", everyone, group.step_timeout)]
    if action == "stop":
        return (PlanStep(index=0, kind="stop", members=everyone, timeout=group.step_timeout),)
    if profile:
        kinds.append(("apply_profile", everyone, group.step_timeout))
    kinds += [("start", (m.member,), group.step_timeout) for m in group.start_order()]
    kinds.append(("verify", everyone, group.verify_timeout))
    return tuple(PlanStep(index=i, kind=k, members=ms, timeout=t) for i, (k, ms, t) in enumerate(kinds))


def parse_plan(kv: KeyValue | None) -> GroupPlan | None:
    if kv is None:
        return None
    try:
        return GroupPlan.model_validate_json(kv.value)
    except (ValidationError, ValueError):
        log.warning("fleet: unreadable group plan at %s", kv.key)
        return None


def acks_of(informer: Informer, keys: Keys, plan: GroupPlan, step: int) -> dict[str, StepAck]:
    prefix = f"{keys.group_acks(plan.group, plan.id)}{step}/"
    acks = {}
    for key, kv in informer.items.items():
        if key.startswith(prefix):
            with contextlib.suppress(ValidationError, ValueError):
                ack = StepAck.model_validate_json(kv.value)
                acks[ack.member] = ack
    return acks


async def run_plan(
    client: EtcdClient,
    keys: Keys,
    informer: Informer,
    group: GroupConfig,
    *,
    action: str,
    profile: str | None,
    initiator: str,
    lease: int,
    reason: str,
    lock_rev: int,
    plan_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[GroupPlan, dict[str, float]]:
    """Write the plan and drive it to done or failed (under a lock already held)."""
    plan = GroupPlan(
        id=plan_id or uuid.uuid4().hex[:12],
        group=group.name,
        action=action,
        profile=profile,
        head=group.head.member,
        initiator=initiator,
        reason=reason,
        created_at=time.time(),
        steps=build_steps(group, profile, action),
    )
    lock = keys.group_lock(group.name)
    plan_key = keys.group_plan(group.name)
    step_seconds: dict[str, float] = {}

    async def write(new: GroupPlan, *, clear_acks: bool = False) -> None:
        ops: list[PutOp | DeleteOp] = [PutOp(plan_key, new.model_dump_json().encode())]
        if clear_acks:
            ops.insert(0, DeleteOp(keys.group_acks(group.name), prefix=True))
        result = await client.txn([Compare(lock, "create", "=", lock_rev)], ops)
        if not result.succeeded:
            raise EtcdError("the group lock is no longer ours (our lease ended)")

    await write(plan, clear_acks=True)
    for step in plan.steps:
        plan = plan.model_copy(update={"current": step.index, "step_started_at": time.time()})
        await write(plan)
        started = clock()
        failure = await _await_acks(informer, keys, plan, step, clock)
        step_seconds[f"{step.index}:{step.kind}"] = clock() - started
        if failure:
            plan = plan.model_copy(update={"phase": "failed", "failure": failure, "finished_at": time.time()})
            with contextlib.suppress(EtcdError):
                await write(plan)
            return plan, step_seconds
    plan = plan.model_copy(update={"phase": "done", "finished_at": time.time()})
    await write(plan)
    return plan, step_seconds


async def _await_acks(
    informer: Informer, keys: Keys, plan: GroupPlan, step: PlanStep, clock: Callable[[], float]
) -> str:
    """'' when every member acknowledged success; else why the step failed."""
    deadline = clock() + step.timeout + ACK_GRACE_S
    while True:
        version = informer.version
        acks = acks_of(informer, keys, plan, step.index)
        bad = [a for a in acks.values() if not a.ok and a.member in step.members]
        if bad:
            return f"{bad[0].member} failed step {step.index} ({step.kind}): {bad[0].detail}"
        missing = [m for m in step.members if m not in acks]
        if not missing:
            return ""
        left = deadline - clock()
        if left <= 0:
            return f"{', '.join(missing)} did not confirm step {step.index} ({step.kind}) within {step.timeout:.0f}s"
        await informer.wait_changed(version, min(left, 1.0))


class GroupMemberRunner:
    """Runs this host's steps of any group plan it sees, once each, and acknowledges them."""

    def __init__(self, client: EtcdClient, keys: Keys, host: str, executor: LocalExecutor | None) -> None:
        self.client = client
        self.keys = keys
        self.host = host
        self.executor = executor
        self._done: set[tuple[str, int, str]] = set()
        self._running: dict[tuple[str, int, str], asyncio.Task[None]] = {}
        self.executed: list[tuple[str, int, str, str]] = []
        self._ended: set[tuple[str, str]] = set()  # (plan, member) whose end was handled here
        self._ending: set[asyncio.Task[None]] = set()
        self._plans: dict[str, GroupPlan] = {}  # plans this host ran steps of, by id

    def on_change(self, informer: Informer) -> None:
        """Called with the groups/ mirror after every change."""
        for key, kv in list(informer.items.items()):
            if not key.endswith("/plan"):
                continue
            plan = parse_plan(kv)
            if plan is None:
                continue
            for old in [p for p in self._plans.values() if p.group == plan.group and p.id != plan.id]:
                # Its end and the next plan came in one watch batch: the next plan stops
                # every member first, so only the bookkeeping is left to do.
                self._plan_over(old.model_copy(update={"phase": "failed", "failure": f"superseded by {plan.id}"}))
            if plan.phase != "running":
                self._plan_over(plan, stop=True)
                continue
            if not 0 <= plan.current < len(plan.steps):
                continue
            step = plan.steps[plan.current]
            for member in step.members:
                if member.partition(":")[0] != self.host:
                    continue
                ident = (plan.id, step.index, member)
                if ident in self._done or ident in self._running:
                    continue
                if member in acks_of(informer, self.keys, plan, step.index):
                    self._done.add(ident)
                    continue
                self._running[ident] = asyncio.ensure_future(self._execute(plan, step, member))

    def _plan_over(self, plan: GroupPlan, *, stop: bool = False) -> None:
        """A plan this host took part in ended: tell the executor; after a failure (`stop`),
        stop each member of this host that the plan had started (never a half-started group)."""
        self._plans.pop(plan.id, None)
        for member in {m for pid, _, m, _ in self.executed if pid == plan.id}:
            if (plan.id, member) in self._ended:
                continue
            self._ended.add((plan.id, member))
            task = asyncio.ensure_future(self._end(plan, member, stop))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _end(self, plan: GroupPlan, member: str, stop: bool) -> None:
        for ident, task in list(self._running.items()):
            if ident[0] == plan.id and ident[2] == member:
                await cancel_and_wait(task)  # a step of a finished plan is moot
                self._running.pop(ident, None)
        started = any(pid == plan.id and m == member and k == "start" for pid, _, m, k in self.executed)
        stopped: StepOutcome | None = None
        if stop and plan.phase == "failed" and started and self.executor is not None:
            worker = member.partition(":")[2]
            try:
                stopped = await self.executor.stop(worker)
            except Exception as exc:  # reported to the executor below, and logged
                log.exception("fleet: stopping %s after the failed plan %s raised", member, plan.id)
                stopped = StepOutcome(False, f"{type(exc).__name__}: {exc}")
            log.warning("fleet: plan %s of group %s failed; stopped %s: %s", plan.id, plan.group, member, stopped)
        if isinstance(self.executor, PlanObserver):
            try:
                await self.executor.plan_ended(plan, member, stopped)
            except Exception:
                log.exception("fleet: the executor failed on the end of plan %s", plan.id)

    async def _execute(self, plan: GroupPlan, step: PlanStep, member: str) -> None:
        ident = (plan.id, step.index, member)
        worker = member.partition(":")[2]
        started = time.time()
        self.executed.append((plan.id, step.index, member, step.kind))
        self._plans[plan.id] = plan
        try:
            if isinstance(self.executor, PlanObserver):
                await self.executor.plan_step(plan, step, member)
            outcome = await wait_for(self._run_step(plan, step, worker), step.timeout)
        except asyncio.TimeoutError:
            outcome = StepOutcome(False, f"{step.kind} did not finish within {step.timeout:.0f}s")
        except Exception as exc:  # the executor's bug becomes a failed step, not a silent hang
            log.exception("fleet: group step %s on %s failed", step.kind, member)
            outcome = StepOutcome(False, f"{type(exc).__name__}: {exc}")
        self._done.add(ident)
        ack = StepAck(member=member, ok=outcome.ok, detail=outcome.detail, started_at=started, ended_at=time.time())
        key = self.keys.group_ack(plan.group, plan.id, step.index, member)
        for attempt in range(20):
            try:
                await self.client.txn([Compare(key, "create", "=", 0)], [PutOp(key, ack.model_dump_json().encode())])
                break
            except EtcdError as exc:
                log.warning("fleet: could not acknowledge %s step %d (%s); retrying", member, step.index, exc)
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
        self._running.pop(ident, None)

    async def _run_step(self, plan: GroupPlan, step: PlanStep, worker: str) -> StepOutcome:
        ex = self.executor
        if ex is None:
            return StepOutcome(False, f"host {self.host} has no local executor for group steps")
        if step.kind == "stop":
            return await ex.stop(worker)
        if step.kind == "apply_profile":
            assert plan.profile is not None
            return await ex.apply_profile(worker, plan.profile)
        if step.kind == "start":
            return await ex.start(worker)
        head = f"{self.host}:{worker}" == plan.head
        return await ex.verify(worker, head=head, deadline_s=max(1.0, step.timeout - 1.0))

    async def close(self) -> None:
        for task in [*self._running.values(), *self._ending]:
            await cancel_and_wait(task)
