"""The alert state machine (`sentinel.rules.state`): every transition, and `for` restore."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.rules.state import (
    RESOLVED_RETENTION_MS,
    Alert,
    AlertState,
    Candidate,
    LimitExceeded,
    StepResult,
    fingerprint,
    restore_active_at,
    step,
)

GPU0 = {"alertname": "GpuHot", "gpu": "0"}
GPU1 = {"alertname": "GpuHot", "gpu": "1"}
MIN = 60_000


def cand(labels: dict[str, str] = GPU0, value: float = 1.0, **annotations: str) -> Candidate:
    return Candidate(dict(labels), dict(annotations), value)


def run(
    ticks: list[tuple[int, list[Candidate]]], for_ms: int = 0, keep_ms: int = 0, limit: int = 0
) -> list[StepResult]:
    """Feed `step` a sequence of (time, candidates); returns every step's result."""
    active: dict[str, Alert] = {}
    results = []
    for ts, cands in ticks:
        result = step(active, cands, ts, for_ms, keep_ms, limit)
        active = result.active
        results.append(result)
    return results


def only(result: StepResult) -> Alert:
    assert len(result.active) == 1, result.active
    return next(iter(result.active.values()))


def moves(result: StepResult) -> list[tuple[AlertState, AlertState]]:
    return [(t.previous, t.current) for t in result.transitions]


# -- transitions ---------------------------------------------------------------------------


def test_new_series_goes_pending_with_active_since_now() -> None:
    (r,) = run([(1_000, [cand()])], for_ms=MIN)
    alert = only(r)
    assert alert.state is AlertState.PENDING
    assert alert.active_at_ms == 1_000 and alert.fired_at_ms is None
    assert moves(r) == [(AlertState.INACTIVE, AlertState.PENDING)]
    assert r.transitions[0].timestamp_ms == 1_000 and r.transitions[0].alert.labels == GPU0


def test_pending_fires_exactly_when_for_has_elapsed() -> None:
    results = run([(0, [cand()]), (59_999, [cand()]), (60_000, [cand()])], for_ms=MIN)
    assert only(results[1]).state is AlertState.PENDING and moves(results[1]) == []
    fired = only(results[2])
    assert fired.state is AlertState.FIRING and fired.fired_at_ms == 60_000 and fired.active_at_ms == 0
    assert moves(results[2]) == [(AlertState.PENDING, AlertState.FIRING)]


def test_for_zero_fires_on_the_first_evaluation() -> None:
    (r,) = run([(5_000, [cand()])], for_ms=0)
    assert only(r).state is AlertState.FIRING
    assert moves(r) == [(AlertState.INACTIVE, AlertState.PENDING), (AlertState.PENDING, AlertState.FIRING)]
    assert r.transitions[-1].alert.fired_at_ms == 5_000


def test_pending_alert_vanishes_when_its_series_goes() -> None:
    results = run([(0, [cand()]), (1_000, [])], for_ms=MIN)
    assert results[1].active == {}
    assert moves(results[1]) == [(AlertState.PENDING, AlertState.INACTIVE)]


def test_firing_alert_resolves_when_its_series_goes() -> None:
    results = run([(0, [cand()]), (1_000, [])])
    resolved = only(results[1])
    assert resolved.state is AlertState.INACTIVE and resolved.resolved_at_ms == 1_000
    assert resolved.fired_at_ms == 0
    assert moves(results[1]) == [(AlertState.FIRING, AlertState.INACTIVE)]


def test_resolved_alert_is_kept_fifteen_minutes_then_dropped() -> None:
    results = run(
        [
            (0, [cand()]),
            (1_000, []),
            (1_000 + RESOLVED_RETENTION_MS, []),
            (1_000 + RESOLVED_RETENTION_MS + 1, []),
        ]
    )
    assert only(results[2]).state is AlertState.INACTIVE  # exactly at the retention: still kept
    assert moves(results[2]) == []
    assert results[3].active == {} and moves(results[3]) == []


def test_resolved_alert_that_returns_starts_a_new_pending_episode() -> None:
    results = run([(0, [cand()]), (1_000, [cand()]), (2_000, []), (3_000, [cand()]), (4_000, [cand()])], for_ms=1_000)
    assert only(results[2]).state is AlertState.INACTIVE
    back = only(results[3])
    assert back.state is AlertState.PENDING and back.active_at_ms == 3_000
    assert back.fired_at_ms is None and back.resolved_at_ms is None
    assert moves(results[3]) == [(AlertState.INACTIVE, AlertState.PENDING)]
    assert only(results[4]).state is AlertState.FIRING and only(results[4]).fired_at_ms == 4_000


