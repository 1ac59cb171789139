"""Serving groups that span hosts, as the remediation engine sees them.

A model served across hosts (vLLM or SGLang with `--nnodes`) is restarted as a whole:
restart one side and the ranks on the other hosts hang in NCCL. Two halves here:

- **Initiator.** A disruptive action (restart, reduce_batch, quantized_fallback,
  restore, stop) decided for a worker that belongs to a group becomes one group action:
  the engine asks `GroupActions.run` (the daemon wires it to the fleet coordinator's
  `run_group_action`) instead of its own backend verb and verification. Its outcome
  maps onto the engine's: `done` (every member restarted in order and verified),
  `failed` (escalate: the ladder, then needs_human), `refused` (journaled as skipped,
  tried again while the alert fires) or `busy` (another member host runs the group's
  action: the fault is being handled there; journaled as skipped, not retried) or
  `blocked` (a member needs a human: no host restarts the group until then; journaled
  as skipped, not retried).

- **Member.** `GroupMemberSteps` is this host's `LocalExecutor` for group plans (any
  member host's, this one's included): it runs each step on its own worker through the
  worker's backend (stop, the profile, start, verify) and, for a plan another host
  started, journals the group action on this host too — a write-ahead row at the first
  step, finished when the plan ends — and keeps the worker "in flight" meanwhile, so
  this host's own healing does not act on a worker the group is restarting (its
  alerts wait, and are dropped once the group action has healed it). A worker taken
  out of service by a group `stop` needs a human, as after a local stop.

Every step is serialized per worker (a stop after a failed plan never overtakes the
start it follows). Label values never reach a shell: the backends get an
`ActionContext`, as for any action.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

from sentinel.fleet.groups import GroupPlan, PlanStep, StepOutcome
from sentinel.remediation.backend import ActionContext
from sentinel.remediation.journal import ActionRow
from sentinel.remediation.policy import HistoryEntry
from sentinel.remediation.verify import HealthReading, Progress, judge
from sentinel.remediation.writer import Entry
from sentinel.runtime.clock import Instant

if TYPE_CHECKING:
    from sentinel.remediation.engine import Remediator
    from sentinel.remediation.worker import WorkerRuntime

__all__ = ["GroupActions", "GroupMemberSteps", "GroupOutcome", "GroupRequest"]

log = logging.getLogger(__name__)

GROUP_TRIGGER = "group"  # the trigger of the rows a member host journals for a group action


@dataclass(frozen=True)
class GroupRequest:
    """A disruptive action decided for `worker`, to run as its group's action."""

    worker: str
    action: str
    profile: str  # the worker's target profile: every member runs the same one
    reason: str  # the alert (or trigger) behind it
    alert: str = ""  # the alert, for the fleet breaker ("" for none)


@dataclass(frozen=True)
class GroupOutcome:
    outcome: Literal["done", "failed", "refused", "busy", "blocked"]
    group: str
    detail: str


class GroupActions(Protocol):
    """Where the engine sends disruptive actions on members of serving groups."""

    def group_of(self, worker: str) -> str | None:
        """The serving group `worker` (on this host) belongs to; None: it acts alone."""

    async def run(self, request: GroupRequest) -> GroupOutcome:
        """Run the group action to its end; etcd trouble is an outcome, never an exception."""


@dataclass
class _Part:
    """This host's part in a plan another host started: its journal row."""

    plan: GroupPlan
    worker: str
    entry: Entry
    started_steady: float


