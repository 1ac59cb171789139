"""The remediation policy: pure decisions over worker state, action history and time.

Nothing here does I/O or reads a clock; the engine passes `now` in, on its steady clock
(seconds that no wall-clock step moves; see `sentinel.runtime.clock`), and every time
in `WorkerState` and `HistoryEntry` is on that clock. `resolve` is the one entry point
the engine uses for a request: it decides, and says what follows (what to journal, the
worker's new state, what to carry out).

How one decision is made (`decide`), in order:

1. `notify_only` always goes through; it touches nothing and counts nowhere.
   `rebalance_experts` that cannot run on the worker (no live placement, no EPLB
   profile, budget spent) becomes `notify_only` with the reason: a routing skew is
   not something the restart ladder heals, so it never escalates to it.
2. Paused (the worker or all of them), marked needs_human, or already acting: skip.
3. Circuit breaker: if acting on this worker would make more than `max_ratio` of the
   workers (and at least `min_workers`) remediated within the breaker's window, skip.
4. An alert's own action waits out its per-(worker, action) cooldown: skip.
5. The asked-for action runs if it applies to the worker (there is a rung below for
   `reduce_batch`, a quantized profile for `quantized_fallback`, ...) and its budget
   (`count` per `window`, per worker and action) is not spent.
6. Otherwise, and whenever an action failed verification, escalate: walk the ladder
   (expanded, so `reduce_batch x2` is two slots) from the worker's escalation
   position; every slot looked at is used up, and the first that applies and has
   budget left runs. No slot left: the worker needs a human.

Recovery (`recovery_step`): after `stable_for` without the alerts that caused actions
on a worker, step back up one rung (`restore`), until the worker's home profile; a
worker at home just has its escalation position forgiven.

Observe mode makes the same decisions from its own history (rows journaled in
observe mode), so switching to act mode starts with fresh budgets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from sentinel.remediation.settings import (
    ACTIONS,
    CircuitBreakerConfig,
    EscalationStep,
    Profile,
    RemediationConfig,
    RouteConfig,
)

__all__ = [
    "DEFAULT_PROFILE",
    "DISRUPTIVE",
    "Decision",
    "HistoryEntry",
    "Plan",
    "Record",
    "Request",
    "Resolution",
    "Trigger",
    "WorkerSpec",
    "WorkerState",
    "budget_spent",
    "circuit_open",
    "cooldown_left",
    "decide",
    "forgiven",
    "ladder_slots",
    "note_trouble",
    "plan_action",
    "recovery_step",
    "remediated_workers",
    "resolve",
    "route_actions",
    "route_matches",
    "state_after",
]

# A worker without profiles still restarts: with this one, which sets nothing.
DEFAULT_PROFILE = Profile(name="default")

# Actions that take the worker out of service for a while (bounded by max_concurrent).
DISRUPTIVE = frozenset({"restart", "reduce_batch", "quantized_fallback", "restore", "stop", "rebalance_experts"})
# Actions after which the worker must prove itself healthy.
_VERIFIED = frozenset({"restart", "reduce_batch", "quantized_fallback", "restore", "rebalance_experts"})
# Actions that need the worker's backend (the live paths aside).
_NEEDS_BACKEND = frozenset({"restart", "reduce_batch", "quantized_fallback", "restore", "stop", "rebalance_experts"})
# Asked for by an alert but impossible on this worker: tell a human instead of escalating.
_NOTIFY_WHEN_IMPOSSIBLE = frozenset({"rebalance_experts"})

Trigger = Literal["alert", "escalation", "recovery"]


# -- inputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What the policy needs to know about a configured worker."""

    name: str
    profiles: tuple[Profile, ...] = ()
    home_index: int = 0
    has_backend: bool = True
    live_batch: bool = False  # runs the probe and a LiveControl can reach it
    live_placement: bool = False  # its probe serves placements: experts can be rebalanced live

    def profile(self, index: int) -> Profile:
        """The profile at `index` (the empty default when the worker has none)."""
        return self.profiles[index] if self.profiles else DEFAULT_PROFILE


