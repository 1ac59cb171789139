"""C1/C3/C10: the store's memory is bounded by retention and per-source series budgets."""

from __future__ import annotations

import pytest

from sentinel.store import LabelMatcher, MatchOp, Store, labels_from


def test_a_series_never_holds_much_more_than_its_retention() -> None:
    # C10: compaction waited for 1,024 dead samples, so a series held its retention
    # plus up to 1,024 samples (2 min at 1 Hz: 120 live, up to 1,144 held).
    store = Store(retention_ms=120_000)
    key = labels_from("m", gpu="0")
    worst = 0
    for t in range(3_000):
        store.append(key, t * 1000, 1.0)
        if t % 15 == 0:  # the daemon trims every 15 s
            store.trim(now=t * 1000)
            series = store.get(key)
            assert series is not None
            held = len(series.raw()[0]) + series._head  # live + dead prefix
            worst = max(worst, held)
    assert worst <= 1.25 * 135 + 16  # live window (120 s + one trim period), a quarter more


def test_a_limited_source_that_churns_names_keeps_its_budget(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    store.limit_source("endpoint:w0", 100)
    for t in range(50):
        with store.appender("endpoint:w0", 1_000 + t) as out:
            for i in range(30):
                out.add("vllm:fresh", 1.0, request_id=f"{t}-{i}")
    assert len(store) == 100
    assert store.series_evicted["endpoint:w0"] == 50 * 30 - 100
    assert store.series_refused["endpoint:w0"] == 0
    # The live pass is whole: only ended series were evicted.
    live = store.instant([LabelMatcher("__name__", MatchOp.EQ, "vllm:fresh")], 1_049)
    assert len(live) == 30
    # 1,400 evictions, one log line (at most one a minute per source).
    assert len([r for r in caplog.records if "endpoint:w0 holds 100 series" in r.getMessage()]) == 1


def test_a_pass_larger_than_the_budget_is_cut_and_counted() -> None:
    store = Store()
    store.limit_source("probe:w0", 10)
    with store.appender("probe:w0", 1_000) as out:
        for i in range(25):
            out.add("x", 1.0, i=str(i))
    assert len(store) == 10
    assert store.series_refused["probe:w0"] == 15
    # An unlimited source is not affected by another's budget.
    with store.appender("nvml", 1_000) as out:
        for i in range(25):
            out.add("y", 1.0, i=str(i))
    assert len(store) == 35


def test_writes_outside_a_pass_count_against_the_owner_budget() -> None:
    store = Store()
    store.limit_source("probe:w0", 3)
    written = [store.append(labels_from("oom", gpu=str(i)), 1_000, 1.0, owner="probe:w0") for i in range(5)]
    # None is live in a pass, so each new one evicts the oldest.
    assert written == [True] * 5 and len(store) == 3 and store.series_evicted["probe:w0"] == 2


def test_names_whose_series_are_gone_are_forgotten_and_cached_readers_notice() -> None:
    store = Store(retention_ms=1_000)
    for i in range(1_000):
        store.append(labels_from(f"churn_{i}"), 1_000, 1.0)
    version = store.version
    selected = store.select_cached([LabelMatcher("__name__", MatchOp.EQ, "churn_7")])
    assert len(selected) == 1
    store.trim(now=10_000)
    assert len(store) == 0
    assert len(store._name_version) == 0 and len(store._name_generation) == 0 and len(store._by_name) == 0
    assert store.changed_since(version, ["churn_7"])
    assert store.select_cached([LabelMatcher("__name__", MatchOp.EQ, "churn_7")]) == ()
    assert not store.changed_since(store.version, ["churn_7"])