class GroupMemberSteps:
    """The `LocalExecutor` (and `PlanObserver`) of this host's group steps (module doc)."""

    def __init__(self, engine: Remediator) -> None:
        self._engine = engine
        self._parts: dict[tuple[str, str], _Part] = {}
        self._plans: dict[str, GroupPlan] = {}  # worker -> the plan whose step runs now
        self._locks: dict[str, asyncio.Lock] = {}
        self.host = ""  # this host's fleet id (set by the daemon when it joins a fleet)
        self.steps_run: list[tuple[str, str, str]] = []  # (plan, step kind, worker), for tests

    # -- PlanObserver -----------------------------------------------------------------------

    async def plan_step(self, plan: GroupPlan, step: PlanStep, member: str) -> None:
        worker = member.partition(":")[2]
        rt = self._engine.runtime_of(worker)
        if rt is None:
            return  # the step itself says so
        self._plans[worker] = plan
        if (plan.id, worker) in self._parts or self._initiated_here(plan, rt):
            return
        self._parts[(plan.id, worker)] = await self._begin(rt, plan)

    async def plan_ended(self, plan: GroupPlan, member: str, stopped: StepOutcome | None) -> None:
        worker = member.partition(":")[2]
        part = self._parts.pop((plan.id, worker), None)
        if self._plans.get(worker) is plan or (worker in self._plans and self._plans[worker].id == plan.id):
            del self._plans[worker]
        if part is None:
            return  # the engine journals the action this host started itself
        await self._finish(part, plan, stopped)

    # -- LocalExecutor ----------------------------------------------------------------------

    async def stop(self, worker: str) -> StepOutcome:
        return await self._step("stop", worker, self._stop)

    async def apply_profile(self, worker: str, profile: str) -> StepOutcome:
        async def apply(rt: WorkerRuntime) -> StepOutcome:
            spec = rt.spec(None)
            names = [p.name for p in spec.profiles] or [spec.profile(0).name]
            if profile not in names:
                return StepOutcome(False, f"worker {worker} has no profile {profile!r} (profiles: {', '.join(names)})")
            if spec.profiles:
                rt.state = replace(rt.state, profile_index=names.index(profile))
                await self._engine.persist_worker(rt)
            return StepOutcome(True, f"profile {profile}")

        return await self._step("apply_profile", worker, apply)

    async def start(self, worker: str) -> StepOutcome:
        return await self._step("start", worker, self._start)

    async def verify(self, worker: str, *, head: bool, deadline_s: float) -> StepOutcome:
        async def verify(rt: WorkerRuntime) -> StepOutcome:
            ok, detail = await self._verify(rt, head, deadline_s)
            if ok:
                return StepOutcome(True, "serving and making progress" if head else "alive")
            return StepOutcome(False, f"not {'serving' if head else 'alive'} within {deadline_s:.0f}s: {detail}")

        return await self._step("verify", worker, verify)

    # -- steps ------------------------------------------------------------------------------

    async def _step(self, kind: str, worker: str, run: _StepFn) -> StepOutcome:
        engine = self._engine
        rt = engine.runtime_of(worker)
        if rt is None:
            return StepOutcome(False, f"no worker named {worker} is configured on this host")
        if engine.config.mode != "act":
            return StepOutcome(False, f"remediation is in {engine.config.mode} mode on this host: no group steps")
        lock = self._locks.setdefault(worker, asyncio.Lock())
        async with lock:
            self.steps_run.append((self._plans[worker].id if worker in self._plans else "", kind, worker))
            return await run(rt)

    def _context(self, rt: WorkerRuntime, action: str) -> ActionContext:
        plan = self._plans.get(rt.name)
        spec = rt.spec(None)
        return ActionContext(
            worker=rt.name,
            action=action,
            alertname=plan.reason if plan is not None else "",
            profile=spec.profile(rt.state.profile_index).name,
            labels={"group": plan.group} if plan is not None else {},
        )

    async def _stop(self, rt: WorkerRuntime) -> StepOutcome:
        if rt.backend is None:
            return StepOutcome(False, f"worker {rt.name} has no backend")
        error = await self._engine.backend_verb(rt, "stop", self._context(rt, "stop"))
        return StepOutcome(not error, error or "stopped")

    async def _start(self, rt: WorkerRuntime) -> StepOutcome:
        if rt.backend is None:
            return StepOutcome(False, f"worker {rt.name} has no backend")
        error = await self._engine.backend_verb(rt, "start", self._context(rt, "start"))
        profile = rt.spec(None).profile(rt.state.profile_index).name
        return StepOutcome(not error, error or f"started with profile {profile}")

    async def _verify(self, rt: WorkerRuntime, head: bool, deadline_s: float) -> tuple[bool, str]:
        """Head: endpoint up, not stalled, progress while requests run; others: a process runs."""
        engine, clocks = self._engine, self._engine.clocks
        if rt.phase is not None:
            rt.enter("verifying", clocks.steady())
        deadline = clocks.steady() + deadline_s
        since_ms = int(clocks.wall() * 1000)
        baseline = engine.latest_sample(rt.name, "sentinel_endpoint_progress_total")
        progress = Progress(baseline.value if baseline is not None else None)
        endpoint = head and bool(rt.config.endpoint)
        while True:
            reading = HealthReading.fresh_from(lambda m: engine.latest_sample(rt.name, m), since_ms, endpoint)
            if reading.needs_unit and rt.backend is not None:
                reading = await engine.with_unit(rt.backend, reading)
            ok, detail, progress = judge(reading, progress)
            if ok:
                return True, ""
            if clocks.steady() >= deadline:
                return False, detail
            await asyncio.sleep(min(engine.config.verify_interval, max(0.05, deadline - clocks.steady())))

    # -- this host's journal of other hosts' group actions -----------------------------------

    def _initiated_here(self, plan: GroupPlan, rt: WorkerRuntime) -> bool:
        """The engine of this host started this plan for this very worker (and journals it)."""
        return plan.initiator == self.host and rt.phase == "group"

    async def _begin(self, rt: WorkerRuntime, plan: GroupPlan) -> _Part:
        engine = self._engine
        spec = rt.spec(None)
        at = Instant.now(engine.clocks)
        row = ActionRow(
            worker=rt.name,
            action=plan.action,
            mode="act",
            trigger=GROUP_TRIGGER,
            started=at.wall,
            alertname=plan.reason,
            profile_before=spec.profile(rt.state.profile_index).name,
            profile_after=plan.profile or spec.profile(rt.state.profile_index).name,
            boot_id=at.boot,
            started_steady=at.steady,
        )
        entry = await engine.journal_begin(row)
        now = engine.clocks.steady()
        rt.begin(plan.action, "group", now)
        engine.note_group_action(HistoryEntry(rt.name, plan.action, now, "act"))
        detail = f"group {plan.group}: {plan.action} started by {plan.initiator} (plan {plan.id}) after {plan.reason}"
        log.warning("worker %s: %s", rt.name, detail)
        engine.report_row(entry.row, "started", detail)
        return _Part(plan, rt.name, entry, now)

    async def _finish(self, part: _Part, plan: GroupPlan, stopped: StepOutcome | None) -> None:
        engine = self._engine
        rt = engine.runtime_of(part.worker)
        assert rt is not None
        done = plan.phase == "done"
        error = "" if done else f"group {plan.group}: {plan.failure or 'failed'}"
        if stopped is not None:
            error += f"; stopped {part.worker} so the group is not left half-started" + (
                "" if stopped.ok else f" (the stop failed: {stopped.detail})"
            )
        healthy_after = engine.clocks.steady() - part.started_steady if done else None
        stop_done = done and plan.action == "stop"
        if stop_done:
            rt.state = replace(
                rt.state, needs_human=True, needs_human_reason=f"stopped with group {plan.group} after {plan.reason}"
            )
        detail = error or f"group {plan.group}: every member restarted in order and verified (plan {plan.id})"
        if stop_done:
            detail = f"group {plan.group}: every member stopped (plan {plan.id}); a person decides what next"
        outcome: Literal["succeeded", "failed"] = "succeeded" if done else "failed"
        await engine.journal_group_finish(rt, part.entry, outcome, error, healthy_after, detail)
        log.log(logging.INFO if done else logging.ERROR, "worker %s: %s", part.worker, detail)


class _StepFn(Protocol):
    async def __call__(self, rt: WorkerRuntime) -> StepOutcome: ...