@dataclass(frozen=True)
class WorkerState:
    """The policy's memory of one worker; persisted by the journal (in_flight aside)."""

    profile_index: int = 0
    escalation: int = 0  # ladder slots used up since the worker was last stable
    needs_human: bool = False
    needs_human_reason: str = ""
    paused: bool = False
    trouble_alerts: frozenset[str] = frozenset()  # alertnames that led to actions
    last_trouble_at: float = float("-inf")  # last action, or last time one of trouble_alerts fired
    in_flight: str | None = None  # the action being carried out (not persisted)


@dataclass(frozen=True)
class HistoryEntry:
    """An action that ran (or, in observe mode, would have): feeds budgets and cooldowns."""

    worker: str
    action: str
    at: float
    mode: str


@dataclass(frozen=True)
class Request:
    """Something asks for an action; `action=None` means "the next ladder step"."""

    worker: str
    action: str | None
    trigger: Trigger = "alert"
    params: Mapping[str, str] = field(default_factory=dict)


# -- outputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """An action ready to be carried out."""

    action: str
    from_index: int
    to_index: int
    params: Mapping[str, str] = field(default_factory=dict)
    live: bool = False  # through the probe (batch limit, expert placement): no restart

    @property
    def escalates(self) -> bool:
        """Whether a failure walks the escalation ladder (a failed rebalance is reported, critical, instead)."""
        return self.action != "rebalance_experts"

    @property
    def disruptive(self) -> bool:
        if self.action == "exec":
            return self.params.get("disruptive") == "true"
        return self.action in DISRUPTIVE and not self.live

    @property
    def verify(self) -> bool:
        if self.action == "exec":
            return self.params.get("verify") == "true"
        if self.action == "rebalance_experts" and self.live:
            return False  # the live rebalance verifies itself: measured balancedness and tokens/s
        return self.action in _VERIFIED


@dataclass(frozen=True)
class Decision:
    """What to do about a request, and the worker's escalation position afterwards."""

    verdict: Literal["act", "skip", "needs_human"]
    reason: str
    plan: Plan | None = None
    escalation: int = 0
    circuit_open: bool = False
    # The obstacle passes by itself (an action in flight, a cooldown, the breaker):
    # a request still wanted when it has passed should be tried again.
    transient: bool = False


# -- routes -----------------------------------------------------------------------------


def route_matches(route: RouteConfig, labels: Mapping[str, str]) -> bool:
    """Equality and fully anchored regex matchers; a missing label reads as ""."""
    if any(labels.get(name, "") != value for name, value in route.match.items()):
        return False
    return all(re.fullmatch(pattern, labels.get(name, "")) is not None for name, pattern in route.match_re.items())


def route_actions(routes: Sequence[RouteConfig], labels: Mapping[str, str]) -> list[tuple[str, Mapping[str, str]]]:
    """Actions for an alert: matching routes (first wins unless it says `continue`), else its `action` label."""
    out: list[tuple[str, Mapping[str, str]]] = []
    for route in routes:
        if route_matches(route, labels):
            out.append((route.action, route.params))
            if not route.continue_:
                return out
    if out:
        return out
    suggested = labels.get("action", "")
    # exec needs an argv that only the operator's config can give.
    if suggested in ACTIONS and suggested != "exec":
        return [(suggested, {})]
    return []


# -- bookkeeping ------------------------------------------------------------------------


def ladder_slots(ladder: Sequence[EscalationStep]) -> tuple[str, ...]:
    """The ladder with each step repeated `times`: the escalation position indexes this."""
    return tuple(step.action for step in ladder for _ in range(step.times))


def _counted(entry: HistoryEntry, mode: str) -> bool:
    return entry.mode == mode and entry.action != "notify_only"


def cooldown_left(
    history: Iterable[HistoryEntry], worker: str, action: str, mode: str, now: float, cooldown: float
) -> float:
    """Seconds until `action` may run again on `worker` (0 when it may run now)."""
    last = max((e.at for e in history if e.worker == worker and e.action == action and e.mode == mode), default=None)
    if last is None:
        return 0.0
    return max(0.0, last + cooldown - now)


