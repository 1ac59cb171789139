"""The remediation engine: turns firing alerts into bounded, verified, journaled actions.

An alert's path, top to bottom in this file:

    on_alert(event)          RuleManager subscriber, on the event loop: which worker, which actions
      _handle(request, why)  policy.resolve() decides and says what follows; applied here, at once:
                             a decision that finishes now (skip, would_act, needs_human, notify_only)
                             is journaled and reported, the worker's state and deferrals updated,
                             and an action to run becomes a task:
      _carry_out(...)        1. journal    the write-ahead row (held in memory if the disk fails)
                             2. admission  the gates: the host-wide slot, a fleet budget (gate.py)
                             3. perform    the backend verb, the live batch limit or the command;
                                           on a member of a serving group that spans hosts, a
                                           disruptive action is one group action instead
                                           (groups.py): every member, in order, verified
                             4. verify     until verify.judge() says healthy, or the deadline
                             5. finish     the row's outcome and the worker's state
                             6. report     metrics and the notification; a failure escalates
                                           through _handle

Decisions are made on the event loop from in-memory state, so "one action in flight per
worker" holds without locks. `tick()` (a scheduler job every `tick_interval`) notes the
alerts that caused actions and still fire, retries requests deferred by a passing
obstacle, steps workers back up after `stable_for`, retries held journal writes, and
refreshes the exported series. Per-worker state lives in `WorkerRuntime` (worker.py).

Clocks (`sentinel.runtime.clock`): durations (cooldowns, budgets, `stable_for`, the
verification deadline) on the steady clock, which no wall-clock step moves (issue 15,
F8); timestamps (journal rows, samples, reports) on Sentinel's wall clock. Times read
back from the journal are converted with `elapsed_since`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sentinel.config.models import WorkerConfig
from sentinel.notify.actions import OUTCOMES, ActionReport, Outcome
from sentinel.remediation.backend import (
    ActionContext,
    BackendError,
    LiveControl,
    ProfileRecord,
    UnitState,
    WorkerBackend,
)
from sentinel.remediation.backends.tracked import has_leftovers, settle_leftovers
from sentinel.remediation.gate import ActionGate, Admission, Gates, HostSlots, Refusal
from sentinel.remediation.groups import GroupActions, GroupMemberSteps, GroupRequest
from sentinel.remediation.journal import ActionRow, Journal, WorkerRecord
from sentinel.remediation.perform import perform
from sentinel.remediation.policy import (
    DISRUPTIVE,
    HistoryEntry,
    Plan,
    Request,
    Resolution,
    Trigger,
    WorkerState,
    circuit_open,
    forgiven,
    ladder_slots,
    note_trouble,
    recovery_step,
    resolve,
    route_actions,
)
from sentinel.remediation.settings import ACTIONS, RemediationConfig
from sentinel.remediation.verify import HealthReading, Progress, judge
from sentinel.remediation.worker import Why, WorkerRuntime
from sentinel.remediation.writer import Entry, JournalWriter
from sentinel.rules.manager import AlertEvent
from sentinel.rules.state import AlertState
from sentinel.runtime.clock import Clocks, Instant, SystemClocks, elapsed_since
from sentinel.runtime.scheduler import Job, Scheduler
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.health import StateHealth
from sentinel.store import Appender, LabelMatcher, MatchOp, Sample, Store

__all__ = ["Remediator", "UnknownWorker"]

log = logging.getLogger(__name__)

Notify = Callable[[ActionReport], object]  # e.g. Notifier.report_action (its future is not awaited)

EPISODE_MEMORY_S = 30 * 86400.0  # how far back a repeated alert episode is recognised
JOURNAL_RETENTION_S = 90 * 86400.0  # journal rows older than this are pruned
PRUNE_EVERY_S = 3600.0
INTERRUPTED = "Sentinel stopped while the action ran"
_METRICS_SOURCE = "remediation"
_METRICS = (
    ("sentinel_remediation_actions_total", "counter", "Remediation decisions by worker, action and outcome."),
    ("sentinel_worker_profile", "gauge", "1 for the worker's active launch profile, 0 for its other profiles."),
    (
        "sentinel_worker_needs_human",
        "gauge",
        "1 when Sentinel stopped acting on the worker until `sentinel resume` (ladder exhausted, or stopped).",
    ),
    ("sentinel_remediation_paused", "gauge", "1 when remediation of the worker is paused (by worker or globally)."),
    ("sentinel_remediation_in_flight", "gauge", "Remediation actions being carried out or verified now."),
    (
        "sentinel_remediation_circuit_breaker_open",
        "gauge",
        "1 when so many workers were remediated within the window that Sentinel stopped acting.",
    ),
)


class UnknownWorker(KeyError):
    """A worker name that is not in the configuration."""


class Remediator:
    """Acts on firing alerts within the configured policy; see the module doc."""

    def __init__(
        self,
        config: RemediationConfig,
        workers: Sequence[WorkerConfig],
        backends: Mapping[str, WorkerBackend],
        store: Store,
        state_dir: Path,
        *,
        notify: Notify | None = None,
        live: LiveControl | None = None,
        clocks: Clocks | None = None,
        scheduler: Scheduler | None = None,
        health: StateHealth | None = None,
        gates: Sequence[ActionGate] = (),
        groups: GroupActions | None = None,
        tick_interval: float = 5.0,
        startup_grace: float = 60.0,
        backend_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self._workers = {w.name: WorkerRuntime(w, backends.get(w.name)) for w in workers}
        self._gpu_owner = {gpu: w.name for w in workers for gpu in w.gpus}
        self._store = store
        self._state_dir = state_dir
        self._notify = notify
        self._live = live
        self._clocks = clocks or SystemClocks()
        self._scheduler = scheduler or Scheduler()
        self._health = health if health is not None else StateHealth()
        self._tick_interval = tick_interval
        # Alerts restored after a restart show up in the store only after the first
        # evaluations: no stepping up before they had a chance to.
        self._startup_grace = startup_grace
        self._backend_timeout = backend_timeout
        # The host-wide slot first; a fleet-wide disruption budget would come after it.
        self._host_slots = HostSlots(config.max_concurrent)
        self._gates = Gates([self._host_slots, *gates])
        # A group action takes its fleet slot itself (one for the whole group).
        self._host_gate = Gates([self._host_slots])
        self._groups = groups
        # This host's part in group actions other hosts (or it) started: the executor of
        # the fleet's group steps.
        self.group_steps = GroupMemberSteps(self)

        self._history: list[HistoryEntry] = []
        self._episodes: dict[tuple[str, str], float] = {}  # (episode, action) -> when it acted (steady)
        self._counters: dict[tuple[str, str, str], float] = {}
        self._paused = False
        self._started_at = 0.0
        self._pruned_at = -math.inf
        self._circuit_was_open = False
        self._ready = False  # start() has loaded the journal
        # Journal writes, commands and file work of remediation: never behind a hung query.
        self._threads = WorkerThreads("remediation", 2)
        self._journal_thread = WorkerThreads("remediation-journal", 1)
        self._journal: JournalWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: set[asyncio.Future[Any]] = set()  # journal writes handed over, not awaited
        self._tick_job: Job | None = None
        for name, type_, help_ in _METRICS:
            store.set_meta(name, type_, help_)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, settle interrupted actions, start supervised workers and the tick."""
        journal = await self._journal_thread.run(Journal.in_dir, self._state_dir, self._health)
        writer = self._journal = JournalWriter(journal, self._journal_thread, self._health)
        clocks = self._clocks
        self._started_at = clocks.steady()
        interrupted = await self._mark_interrupted(writer)
        records = await writer.read(journal.load_workers)
        self._paused = (await writer.read(journal.get_meta, "paused", "0")) == "1"
        # Every (worker, action, outcome) counter exists from the start at 0, as client
        # libraries advise: a Prometheus scraping /metrics never sees a counter born at 1,
        # so increase() works there too (CudaOOMAfterReduction reads these).
        for name in self._workers:
            for action in ACTIONS:
                for outcome in (*OUTCOMES, "interrupted"):
                    if outcome != "started":
                        self._counters.setdefault((name, action, outcome), 0.0)
        await self._load_history(writer, journal)
        for rt in self._workers.values():
            record = records.get(rt.name)
            rt.restore(await self._reconcile(rt, record), clocks)
            # A command a crashed Sentinel left running is waited for ("settling") before
            # the worker is verified or acted on again.
            leftover = await self._threads.run(has_leftovers, self._state_dir, rt.name)
            reverify = (record is not None and record.reverify) or any(r.worker == rt.name for r in interrupted)
            if reverify or leftover:
                rt.begin("verify", "settling" if leftover else "verifying", clocks.steady())
            self._persist(rt)
        for row in interrupted:
            self._count(row.worker, row.action, "interrupted")
            log.warning(
                "%s on worker %s (started %s) was interrupted by a Sentinel restart; re-verifying the worker",
                row.action,
                row.worker,
                _local_time(row.started),
            )
        await self._start_supervised()
        for rt in self._workers.values():
            if rt.state.in_flight == "verify":
                # Rows interrupted by this start, or by a shutdown: both wait for a verdict.
                rows_of = await writer.read(journal.awaiting_reverify, rt.name)
                self._spawn(self._reverify(rt, rows_of))
        await self._refresh_units()
        self.publish_metrics()
        self._ready = True
        self._tick_job = self._scheduler.add(
            "remediation", self._tick_job_run, self._tick_interval, first_run_in=self._tick_interval
        )
        log.info(
            "remediation started in %s mode for %d worker(s)%s%s",
            self.config.mode,
            len(self._workers),
            " (paused)" if self._paused else "",
            "" if journal.durable else " with the journal in memory only",
        )

    async def close(self) -> None:
        """Stop acting; actions cut short are journaled as interrupted and re-verified next start.

        The backends belong to whoever built them and are not closed here. Nothing here
        waits for a thread: a journal stuck on a dead disk cannot hold up the shutdown.
        """
        if self._tick_job is not None:
            job, self._tick_job = self._tick_job, None
            if self._scheduler.get(job.name) is job:
                self._scheduler.remove(job.name)
            await job.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ready = False
        try:
            if self._journal is not None:
                writer, self._journal = self._journal, None
                try:
                    left = await writer.read(writer.journal.mark_interrupted, self._clocks.wall(), INTERRUPTED)
                    if left:
                        log.warning("%d action(s) cut short; re-verified at next start", len(left))
                except sqlite3.Error as exc:
                    log.warning("cannot mark actions cut short as interrupted (the next start will): %s", exc)
                finally:
                    await self._journal_thread.run(writer.close)
        finally:
            self._journal_thread.shutdown(wait=False)
            self._threads.shutdown(wait=False)

    def reconfigure(self, config: RemediationConfig) -> None:
        """Take a reloaded policy (mode, routes, limits, ladder); worker state and history stay.

        Workers and backends are fixed for the life of a Remediator: build a new one when they change.
        """
        self._host_slots.resize(config.max_concurrent)
        if config.mode != self.config.mode:
            log.warning("remediation mode changed from %s to %s", self.config.mode, config.mode)
        self.config = config
        self.publish_metrics()

    async def wait_idle(self) -> None:
        """Wait until no action, verification or journal write is pending (tests, shutdown)."""
        while self._tasks or self._pending:
            await asyncio.gather(*list(self._tasks), *list(self._pending), return_exceptions=True)

    # -- an alert's path ----------------------------------------------------------------------

    def on_alert(self, event: AlertEvent) -> None:
        """RuleManager subscriber: act on alerts that start firing (module doc)."""
        if not self._ready:
            log.debug("remediation not started yet; ignoring %s", event.alert.labels.get("alertname"))
            return
        transition = event.transition
        if transition.current is not AlertState.FIRING or transition.previous is AlertState.FIRING:
            return
        name = self.worker_for(transition.alert.labels)
        if name is None:
            return
        rt, why = self._workers[name], Why.of(event)
        self._note_trouble(rt, why.alertname, self._clocks.steady())
        for action, params in route_actions(self.config.routes, why.labels):
            if why.episode and (why.episode, action) in self._episodes:
                log.info("alert %s on %s: this episode already led to %s; not again", why.alertname, name, action)
                continue
            self._handle(Request(name, action, "alert", params), why)

    def worker_for(self, labels: Mapping[str, str]) -> str | None:
        """The configured worker an alert is about: its `worker` label, else the owner of its `gpu`."""
        name = labels.get("worker", "")
        if name in self._workers:
            return name
        gpu = labels.get("gpu", "")
        if not name and gpu.isdigit():
            return self._gpu_owner.get(int(gpu))
        return None

    def _handle(self, request: Request, why: Why) -> None:
        """Decide one request and apply everything that follows from it (policy.resolve)."""
        rt, now = self._workers[request.worker], self._clocks.steady()
        key = request.action or "escalate"
        res = resolve(
            self.config,
            rt.spec(self._live),
            rt.state,
            self._history,
            request,
            now,
            total_workers=len(self._workers),
            globally_paused=self._paused,
            deferred=key in rt.deferred,
            alertname=why.alertname,
        )
        if res.decision.circuit_open:
            self._note_circuit(True)
        before, rt.state = rt.state, res.state
        if res.defer:
            rt.deferred[key] = (request, why)
        elif res.defer is False:
            rt.deferred.pop(key, None)
        if res.counts:
            plan = res.decision.plan
            assert plan is not None
            self._history.append(HistoryEntry(rt.name, plan.action, now, self.config.mode))
            if why.episode and request.trigger == "alert":
                self._episodes[(why.episode, plan.action)] = now
        self._log_resolution(rt, request, why, res)
        if res.persist:
            self._persist(rt)
        if res.record is not None:
            self._record_now(rt, res, request.trigger, why, before)
        if res.start is not None:
            rt.begin(res.start.action, "acting", now)
            self._spawn(self._carry_out(rt, res.start, request, why, res.decision.reason, before))
        self.publish_metrics()

    async def _carry_out(
        self, rt: WorkerRuntime, plan: Plan, request: Request, why: Why, reason: str, before: WorkerState
    ) -> None:
        """journal -> admission -> perform -> verify -> finish -> report (module doc)."""
        spec, trigger = rt.spec(self._live), request.trigger
        target = spec.profile(plan.to_index)
        entry = await self._journal_start(rt, plan, trigger, why)  # 1. journal (write-ahead)
        self._report(self._action_report(entry.row, "started", reason + _unsaved(entry)))
        ctx = ActionContext(
            worker=rt.name,
            action=plan.action,
            alertname=why.alertname,
            fingerprint=why.fingerprint,
            profile=target.name,
            previous_profile=spec.profile(plan.from_index).name,
            labels=dict(why.labels),
        )
        started = self._clocks.steady()
        healthy_after: float | None = None
        admission = Admission(rt.name, plan.action, plan.disruptive, alert=why.alertname)
        group = self._group_of(rt.name, plan)
        gates = self._gates if group is None else self._host_gate
        async with gates.admit(admission) as refusal:  # 2. admission
            if refusal is None and group is not None:  # 3+4. the group action, verified by its plan
                error, refusal = await self._group_action(rt, plan, target.name, why, trigger, admission)
                if not error and refusal is None:
                    healthy_after = self._clocks.steady() - started
            else:
                error = refusal.reason if refusal is not None else await self._perform(rt, plan, ctx, target)  # 3.
                if not error and refusal is None and plan.verify:
                    rt.enter("verifying", self._clocks.steady())
                    ok, detail = await self._verify(rt, self._clocks.wall())  # 4. verify
                    if ok:
                        healthy_after = self._clocks.steady() - started
                    else:
                        error = f"not healthy within {self.config.verify_timeout:g}s: {detail}"
        if admission.notes:
            reason = "; ".join([reason, *admission.notes])
            if error and refusal is None:
                error = "; ".join([error, *admission.notes])
        if refusal is not None:
            # It never ran: as if it had not been decided (no budget, cooldown or ladder step used).
            rt.state = replace(before, in_flight=rt.state.in_flight)
            self._forget_attempt(rt.name, plan.action, why)
        elif error and plan.live:
            # Nothing changed in the worker: keep believing the profile it still runs.
            rt.state = replace(rt.state, profile_index=plan.from_index)
        outcome: Outcome = "skipped" if refusal is not None else "failed" if error else "succeeded"
        finished = await self._journal_finish(rt, entry, plan, outcome, error, healthy_after, why, trigger)  # 5.
        self._count(rt.name, plan.action, outcome)  # 6. report
        if outcome == "succeeded":
            log.info(
                "worker %s: %s succeeded%s",
                rt.name,
                plan.action,
                f", healthy after {healthy_after:.1f}s" if healthy_after is not None else "",
            )
        else:
            log.error("worker %s: %s %s: %s", rt.name, plan.action, outcome, error)
        report = self._action_report(
            finished,
            outcome,
            error or reason,
            seconds_to_healthy=healthy_after,
            severity=("warning" if plan.escalates else "critical") if error else "info",
        )
        self._report(report)
        self.publish_metrics()
        if refusal is not None and refusal.transient and trigger == "alert":
            rt.deferred[request.action or "escalate"] = (request, why)
        elif error and refusal is None and plan.escalates:
            self._handle(Request(rt.name, None, "escalation"), why)

    def _group_of(self, worker: str, plan: Plan) -> str | None:
        """The serving group a disruptive action on `worker` must become (None: act alone)."""
        if self._groups is None or not plan.disruptive or plan.action not in DISRUPTIVE:
            return None
        return self._groups.group_of(worker)

    async def _group_action(
        self, rt: WorkerRuntime, plan: Plan, profile: str, why: Why, trigger: Trigger, admission: Admission
    ) -> tuple[str, Refusal | None]:
        """Run `plan` as one action of the worker's serving group; (error, refusal)."""
        assert self._groups is not None
        rt.enter("group", self._clocks.steady())
        request = GroupRequest(rt.name, plan.action, profile, why.alertname or trigger, why.alertname)
        result = await self._groups.run(request)
        text = f"group {result.group}: {result.detail}"
        if result.outcome == "done":
            admission.notes.append(text)
            return "", None
        if result.outcome == "failed":
            return text, None
        if result.outcome == "busy":  # another member host is restarting the group: handled there
            return "", Refusal("group", f"{text}; the fault is being handled by that action", transient=False)
        if result.outcome == "blocked":  # a member needs a human: not until a person resumes it
            return "", Refusal("group", text, transient=False)
        return "", Refusal("group", text, transient=True)

    async def _journal_start(self, rt: WorkerRuntime, plan: Plan, trigger: Trigger, why: Why) -> Entry:
        """The write-ahead row and the worker's new profile, on disk before anything happens."""
        spec, writer = rt.spec(self._live), self._require_journal()
        at = Instant.now(self._clocks)
        row = ActionRow(
            worker=rt.name,
            action=plan.action,
            mode="act",
            trigger=trigger,
            started=at.wall,
            alertname=why.alertname,
            fingerprint=why.fingerprint,
            episode=why.episode if trigger == "alert" else "",
            profile_before=spec.profile(plan.from_index).name,
            profile_after=spec.profile(plan.to_index).name,
            boot_id=at.boot,
            started_steady=at.steady,
        )
        entry = await writer.begin(row)
        await self._persist(rt)
        return entry

    async def _perform(self, rt: WorkerRuntime, plan: Plan, ctx: ActionContext, target: Any) -> str:
        """Run the action; the error text, or "" when it went through."""
        try:
            note = await perform(
                plan,
                ctx,
                target,
                backend=rt.backend,
                live=self._live,
                state_dir=self._state_dir,
                threads=self._threads,
                verify_timeout=self.config.verify_timeout,
            )
            if note:
                log.info("worker %s: %s: %s", rt.name, plan.action, note)
        except BackendError as exc:
            return str(exc) or type(exc).__name__
        except Exception as exc:
            log.exception("worker %s: %s raised", rt.name, plan.action)
            return f"{type(exc).__name__}: {exc}"
        return ""

    async def _journal_finish(
        self,
        rt: WorkerRuntime,
        entry: Entry,
        plan: Plan,
        outcome: Outcome,
        error: str,
        healthy_after: float | None,
        why: Why,
        trigger: Trigger,
    ) -> ActionRow:
        """The row's outcome and the worker's state after the action; returns the finished row."""
        profile_now = await self._close_row(rt, entry, outcome, error, healthy_after)
        if outcome == "succeeded" and plan.action == "stop":
            # A worker Sentinel took out of service stays out until a person says otherwise.
            reason = f"stopped by policy after {why.alertname or trigger}"
            rt.state = replace(rt.state, needs_human=True, needs_human_reason=reason)
        await self._persist(rt)
        finished = replace(entry.row, id=entry.id, outcome=outcome, error=error, profile_after=profile_now)
        self._remember(rt, finished, healthy_after)
        return finished

    async def _verify(self, rt: WorkerRuntime, since: float) -> tuple[bool, str]:
        """Poll the store until `verify.judge` says healthy with samples newer than `since`, or time runs out."""
        deadline = self._clocks.steady() + self.config.verify_timeout
        baseline = self._latest(rt.name, "sentinel_endpoint_progress_total")
        progress = Progress(baseline.value if baseline is not None else None)
        since_ms = int(since * 1000)
        while True:
            reading = HealthReading.fresh_from(
                lambda metric: self._latest(rt.name, metric), since_ms, bool(rt.config.endpoint)
            )
            if reading.needs_unit and rt.backend is not None:
                reading = await self._with_unit(rt.backend, reading)
            ok, detail, progress = judge(reading, progress)
            if ok:
                return True, ""
            if self._clocks.steady() >= deadline:
                return False, detail
            await asyncio.sleep(self.config.verify_interval)

    async def _with_unit(self, backend: WorkerBackend, reading: HealthReading) -> HealthReading:
        try:
            unit = await wait_for(backend.state(), self._backend_timeout)
        except Exception as exc:
            return replace(reading, unit_error=str(exc) or type(exc).__name__)
        return replace(reading, unit=unit)

    async def _reverify(self, rt: WorkerRuntime, rows: Sequence[ActionRow]) -> None:
        """After a restart: wait out what the crashed Sentinel left running, then verify the worker."""
        leftovers = await settle_leftovers(self._state_dir, rt.name, self._threads, self._clocks)
        rt.enter("verifying", self._clocks.steady())
        ok, detail = await self._verify(rt, self._clocks.wall())
        writer = self._require_journal()
        for row in rows:
            if row.id is not None:
                await writer.set_verify(row.id, "passed" if ok else "failed")
        rt.end()
        await self._persist(rt)
        last = rows[-1] if rows else None
        why = Why(last.alertname, last.fingerprint, last.episode) if last else Why()
        if last is not None:
            message = f"{last.action} was interrupted by a Sentinel restart; "
        else:
            message = "a command of the previous Sentinel was still running; "
        if leftovers:
            message += "; ".join(left.describe() for left in leftovers) + "; "
        if ok:
            log.info("worker %s re-verified healthy after an interrupted action", rt.name)
        else:
            log.error("worker %s is not healthy after an interrupted action: %s", rt.name, detail)
        if last is not None:
            profile = rt.spec(self._live).profile(rt.state.profile_index).name
            self._report(
                self._action_report(
                    replace(last, profile_after=profile),
                    "succeeded" if ok else "failed",
                    message + ("the worker is healthy" if ok else f"the worker is not healthy: {detail}"),
                    severity="info" if ok else "warning",
                )
            )
        self.publish_metrics()
        if not ok and self.config.mode == "act":
            self._handle(Request(rt.name, None, "escalation"), why)

    # -- decisions that finish at once ----------------------------------------------------------

    def _record_now(self, rt: WorkerRuntime, res: Resolution, trigger: Trigger, why: Why, before: WorkerState) -> None:
        """Journal and report a decision that finishes at once (skip, would_act, needs_human, notify_only)."""
        record = res.record
        assert record is not None
        spec, at = rt.spec(self._live), Instant.now(self._clocks)
        row = ActionRow(
            worker=rt.name,
            action=record.action,
            mode=self.config.mode,
            trigger=trigger,
            started=at.wall,
            finished=at.wall,
            outcome=record.outcome,
            error=record.detail,
            alertname=why.alertname,
            fingerprint=why.fingerprint,
            episode=why.episode if trigger == "alert" else "",
            profile_before=spec.profile(before.profile_index).name,
            profile_after=spec.profile(record.profile_after).name,
            boot_id=at.boot,
            started_steady=at.steady,
        )
        self._track(self._require_journal().record(row))
        self._count(rt.name, record.action, record.outcome)
        self._remember(rt, row, None)
        self._report(self._action_report(row, record.outcome, record.detail, severity=record.severity))

    def _forget_attempt(self, worker: str, action: str, why: Why) -> None:
        for i in range(len(self._history) - 1, -1, -1):
            if self._history[i].worker == worker and self._history[i].action == action:
                del self._history[i]
                break
        self._episodes.pop((why.episode, action), None)

    def _log_resolution(self, rt: WorkerRuntime, request: Request, why: Why, res: Resolution) -> None:
        decision, asked = res.decision, request.action or "escalate"
        if decision.verdict == "skip" and request.trigger == "recovery":
            log.debug("worker %s: not stepping up now: %s", rt.name, decision.reason)
        elif decision.verdict == "skip" and res.record is not None:
            log.info("worker %s: not acting on %s (%s): %s", rt.name, why.alertname or "-", asked, decision.reason)
        elif decision.verdict == "needs_human" and self.config.mode == "act":
            log.error(
                "worker %s needs a human; not acting on it until `sentinel resume %s`: %s",
                rt.name,
                rt.name,
                decision.reason,
            )
        elif res.start is not None:
            spec, plan = rt.spec(self._live), res.start
            log.warning(
                "worker %s: %s%s (%s -> %s): %s",
                rt.name,
                plan.action,
                " (live)" if plan.live else "",
                spec.profile(plan.from_index).name,
                spec.profile(plan.to_index).name,
                decision.reason,
            )

    # -- operator controls ------------------------------------------------------------------

    async def pause(self, worker: str | None = None) -> None:
        """Stop starting actions on `worker` (or on every worker); running ones finish."""
        if worker is None:
            self._paused = True
            await self._require_journal().set_meta("paused", "1")
        else:
            rt = self._runtime(worker)
            rt.state = replace(rt.state, paused=True)
            await self._persist(rt)
        log.warning("remediation paused on %s by the operator", worker or "all workers")
        self.publish_metrics()

    async def resume(self, worker: str | None = None) -> None:
        """Act again on `worker` (or every worker); also clears needs_human and restarts the ladder."""
        if worker is None:
            self._paused = False
            await self._require_journal().set_meta("paused", "0")
            runtimes = list(self._workers.values())
        else:
            runtimes = [self._runtime(worker)]
        for rt in runtimes:
            state = rt.state
            rt.state = replace(state, paused=False, needs_human=False, needs_human_reason="", escalation=0)
            if state.needs_human:
                log.warning("worker %s: needs_human cleared by the operator", rt.name)
            await self._persist(rt)
        log.warning("remediation resumed on %s by the operator", worker or "all workers")
        self.publish_metrics()

    # -- serving groups: what this host's part in a group action needs (groups.py) ---------

    @property
    def clocks(self) -> Clocks:
        return self._clocks

    def runtime_of(self, worker: str) -> WorkerRuntime | None:
        return self._workers.get(worker)

    async def persist_worker(self, rt: WorkerRuntime) -> None:
        await self._persist(rt)

    def latest_sample(self, worker: str, metric: str) -> Sample | None:
        return self._latest(worker, metric)

    async def with_unit(self, backend: WorkerBackend, reading: HealthReading) -> HealthReading:
        return await self._with_unit(backend, reading)

    async def backend_verb(self, rt: WorkerRuntime, verb: str, ctx: ActionContext) -> str:
        """`start` (with the worker's current profile) or `stop`; the error text, or ""."""
        backend = rt.backend
        if backend is None:
            return f"worker {rt.name} has no backend"
        try:
            if verb == "stop":
                await backend.stop(ctx)
            else:
                await backend.start(rt.spec(self._live).profile(rt.state.profile_index), ctx)
        except BackendError as exc:
            return str(exc) or type(exc).__name__
        except Exception as exc:
            log.exception("worker %s: %s raised", rt.name, verb)
            return f"{type(exc).__name__}: {exc}"
        return ""

    async def journal_begin(self, row: ActionRow) -> Entry:
        return await self._require_journal().begin(row)

    def note_group_action(self, entry: HistoryEntry) -> None:
        """An action another host's group action carried out here: budgets, cooldowns, the breaker."""
        self._history.append(entry)
        self.publish_metrics()

    def report_row(self, row: ActionRow, outcome: Outcome, detail: str) -> None:
        self._report(self._action_report(row, outcome, detail, severity="info"))

    async def _close_row(
        self, rt: WorkerRuntime, entry: Entry, outcome: Outcome, error: str, healthy_after: float | None
    ) -> str:
        """Journal how an action ended and end it on the worker; the profile it runs now."""
        now_wall = self._clocks.wall()
        if outcome == "succeeded":
            rt.healed_at = now_wall
        profile_now = rt.spec(self._live).profile(rt.state.profile_index).name
        await self._require_journal().finish(
            entry, outcome, now_wall, error=error, profile_after=profile_now, seconds_to_healthy=healthy_after
        )
        rt.end()
        return profile_now

    async def journal_group_finish(
        self,
        rt: WorkerRuntime,
        entry: Entry,
        outcome: Outcome,
        error: str,
        healthy_after: float | None,
        detail: str,
    ) -> None:
        """Finish this host's row of a group action: journal, state, counters, report."""
        profile_now = await self._close_row(rt, entry, outcome, error, healthy_after)
        await self._persist(rt)
        row = replace(entry.row, id=entry.id, outcome=outcome, error=error, profile_after=profile_now)
        self._remember(rt, row, healthy_after)
        self._count(rt.name, row.action, outcome)
        severity = "warning" if error else "info"
        self._report(self._action_report(row, outcome, detail, seconds_to_healthy=healthy_after, severity=severity))
        self.publish_metrics()

    # -- views --------------------------------------------------------------------------

    def workers_json(self) -> dict[str, Any]:
        """Mode, global pause, breaker and each worker's profile and state (GET /api/v1/workers)."""
        return {
            "mode": self.config.mode,
            "paused": self._paused,
            "circuit_breaker_open": self._circuit_now(),
            "max_concurrent": self.config.max_concurrent,
            "ladder_steps": len(ladder_slots(self.config.ladder)),
            "in_flight": sum(1 for rt in self._workers.values() if rt.state.in_flight is not None),
            "journal": self._health.store("journal").as_json(),
            "workers": [rt.status_json(self._clocks, self._paused) for rt in self._workers.values()],
        }

    async def actions_json(self, limit: int = 50, worker: str | None = None) -> list[dict[str, Any]]:
        """The newest journal rows first (GET /api/v1/actions); empty before start()."""
        if self._journal is None:
            return []
        rows = await self._journal.read(self._journal.journal.recent, limit, worker)
        return [r.as_json() for r in rows]

    def known_worker(self, name: str) -> bool:
        return name in self._workers

    # -- periodic ---------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass: trouble from firing alerts, deferred requests, recovery, held writes, series."""
        now = self._clocks.steady()
        firing = self._scan_firing(now)
        self._retry_deferred(firing)
        if now - self._started_at >= self._startup_grace:
            for rt in self._workers.values():
                self._recover(rt, now)
        horizon = max(self.config.budget.window, self.config.circuit_breaker.window, self.config.cooldown)
        self._history = [e for e in self._history if e.at > now - horizon]
        writer = self._require_journal()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self._episodes = {k: t for k, t in self._episodes.items() if t > now - EPISODE_MEMORY_S}
            self._track(writer.prune(self._clocks.wall() - JOURNAL_RETENTION_S))
        await writer.retry()
        await self._refresh_units()
        self._note_circuit(self._circuit_now())
        self.publish_metrics()

    async def _tick_job_run(self) -> None:
        await self.tick()

    def _scan_firing(self, now: float) -> set[tuple[str, str]]:
        # The store's ALERTS series also hold alerts restored after a restart, which
        # produce no transition: this is how they keep a worker from stepping up.
        matchers = [LabelMatcher("__name__", MatchOp.EQ, "ALERTS"), LabelMatcher("alertstate", MatchOp.EQ, "firing")]
        firing: set[tuple[str, str]] = set()
        for sample in self._store.instant(matchers, int(self._clocks.wall() * 1000)):
            labels = dict(sample.labels)
            name = self.worker_for(labels)
            if name is None:
                continue
            firing.add((name, labels.get("alertname", "")))
            self._note_trouble(self._workers[name], labels.get("alertname", ""), now, quiet=True)
        return firing

    def _note_trouble(self, rt: WorkerRuntime, alertname: str, now: float, *, quiet: bool = False) -> None:
        """A cause of earlier actions fires: its stable clock starts over (persisted at most once a minute)."""
        before = rt.state
        rt.state = note_trouble(before, alertname, now)
        if rt.state == before:
            return
        # An alert arriving is worth a write; a rescan of firing alerts only delays a step
        # up after a restart, so once a minute is enough on disk.
        if not quiet or rt.state.last_trouble_at - rt.trouble_saved >= 60.0:
            self._persist(rt)

    def _retry_deferred(self, firing: set[tuple[str, str]]) -> None:
        for rt in self._workers.values():
            for key, (request, why) in list(rt.deferred.items()):
                if (rt.name, why.alertname) not in firing:
                    del rt.deferred[key]  # the alert is gone: nothing left to heal
                elif why.episode and request.action and (why.episode, request.action) in self._episodes:
                    del rt.deferred[key]  # this episode was acted on meanwhile
                elif rt.healed_at >= why.active_at:
                    # Another action healed the worker after this alert began (the EngineDead
                    # that came with an OOM, say): acting again would only be a storm.
                    del rt.deferred[key]
                elif self._retry_blocked(rt, request, why):
                    continue  # the same gate would refuse again: no row, no report, until it passes
                else:
                    self._handle(request, why)

    def _retry_blocked(self, rt: WorkerRuntime, request: Request, why: Why) -> bool:
        """Whether a gate can already tell that a deferred request would be refused again."""
        action = request.action or "escalate"
        disruptive = request.action is None or request.action in DISRUPTIVE
        refusal = self._gates.precheck(Admission(rt.name, action, disruptive, alert=why.alertname))
        if refusal is not None:
            log.debug("worker %s: %s still held back by the %s gate: %s", rt.name, action, refusal.gate, refusal.reason)
        return refusal is not None

    def _recover(self, rt: WorkerRuntime, now: float) -> None:
        step = recovery_step(self.config, rt.spec(self._live), rt.state, now)
        if step == "forgive":
            rt.state = forgiven(rt.state)
            log.info("worker %s stable for %gs: escalation ladder starts over", rt.name, self.config.stable_for)
            self._persist(rt)
        elif step == "restore" and self.config.mode == "act" and not self._host_slots.full:
            self._handle(Request(rt.name, "restore", "recovery"), Why())

    async def _refresh_units(self) -> None:
        async def one(rt: WorkerRuntime, backend: WorkerBackend) -> None:
            try:
                rt.unit = await wait_for(backend.state(), self._backend_timeout)
            except Exception as exc:
                rt.unit = UnitState("unknown", f"state unavailable: {exc or type(exc).__name__}")

        await asyncio.gather(*(one(rt, rt.backend) for rt in self._workers.values() if rt.backend is not None))

    # -- start-up ---------------------------------------------------------------------------

    async def _mark_interrupted(self, writer: JournalWriter) -> list[ActionRow]:
        """Rows left without a finish by the last run; on a disk that refuses writes, still known."""
        journal = writer.journal
        try:
            return await writer.read(journal.mark_interrupted, self._clocks.wall(), INTERRUPTED)
        except sqlite3.Error as exc:
            self._health.write_failed("journal", "the interrupted actions of the last run", exc)
            rows = await writer.read(journal.unfinished)
            for row in rows:
                await writer.finish(Entry(row, row.id), "interrupted", self._clocks.wall(), error=INTERRUPTED)
            return rows

    async def _load_history(self, writer: JournalWriter, journal: Journal) -> None:
        """Budgets, cooldowns and episodes from the journal, onto the steady clock."""
        clocks = self._clocks
        now, wall, boot = clocks.steady(), clocks.wall(), clocks.boot_id()
        horizon = max(self.config.budget.window, self.config.circuit_breaker.window, self.config.cooldown)
        for row in await writer.read(journal.acted_since, wall - horizon, boot):
            age = elapsed_since(Instant(row.started, row.boot_id, row.started_steady), clocks)
            if age < horizon:
                self._history.append(HistoryEntry(row.worker, row.action, now - age, row.mode))
        for key, at in (await writer.read(journal.acted_episodes, wall - EPISODE_MEMORY_S)).items():
            self._episodes[key] = now - elapsed_since(Instant(at), clocks)

    async def _reconcile(self, rt: WorkerRuntime, record: WorkerRecord | None) -> WorkerRecord | None:
        """Check the journaled profile against the one the backend recorded (its env file)."""
        backend = rt.backend
        if not isinstance(backend, ProfileRecord):
            return record
        try:
            applied = await wait_for(backend.active_profile(), self._backend_timeout)
        except Exception as exc:
            log.warning("worker %s: cannot read the profile its backend recorded: %s", rt.name, exc)
            return record
        if applied is None or applied not in {p.name for p in rt.config.profiles}:
            return record
        if record is None:
            # A fresh state directory: the backend knows where on the ladder the worker is.
            return WorkerRecord(profile=applied)
        if record.profile != applied and not rt.config.probe:
            # A crash between the journal write and the env file write: the file is what the
            # worker starts with. (With the probe a live batch change never touches the file.)
            log.warning(
                "worker %s: journal says profile %s, its backend applied %s; going by the backend",
                rt.name,
                record.profile,
                applied,
            )
            return replace(record, profile=applied)
        return record

    async def _start_supervised(self) -> None:
        # A supervised child exists only if Sentinel starts it: with the journaled profile,
        # so a step down survives a restart of Sentinel. Not remediation: observe mode too.
        for rt in self._workers.values():
            cfg = rt.config.backend
            if rt.backend is None or cfg is None or cfg.type != "process":
                continue
            profile = rt.spec(self._live).profile(rt.state.profile_index)
            try:
                await rt.backend.start(profile, ActionContext(worker=rt.name, action="start", profile=profile.name))
            except Exception as exc:
                log.error("worker %s: cannot start it with profile %s: %s", rt.name, profile.name, exc)

    # -- bookkeeping ------------------------------------------------------------------------

    def _remember(self, rt: WorkerRuntime, row: ActionRow, seconds_to_healthy: float | None) -> None:
        rt.last = {
            "action": row.action,
            "outcome": row.outcome,
            "at": row.finished if row.finished is not None else row.started,
            "alertname": row.alertname,
            "detail": row.error,
            "seconds_to_healthy": seconds_to_healthy,
        }

    def _count(self, worker: str, action: str, outcome: str) -> None:
        key = (worker, action, outcome)
        ts = int(self._clocks.wall() * 1000)
        labels = {"worker": worker, "action": action, "outcome": outcome}
        if key not in self._counters:
            # A new counter starts at 0 just before its first increment, so increase()
            # sees the first action (rules such as CudaOOMAfterReduction depend on it).
            self._store.add("sentinel_remediation_actions_total", 0.0, labels, ts - 1)
        self._counters[key] = self._counters.get(key, 0.0) + 1
        self._store.add("sentinel_remediation_actions_total", self._counters[key], labels, ts)

    def _action_report(
        self,
        row: ActionRow,
        outcome: Outcome,
        detail: str,
        *,
        seconds_to_healthy: float | None = None,
        severity: str = "info",
    ) -> ActionReport:
        return ActionReport(
            worker=row.worker,
            action=row.action,
            outcome=outcome,
            timestamp_ms=int(self._clocks.wall() * 1000),
            from_profile=row.profile_before or None,
            to_profile=row.profile_after or None,
            alertname=row.alertname or None,
            fingerprint=row.fingerprint or None,
            detail=detail,
            seconds_to_healthy=seconds_to_healthy,
            severity=severity,
        )

    def _report(self, report: ActionReport) -> None:
        if self._notify is None:
            return
        try:
            self._notify(report)
        except Exception:  # a broken notifier must not stop remediation
            log.exception("cannot hand over the report of %s on %s", report.action, report.worker)

    def publish_metrics(self) -> None:
        """Write every remediation series (one pass of the `remediation` source)."""
        out = Appender(self._store, _METRICS_SOURCE, int(self._clocks.wall() * 1000))
        for (worker, action, outcome), value in self._counters.items():
            out.add("sentinel_remediation_actions_total", value, worker=worker, action=action, outcome=outcome)
        in_flight = 0
        for rt in self._workers.values():
            spec, state = rt.spec(None), rt.state
            for index, profile in enumerate(spec.profiles or (spec.profile(0),)):
                active = 1.0 if index == state.profile_index else 0.0
                out.add("sentinel_worker_profile", active, worker=rt.name, profile=profile.name)
            out.add("sentinel_worker_needs_human", 1.0 if state.needs_human else 0.0, worker=rt.name)
            out.add("sentinel_remediation_paused", 1.0 if state.paused or self._paused else 0.0, worker=rt.name)
            in_flight += state.in_flight is not None
        out.add("sentinel_remediation_in_flight", float(in_flight))
        out.add("sentinel_remediation_circuit_breaker_open", 1.0 if self._circuit_now() else 0.0)
        out.commit()

    def _note_circuit(self, is_open: bool) -> None:
        # The skips it causes are reported (critical) one by one; here only the state change is logged.
        if is_open and not self._circuit_was_open:
            breaker = self.config.circuit_breaker
            log.error(
                "remediation circuit breaker open: more than %.0f%% of workers remediated within %gs; not acting",
                breaker.max_ratio * 100,
                breaker.window,
            )
        elif not is_open and self._circuit_was_open:
            log.warning("remediation circuit breaker closed again")
        self._circuit_was_open = is_open

    def _circuit_now(self) -> bool:
        cfg = self.config
        return circuit_open(self._history, cfg.circuit_breaker, cfg.mode, self._clocks.steady(), len(self._workers))

    def _persist(self, rt: WorkerRuntime) -> asyncio.Future[None]:
        """Queue the worker's state for the journal (awaitable; writes stay in call order)."""
        rt.trouble_saved = rt.state.last_trouble_at
        return self._track(self._require_journal().save_worker(rt.name, rt.record(self._clocks)))

    def _track(self, future: asyncio.Future[None]) -> asyncio.Future[None]:
        self._pending.add(future)
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("remediation journal write failed: %s", future.exception())

    def _latest(self, name: str, metric: str) -> Sample | None:
        matchers = [LabelMatcher("__name__", MatchOp.EQ, metric), LabelMatcher("worker", MatchOp.EQ, name)]
        samples = self._store.instant(matchers, int(self._clocks.wall() * 1000))
        return max(samples, key=lambda s: s.timestamp_ms, default=None)

    def _runtime(self, name: str) -> WorkerRuntime:
        if name not in self._workers:
            raise UnknownWorker(name)
        return self._workers[name]

    def _require_journal(self) -> JournalWriter:
        if self._journal is None:
            raise RuntimeError("the remediator is not started")
        return self._journal

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("remediation task failed", exc_info=task.exception())


def _unsaved(entry: Entry) -> str:
    return "" if entry.on_disk else " (not journaled yet: the state directory refuses writes; see the log)"


def _local_time(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
