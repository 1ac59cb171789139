"""Evaluating one rule group, as Prometheus's `rules/group.go` does.

Rules run in file order, each seeing the output of the recording rules before it. A
failing rule is marked unhealthy with its last error and the next rule still runs.
Alerting rules write `ALERTS` and `ALERTS_FOR_STATE`; recording rules write their
series. Each rule writes through its own store source, so a series it stops producing
gets a staleness marker, as in Prometheus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sentinel.gotemplate import Template, TemplateContext, TemplateError
from sentinel.gotemplate import parse as parse_template
from sentinel.rules.rendercache import RenderCache
from sentinel.rules.rulefile import Rule, RuleGroup
from sentinel.rules.state import Alert, AlertState, Candidate, LimitExceeded, Transition, step
from sentinel.store import Appender, Store, labels_from

__all__ = ["GroupEvaluator", "QueryError", "QueryFn", "RuleHealth", "VectorSample"]

log = logging.getLogger(__name__)

VectorSample = tuple[dict[str, str], float]
QueryFn = Callable[[str, int], list[VectorSample]]
"""Evaluate an expression at a time (ms) to an instant vector; raises QueryError."""


@dataclass(frozen=True)
class _Sample:
    """A query result row for the `query` template function."""

    labels: dict[str, str]
    value: float


class QueryError(Exception):
    """The expression could not be evaluated (Prometheus's execution errors)."""


@dataclass
class RuleHealth:
    health: str = "unknown"  # ok | err | unknown, as Prometheus's API says
    last_error: str = ""
    last_evaluation_ms: int | None = None
    evaluation_time_s: float = 0.0
    active: dict[str, Alert] = field(default_factory=dict)


class GroupEvaluator:
    """Holds one group's rules, their alert states and health."""

    def __init__(
        self,
        group: RuleGroup,
        store: Store,
        query: QueryFn,
        *,
        interval_ms: int,
        external_labels: Mapping[str, str] | None = None,
        external_url: str = "",
    ) -> None:
        self.group = group
        self.store = store
        self.query = query
        self.interval_ms = group.interval_ms or interval_ms
        self.external_labels = dict(external_labels or {})
        self.external_url = external_url
        self.health: list[RuleHealth] = [RuleHealth() for _ in group.rules]
        self.last_evaluation_ms: int | None = None
        self.last_duration_s = 0.0
        self.failures_total = 0
        self._templates: dict[str, Template] = {}
        self._rendered = RenderCache()

    @property
    def key(self) -> str:
        """Identity of the group across reloads: file and name, as Prometheus keys it."""
        return f"{self.group.file};{self.group.name}"

    def source(self, index: int) -> str:
        return f"rules:{self.key}:{index}"

    def evaluate(self, ts: int) -> list[tuple[Rule, Transition]]:
        """Evaluate every rule at `ts`; returns the alert transitions with their rules."""
        started = time.perf_counter()
        transitions: list[tuple[Rule, Transition]] = []
        query_ts = ts - self.group.query_offset_ms
        for index, rule in enumerate(self.group.rules):
            health = self.health[index]
            rule_started = time.perf_counter()
            out = self.store.appender(self.source(index), ts)
            try:
                samples = self.query(rule.expr, query_ts)
                if rule.is_alert:
                    transitions.extend((rule, t) for t in self._alert(rule, health, samples, ts, query_ts, out))
                else:
                    self._record(rule, samples, out)
            except Exception as exc:
                # Any error, expected (QueryError, TemplateError, LimitExceeded, ValueError)
                # or a bug, fails this rule only: the next rules still run.
                message = str(exc) or type(exc).__name__
                if not isinstance(exc, (QueryError, TemplateError, LimitExceeded, ValueError)):
                    if message != health.last_error:  # once per new error, not every tick
                        log.exception("rule %s failed unexpectedly", rule.location())
                else:
                    log.debug("rule %s failed: %s", rule.location(), exc)
                health.health = "err"
                health.last_error = message
                self.failures_total += 1
                if isinstance(exc, LimitExceeded):
                    # Prometheus drops every alert of a rule over its limit.
                    health.active = {}
                # No commit: the rule's series live on until lookback, as in Prometheus.
            else:
                health.health = "ok"
                health.last_error = ""
                out.commit()
            health.last_evaluation_ms = ts
            health.evaluation_time_s = time.perf_counter() - rule_started
        self._rendered.next_evaluation()
        self.last_evaluation_ms = ts
        self.last_duration_s = time.perf_counter() - started
        return transitions

    # -- alerting ---------------------------------------------------------------

    def _alert(
        self, rule: Rule, health: RuleHealth, samples: Sequence[VectorSample], ts: int, query_ts: int, out: Appender
    ) -> list[Transition]:
        candidates: list[Candidate] = []
        seen: set[tuple[tuple[str, str], ...]] = set()
        for labels, value in samples:
            cand = self._candidate(rule, labels, value, query_ts)
            key = tuple(sorted(cand.labels.items()))
            if key in seen:
                raise ValueError("vector contains metrics with the same labelset after applying alert labels")
            seen.add(key)
            candidates.append(cand)
        result = step(health.active, candidates, ts, rule.for_ms, rule.keep_firing_for_ms, self.group.limit)
        health.active = result.active
        for alert in result.active.values():
            if alert.state is AlertState.INACTIVE:
                continue
            self._write_alert_series(alert, out)
        return result.transitions

    def _candidate(self, rule: Rule, sample_labels: Mapping[str, str], value: float, query_ts: int) -> Candidate:
        def query(expr: str) -> list[_Sample]:
            return [_Sample(labels, v) for labels, v in self.query(expr, query_ts)]

        ctx = TemplateContext(
            labels=dict(sample_labels),
            value=value,
            external_labels=self.external_labels,
            external_url=self.external_url,
            query=query,
        )
        labels = {k: v for k, v in sample_labels.items() if k != "__name__"}
        for name, text in {**self.group.labels, **rule.labels}.items():
            expanded = self._render(text, ctx)
            if expanded == "":
                labels.pop(name, None)
            else:
                labels[name] = expanded
        labels["alertname"] = rule.name
        annotations = {name: self._render(text, ctx) for name, text in rule.annotations.items()}
        return Candidate(labels, annotations, value)

    def _render(self, text: str, ctx: TemplateContext) -> str:
        if "{{" not in text:
            return text
        template = self._templates.get(text)
        if template is None:
            template = self._templates[text] = parse_template(text)
        return self._rendered.render(text, ctx.labels, ctx.value, lambda: _render_or_error(template, ctx))

    @staticmethod
    def _write_alert_series(alert: Alert, out: Appender) -> None:
        out.add_labels(labels_from("ALERTS", alert.labels, alertstate=alert.state.value), 1.0)
        # Whole seconds, as Prometheus stores the active-since time.
        out.add_labels(labels_from("ALERTS_FOR_STATE", alert.labels), float(alert.active_at_ms // 1000))

    # -- recording --------------------------------------------------------------

    def _record(self, rule: Rule, samples: Sequence[VectorSample], out: Appender) -> None:
        seen: set[tuple[tuple[str, str], ...]] = set()
        for labels, value in samples:
            merged = {k: v for k, v in labels.items() if k != "__name__"}
            for name, text in {**self.group.labels, **rule.labels}.items():
                if text == "":
                    merged.pop(name, None)
                else:
                    merged[name] = text
            key = labels_from(rule.name, merged)
            if key in seen:
                raise ValueError("vector contains metrics with the same labelset after applying rule labels")
            seen.add(key)
            out.add_labels(key, value)

    # -- views ------------------------------------------------------------------

    def active_alerts(self) -> list[tuple[Rule, Alert]]:
        out: list[tuple[Rule, Alert]] = []
        for rule, health in zip(self.group.rules, self.health, strict=True):
            out.extend((rule, a) for a in health.active.values() if a.state is not AlertState.INACTIVE)
        return out


def _render_or_error(template: Template, ctx: TemplateContext) -> str:
    try:
        return template.render(ctx)
    except TemplateError as exc:
        # Prometheus renders the error into the text rather than failing the rule.
        return f"<error expanding template: {exc}>"