def budget_spent(
    history: Iterable[HistoryEntry], worker: str, action: str, mode: str, now: float, count: int, window: float
) -> bool:
    """True when `count` runs of `action` on `worker` happened within the last `window` seconds."""
    since = now - window
    used = sum(1 for e in history if e.worker == worker and e.action == action and e.mode == mode and e.at > since)
    return used >= count


def remediated_workers(history: Iterable[HistoryEntry], mode: str, since: float) -> set[str]:
    """Workers acted on after `since` (notify_only does not count)."""
    return {e.worker for e in history if _counted(e, mode) and e.at > since}


def circuit_open(
    history: Iterable[HistoryEntry],
    config: CircuitBreakerConfig,
    mode: str,
    now: float,
    total_workers: int,
    worker: str | None = None,
) -> bool:
    """True when acting on `worker` would exceed the share of workers remediated in the window.

    With `worker=None`: whether a worker not remediated yet would be refused, i.e. whether
    the breaker has stopped Sentinel from spreading its actions further (the gauge).
    """
    acted = remediated_workers(history, mode, now - config.window)
    n = len(acted)
    if worker is None:
        n += 1 if n < total_workers else 0
    elif worker not in acted:
        n += 1
    return n >= config.min_workers and n > config.max_ratio * max(total_workers, 1)


# -- what an action does to a worker ----------------------------------------------------


def plan_action(spec: WorkerSpec, state: WorkerState, action: str, params: Mapping[str, str]) -> Plan | str:
    """The plan for `action` on this worker, or why it does not apply."""
    here = state.profile_index
    if action == "notify_only":
        return Plan(action, here, here, params)
    if action == "exec":
        return Plan(action, here, here, params) if params.get("argv") else "exec needs params.argv"
    if action == "reduce_batch":
        target = here + 1
        if target >= len(spec.profiles):
            return "already on the lowest rung of the ladder"
    elif action == "restore":
        if here <= 0:
            return "already on the top rung of the ladder"
        target = here - 1
    elif action == "quantized_fallback":
        quantized = next((i for i, p in enumerate(spec.profiles) if p.quantized), None)
        if quantized is None:
            return "no quantized profile"
        if spec.profile(here).quantized or here > quantized:
            return "already on a quantized profile"
        target = quantized
    elif action == "rebalance_experts":
        if spec.live_placement:
            return Plan(action, here, here, params, live=True)
        eplb = next((i for i, p in enumerate(spec.profiles) if p.eplb), None)
        if eplb is None:
            return "the worker cannot rebalance live (no probe serving placements) and has no profile marked eplb"
        if here == eplb:
            return "the worker already runs its EPLB profile"
        target = eplb
    elif action in ("restart", "stop"):
        target = here
    else:
        return f"unknown action {action!r}"
    live = action in ("reduce_batch", "restore") and _live_change(spec, here, target)
    if not live and action in _NEEDS_BACKEND and not spec.has_backend:
        return "the worker has no backend"
    return Plan(action, here, target, params, live=live)


def _live_change(spec: WorkerSpec, here: int, target: int) -> bool:
    # Only a pure batch-limit change can go live: a quantization change needs a restart.
    if not spec.live_batch or not spec.profiles:
        return False
    now, then = spec.profile(here), spec.profile(target)
    return then.batch_limit is not None and now.quantized == then.quantized


# -- the decision -----------------------------------------------------------------------


