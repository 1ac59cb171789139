"""The pure remediation policy: routes, ladder, budgets, cooldowns, circuit breaker, recovery."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sentinel.remediation.policy import (
    Decision,
    HistoryEntry,
    Request,
    WorkerSpec,
    WorkerState,
    budget_spent,
    circuit_open,
    cooldown_left,
    decide,
    forgiven,
    ladder_slots,
    note_trouble,
    plan_action,
    recovery_step,
    route_actions,
    state_after,
)
from sentinel.remediation.settings import (
    CircuitBreakerConfig,
    EscalationStep,
    Profile,
    RemediationConfig,
    RouteConfig,
)

NOW = 1_000_000.0
FOUR_RUNGS = (
    Profile(name="full", batch_limit=64),
    Profile(name="r32", batch_limit=32),
    Profile(name="r16", batch_limit=16),
    Profile(name="fp8", batch_limit=16, quantized=True),
)
SPEC = WorkerSpec("qwen", FOUR_RUNGS)


def config(**overrides: object) -> RemediationConfig:
    base: dict[str, object] = {"mode": "act", "cooldown": 300, "budget": {"count": 3, "window": 3600}}
    base.update(overrides)
    return RemediationConfig.model_validate(base)


def run(
    cfg: RemediationConfig,
    state: WorkerState,
    history: list[HistoryEntry],
    request: Request,
    now: float = NOW,
    spec: WorkerSpec = SPEC,
    total: int = 1,
) -> tuple[Decision, WorkerState]:
    """Decide, and apply the decision as the engine would (the action succeeds at once)."""
    decision = decide(cfg, spec, state, history, request, now, total_workers=total)
    if decision.verdict == "act" and decision.plan is not None and decision.plan.action != "notify_only":
        history.append(HistoryEntry(spec.name, decision.plan.action, now, cfg.mode))
    after = state_after(state, decision, "CudaOOM", request.trigger, now)
    return decision, replace(after, in_flight=None)


# -- routes ------------------------------------------------------------------------------


def test_first_matching_route_wins_over_later_routes_and_the_action_label() -> None:
    routes = (
        RouteConfig(match={"alertname": "CudaOOM"}, action="reduce_batch"),
        RouteConfig(match_re={"alertname": "Cuda.*"}, action="restart"),
    )
    labels = {"alertname": "CudaOOM", "action": "stop"}
    assert [a for a, _ in route_actions(routes, labels)] == ["reduce_batch"]
    assert [a for a, _ in route_actions(routes, {"alertname": "CudaError"})] == ["restart"]


def test_route_regex_is_fully_anchored_and_missing_labels_read_empty() -> None:
    routes = (RouteConfig(match_re={"alertname": "OOM"}, action="restart"),)
    assert route_actions(routes, {"alertname": "CudaOOM"}) == []
    empty = (RouteConfig(match={"severity": ""}, action="notify_only"),)
    assert [a for a, _ in route_actions(empty, {"alertname": "X"})] == ["notify_only"]


def test_continue_collects_later_routes_too() -> None:
    routes = (
        RouteConfig.model_validate({"match": {"alertname": "Stall"}, "action": "notify_only", "continue": True}),
        RouteConfig(match={"alertname": "Stall"}, action="restart"),
        RouteConfig(match={"alertname": "Stall"}, action="stop"),
    )
    assert [a for a, _ in route_actions(routes, {"alertname": "Stall"})] == ["notify_only", "restart"]


def test_without_a_route_the_alerts_action_label_names_the_action() -> None:
    assert route_actions((), {"alertname": "X", "action": "restart"}) == [("restart", {})]


def test_unknown_or_exec_action_label_and_no_label_mean_no_action() -> None:
    assert route_actions((), {"alertname": "X", "action": "reboot_host"}) == []
    assert route_actions((), {"alertname": "X", "action": "exec"}) == []
    assert route_actions((), {"alertname": "X"}) == []


def test_route_params_are_checked_against_the_action() -> None:
    with pytest.raises(ValidationError, match="not understood by restart"):
        RouteConfig(match={}, action="restart", params={"argv": "x"})
    with pytest.raises(ValidationError, match="exec needs a command"):
        RouteConfig(action="exec")
    with pytest.raises(ValidationError, match=r"params\.verify"):
        RouteConfig(action="exec", params={"argv": "/bin/true", "verify": "yes"})
    ok = RouteConfig(action="exec", params={"argv": "/usr/bin/dump --all 'a b'", "timeout": "30s", "verify": "true"})
    assert ok.params["verify"] == "true"


def test_ladder_refuses_actions_that_need_an_alerts_context() -> None:
    with pytest.raises(ValidationError, match="ladder step"):
        EscalationStep(action="exec")
    assert ladder_slots((EscalationStep(action="reduce_batch", times=2), EscalationStep(action="restart"))) == (
        "reduce_batch",
        "reduce_batch",
        "restart",
    )


# -- what actions do to the ladder -----------------------------------------------------------


def test_reduce_batch_goes_one_rung_down_and_restore_one_rung_up() -> None:
    plan = plan_action(SPEC, WorkerState(profile_index=1), "reduce_batch", {})
    assert not isinstance(plan, str) and (plan.from_index, plan.to_index) == (1, 2)
    plan = plan_action(SPEC, WorkerState(profile_index=1), "restore", {})
    assert not isinstance(plan, str) and plan.to_index == 0
    assert plan_action(SPEC, WorkerState(profile_index=3), "reduce_batch", {}) == (
        "already on the lowest rung of the ladder"
    )
    assert plan_action(SPEC, WorkerState(profile_index=0), "restore", {}) == "already on the top rung of the ladder"


def test_quantized_fallback_goes_to_the_first_quantized_profile() -> None:
    plan = plan_action(SPEC, WorkerState(profile_index=0), "quantized_fallback", {})
    assert not isinstance(plan, str) and plan.to_index == 3 and plan.disruptive and plan.verify
    assert plan_action(SPEC, WorkerState(profile_index=3), "quantized_fallback", {}) == (
        "already on a quantized profile"
    )
    assert plan_action(WorkerSpec("x", FOUR_RUNGS[:2]), WorkerState(), "quantized_fallback", {}) == (
        "no quantized profile"
    )


def test_batch_change_goes_live_only_with_the_probe_and_without_a_quantization_change() -> None:
    live = WorkerSpec("qwen", FOUR_RUNGS, live_batch=True)
    plan = plan_action(live, WorkerState(profile_index=0), "reduce_batch", {})
    assert not isinstance(plan, str) and plan.live and not plan.disruptive
    plan = plan_action(live, WorkerState(profile_index=2), "reduce_batch", {})
    assert not isinstance(plan, str) and not plan.live  # r16 -> fp8 needs a restart


def test_a_worker_without_backend_cannot_restart() -> None:
    spec = WorkerSpec("qwen", FOUR_RUNGS, has_backend=False)
    assert plan_action(spec, WorkerState(), "restart", {}) == "the worker has no backend"
    notify = plan_action(spec, WorkerState(), "notify_only", {})
    assert not isinstance(notify, str) and not notify.disruptive


# -- cooldown, budget, ladder -----------------------------------------------------------------


def test_cooldown_is_per_worker_and_action() -> None:
    history = [HistoryEntry("qwen", "restart", NOW - 100, "act")]
    assert cooldown_left(history, "qwen", "restart", "act", NOW, 300) == pytest.approx(200)
    assert cooldown_left(history, "qwen", "reduce_batch", "act", NOW, 300) == 0
    assert cooldown_left(history, "other", "restart", "act", NOW, 300) == 0
    assert cooldown_left(history, "qwen", "restart", "observe", NOW, 300) == 0


def test_alert_within_cooldown_is_skipped_and_acts_once_it_passed() -> None:
    cfg = config(cooldown=300)
    history: list[HistoryEntry] = []
    first, state = run(cfg, WorkerState(), history, Request("qwen", "restart"))
    assert first.verdict == "act"
    again, _ = run(cfg, state, history, Request("qwen", "restart"), now=NOW + 299)
    assert again.verdict == "skip" and "cooling down" in again.reason
    later, _ = run(cfg, state, history, Request("qwen", "restart"), now=NOW + 301)
    assert later.verdict == "act"


def test_budget_counts_only_the_window() -> None:
    history = [HistoryEntry("qwen", "restart", NOW - t, "act") for t in (10, 20, 4000)]
    assert not budget_spent(history, "qwen", "restart", "act", NOW, 3, 3600)
    assert budget_spent(history, "qwen", "restart", "act", NOW, 2, 3600)


def test_spent_budget_escalates_along_the_ladder_then_needs_a_human() -> None:
    cfg = config(cooldown=0, budget={"count": 3, "window": 3600})
    history = [HistoryEntry("qwen", "reduce_batch", NOW - i, "act") for i in range(1, 4)]
    state = WorkerState(profile_index=0)
    actions: list[str] = []
    for i in range(8):
        decision, state = run(cfg, state, history, Request("qwen", "reduce_batch"), now=NOW + i)
        if decision.verdict != "act":
            break
        assert decision.plan is not None and "escalating to" in decision.reason
        actions.append(decision.plan.action)
    # reduce_batch x2 are passed over (budget spent), quantized_fallback, then restart x3.
    assert actions == ["quantized_fallback", "restart", "restart", "restart"]
    assert decision.verdict == "needs_human" and "ladder exhausted" in decision.reason
    assert state.needs_human and state.profile_index == 3
    blocked, _ = run(cfg, state, history, Request("qwen", "restart"), now=NOW + 20)
    assert blocked.verdict == "skip" and "sentinel resume qwen" in blocked.reason


def test_failed_verification_walks_the_ladder_in_order() -> None:
    cfg = config(budget={"count": 5, "window": 3600})
    history: list[HistoryEntry] = []
    state = WorkerState()
    seen = []
    for i in range(10):
        decision, state = run(cfg, state, history, Request("qwen", None, "escalation"), now=NOW + i)
        if decision.verdict != "act":
            break
        assert decision.plan is not None
        seen.append((decision.plan.action, SPEC.profile(decision.plan.to_index).name))
    assert seen == [
        ("reduce_batch", "r32"),
        ("reduce_batch", "r16"),
        ("quantized_fallback", "fp8"),
        ("restart", "fp8"),
        ("restart", "fp8"),
        ("restart", "fp8"),
    ]
    assert decision.verdict == "needs_human"


def test_requested_action_that_does_not_apply_escalates() -> None:
    decision, _ = run(config(), WorkerState(profile_index=3), [], Request("qwen", "reduce_batch"))
    assert decision.verdict == "act" and decision.plan is not None
    # The two reduce_batch slots and quantized_fallback cannot apply on fp8: restart.
    assert decision.plan.action == "restart" and decision.escalation == 4
    assert "already on the lowest rung" in decision.reason


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["restart", "reduce_batch", "quantized_fallback", "stop"]), st.integers(1, 3)),
        min_size=1,
        max_size=4,
    ),
    budget=st.integers(1, 4),
    start=st.integers(0, 3),
)
def test_escalation_always_ends_with_needs_human_within_the_ladders_length(
    steps: list[tuple[str, int]], budget: int, start: int
) -> None:
    cfg = config(
        ladder=[{"action": a, "times": t} for a, t in steps], budget={"count": budget, "window": 3600}, cooldown=0
    )
    slots = len(ladder_slots(cfg.ladder))
    history: list[HistoryEntry] = []
    state = WorkerState(profile_index=start)
    for i in range(slots + 1):
        decision, state = run(cfg, state, history, Request("qwen", None, "escalation"), now=NOW + i)
        assert decision.escalation <= slots
        if decision.verdict == "needs_human":
            break
        assert decision.verdict == "act"
    assert state.needs_human


# -- skips -------------------------------------------------------------------------------------


def test_paused_needs_human_and_busy_workers_are_skipped_but_notify_only_goes_through() -> None:
    cfg = config()
    for state, word in (
        (WorkerState(paused=True), "paused"),
        (WorkerState(needs_human=True, needs_human_reason="ladder"), "waiting for a human"),
        (WorkerState(in_flight="restart"), "in flight"),
    ):
        assert word in decide(cfg, SPEC, state, [], Request("qwen", "restart"), NOW, total_workers=1).reason
        notify = decide(cfg, SPEC, state, [], Request("qwen", "notify_only"), NOW, total_workers=1)
        assert notify.verdict == "act"
    globally = decide(
        cfg, SPEC, WorkerState(), [], Request("qwen", "restart"), NOW, total_workers=1, globally_paused=True
    )
    assert globally.verdict == "skip" and "all workers" in globally.reason


def test_recovery_never_escalates_when_restore_cannot_run() -> None:
    history = [HistoryEntry("qwen", "restore", NOW - i, "act") for i in range(1, 4)]
    decision = decide(
        config(),
        SPEC,
        WorkerState(profile_index=2),
        history,
        Request("qwen", "restore", "recovery"),
        NOW,
        total_workers=1,
    )
    assert decision.verdict == "skip" and "budget spent" in decision.reason


# -- circuit breaker ----------------------------------------------------------------------------


def test_circuit_breaker_refuses_a_worker_that_would_exceed_the_share() -> None:
    cfg = CircuitBreakerConfig(max_ratio=0.5, window=600)
    history = [HistoryEntry(w, "restart", NOW - 10, "act") for w in ("a", "b")]
    assert circuit_open(history, cfg, "act", NOW, 4, "c")  # 3 of 4 > 50 %
    assert not circuit_open(history, cfg, "act", NOW, 4, "a")  # a again: still 2 of 4
    assert not circuit_open(history, cfg, "act", NOW + 601, 4, "c")  # the window passed
    assert circuit_open(history, cfg, "act", NOW, 4)  # open: the next new worker would be refused
    assert not circuit_open(history[:1], cfg, "act", NOW, 4)
    notify = [HistoryEntry(w, "notify_only", NOW, "act") for w in "cd"]
    assert not circuit_open(history + notify, cfg, "act", NOW, 4, "a")


def test_circuit_breaker_needs_min_workers_so_a_lone_worker_is_never_blocked() -> None:
    cfg = CircuitBreakerConfig(max_ratio=0.5, window=600)
    history = [HistoryEntry("solo", "restart", NOW - 1, "act")]
    assert not circuit_open(history, cfg, "act", NOW, 1, "solo")
    decision = decide(config(), SPEC, WorkerState(), history, Request("qwen", "restart"), NOW, total_workers=2)
    assert decision.verdict == "skip" and decision.circuit_open and "circuit breaker open" in decision.reason


# -- recovery ----------------------------------------------------------------------------------


def test_recovery_waits_stable_for_after_the_last_trouble() -> None:
    cfg = config(stable_for=1800)
    state = WorkerState(profile_index=2, trouble_alerts=frozenset({"CudaOOM"}), last_trouble_at=NOW)
    assert recovery_step(cfg, SPEC, state, NOW + 1799) is None
    assert recovery_step(cfg, SPEC, state, NOW + 1800) == "restore"
    # The cause fires again: the clock starts over; an unrelated alert does not reset it.
    assert note_trouble(state, "GpuHot", NOW + 1000) == state
    state = note_trouble(state, "CudaOOM", NOW + 1000)
    assert recovery_step(cfg, SPEC, state, NOW + 1800) is None
    assert recovery_step(cfg, SPEC, state, NOW + 2800) == "restore"


def test_recovery_stops_at_home_and_then_forgives_the_ladder() -> None:
    cfg = config(stable_for=60)
    spec = WorkerSpec("qwen", FOUR_RUNGS, home_index=1)
    state = WorkerState(profile_index=1, escalation=3, trouble_alerts=frozenset({"X"}), last_trouble_at=NOW)
    assert recovery_step(cfg, spec, state, NOW + 61) == "forgive"
    assert recovery_step(cfg, spec, forgiven(state), NOW + 61) is None
    assert recovery_step(cfg, spec, replace(state, paused=True), NOW + 61) is None


def test_a_restore_from_recovery_resets_the_ladder_and_restarts_the_stable_clock() -> None:
    cfg = config(stable_for=60)
    state = WorkerState(profile_index=2, escalation=2, last_trouble_at=NOW)
    decision, after = run(cfg, state, [], Request("qwen", "restore", "recovery"), now=NOW + 61)
    assert decision.plan is not None and decision.plan.to_index == 1
    assert after.escalation == 0 and after.last_trouble_at == NOW + 61 and after.profile_index == 1