def test_keep_firing_for_holds_firing_then_resolves() -> None:
    keep = 30_000
    results = run(
        [(0, [cand()]), (1_000, []), (20_000, []), (30_999, []), (31_000, [])],
        keep_ms=keep,
    )
    for r in results[1:4]:
        alert = only(r)
        assert alert.state is AlertState.FIRING and alert.keep_firing_since_ms == 1_000
        assert moves(r) == []
    resolved = only(results[4])
    assert resolved.state is AlertState.INACTIVE and resolved.resolved_at_ms == 31_000
    assert moves(results[4]) == [(AlertState.FIRING, AlertState.INACTIVE)]


def test_keep_firing_for_starts_over_when_the_series_returns() -> None:
    results = run([(0, [cand()]), (1_000, []), (2_000, [cand()]), (3_000, []), (32_000, [])], keep_ms=30_000)
    assert only(results[2]).keep_firing_since_ms is None
    assert only(results[3]).keep_firing_since_ms == 3_000
    assert only(results[4]).state is AlertState.FIRING  # 29 s after the series went the second time


def test_keep_firing_for_does_not_hold_a_pending_alert() -> None:
    results = run([(0, [cand()]), (1_000, [])], for_ms=MIN, keep_ms=MIN)
    assert results[1].active == {}


def test_active_alert_refreshes_value_and_annotations_but_keeps_active_since() -> None:
    results = run(
        [(0, [cand(value=86, summary="86 C")]), (1_000, [cand(value=91, summary="91 C")])],
        for_ms=MIN,
    )
    alert = only(results[1])
    assert alert.value == 91 and alert.annotations == {"summary": "91 C"}
    assert alert.active_at_ms == 0 and moves(results[1]) == []


def test_alerts_are_keyed_by_labels_independently() -> None:
    results = run([(0, [cand(GPU0), cand(GPU1)]), (1_000, [cand(GPU1)])], for_ms=MIN)
    assert {a.labels["gpu"] for a in results[0].active.values()} == {"0", "1"}
    assert [a.labels["gpu"] for a in results[1].active.values()] == ["1"]
    assert fingerprint(GPU0) == fingerprint(dict(reversed(list(GPU0.items()))))
    assert fingerprint(GPU0) != fingerprint(GPU1)


def test_more_active_alerts_than_the_limit_raises() -> None:
    step({}, [cand(GPU0), cand(GPU1)], 0, 0, 0, limit=2)
    with pytest.raises(LimitExceeded, match="exceeded limit of 1 with 2 alerts"):
        step({}, [cand(GPU0), cand(GPU1)], 0, 0, 0, limit=1)


def test_resolved_alerts_do_not_count_against_the_limit() -> None:
    first = step({}, [cand(GPU0)], 0, 0, 0, limit=1)
    resolved = step(first.active, [], 1_000, 0, 0, limit=1)
    after = step(resolved.active, [cand(GPU1)], 2_000, 0, 0, limit=1)
    assert {a.labels["gpu"]: a.state for a in after.active.values()} == {
        "0": AlertState.INACTIVE,
        "1": AlertState.FIRING,
    }


def test_step_does_not_mutate_the_previous_active_set() -> None:
    first = step({}, [cand()], 0, MIN, 0)
    before = dict(first.active)
    step(first.active, [], 1_000, MIN, 0)
    assert first.active == before


# -- restore after an outage ------------------------------------------------------------------


def test_restore_counts_time_already_spent_pending() -> None:
    # Pending for 2 of 10 minutes, down 1 minute: 8 minutes are left after the restart.
    active_at, down_at, now = 0, 2 * MIN, 3 * MIN
    restored = restore_active_at(active_at, down_at, now, for_ms=10 * MIN, grace_ms=MIN)
    assert restored == 1 * MIN
    assert restored + 10 * MIN - now == 8 * MIN


def test_restore_gives_at_least_the_grace_period_before_firing() -> None:
    # 9.5 of 10 minutes spent: only 30 s remain, less than the 2 min grace period.
    restored = restore_active_at(0, 9 * MIN + 30_000, 10 * MIN, for_ms=10 * MIN, grace_ms=2 * MIN)
    assert restored + 10 * MIN == 10 * MIN + 2 * MIN  # fires exactly one grace period after now