def decide(
    config: RemediationConfig,
    spec: WorkerSpec,
    state: WorkerState,
    history: Sequence[HistoryEntry],
    request: Request,
    now: float,
    *,
    total_workers: int,
    globally_paused: bool = False,
) -> Decision:
    """Decide what to do about `request` (see the module docstring for the order)."""
    keep = state.escalation
    if request.action == "notify_only":
        return Decision("act", "notify only", Plan("notify_only", state.profile_index, state.profile_index), keep)
    if globally_paused or state.paused:
        return Decision("skip", "remediation is paused" + ("" if state.paused else " on all workers"), escalation=keep)
    if state.needs_human:
        return Decision(
            "skip", f"waiting for a human (sentinel resume {spec.name}): {state.needs_human_reason}", escalation=keep
        )
    if state.in_flight is not None:
        # The same action already in flight answers this request too (two series of one
        # alert firing together): waiting to run it a second time would only be a storm.
        again = request.action is not None and request.action == state.in_flight
        return Decision(
            "skip", f"{state.in_flight} already in flight on this worker", escalation=keep, transient=not again
        )

    mode = config.mode
    if circuit_open(history, config.circuit_breaker, mode, now, total_workers, spec.name):
        acted = len(remediated_workers(history, mode, now - config.circuit_breaker.window))
        reason = (
            f"circuit breaker open: {acted} of {total_workers} workers remediated "
            f"within {config.circuit_breaker.window:g}s"
        )
        return Decision("skip", reason, escalation=keep, circuit_open=True, transient=True)

    why_not = ""
    if request.action is not None:
        if request.trigger == "alert":
            wait = cooldown_left(history, spec.name, request.action, mode, now, config.cooldown)
            if wait > 0:
                return Decision(
                    "skip", f"{request.action} is cooling down for {wait:.0f}s more", escalation=keep, transient=True
                )
        planned = plan_action(spec, state, request.action, request.params)
        if isinstance(planned, Plan):
            budget = config.budget
            if not budget_spent(history, spec.name, request.action, mode, now, budget.count, budget.window):
                return Decision("act", f"{request.action} requested", planned, keep)
            why_not = f"{request.action} budget spent ({budget.count} per {budget.window:g}s)"
        else:
            why_not = f"{request.action}: {planned}"
        if request.action in _NOTIFY_WHEN_IMPOSSIBLE:
            return Decision(
                "act", f"notify only: {why_not}", Plan("notify_only", state.profile_index, state.profile_index), keep
            )
        if request.trigger == "recovery":
            # Stepping up is optional: never escalate on its behalf, just try again later.
            return Decision("skip", why_not, escalation=keep)
    return _escalate(config, spec, state, history, now, why_not or "the last action did not heal the worker")


def _escalate(
    config: RemediationConfig,
    spec: WorkerSpec,
    state: WorkerState,
    history: Sequence[HistoryEntry],
    now: float,
    because: str,
) -> Decision:
    slots = ladder_slots(config.ladder)
    budget = config.budget
    passed: list[str] = []
    for position in range(state.escalation, len(slots)):
        action = slots[position]
        planned = plan_action(spec, state, action, {})
        if isinstance(planned, str):
            passed.append(f"{action}: {planned}")
            continue
        if budget_spent(history, spec.name, action, config.mode, now, budget.count, budget.window):
            passed.append(f"{action}: budget spent")
            continue
        reason = f"{because}; escalating to {action} (ladder step {position + 1} of {len(slots)})"
        return Decision("act", reason, planned, position + 1)
    detail = f"{because}; escalation ladder exhausted"
    if passed:
        detail += " (" + "; ".join(dict.fromkeys(passed)) + ")"
    return Decision("needs_human", detail, escalation=len(slots))


# -- state changes ----------------------------------------------------------------------


def state_after(state: WorkerState, decision: Decision, alertname: str, trigger: Trigger, now: float) -> WorkerState:
    """The worker's state once a decided plan has started."""
    if decision.verdict == "needs_human":
        return replace(state, needs_human=True, needs_human_reason=decision.reason, escalation=decision.escalation)
    plan = decision.plan
    if decision.verdict != "act" or plan is None or plan.action == "notify_only":
        return state
    if trigger == "recovery":
        # Going up: trouble is forgotten once home; the next rung waits another stable_for.
        return replace(state, profile_index=plan.to_index, escalation=0, last_trouble_at=now, in_flight=plan.action)
    alerts = state.trouble_alerts | ({alertname} if alertname else set())
    return replace(
        state,
        profile_index=plan.to_index,
        escalation=decision.escalation,
        trouble_alerts=frozenset(alerts),
        last_trouble_at=now,
        in_flight=plan.action,
    )


