"""PromQL engine semantics: staleness, lookback, left-open ranges, rate extrapolation,
vector matching errors, delayed name removal; plus a no-crash property test."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.promql import (
    Engine,
    Matrix,
    PromQLError,
    Scalar,
    String,
    Vector,
    metric_names,
    parse,
    reads_any_metric,
)
from sentinel.store import STALE_NAN, Store, labels_from

S = 1000
M = 60 * S


def values(result: object) -> dict[tuple[tuple[str, str], ...], float]:
    assert isinstance(result, Vector)
    return {s.labels: s.value for s in result}


def only_value(result: object) -> float:
    assert isinstance(result, Vector) and len(result) == 1, result
    return result[0].value


@pytest.fixture
def store() -> Store:
    return Store(retention_ms=1 << 40)


def test_instant_selector_returns_newest_sample_within_lookback(store: Store) -> None:
    store.add("up", 1, {"job": "a"}, timestamp_ms=0)
    store.add("up", 2, {"job": "a"}, timestamp_ms=10 * S)
    engine = Engine(store)
    assert only_value(engine.instant("up", 15 * S)) == 2
    assert only_value(engine.instant("up", 5 * S)) == 1
    assert engine.instant("up", -1) == Vector()


def test_lookback_window_is_left_open_and_configurable(store: Store) -> None:
    store.add("up", 1, timestamp_ms=0)
    assert only_value(Engine(store).instant("up", 5 * M - 1)) == 1
    # Prometheus 3: a sample exactly `lookback` old is out of the window.
    assert Engine(store).instant("up", 5 * M) == Vector()
    assert Engine(store, lookback_ms=M).instant("up", 2 * M) == Vector()


def test_stale_marker_hides_series_at_once_and_a_later_sample_revives_it(store: Store) -> None:
    labels = labels_from("up", {"job": "a"})
    store.append(labels, 0, 1)
    store.append(labels, 10 * S, STALE_NAN)
    store.append(labels, 30 * S, 3)
    engine = Engine(store)
    assert engine.instant("up", 20 * S) == Vector()
    assert only_value(engine.instant("up", 30 * S)) == 3
    # Range functions skip the marker instead of counting it.
    assert only_value(engine.instant("count_over_time(up[1m])", 30 * S)) == 2


def test_range_selector_excludes_sample_at_window_start(store: Store) -> None:
    for i in range(5):
        store.add("m", i, timestamp_ms=i * 10 * S)
    engine = Engine(store)
    # (40s - 20s, 40s] holds the samples at 30s and 40s only.
    assert only_value(engine.instant("count_over_time(m[20s])", 40 * S)) == 2
    matrix = engine.instant("m[20s]", 40 * S)
    assert isinstance(matrix, Matrix)
    assert matrix[0].points() == [(30 * S, 3.0), (40 * S, 4.0)]


def test_rate_extrapolates_to_window_edges_like_prometheus(store: Store) -> None:
    # 0, 10, ..., 100 every 15 s: samples cover 0..150 s of a 5 m window ending at 300 s.
    for i in range(11):
        store.add("req_total", i * 10, timestamp_ms=150 * S + i * 15 * S)
    engine = Engine(store)
    # Sampled 150 s for +100; the start is extrapolated to the counter's zero point
    # (150 s before the first sample would go negative), the end by 0 s.
    assert only_value(engine.instant("increase(req_total[5m])", 300 * S)) == pytest.approx(100.0)
    assert only_value(engine.instant("rate(req_total[5m])", 300 * S)) == pytest.approx(100 / 300)
    # A gap larger than 1.1 average intervals at the end extrapolates by half an interval.
    assert only_value(engine.instant("increase(req_total[5m])", 330 * S)) == pytest.approx(100 * 157.5 / 150)


def test_rate_adds_back_counter_resets(store: Store) -> None:
    for i, v in enumerate([10, 20, 30, 5, 15]):
        store.add("c_total", v, timestamp_ms=i * 15 * S)
    engine = Engine(store)
    # (0, 60 s] holds 20 30 5 15: +10, a reset adding 5, +10 = 25 over the 45 s
    # sampled, extrapolated by one interval to the window start: 25 * 60 / 45.
    got = only_value(engine.instant("increase(c_total[1m])", 60 * S))
    assert got == pytest.approx(25 * 60 / 45)
    assert only_value(engine.instant("resets(c_total[2m])", 60 * S)) == 1
    assert only_value(engine.instant("irate(c_total[1m])", 60 * S)) == pytest.approx(10 / 15)


def test_rate_needs_two_samples_and_notes_non_counter_names(store: Store) -> None:
    store.add("gauge", 1, timestamp_ms=0)
    engine = Engine(store)
    assert engine.instant("rate(gauge[1m])", 10 * S) == Vector()
    store.add("gauge", 2, timestamp_ms=10 * S)
    result = engine.instant_query("rate(gauge[1m])", 10 * S)
    assert result.annotations.infos and "might not be a counter" in result.annotations.infos[0]


def test_offset_and_at_modifiers_shift_the_evaluation_time(store: Store) -> None:
    for i in range(10):
        store.add("m", i, timestamp_ms=i * M)
    engine = Engine(store)
    assert only_value(engine.instant("m offset 3m", 9 * M)) == 6
    assert only_value(engine.instant("m @ 120", 9 * M)) == 2
    matrix = engine.range("m @ end()", 0, 4 * M, 2 * M)
    assert [v for _, v in matrix[0].points()] == [4.0, 4.0, 4.0]


def test_subquery_steps_are_aligned_to_absolute_multiples_of_the_step(store: Store) -> None:
    for i in range(10):
        store.add("m", i, timestamp_ms=i * 10 * S)
    engine = Engine(store)
    # (55 s, 95 s] at 20 s steps: 60 s and 80 s, not 55 + 20 = 75 s.
    assert only_value(engine.instant("count_over_time(m[40s:20s])", 95 * S)) == 2
    assert only_value(engine.instant("max_over_time(m[40s:20s])", 95 * S)) == 8
    assert only_value(engine.instant("min_over_time(m[40s:20s])", 95 * S)) == 6


def test_many_to_many_matching_is_a_typed_error(store: Store) -> None:
    store.add("a", 1, {"x": "1"}, timestamp_ms=0)
    store.add("b", 1, {"x": "1", "y": "1"}, timestamp_ms=0)
    store.add("b", 2, {"x": "1", "y": "2"}, timestamp_ms=0)
    engine = Engine(store)
    with pytest.raises(PromQLError, match="many-to-many matching not allowed"):
        engine.instant("a + on(x) b", 0)
    with pytest.raises(PromQLError, match="many-to-one matching must be explicit"):
        engine.instant("b + on(x) a", 0)
    got = values(engine.instant("b + on(x) group_left a", 0))
    assert got == {(("x", "1"), ("y", "1")): 2.0, (("x", "1"), ("y", "2")): 3.0}


def test_group_left_copies_labels_from_the_one_side(store: Store) -> None:
    store.add("cpu", 3, {"instance": "a", "mode": "idle"}, timestamp_ms=0)
    store.add("info", 1, {"instance": "a", "owner": "ops"}, timestamp_ms=0)
    engine = Engine(store)
    got = values(engine.instant("cpu * on(instance) group_left(owner) info", 0))
    assert got == {(("instance", "a"), ("mode", "idle"), ("owner", "ops")): 3.0}


def test_comparison_filters_or_returns_bool_and_keeps_name_only_when_filtering(store: Store) -> None:
    store.add("m", 5, {"i": "1"}, timestamp_ms=0)
    store.add("m", 1, {"i": "2"}, timestamp_ms=0)
    engine = Engine(store)
    assert values(engine.instant("m > 2", 0)) == {(("__name__", "m"), ("i", "1")): 5.0}
    assert values(engine.instant("m > bool 2", 0)) == {(("i", "1"),): 1.0, (("i", "2"),): 0.0}
    assert values(engine.instant("2 < m", 0)) == {(("__name__", "m"), ("i", "1")): 5.0}


def test_set_operators_match_on_labels_without_name(store: Store) -> None:
    store.add("a", 1, {"i": "1"}, timestamp_ms=0)
    store.add("a", 2, {"i": "2"}, timestamp_ms=0)
    store.add("b", 9, {"i": "2"}, timestamp_ms=0)
    engine = Engine(store)
    assert values(engine.instant("a and b", 0)) == {(("__name__", "a"), ("i", "2")): 2.0}
    assert values(engine.instant("a unless b", 0)) == {(("__name__", "a"), ("i", "1")): 1.0}
    assert len(values(engine.instant("b or a", 0))) == 2


def test_dropped_names_that_collide_are_an_error(store: Store) -> None:
    store.add("a", 1, timestamp_ms=0)
    store.add("b", 2, timestamp_ms=0)
    engine = Engine(store)
    with pytest.raises(PromQLError, match="same labelset"):
        engine.instant('abs({__name__=~"a|b"})', 0)
    # Delayed removal: label_replace can still read the name a function will drop.
    got = values(engine.instant('label_replace(abs({__name__=~"a|b"}), "was", "$1", "__name__", "(.*)")', 0))
    assert got == {(("was", "a"),): 1.0, (("was", "b"),): 2.0}


def test_aggregations_group_by_and_without(store: Store) -> None:
    for gpu, v in enumerate([1.0, 2.0, 3.0, 4.0]):
        store.add("util", v, {"host": "h" + str(gpu % 2), "gpu": str(gpu)}, timestamp_ms=0)
    engine = Engine(store)
    assert values(engine.instant("sum by (host) (util)", 0)) == {(("host", "h0"),): 4.0, (("host", "h1"),): 6.0}
    assert values(engine.instant("max without (gpu) (util)", 0)) == {(("host", "h0"),): 3.0, (("host", "h1"),): 4.0}
    assert only_value(engine.instant("stddev(util)", 0)) == pytest.approx(math.sqrt(1.25))
    assert only_value(engine.instant("quantile(0.5, util)", 0)) == 2.5
    top = engine.instant("topk(2, util)", 0)
    assert isinstance(top, Vector) and [s.value for s in top] == [4.0, 3.0]
    counts = values(engine.instant('count_values("v", util > 2)', 0))
    assert counts == {(("v", "3"),): 1.0, (("v", "4"),): 1.0}


def test_histogram_quantile_interpolates_classic_buckets(store: Store) -> None:
    for le, count in (("0.1", 10), ("0.5", 30), ("1", 40), ("+Inf", 40)):
        store.add("lat_bucket", count, {"le": le}, timestamp_ms=0)
    engine = Engine(store)
    # Rank 20 of 40 falls in (0.1, 0.5] holding observations 10..30: halfway.
    assert only_value(engine.instant("histogram_quantile(0.5, lat_bucket)", 0)) == pytest.approx(0.3)
    # Rank 39.6 falls in (0.5, 1] holding 30..40: 0.5 + 0.5 * 9.6 / 10.
    assert only_value(engine.instant("histogram_quantile(0.99, lat_bucket)", 0)) == pytest.approx(0.98)


def test_native_histogram_functions_are_refused_clearly(store: Store) -> None:
    with pytest.raises(PromQLError, match="native histograms"):
        Engine(store).instant("histogram_count(x)", 0)


def test_label_replace_uses_go_template_syntax(store: Store) -> None:
    store.add("m", 1, {"instance": "host:9100"}, timestamp_ms=0)
    engine = Engine(store)
    got = values(engine.instant('label_replace(m, "host", "${1}-x$$", "instance", "(.*):.*")', 0))
    assert list(got) == [(("__name__", "m"), ("host", "host-x$"), ("instance", "host:9100"))]


def test_regex_matchers_use_re2_semantics(store: Store) -> None:
    store.add("m", 1, {"g": "Production"}, timestamp_ms=0)
    engine = Engine(store)
    assert len(values(engine.instant('m{g=~"((?i)PRO).*"}', 0))) == 1
    assert len(values(engine.instant('m{g=~"[[:upper:]][[:lower:]]+"}', 0))) == 1
    assert values(engine.instant('m{g=~"Prod"}', 0)) == {}  # anchored


def test_scalar_and_string_results_and_range_queries(store: Store) -> None:
    store.add("m", 1, timestamp_ms=0)
    engine = Engine(store)
    assert engine.instant("1 + 2 * 3", 0) == Scalar(7.0)
    assert engine.instant('"hi"', 0) == String("hi")
    assert engine.instant("scalar(m) / 0", 0) == Scalar(math.inf)
    matrix = engine.range("time()", 0, 20 * S, 10 * S)
    assert matrix[0].points() == [(0, 0.0), (10 * S, 10.0), (20 * S, 20.0)]
    with pytest.raises(PromQLError, match="range vector"):
        engine.range("m[1m]", 0, 10 * S, 5 * S)


def test_parse_is_cached_and_parse_errors_are_typed() -> None:
    assert parse("sum(rate(x[5m]))") is parse("sum(rate(x[5m]))")
    with pytest.raises(PromQLError, match="parse error"):
        parse("sum(")


def test_metric_names_lists_every_selected_name() -> None:
    expr = 'a + on(x) b{c="d"} or sum(rate(e[5m])) unless {__name__="f"} > bool max_over_time(g[1m:])'
    assert metric_names(expr) == {"a", "b", "e", "f", "g"}
    assert not reads_any_metric(expr)
    assert reads_any_metric('{job="x"}')


# -- property: arbitrary simple expressions never crash with anything but PromQLError --

_SELECTORS = st.sampled_from(["m", 'm{a="x"}', "n", '{__name__=~"m|n"}', 'm{a!="y"}'])
_DURATIONS = st.sampled_from(["10s", "1m", "90s", "5m"])
_RANGE_FUNCS = st.sampled_from(
    [
        "rate", "increase", "delta", "irate", "idelta", "deriv", "changes", "resets",
        "avg_over_time", "sum_over_time", "min_over_time", "max_over_time", "count_over_time",
        "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time", "mad_over_time",
        "absent_over_time", "ts_of_max_over_time",
    ]
)  # fmt: skip
_FUNCS = st.sampled_from(
    ["abs", "ceil", "floor", "exp", "ln", "log2", "sqrt", "sgn", "sin", "acos", "atanh", "cosh",
     "deg", "round", "timestamp", "sort", "sort_desc", "absent", "day_of_week", "year"]
)  # fmt: skip
_AGGS = st.sampled_from(["sum", "avg", "min", "max", "count", "group", "stddev", "stdvar"])
_OPS = st.sampled_from(["+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless", "atan2"])
_MODS = st.sampled_from(
    ["", "on(a) ", "ignoring(a) ", "on() ", "bool ", "on(a) group_left ", "ignoring(a) group_right "]
)
_NUMBERS = st.sampled_from(["0", "1", "-1", "0.5", "NaN", "Inf", "-Inf", "1e308"])


def _expressions() -> st.SearchStrategy[str]:
    leaf = st.one_of(
        _SELECTORS,
        _NUMBERS,
        st.builds(lambda f, s, d: f"{f}({s}[{d}])", _RANGE_FUNCS, _SELECTORS, _DURATIONS),
        st.builds(lambda s: f"quantile_over_time(0.9, {s}[1m])", _SELECTORS),
        st.builds(lambda s, k: f"predict_linear({s}[1m], {k})", _SELECTORS, _NUMBERS),
        st.just("time()"),
        st.just("vector(1)"),
    )

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.builds(lambda f, e: f"{f}({e})", _FUNCS, inner),
            st.builds(lambda a, e: f"{a} by (a) ({e})", _AGGS, inner),
            st.builds(lambda a, e: f"{a} without (a) ({e})", _AGGS, inner),
            st.builds(lambda k, e: f"topk({k}, {e})", _NUMBERS, inner),
            st.builds(lambda k, e: f"limitk({k}, {e})", _NUMBERS, inner),
            st.builds(lambda k, e: f"quantile({k}, {e})", _NUMBERS, inner),
            st.builds(lambda e: f'count_values("v", {e})', inner),
            st.builds(lambda lo, hi, e: f"clamp({e}, {lo}, {hi})", _NUMBERS, _NUMBERS, inner),
            st.builds(lambda e: f'label_replace({e}, "a", "$1", "a", "(.*)")', inner),
            st.builds(lambda e: f"max_over_time(({e})[1m:20s])", inner),
            st.builds(lambda e: f"scalar({e})", inner),
            st.builds(lambda a, o, m, b: f"({a}) {o} {m}({b})", inner, _OPS, _MODS, inner),
            st.builds(lambda e: f"-({e})", inner),
        )

    return st.recursive(leaf, extend, max_leaves=6)


_POINT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1.0, -1.0, STALE_NAN]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expr=_expressions(),
    data=st.lists(
        st.tuples(st.sampled_from(["m", "n"]), st.sampled_from(["x", "y", ""]), st.lists(_POINT, max_size=8)),
        max_size=4,
    ),
    at=st.integers(min_value=-60, max_value=200),
)
def test_arbitrary_expressions_raise_nothing_but_promql_error(
    expr: str, data: list[tuple[str, str, list[float]]], at: int
) -> None:
    store = Store(retention_ms=1 << 40)
    for name, a, points in data:
        labels = labels_from(name, {"a": a})
        for i, v in enumerate(points):
            store.append(labels, i * 15 * S, v)
    engine = Engine(store)
    try:
        engine.instant(expr, at * S)
        engine.range(expr, 0, 120 * S, 30 * S)
    except PromQLError:
        pass
