"""Store semantics: staleness, retention, lookback, ranges; plus property tests."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.store import (
    STALE_NAN,
    LabelMatcher,
    MatchOp,
    Store,
    is_stale_marker,
    labels_from,
)

UP = [LabelMatcher("__name__", MatchOp.EQ, "up")]


def test_stale_marker_is_distinct_from_an_ordinary_nan() -> None:
    assert is_stale_marker(STALE_NAN)
    assert not is_stale_marker(math.nan)
    assert not is_stale_marker(1.0)


def test_instant_lookup_sees_newest_sample_within_lookback() -> None:
    store = Store(lookback_ms=300_000)
    store.add("up", 1, {"job": "a"}, timestamp_ms=10_000)
    store.add("up", 2, {"job": "a"}, timestamp_ms=20_000)
    [sample] = store.instant(UP, 25_000)
    assert (sample.timestamp_ms, sample.value) == (20_000, 2)
    # Lookback is left-open: a sample exactly lookback old is out.
    assert store.instant(UP, 320_000) == []
    assert len(store.instant(UP, 319_999)) == 1
    # A sample in the future of the query is not seen.
    assert store.instant(UP, 15_000)[0].value == 1


def test_series_missing_from_a_source_pass_goes_stale() -> None:
    store = Store()
    with store.appender("nvml", 1_000) as app:
        app.add("up", 1, gpu="0")
        app.add("up", 1, gpu="1")
    with store.appender("nvml", 2_000) as app:
        app.add("up", 1, gpu="0")
    live = {dict(s.labels)["gpu"] for s in store.instant(UP, 2_500)}
    assert live == {"0"}
    # Before the marker the series was visible.
    assert {dict(s.labels)["gpu"] for s in store.instant(UP, 1_500)} == {"0", "1"}
    # The series comes back when reported again.
    with store.appender("nvml", 3_000) as app:
        app.add("up", 1, gpu="1")
    assert {dict(s.labels)["gpu"] for s in store.instant(UP, 3_000)} == {"1"}


def test_sources_only_stale_their_own_series() -> None:
    store = Store()
    with store.appender("a", 1_000) as app:
        app.add("up", 1, src="a")
    with store.appender("b", 1_000) as app:
        app.add("up", 1, src="b")
    store.appender("a", 2_000).commit()
    assert [dict(s.labels)["src"] for s in store.instant(UP, 2_000)] == ["b"]


def test_range_read_is_left_open_and_drops_stale_markers() -> None:
    store = Store()
    key = labels_from("up", job="x")
    for t in range(0, 60_001, 10_000):
        store.append(key, t, t / 1000)
    store.mark_stale(key, 65_000)
    [(labels, ts, vals)] = store.range(UP, 10_000, 65_000)
    assert labels == key
    assert list(ts) == [20_000, 30_000, 40_000, 50_000, 60_000]
    assert list(vals) == [20.0, 30.0, 40.0, 50.0, 60.0]


def test_retention_drops_old_samples_and_empty_series() -> None:
    store = Store(retention_ms=60_000)
    store.add("up", 1, {"job": "old"}, timestamp_ms=0)
    for t in range(0, 120_001, 1_000):
        store.add("up", 1, {"job": "new"}, timestamp_ms=t)
    removed = store.trim(now=120_000)
    assert removed == 1
    [(labels, ts, _)] = store.range(UP, -1, 120_000)
    assert dict(labels)["job"] == "new"
    assert ts[0] == 60_000


def test_out_of_order_samples_are_refused_and_counted() -> None:
    store = Store()
    with store.appender("s", 2_000) as app:
        app.add("up", 1)
    with store.appender("s", 1_000) as app:
        app.add("up", 5)
    assert store.out_of_order_total == 1
    assert store.instant(UP, 3_000)[0].value == 1


def test_regex_matchers_are_fully_anchored() -> None:
    store = Store()
    store.add("up", 1, {"job": "node"}, timestamp_ms=1)
    store.add("up", 1, {"job": "node_exporter"}, timestamp_ms=1)
    hits = store.instant([*UP, LabelMatcher("job", MatchOp.RE, "node")], 1)
    assert [dict(s.labels)["job"] for s in hits] == ["node"]
    misses = store.instant([*UP, LabelMatcher("job", MatchOp.NRE, "node.*")], 1)
    assert misses == []


def test_missing_label_matches_empty_string() -> None:
    store = Store()
    store.add("up", 1, {}, timestamp_ms=1)
    assert len(store.instant([*UP, LabelMatcher("job", MatchOp.EQ, "")], 1)) == 1


def test_counter_increment_starts_at_zero() -> None:
    store = Store()
    assert store.inc("x_total", gpu="0", timestamp_ms=1) == 1
    assert store.inc("x_total", 2, gpu="0", timestamp_ms=2) == 3


def test_samples_cost_sixteen_bytes_in_the_steady_state() -> None:
    store = Store(retention_ms=900_000)
    key = labels_from("up")
    for t in range(0, 900_000, 1000):
        store.append(key, t, 1.0)
    # array over-allocates by at most ~12 %: well under the 24-byte target.
    assert store.nbytes() / store.sample_count() <= 24


timestamps = st.lists(st.integers(min_value=0, max_value=10_000_000), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    ts=timestamps,
    query=st.integers(min_value=0, max_value=11_000_000),
    lookback=st.integers(min_value=1, max_value=1_000_000),
)
def test_instant_lookup_matches_a_naive_model(ts: list[int], query: int, lookback: int) -> None:
    store = Store(retention_ms=10**12, lookback_ms=lookback)
    key = labels_from("up")
    accepted: dict[int, float] = {}
    last = -1
    for i, t in enumerate(ts):
        if t >= last:
            accepted[t] = float(i)
            last = t
        store.append(key, t, float(i))
    window = [t for t in accepted if query - lookback < t <= query]
    got = store.instant(UP, query)
    if not window:
        assert got == []
    else:
        newest = max(window)
        assert [(s.timestamp_ms, s.value) for s in got] == [(newest, accepted[newest])]


@settings(max_examples=200, deadline=None)
@given(
    ts=timestamps,
    start=st.integers(0, 10_000_000),
    width=st.integers(0, 5_000_000),
    retention=st.integers(1, 10_000_000),
)
def test_range_read_after_trim_matches_a_naive_model(ts: list[int], start: int, width: int, retention: int) -> None:
    store = Store(retention_ms=retention)
    key = labels_from("up")
    kept: dict[int, float] = {}
    last = -1
    for i, t in enumerate(sorted(ts)):
        store.append(key, t, float(i))
        if t >= last:
            kept[t] = float(i)
            last = t
    now = max(ts)
    store.trim(now=now)
    cutoff = now - retention
    expected = [(t, v) for t, v in sorted(kept.items()) if t >= cutoff and start < t <= start + width]
    got = store.range(UP, start, start + width)
    flat = [(int(t), float(v)) for _, tss, vals in got for t, v in zip(tss, vals, strict=False)]
    assert flat == expected