def test_restore_of_an_alert_already_past_for_keeps_its_active_since() -> None:
    assert restore_active_at(0, 11 * MIN, 12 * MIN, for_ms=10 * MIN, grace_ms=2 * MIN) == 0
    assert restore_active_at(0, 10 * MIN, 12 * MIN, for_ms=10 * MIN, grace_ms=2 * MIN) == 0


def test_restore_skipped_when_for_is_shorter_than_the_grace_period() -> None:
    # Prometheus skips restoring such alerts: they wait their own `for` again, not the grace period.
    now = 10 * MIN
    assert restore_active_at(now - 20_000, now - 5_000, now, for_ms=30_000, grace_ms=10 * MIN) == now


def test_restore_with_the_remaining_time_exactly_the_grace_period_shifts_by_the_outage() -> None:
    restored = restore_active_at(0, 8 * MIN, 9 * MIN, for_ms=10 * MIN, grace_ms=2 * MIN)
    assert restored == MIN


# -- property: the state machine against a small reference model ----------------------------------


@dataclass
class Ref:
    state: str  # pending | firing | resolved
    active_at: int
    keep_since: int | None = None
    resolved_at: int | None = None


def ref_step(m: Ref | None, present: bool, ts: int, for_ms: int, keep_ms: int) -> Ref | None:
    """The documented behaviour, written as plainly as possible."""
    if present:
        if m is None or m.state == "resolved":
            m = Ref("pending", ts)
        m.keep_since = None
        if m.state == "pending" and ts - m.active_at >= for_ms:
            m.state = "firing"
        return m
    if m is None:
        return None
    if m.state == "pending":
        return None
    if m.state == "firing":
        if keep_ms > 0:
            if m.keep_since is None:
                m.keep_since = ts
            if ts - m.keep_since < keep_ms:
                return m
        m.state, m.resolved_at = "resolved", ts
        return m
    assert m.resolved_at is not None
    return None if ts - m.resolved_at > RESOLVED_RETENTION_MS else m


_STATE_NAMES = {AlertState.PENDING: "pending", AlertState.FIRING: "firing", AlertState.INACTIVE: "resolved"}
SERIES = ({"alertname": "X", "gpu": "0"}, {"alertname": "X", "gpu": "1"})


@settings(max_examples=300, deadline=None)
@given(
    for_ms=st.sampled_from([0, 1_000, 5_000, 60_000]),
    keep_ms=st.sampled_from([0, 2_000, 30_000]),
    ticks=st.lists(
        st.tuples(
            st.sampled_from([1, 500, 1_000, 2_000, 30_000, 10 * MIN, RESOLVED_RETENTION_MS]),
            st.tuples(st.booleans(), st.booleans()),
        ),
        max_size=40,
    ),
)
def test_state_machine_matches_reference_model(
    for_ms: int, keep_ms: int, ticks: list[tuple[int, tuple[bool, bool]]]
) -> None:
    active: dict[str, Alert] = {}
    refs: list[Ref | None] = [None, None]
    ts = 0
    for gap, present in ticks:
        ts += gap
        cands = [Candidate(dict(labels), {}, float(ts)) for labels, p in zip(SERIES, present, strict=True) if p]
        result = step(active, cands, ts, for_ms, keep_ms)
        for i, labels in enumerate(SERIES):
            before = refs[i].state if refs[i] is not None else None  # type: ignore[union-attr]
            refs[i] = ref_step(refs[i], present[i], ts, for_ms, keep_ms)
            ref = refs[i]
            got = result.active.get(fingerprint(labels))
            if ref is None:
                assert got is None
            else:
                assert got is not None
                assert _STATE_NAMES[got.state] == ref.state
                assert got.active_at_ms == ref.active_at
                assert got.keep_firing_since_ms == ref.keep_since
                if ref.state == "resolved":
                    assert got.resolved_at_ms == ref.resolved_at
            after = ref.state if ref is not None else None
            changes = [t for t in result.transitions if t.alert.labels == labels]
            if before == after or (before == "resolved" and after is None):
                assert changes == [], (before, after)
            else:
                assert changes, (before, after)
                assert _STATE_NAMES.get(changes[-1].current, "resolved") == (after or "resolved")
        active = result.active
