"""Runs the rule groups: on their interval, and at once when an event touches them.

Each group is a job of the daemon's scheduler (`sentinel.runtime.scheduler`): it runs
on its interval, and early when an event names a metric the group reads (at most one
extra evaluation per `event_min_interval`), with the scheduler's missed-tick counting
and guard. Evaluation itself (PromQL is CPU work) runs in one dedicated thread, which
also owns the groups' alert state and writes it to SQLite; transitions come back to
the loop and go to subscribers (remediation, notifiers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sentinel.config.models import RulesConfig
from sentinel.promql import metric_names, reads_any_metric
from sentinel.rules.group import GroupEvaluator, QueryFn
from sentinel.rules.persist import FILENAME as STATE_FILE
from sentinel.rules.persist import AlertStateDB
from sentinel.rules.rulefile import Rule, RuleGroup
from sentinel.rules.state import Alert, AlertState, Transition, restore_active_at
from sentinel.runtime.scheduler import Job, Scheduler
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.health import StateHealth
from sentinel.store import Store, labels_from, now_ms
from sentinel.store.events import Event, EventBus

__all__ = ["AlertEvent", "RuleManager", "TransitionSubscriber"]

log = logging.getLogger(__name__)

HEARTBEAT_MS = 5_000
CLOSE_BUDGET_S = 0.5  # of the daemon's 2 s from SIGTERM to exit


@dataclass(frozen=True)
class AlertEvent:
    """An alert transition with the rule and group it belongs to."""

    transition: Transition
    rule: Rule
    group: str
    group_file: str

    @property
    def alert(self) -> Alert:
        return self.transition.alert


TransitionSubscriber = Callable[[AlertEvent], None]


class _GroupRunner:
    def __init__(self, evaluator: GroupEvaluator) -> None:
        self.evaluator = evaluator
        self.reads_all = any(reads_any_metric(r.expr) for r in evaluator.group.rules)
        self.metrics: set[str] = set()
        for rule in evaluator.group.rules:
            self.metrics |= metric_names(rule.expr)
        self.job: Job | None = None
        self.last_persist_ms = 0

    @property
    def event_evaluations_total(self) -> int:
        return self.job.early_runs_total if self.job is not None else 0

    def reads(self, metrics: Sequence[str]) -> bool:
        return self.reads_all or any(m in self.metrics for m in metrics)


class RuleManager:
    """Owns the rule groups of one daemon."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        query: QueryFn,
        config: RulesConfig,
        state_dir: Path | None,
        external_url: str,
        *,
        scheduler: Scheduler | None = None,
        health: StateHealth | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.query = query
        self.config = config
        self.external_url = external_url
        self._scheduler = scheduler or Scheduler()
        self._health = health if health is not None else StateHealth()
        self._db: AlertStateDB | None = None
        if state_dir is not None:
            # Never raises for a bad file: a corrupt one is moved aside, an unopenable one
            # kept in memory (alerting without restart safety beats no alerting at all).
            self._db = AlertStateDB(state_dir / STATE_FILE, health=self._health)
        self._runners: list[_GroupRunner] = []
        self._subscribers: list[TransitionSubscriber] = []
        self._executor = WorkerThreads("rule-eval", 1)
        self._unsubscribe: Callable[[], None] | None = None
        self._restored = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        store.set_meta("sentinel_rule_group_duration_seconds", "gauge", "Duration of the group's last evaluation.")
        store.set_meta(
            "sentinel_rule_group_last_evaluation_timestamp_seconds",
            "gauge",
            "Unix time of the group's last evaluation.",
        )
        store.set_meta("sentinel_rule_evaluation_failures_total", "counter", "Rule evaluations that failed.")
        store.set_meta("sentinel_rule_group_rules", "gauge", "Rules in the group.")
        store.set_meta(
            "sentinel_rule_group_event_evaluations_total",
            "counter",
            "Evaluations of the group triggered by an event rather than its interval.",
        )
        store.set_meta("sentinel_alerts", "gauge", "Active alerts by state.")

    # -- configuration --------------------------------------------------------------

    @property
    def groups(self) -> list[GroupEvaluator]:
        return [r.evaluator for r in self._runners]

    def subscribe(self, subscriber: TransitionSubscriber) -> None:
        self._subscribers.append(subscriber)

    async def apply(self, groups: Sequence[RuleGroup], config: RulesConfig | None = None) -> None:
        """Replace the running groups, carrying alert state over to identical rules."""
        if config is not None:
            self.config = config
        loop = asyncio.get_running_loop()
        self._loop = loop
        old = {r.evaluator.key: r for r in self._runners}
        for runner in self._runners:
            self._stop_job(runner)
        new_runners = [
            _GroupRunner(
                GroupEvaluator(
                    group,
                    self.store,
                    self.query,
                    interval_ms=int(self.config.interval * 1000),
                    external_labels=self.config.external_labels,
                    external_url=self.external_url,
                )
            )
            for group in groups
        ]
        # On the evaluation thread: an evaluation still running for a cancelled group
        # finishes first, so its state is carried over and its series cannot come back
        # after they were marked stale.
        await loop.run_in_executor(self._executor, self._hand_over, old, new_runners)
        self._runners = new_runners
        if self._unsubscribe is None:
            self._unsubscribe = self.bus.subscribe(self._on_event)
        for runner in self._runners:
            runner.job = self._scheduler.add(
                f"rules:{runner.evaluator.key}",
                functools.partial(self._tick, runner),
                runner.evaluator.interval_ms / 1000,
                min_gap=self.config.event_min_interval,
            )

    def _hand_over(self, old: dict[str, _GroupRunner], new_runners: Sequence[_GroupRunner]) -> None:
        for runner in new_runners:
            previous = old.get(runner.evaluator.key)
            if previous is not None:
                _carry_state(previous.evaluator, runner.evaluator)
        if not self._restored:
            self._restore(new_runners)
            self._restored = True
        kept = {r.evaluator.key: len(r.evaluator.group.rules) for r in new_runners}
        for key, runner in old.items():
            # Series of removed groups, and of rules past the end of a shrunk group, end now.
            for index in range(kept.get(key, 0), len(runner.evaluator.group.rules)):
                self.store.drop_source(runner.evaluator.source(index))

    async def close(self) -> None:
        """Stop evaluating; the alert state is saved so a restart measures the outage from now."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for runner in self._runners:
            self._stop_job(runner)
        try:
            # Queued after any evaluation in flight, which must not see the database closed.
            await wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, self._close_state), CLOSE_BUDGET_S
            )
        except (asyncio.TimeoutError, RuntimeError) as exc:
            log.warning("alert state not saved at shutdown: %s", exc or "evaluation still running")
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _close_state(self) -> None:
        if self._db is None:
            return
        ts = now_ms()
        for runner in self._runners:
            self._persist(runner, ts, True)
        self._db.close()
        self._db = None

    # -- scheduling -------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if not event.metrics:
            return
        for runner in self._runners:
            if runner.job is not None and runner.reads(event.metrics):
                runner.job.wake()

    async def _tick(self, runner: _GroupRunner) -> None:
        """One evaluation of a group (a scheduler job: on its interval, or woken by an event)."""
        if self._closed:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._evaluate, runner)

    def _stop_job(self, runner: _GroupRunner) -> None:
        if runner.job is not None:
            if self._scheduler.get(runner.job.name) is runner.job:
                self._scheduler.remove(runner.job.name)
            else:
                runner.job.cancel()

    def _evaluate(self, runner: _GroupRunner) -> None:
        evaluator = runner.evaluator
        ts = now_ms()
        transitions = evaluator.evaluate(ts)
        events = [AlertEvent(t, rule, evaluator.group.name, evaluator.group.file) for rule, t in transitions]
        if events and self._loop is not None:
            # Handed to the loop from here, not returned: a reload that cancels the group's
            # task while this runs must not lose the transitions (its state is carried over).
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self._loop.call_soon_threadsafe(self._publish, events)
        group = evaluator.group
        name = {"rule_group": evaluator.key}
        self.store.add("sentinel_rule_group_duration_seconds", evaluator.last_duration_s, name, ts)
        self.store.add("sentinel_rule_group_last_evaluation_timestamp_seconds", ts / 1000, name, ts)
        self.store.append(labels_from("sentinel_rule_evaluation_failures_total", name), ts, evaluator.failures_total)
        self.store.append(
            labels_from("sentinel_rule_group_event_evaluations_total", name), ts, runner.event_evaluations_total
        )
        self.store.add("sentinel_rule_group_rules", len(group.rules), name, ts)
        counts = dict.fromkeys((AlertState.PENDING, AlertState.FIRING), 0)
        for _, alert in evaluator.active_alerts():
            counts[alert.state] += 1
        for state, count in counts.items():
            self.store.add("sentinel_alerts", count, {**name, "state": state.value}, ts)
        self._persist(runner, ts, bool(transitions))

    def _persist(self, runner: _GroupRunner, ts: int, changed: bool) -> None:
        if self._db is None:
            return
        if changed or ts - runner.last_persist_ms >= HEARTBEAT_MS:
            evaluator = runner.evaluator
            alerts = [
                (rule.name, alert)
                for rule, health in zip(evaluator.group.rules, evaluator.health, strict=True)
                for alert in health.active.values()
            ]
            try:
                self._db.save_group(evaluator.key, ts, alerts)
            except Exception as exc:  # a full disk must not stop alerting; said once, counted
                self._health.write_failed("alert_state", f"the alert state of group {evaluator.key}", exc)
            else:
                runner.last_persist_ms = ts
                self._health.write_ok("alert_state")

    def _restore(self, runners: Sequence[_GroupRunner]) -> None:
        """Bring back alerts from before a restart, as Prometheus restores `for` state."""
        if self._db is None:
            return
        now = now_ms()
        tolerance = int(self.config.outage_tolerance * 1000)
        grace = int(self.config.for_grace_period * 1000)
        for runner in runners:
            evaluator = runner.evaluator
            try:
                down_at, stored = self._db.load_group(evaluator.key)
            except (sqlite3.Error, ValueError) as exc:  # a damaged file: start afresh, keep alerting
                log.error("cannot restore alert state of %s: %s", evaluator.key, exc)
                continue
            if down_at is None or now - down_at > tolerance:
                continue
            restored = 0
            for index, rule in enumerate(evaluator.group.rules):
                if not rule.is_alert:
                    continue
                for rule_name, alert in stored:
                    if rule_name != rule.name or not _may_belong(evaluator.group, rule, alert):
                        continue
                    if alert.state is AlertState.PENDING:
                        alert = _with_active_at(
                            alert, restore_active_at(alert.active_at_ms, down_at, now, rule.for_ms, grace)
                        )
                    evaluator.health[index].active[alert.fingerprint] = alert
                    restored += 1
            if restored:
                log.info(
                    "restored %d alert(s) of group %s after %.1fs down",
                    restored,
                    evaluator.group.name,
                    (now - down_at) / 1000,
                )

    def _publish(self, events: list[AlertEvent]) -> None:
        for event in events:
            for subscriber in list(self._subscribers):
                try:
                    subscriber(event)
                except Exception:
                    log.exception("alert subscriber failed")

    # -- views ----------------------------------------------------------------------------

    def active_alerts(self) -> list[tuple[GroupEvaluator, Rule, Alert]]:
        out: list[tuple[GroupEvaluator, Rule, Alert]] = []
        for runner in self._runners:
            out.extend((runner.evaluator, rule, alert) for rule, alert in runner.evaluator.active_alerts())
        return out


def _may_belong(group: RuleGroup, rule: Rule, alert: Alert) -> bool:
    """False when a stored alert has a fixed label of the rule with another value.

    Rules often share a name and differ by a label (`severity: warning` at 80 C,
    `critical` at 90 C); each must get back only its own alerts, or the other one
    resolves them on its first evaluation.
    """
    for name, text in {**group.labels, **rule.labels}.items():
        if "{{" not in text and alert.labels.get(name, "") != text:
            return False
    return True


def _with_active_at(alert: Alert, active_at_ms: int) -> Alert:
    return replace(alert, active_at_ms=active_at_ms)


def _carry_state(old: GroupEvaluator, new: GroupEvaluator) -> None:
    """Keep alert state across a reload for rules that did not change."""
    old_by_identity = {(r.name, r.expr, r.for_ms): h for r, h in zip(old.group.rules, old.health, strict=True)}
    for rule, health in zip(new.group.rules, new.health, strict=True):
        previous = old_by_identity.get((rule.name, rule.expr, rule.for_ms))
        if previous is not None:
            health.active = dict(previous.active)
            health.health = previous.health
            health.last_error = previous.last_error