def note_trouble(state: WorkerState, alertname: str, now: float) -> WorkerState:
    """An alert fired (or is still firing) on the worker: restart its stable clock if it is a cause."""
    if alertname in state.trouble_alerts and now > state.last_trouble_at:
        return replace(state, last_trouble_at=now)
    return state


def recovery_step(
    config: RemediationConfig, spec: WorkerSpec, state: WorkerState, now: float
) -> Literal["restore", "forgive"] | None:
    """After `stable_for` quiet: `restore` one rung toward home, or `forgive` the escalation position."""
    if state.needs_human or state.paused or state.in_flight is not None:
        return None
    if now - state.last_trouble_at < config.stable_for:
        return None
    if state.profile_index > spec.home_index:
        return "restore"
    if state.escalation > 0 or state.trouble_alerts:
        return "forgive"
    return None


def forgiven(state: WorkerState) -> WorkerState:
    """The worker is home and stable: its ladder starts over."""
    return replace(state, escalation=0, trouble_alerts=frozenset())


# -- one request, resolved --------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A decision that finishes at once: journaled and reported as it is."""

    action: str
    outcome: Literal["skipped", "needs_human", "would_act", "succeeded"]
    detail: str
    severity: Literal["info", "warning", "critical"] = "info"
    profile_after: int = 0  # the profile the report names as "to" (a would_act names its target)


@dataclass(frozen=True)
class Resolution:
    """Everything that follows from one request, for the engine to apply in one place."""

    decision: Decision
    state: WorkerState  # the worker's state from now on
    record: Record | None = None  # journal and report this now
    start: Plan | None = None  # carry this action out now
    defer: bool | None = None  # True: retry while the alert fires; False: forget a deferral; None: unchanged
    counts: bool = False  # enters the history: budgets, cooldowns, the breaker, the episode
    persist: bool = False  # the state changed in a way the journal must keep


def resolve(
    config: RemediationConfig,
    spec: WorkerSpec,
    state: WorkerState,
    history: Sequence[HistoryEntry],
    request: Request,
    now: float,
    *,
    total_workers: int,
    globally_paused: bool = False,
    deferred: bool = False,
    alertname: str = "",
) -> Resolution:
    """Decide `request` and say what follows: what to journal, the new state, what to run.

    `deferred`: this request already waits for a passing obstacle (it was journaled
    then, and is not again). A skipped step up (recovery) is not journaled at all; a
    skipped alert whose obstacle passes (cooldown, in flight, breaker) is deferred.
    Observe mode journals what it would do and changes nothing.
    """
    decision = decide(
        config, spec, state, history, request, now, total_workers=total_workers, globally_paused=globally_paused
    )
    asked = request.action or "escalate"
    here = state.profile_index
    if decision.verdict == "skip":
        if request.trigger == "recovery":
            return Resolution(decision, state)
        defer = request.trigger == "alert" and decision.transient
        if defer and deferred:
            return Resolution(decision, state)
        severity: Literal["info", "critical"] = "critical" if decision.circuit_open else "info"
        record = Record(asked, "skipped", decision.reason, severity, here)
        return Resolution(decision, state, record, defer=True if defer else None)
    if decision.verdict == "needs_human":
        if config.mode == "observe":
            detail = decision.reason + " (would mark the worker needs_human)"
            return Resolution(decision, state, Record(asked, "would_act", detail, "warning", here))
        after = state_after(state, decision, alertname, request.trigger, now)
        return Resolution(
            decision, after, Record(asked, "needs_human", decision.reason, "critical", here), persist=True
        )
    plan = decision.plan
    assert plan is not None
    if plan.action == "notify_only":
        return Resolution(decision, state, Record(plan.action, "succeeded", decision.reason, "info", here), defer=False)
    if config.mode == "observe":
        record = Record(plan.action, "would_act", decision.reason, "info", plan.to_index)
        return Resolution(decision, state, record, defer=False, counts=True)
    after = state_after(state, decision, alertname, request.trigger, now)
    return Resolution(decision, after, start=plan, defer=False, counts=True)
