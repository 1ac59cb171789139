"""The remediation engine: turns firing alerts into bounded, verified, journaled actions.

`Remediator.on_alert` is a RuleManager subscriber. It runs on the event loop and
decides at once, from in-memory state (see `policy` for the rules), so "one action
in flight per worker" holds without locks. Each action then runs as its own task:

    journal row (write-ahead) -> [host-wide slot] -> backend verb or live batch limit
    -> verification against the store -> journal finish, metrics, report
    -> on failure, the next step of the escalation ladder

`tick()` (every `tick_interval` once started) watches the alerts that caused actions,
steps workers back up after `stable_for`, and refreshes the exported series.

Times: `wall` (Unix seconds) for everything persisted or compared across restarts
(cooldowns, budgets, stable_for, journal rows, sample timestamps); `clock`
(monotonic) for the verification deadline and time-to-healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sentinel.config.base import parse_duration
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
from sentinel.remediation.journal import ActionRow, Journal, WorkerRecord, episode_key
from sentinel.remediation.policy import (
    Decision,
    HistoryEntry,
    Plan,
    Request,
    Trigger,
    WorkerSpec,
    WorkerState,
    circuit_open,
    decide,
    forgiven,
    ladder_slots,
    note_trouble,
    recovery_step,
    route_actions,
    state_after,
)
from sentinel.remediation.settings import ACTIONS, RemediationConfig
from sentinel.rules.manager import AlertEvent
from sentinel.rules.state import AlertState
from sentinel.store import Appender, LabelMatcher, MatchOp, Sample, Store

__all__ = ["Remediator", "UnknownWorker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Notify = Callable[[ActionReport], object]  # e.g. Notifier.report_action (its future is not awaited)

EXEC_TIMEOUT_S = 60.0
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


@dataclass(frozen=True)
class _Why:
    """The alert (if any) behind an action: for the journal, the backend and the report."""

    alertname: str = ""
    fingerprint: str = ""
    episode: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    active_at: float = 0.0  # when the alert became active (wall seconds)


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
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        tick_interval: float = 5.0,
        startup_grace: float = 60.0,
        backend_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self._workers = {w.name: w for w in workers}
        self._gpu_owner = {gpu: w.name for w in workers for gpu in w.gpus}
        self._backends = dict(backends)
        self._store = store
        self._state_dir = state_dir
        self._notify = notify
        self._live = live
        self._clock = clock
        self._wall = wall
        self._tick_interval = tick_interval
        # Alerts restored after a restart show up in the store only after the first
        # evaluations: no stepping up before they had a chance to.
        self._startup_grace = startup_grace
        self._backend_timeout = backend_timeout

        self._states: dict[str, WorkerState] = {}
        self._history: list[HistoryEntry] = []
        self._episodes: dict[tuple[str, str], float] = {}  # (episode, action) -> when it acted
        # Alert requests refused for a passing reason (cooldown, in flight): tried again on
        # each tick while their alert still fires, so a crash during a cooldown is healed.
        self._deferred: dict[tuple[str, str], tuple[Request, _Why]] = {}
        self._healed_at: dict[str, float] = {}  # worker -> when an action last verified it healthy
        self._pruned_at = 0.0
        self._paused = False
        self._started_at = 0.0
        self._in_flight_since: dict[str, float] = {}
        self._phase: dict[str, str] = {}  # "acting" or "verifying", while in flight
        self._trouble_saved: dict[str, float] = {}  # last_trouble_at as last persisted
        self._units: dict[str, UnitState] = {}
        self._last: dict[str, dict[str, Any]] = {}  # last finished decision per worker, for status
        self._counters: dict[tuple[str, str, str], float] = {}
        self._circuit_was_open = False
        self._ready = False  # start() has loaded the journal

        self._journal: Journal | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="remediation-journal")
        self._pending: set[asyncio.Future[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent)
        for name, type_, help_ in _METRICS:
            store.set_meta(name, type_, help_)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, settle interrupted actions, start supervised workers and the tick."""
        journal = await self._db(Journal.in_dir, self._state_dir)
        self._journal = journal
        now = self._wall()
        self._started_at = now
        interrupted = await self._db(journal.mark_interrupted, now, INTERRUPTED)
        records = await self._db(journal.load_workers)
        self._paused = (await self._db(journal.get_meta, "paused", "0")) == "1"
        # Every (worker, action, outcome) counter exists from the start at 0, as client
        # libraries advise: a Prometheus scraping /metrics never sees a counter born at 1,
        # so increase() works there too (CudaOOMAfterReduction reads these).
        for name in self._workers:
            for action in ACTIONS:
                for outcome in (*OUTCOMES, "interrupted"):
                    if outcome != "started":
                        self._counters.setdefault((name, action, outcome), 0.0)
        horizon = max(self.config.budget.window, self.config.circuit_breaker.window, self.config.cooldown)
        rows = await self._db(journal.acted_since, now - horizon)
        self._history = [HistoryEntry(r.worker, r.action, r.started, r.mode) for r in rows]
        self._episodes = await self._db(journal.acted_episodes, now - EPISODE_MEMORY_S)
        for name in self._workers:
            record = await self._reconcile(name, records.get(name))
            self._states[name] = self._state_from(self._spec(name), record, now)
            if record is not None and record.reverify:
                self._begin(name, "verify", "verifying")
            self._persist(name)
        for row in interrupted:
            self._count(row.worker, row.action, "interrupted")
            log.warning(
                "%s on worker %s (started %s) was interrupted by a Sentinel restart; re-verifying the worker",
                row.action,
                row.worker,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.started)),
            )
        await self._start_supervised()
        for name in self._workers:
            if self._states[name].in_flight == "verify":
                # Rows interrupted by this start, or by a shutdown: both wait for a verdict.
                rows_of = await self._db(journal.awaiting_reverify, name)
                self._spawn(self._reverify(name, rows_of))
        await self._refresh_units()
        self.publish_metrics()
        self._ready = True
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop(), name="remediation-tick")
        log.info(
            "remediation started in %s mode for %d worker(s)%s",
            self.config.mode,
            len(self._workers),
            " (paused)" if self._paused else "",
        )

    async def close(self) -> None:
        """Stop acting; actions cut short are journaled as interrupted and re-verified next start.

        The backends belong to whoever built them and are not closed here.
        """
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._ready = False
        if self._journal is not None:
            journal, self._journal = self._journal, None
            try:
                left = await self._db(journal.mark_interrupted, self._wall(), INTERRUPTED)
                if left:
                    log.warning("%d action(s) cut short; re-verified at next start", len(left))
            finally:
                await self._db(journal.close)
        self._executor.shutdown(wait=True)

    def reconfigure(self, config: RemediationConfig) -> None:
        """Take a reloaded policy (mode, routes, limits, ladder); worker state and history stay.

        Workers and backends are fixed for the life of a Remediator: build a new one when they change.
        """
        if config.max_concurrent != self.config.max_concurrent:
            # Actions holding a slot of the old semaphore finish with it; new ones use the new size.
            self._slots = asyncio.Semaphore(config.max_concurrent)
        if config.mode != self.config.mode:
            log.warning("remediation mode changed from %s to %s", self.config.mode, config.mode)
        self.config = config
        self.publish_metrics()

    async def wait_idle(self) -> None:
        """Wait until no action, verification or journal write is pending (tests, shutdown)."""
        while self._tasks or self._pending:
            await asyncio.gather(*list(self._tasks), *list(self._pending), return_exceptions=True)

    # -- alerts ---------------------------------------------------------------------------

    def on_alert(self, event: AlertEvent) -> None:
        """RuleManager subscriber: act on alerts that start firing."""
        if not self._ready:
            log.debug("remediation not started yet; ignoring %s", event.alert.labels.get("alertname"))
            return
        transition = event.transition
        if transition.current is not AlertState.FIRING or transition.previous is AlertState.FIRING:
            return
        alert = transition.alert
        labels = alert.labels
        worker = self.worker_for(labels)
        if worker is None:
            return
        alertname = labels.get("alertname", event.rule.name)
        now = self._wall()
        before = self._states[worker]
        self._states[worker] = note_trouble(before, alertname, now)
        if self._states[worker] != before:
            self._persist(worker)
        why = _Why(
            alertname,
            alert.fingerprint,
            episode_key(alert.fingerprint, alert.active_at_ms),
            labels,
            alert.active_at_ms / 1000,
        )
        for action, params in route_actions(self.config.routes, labels):
            if why.episode and (why.episode, action) in self._episodes:
                log.info("alert %s on %s: this episode already led to %s; not again", alertname, worker, action)
                continue
            self._request(Request(worker, action, "alert", params), why)

    def worker_for(self, labels: Mapping[str, str]) -> str | None:
        """The configured worker an alert is about: its `worker` label, else the owner of its `gpu`."""
        name = labels.get("worker", "")
        if name in self._workers:
            return name
        gpu = labels.get("gpu", "")
        if not name and gpu.isdigit():
            return self._gpu_owner.get(int(gpu))
        return None

    # -- operator controls ------------------------------------------------------------------

    async def pause(self, worker: str | None = None) -> None:
        """Stop starting actions on `worker` (or on every worker); running ones finish."""
        if worker is None:
            self._paused = True
            await self._db(self._require_journal().set_meta, "paused", "1")
        else:
            self._check_worker(worker)
            self._states[worker] = replace(self._states[worker], paused=True)
            await self._persist(worker)
        log.warning("remediation paused on %s by the operator", worker or "all workers")
        self.publish_metrics()

    async def resume(self, worker: str | None = None) -> None:
        """Act again on `worker` (or every worker); also clears needs_human and restarts the ladder."""
        names = list(self._workers) if worker is None else [worker]
        if worker is None:
            self._paused = False
            await self._db(self._require_journal().set_meta, "paused", "0")
        else:
            self._check_worker(worker)
        for name in names:
            state = self._states[name]
            self._states[name] = replace(state, paused=False, needs_human=False, needs_human_reason="", escalation=0)
            if state.needs_human:
                log.warning("worker %s: needs_human cleared by the operator", name)
            await self._persist(name)
        log.warning("remediation resumed on %s by the operator", worker or "all workers")
        self.publish_metrics()

    # -- views --------------------------------------------------------------------------

    def workers_json(self) -> dict[str, Any]:
        """Mode, global pause, breaker and each worker's profile and state (GET /api/v1/workers)."""
        now = self._wall()
        out = []
        for name in self._workers:
            spec, state = self._spec(name), self._states.get(name)
            if state is None:
                state = WorkerState(profile_index=spec.home_index)
            unit = self._units.get(name)
            in_flight = None
            if state.in_flight is not None:
                since = self._in_flight_since.get(name, now)
                in_flight = {
                    "action": state.in_flight,
                    "phase": self._phase.get(name, "acting"),
                    "since": since,
                    "seconds": round(now - since, 1),
                }
            out.append(
                {
                    "name": name,
                    "state": self._state_word(name, state),
                    "profile": spec.profile(state.profile_index).name,
                    "profile_index": state.profile_index,
                    "profiles": [p.name for p in spec.profiles],
                    "home_profile": spec.profile(spec.home_index).name,
                    "backend": type(self._backends[name]).__name__ if name in self._backends else None,
                    "unit": unit.state if unit else None,
                    "unit_detail": unit.detail if unit else None,
                    "needs_human": state.needs_human,
                    "needs_human_reason": state.needs_human_reason,
                    "paused": state.paused,
                    "in_flight": in_flight,
                    "escalation": state.escalation,
                    "trouble_alerts": sorted(state.trouble_alerts),
                    "last_trouble_at": state.last_trouble_at or None,
                    "last_action": self._last.get(name),
                    "gpus": list(self._workers[name].gpus),
                }
            )
        return {
            "mode": self.config.mode,
            "paused": self._paused,
            "circuit_breaker_open": self._circuit_now(),
            "max_concurrent": self.config.max_concurrent,
            "ladder_steps": len(ladder_slots(self.config.ladder)),
            "in_flight": sum(1 for s in self._states.values() if s.in_flight is not None),
            "workers": out,
        }

    async def actions_json(self, limit: int = 50, worker: str | None = None) -> list[dict[str, Any]]:
        """The newest journal rows first (GET /api/v1/actions); empty before start()."""
        if self._journal is None:
            return []
        rows = await self._db(self._journal.recent, limit, worker)
        return [r.as_json() for r in rows]

    def known_worker(self, name: str) -> bool:
        return name in self._workers

    # -- periodic ---------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass: trouble from firing alerts, recovery steps, unit states, exported series."""
        now = self._wall()
        self._scan_firing(now)
        if now - self._started_at >= self._startup_grace:
            for name in self._workers:
                self._recover(name, now)
        horizon = max(self.config.budget.window, self.config.circuit_breaker.window, self.config.cooldown)
        self._history = [e for e in self._history if e.at > now - horizon]
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self._episodes = {k: t for k, t in self._episodes.items() if t > now - EPISODE_MEMORY_S}
            self._submit(self._require_journal().prune, now - JOURNAL_RETENTION_S)
        await self._refresh_units()
        self._note_circuit(self._circuit_now())
        self.publish_metrics()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            try:
                await self.tick()
            except Exception:  # one bad pass must not end the loop
                log.exception("remediation tick failed")

    def _scan_firing(self, now: float) -> None:
        # The store's ALERTS series also hold alerts restored after a restart, which
        # produce no transition: this is how they keep a worker from stepping up.
        matchers = [LabelMatcher("__name__", MatchOp.EQ, "ALERTS"), LabelMatcher("alertstate", MatchOp.EQ, "firing")]
        firing: set[tuple[str, str]] = set()
        for sample in self._store.instant(matchers, int(now * 1000)):
            labels = dict(sample.labels)
            worker = self.worker_for(labels)
            if worker is None:
                continue
            firing.add((worker, labels.get("alertname", "")))
            self._states[worker] = note_trouble(self._states[worker], labels.get("alertname", ""), now)
        self._retry_deferred(firing)
        for name, state in self._states.items():
            # Once a minute is enough on disk: it only delays a step up after a restart.
            if state.last_trouble_at - self._trouble_saved.get(name, 0.0) >= 60.0:
                self._persist(name)

    def _retry_deferred(self, firing: set[tuple[str, str]]) -> None:
        for key, (request, why) in list(self._deferred.items()):
            if (request.worker, why.alertname) not in firing:
                del self._deferred[key]  # the alert is gone: nothing left to heal
                continue
            if why.episode and request.action and (why.episode, request.action) in self._episodes:
                del self._deferred[key]  # this episode was acted on meanwhile
                continue
            if self._healed_at.get(request.worker, -1.0) >= why.active_at:
                # Another action healed the worker after this alert began (the EngineDead
                # that came with an OOM, say): acting again would only be a storm.
                del self._deferred[key]
                continue
            self._request(request, why)

    def _recover(self, name: str, now: float) -> None:
        spec, state = self._spec(name), self._states[name]
        step = recovery_step(self.config, spec, state, now)
        if step == "forgive":
            self._states[name] = forgiven(state)
            log.info("worker %s stable for %gs: escalation ladder starts over", name, self.config.stable_for)
            self._persist(name)
        elif step == "restore" and self.config.mode == "act" and not self._slots.locked():
            self._request(Request(name, "restore", "recovery"), _Why())

    async def _refresh_units(self) -> None:
        async def one(name: str, backend: WorkerBackend) -> None:
            try:
                self._units[name] = await asyncio.wait_for(backend.state(), self._backend_timeout)
            except Exception as exc:
                self._units[name] = UnitState("unknown", f"state unavailable: {exc or type(exc).__name__}")

        await asyncio.gather(*(one(n, b) for n, b in self._backends.items() if n in self._workers))

    # -- deciding -----------------------------------------------------------------------

    def _request(self, request: Request, why: _Why) -> None:
        name = request.worker
        now = self._wall()
        spec, state = self._spec(name), self._states[name]
        decision = decide(
            self.config,
            spec,
            state,
            self._history,
            request,
            now,
            total_workers=len(self._workers),
            globally_paused=self._paused,
        )
        if decision.circuit_open:
            self._note_circuit(True)
        asked = request.action or "escalate"
        key = (name, request.action or "escalate")
        if decision.verdict == "skip":
            if request.trigger == "recovery":
                log.debug("worker %s: not stepping up now: %s", name, decision.reason)
                return
            if request.trigger == "alert" and decision.transient:
                if key in self._deferred:
                    return  # still waiting: journaled once already
                self._deferred[key] = (request, why)
            log.info("worker %s: not acting on %s (%s): %s", name, why.alertname or "-", asked, decision.reason)
            severity = "critical" if decision.circuit_open else "info"
            self._record(name, asked, "skipped", request.trigger, why, decision.reason, state, state, severity=severity)
            return
        if decision.verdict == "needs_human":
            self._needs_human(name, asked, request.trigger, why, decision, state, now)
            return
        self._deferred.pop(key, None)
        plan = decision.plan
        assert plan is not None
        if why.episode and request.trigger == "alert":
            self._episodes[(why.episode, plan.action)] = now
        if plan.action == "notify_only":
            self._record(name, plan.action, "succeeded", request.trigger, why, decision.reason, state, state)
            return
        self._history.append(HistoryEntry(name, plan.action, now, self.config.mode))
        if self.config.mode == "observe":
            after = replace(state, profile_index=plan.to_index)
            self._record(name, plan.action, "would_act", request.trigger, why, decision.reason, state, after)
            return
        self._states[name] = state_after(state, decision, why.alertname, request.trigger, now)
        self._in_flight_since[name] = now
        self._phase[name] = "acting"
        log.warning(
            "worker %s: %s%s (%s -> %s): %s",
            name,
            plan.action,
            " (live)" if plan.live else "",
            spec.profile(plan.from_index).name,
            spec.profile(plan.to_index).name,
            decision.reason,
        )
        self._spawn(self._carry_out(name, plan, request.trigger, why, decision.reason, now))
        self.publish_metrics()

    def _needs_human(
        self, name: str, asked: str, trigger: Trigger, why: _Why, decision: Decision, state: WorkerState, now: float
    ) -> None:
        if self.config.mode == "observe":
            detail = decision.reason + " (would mark the worker needs_human)"
            self._record(name, asked, "would_act", trigger, why, detail, state, state, severity="warning")
            return
        self._states[name] = state_after(state, decision, why.alertname, trigger, now)
        self._persist(name)
        log.error(
            "worker %s needs a human; not acting on it until `sentinel resume %s`: %s", name, name, decision.reason
        )
        self._record(name, asked, "needs_human", trigger, why, decision.reason, state, state, severity="critical")
        self.publish_metrics()

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
        return circuit_open(self._history, cfg.circuit_breaker, cfg.mode, self._wall(), len(self._workers))

    # -- acting -----------------------------------------------------------------------------

    async def _carry_out(self, name: str, plan: Plan, trigger: Trigger, why: _Why, reason: str, at: float) -> None:
        spec = self._spec(name)
        before, after = spec.profile(plan.from_index), spec.profile(plan.to_index)
        row = ActionRow(
            worker=name,
            action=plan.action,
            mode="act",
            trigger=trigger,
            started=at,
            alertname=why.alertname,
            fingerprint=why.fingerprint,
            episode=why.episode if trigger == "alert" else "",
            profile_before=before.name,
            profile_after=after.name,
        )
        journal = self._require_journal()
        # Write-ahead: the row and the worker's new profile are on disk before anything happens.
        row_id = await self._db(journal.insert, row)
        await self._persist(name)
        self._report(self._action_report(row, "started", reason))
        error = ""
        healthy_after: float | None = None
        async with self._slots if plan.disruptive else contextlib.nullcontext():
            started = self._clock()
            ctx = ActionContext(
                worker=name,
                action=plan.action,
                alertname=why.alertname,
                fingerprint=why.fingerprint,
                profile=after.name,
                previous_profile=before.name,
                labels=dict(why.labels),
            )
            try:
                await self._execute(name, plan, ctx)
            except BackendError as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:
                log.exception("worker %s: %s raised", name, plan.action)
                error = f"{type(exc).__name__}: {exc}"
            if error and plan.live:
                # Nothing changed in the worker: keep believing the profile it still runs.
                self._states[name] = replace(self._states[name], profile_index=plan.from_index)
            if not error and plan.verify:
                self._phase[name] = "verifying"
                ok, detail = await self._verify(name, self._wall())
                if ok:
                    healthy_after = self._clock() - started
                else:
                    error = f"not healthy within {self.config.verify_timeout:g}s: {detail}"
        outcome: Outcome = "failed" if error else "succeeded"
        if not error:
            self._healed_at[name] = self._wall()
        profile_now = spec.profile(self._states[name].profile_index).name
        await self._db(
            journal.finish,
            row_id,
            outcome,
            self._wall(),
            error=error,
            profile_after=profile_now,
            seconds_to_healthy=healthy_after,
        )
        state = replace(self._states[name], in_flight=None)
        if not error and plan.action == "stop":
            # A worker Sentinel took out of service stays out until a person says otherwise.
            reason = f"stopped by policy after {why.alertname or trigger}"
            state = replace(state, needs_human=True, needs_human_reason=reason)
        self._states[name] = state
        self._in_flight_since.pop(name, None)
        self._phase.pop(name, None)
        await self._persist(name)
        finished = replace(row, id=row_id, outcome=outcome, error=error, profile_after=profile_now)
        self._remember(finished, healthy_after)
        self._count(name, plan.action, outcome)
        if error:
            log.error("worker %s: %s failed: %s", name, plan.action, error)
        else:
            log.info(
                "worker %s: %s succeeded%s",
                name,
                plan.action,
                f", healthy after {healthy_after:.1f}s" if healthy_after is not None else "",
            )
        self._report(
            self._action_report(
                finished,
                outcome,
                error or reason,
                seconds_to_healthy=healthy_after,
                severity="warning" if error else "info",
            )
        )
        self.publish_metrics()
        if error:
            self._request(Request(name, None, "escalation"), why)

    async def _execute(self, name: str, plan: Plan, ctx: ActionContext) -> None:
        profile = self._spec(name).profile(plan.to_index)
        if plan.action == "exec":
            await _run_exec(plan.params, ctx)
            return
        if plan.live:
            assert self._live is not None and profile.batch_limit is not None
            await self._live.set_batch_limit(name, profile.batch_limit)
            return
        backend = self._backends.get(name)
        if backend is None:
            raise BackendError(f"worker {name} has no backend")
        if plan.action == "stop":
            await backend.stop(ctx)
        else:
            await backend.restart(profile, ctx)

    async def _verify(self, name: str, since: float) -> tuple[bool, str]:
        """Poll the store until the worker is healthy with samples newer than `since`, or time runs out."""
        deadline = self._clock() + self.config.verify_timeout
        baseline = self._latest(name, "sentinel_endpoint_progress_total")
        progress = _Progress(baseline.value if baseline is not None else None)
        while True:
            ok, detail = await self._healthy(name, int(since * 1000), progress)
            if ok:
                return True, ""
            if self._clock() >= deadline:
                return False, detail
            await asyncio.sleep(self.config.verify_interval)

    async def _healthy(self, name: str, since_ms: int, progress: _Progress) -> tuple[bool, str]:
        """Endpoint up, not stalled, and progressing if requests run; without an endpoint, the process."""

        def fresh(metric: str) -> Sample | None:
            sample = self._latest(name, metric)
            return sample if sample is not None and sample.timestamp_ms >= since_ms else None

        if self._workers[name].endpoint:
            up = fresh("sentinel_endpoint_up")
            if up is None or up.value != 1:
                return False, "endpoint not up" if up is not None else "no health probe since the action"
            stalled = fresh("sentinel_endpoint_stalled")
            if stalled is not None and stalled.value == 1:
                return False, "engine stalled: requests running, no tokens generated"
            running = fresh("sentinel_endpoint_requests_running")
            if running is not None and running.value > 0:
                counter = fresh("sentinel_endpoint_progress_total")
                if counter is None or not progress.advanced(counter.value):
                    return False, f"{running.value:g} requests running, no progress yet"
            return True, ""
        process = fresh("sentinel_worker_up")
        if process is not None:
            return (True, "") if process.value == 1 else (False, "no process of the worker found")
        backend = self._backends.get(name)
        if backend is None:
            return True, ""  # nothing to ask: the action's own success is all we know
        try:
            unit = await asyncio.wait_for(backend.state(), self._backend_timeout)
        except Exception as exc:
            return False, f"backend state unavailable: {exc}"
        return (True, "") if unit.running else (False, f"unit {unit.state}: {unit.detail}")

    async def _reverify(self, name: str, rows: Sequence[ActionRow]) -> None:
        ok, detail = await self._verify(name, self._started_at)
        journal = self._require_journal()
        for row in rows:
            if row.id is not None:
                await self._db(journal.set_verify, row.id, "passed" if ok else "failed")
        self._states[name] = replace(self._states[name], in_flight=None)
        self._in_flight_since.pop(name, None)
        self._phase.pop(name, None)
        await self._persist(name)
        last = rows[-1] if rows else None
        why = _Why(last.alertname, last.fingerprint, last.episode) if last else _Why()
        message = f"{last.action if last else 'an action'} was interrupted by a Sentinel restart; "
        if ok:
            log.info("worker %s re-verified healthy after an interrupted action", name)
        else:
            log.error("worker %s is not healthy after an interrupted action: %s", name, detail)
        if last is not None:
            self._report(
                self._action_report(
                    replace(last, profile_after=self._spec(name).profile(self._states[name].profile_index).name),
                    "succeeded" if ok else "failed",
                    message + ("the worker is healthy" if ok else f"the worker is not healthy: {detail}"),
                    severity="info" if ok else "warning",
                )
            )
        self.publish_metrics()
        if not ok and self.config.mode == "act":
            self._request(Request(name, None, "escalation"), why)

    # -- bookkeeping --------------------------------------------------------------------

    def _begin(self, name: str, action: str, phase: str) -> None:
        self._in_flight_since[name] = self._wall()
        self._phase[name] = phase
        self._states[name] = replace(self._states[name], in_flight=action)

    def _record(
        self,
        name: str,
        action: str,
        outcome: Outcome,
        trigger: Trigger,
        why: _Why,
        detail: str,
        before: WorkerState,
        after: WorkerState,
        *,
        severity: str = "info",
    ) -> None:
        """Journal and report a decision that finishes at once (skip, would_act, needs_human, notify)."""
        spec = self._spec(name)
        now = self._wall()
        row = ActionRow(
            worker=name,
            action=action,
            mode=self.config.mode,
            trigger=trigger,
            started=now,
            finished=now,
            outcome=outcome,
            error=detail,
            alertname=why.alertname,
            fingerprint=why.fingerprint,
            episode=why.episode if trigger == "alert" else "",
            profile_before=spec.profile(before.profile_index).name,
            profile_after=spec.profile(after.profile_index).name,
        )
        self._submit(self._require_journal().insert, row)
        self._count(name, action, outcome)
        self._remember(row, None)
        self._report(self._action_report(row, outcome, detail, severity=severity))
        self.publish_metrics()

    def _remember(self, row: ActionRow, seconds_to_healthy: float | None) -> None:
        self._last[row.worker] = {
            "action": row.action,
            "outcome": row.outcome,
            "at": row.finished if row.finished is not None else row.started,
            "alertname": row.alertname,
            "detail": row.error,
            "seconds_to_healthy": seconds_to_healthy,
        }

    def _count(self, worker: str, action: str, outcome: str) -> None:
        key = (worker, action, outcome)
        ts = int(self._wall() * 1000)
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
            timestamp_ms=int(self._wall() * 1000),
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
        ts = int(self._wall() * 1000)
        out = Appender(self._store, _METRICS_SOURCE, ts)
        for (worker, action, outcome), value in self._counters.items():
            out.add("sentinel_remediation_actions_total", value, worker=worker, action=action, outcome=outcome)
        in_flight = 0
        for name in self._workers:
            spec = self._spec(name)
            state = self._states.get(name) or WorkerState(profile_index=spec.home_index)
            for index, profile in enumerate(spec.profiles or (spec.profile(0),)):
                active = 1.0 if index == state.profile_index else 0.0
                out.add("sentinel_worker_profile", active, worker=name, profile=profile.name)
            out.add("sentinel_worker_needs_human", 1.0 if state.needs_human else 0.0, worker=name)
            out.add("sentinel_remediation_paused", 1.0 if state.paused or self._paused else 0.0, worker=name)
            in_flight += state.in_flight is not None
        out.add("sentinel_remediation_in_flight", float(in_flight))
        out.add("sentinel_remediation_circuit_breaker_open", 1.0 if self._circuit_now() else 0.0)
        out.commit()

    # -- helpers ------------------------------------------------------------------------

    def _spec(self, name: str) -> WorkerSpec:
        worker = self._workers[name]
        names = [p.name for p in worker.profiles]
        home = names.index(worker.initial_profile) if worker.initial_profile in names else 0
        # Asked each time: a probe may connect (or vanish) after Sentinel started.
        live = bool(worker.probe and self._live is not None and self._live.supports_live_batch_limit(name))
        return WorkerSpec(name, worker.profiles, home, name in self._backends, live)

    def _state_from(self, spec: WorkerSpec, record: WorkerRecord | None, now: float) -> WorkerState:
        if record is None:
            return WorkerState(profile_index=spec.home_index)
        names = [p.name for p in spec.profiles]
        if record.profile in names:
            index = names.index(record.profile)
        else:
            if record.profile and spec.profiles:
                log.warning(
                    "worker %s: journaled profile %r is no longer configured; using %s",
                    spec.name,
                    record.profile,
                    spec.profile(spec.home_index).name,
                )
            index = spec.home_index
        trouble_at = record.last_trouble_at
        if index != spec.home_index and not trouble_at:
            trouble_at = now  # stepped down at an unknown time: wait a full stable_for
        return WorkerState(
            profile_index=index,
            escalation=record.escalation,
            needs_human=record.needs_human,
            needs_human_reason=record.needs_human_reason,
            paused=record.paused,
            trouble_alerts=frozenset(record.trouble_alerts),
            last_trouble_at=trouble_at,
        )

    async def _reconcile(self, name: str, record: WorkerRecord | None) -> WorkerRecord | None:
        """Check the journaled profile against the one the backend recorded (its env file)."""
        backend = self._backends.get(name)
        if not isinstance(backend, ProfileRecord):
            return record
        try:
            applied = await asyncio.wait_for(backend.active_profile(), self._backend_timeout)
        except Exception as exc:
            log.warning("worker %s: cannot read the profile its backend recorded: %s", name, exc)
            return record
        worker = self._workers[name]
        if applied is None or applied not in {p.name for p in worker.profiles}:
            return record
        if record is None:
            # A fresh state directory: the backend knows where on the ladder the worker is.
            return WorkerRecord(profile=applied)
        if record.profile != applied and not worker.probe:
            # A crash between the journal write and the env file write: the file is what the
            # worker starts with. (With the probe a live batch change never touches the file.)
            log.warning(
                "worker %s: journal says profile %s, its backend applied %s; going by the backend",
                name,
                record.profile,
                applied,
            )
            return replace(record, profile=applied)
        return record

    def _record_of(self, name: str) -> WorkerRecord:
        state, spec = self._states[name], self._spec(name)
        return WorkerRecord(
            profile=spec.profile(state.profile_index).name,
            escalation=state.escalation,
            needs_human=state.needs_human,
            needs_human_reason=state.needs_human_reason,
            paused=state.paused,
            trouble_alerts=tuple(sorted(state.trouble_alerts)),
            last_trouble_at=state.last_trouble_at,
            reverify=state.in_flight == "verify",
        )

    def _persist(self, name: str) -> asyncio.Future[None]:
        """Queue the worker's state for the journal (awaitable; writes stay in call order)."""
        self._trouble_saved[name] = self._states[name].last_trouble_at
        return self._submit(self._require_journal().save_worker, name, self._record_of(name))

    def _state_word(self, name: str, state: WorkerState) -> str:
        if state.needs_human:
            return "needs_human"
        if state.paused or self._paused:
            return "paused"
        if state.in_flight is not None:
            return self._phase.get(name, "acting")
        if state.profile_index != self._spec(name).home_index:
            return "degraded"
        return "ok"

    def _latest(self, name: str, metric: str) -> Sample | None:
        matchers = [LabelMatcher("__name__", MatchOp.EQ, metric), LabelMatcher("worker", MatchOp.EQ, name)]
        samples = self._store.instant(matchers, int(self._wall() * 1000))
        return max(samples, key=lambda s: s.timestamp_ms, default=None)

    def _check_worker(self, name: str) -> None:
        if name not in self._workers:
            raise UnknownWorker(name)

    def _require_journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("the remediator is not started")
        return self._journal

    async def _start_supervised(self) -> None:
        # A supervised child exists only if Sentinel starts it: with the journaled profile,
        # so a step down survives a restart of Sentinel. Not remediation: observe mode too.
        for name, worker in self._workers.items():
            backend = self._backends.get(name)
            if backend is None or worker.backend is None or worker.backend.type != "process":
                continue
            profile = self._spec(name).profile(self._states[name].profile_index)
            try:
                await backend.start(profile, ActionContext(worker=name, action="start", profile=profile.name))
            except Exception as exc:
                log.error("worker %s: cannot start it with profile %s: %s", name, profile.name, exc)

    def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        return self._submit(fn, *args, **kwargs)

    def _submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        # run_in_executor submits now, to a single thread: journal writes keep call order.
        call = partial(fn, *args, **kwargs)
        future: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._pending.add(future)
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("remediation journal write failed: %s", future.exception())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("remediation task failed", exc_info=task.exception())


class _Progress:
    """Has the engine's progress counter moved past where it stood when verification began?"""

    def __init__(self, baseline: float | None) -> None:
        self.baseline = baseline

    def advanced(self, value: float) -> bool:
        if self.baseline is None:
            # No reading from before: the first one is the baseline, a later rise is progress.
            self.baseline = value
            return False
        return value > self.baseline


async def _run_exec(params: Mapping[str, str], ctx: ActionContext) -> None:
    """The operator's command, never through a shell; alert context in SENTINEL_* variables."""
    argv = shlex.split(params["argv"])
    timeout = parse_duration(params["timeout"]) if "timeout" in params else EXEC_TIMEOUT_S
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **ctx.environment()},
            start_new_session=True,
        )
    except OSError as exc:
        raise BackendError(f"cannot run {argv[0]!r}: {exc}") from exc
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise BackendError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip()[-300:]
        raise BackendError(f"{argv[0]} exited with status {proc.returncode}" + (f": {tail}" if tail else ""))
