"""Subquery steps reused across evaluations give exactly the results of evaluating afresh."""

from __future__ import annotations

import math
import random

import pytest

from sentinel.promql import Engine, Vector
from sentinel.promql.subcache import SubqueryCache, reach
from sentinel.promql.syntax import Subquery, parse
from sentinel.store import Store

EXPRESSIONS = [
    "max_over_time(sum by (job) (rate(c[5m]))[30m:1m])",
    "avg_over_time(g[20m:])",
    "min_over_time((g offset 2m)[10m:30s])",
    "max_over_time((g offset -1m)[10m:1m])",  # reads ahead of its step: settles later
    "count_over_time(max_over_time(g[3m:1m])[15m:1m])",  # nested subqueries
    "quantile_over_time(0.5, (g * on(job) group_left c)[10m:1m])",
    "sum_over_time(vector(time())[10m:1m])",
]


def _values(value: object) -> list[tuple[object, float]]:
    assert isinstance(value, Vector)
    return sorted((s.labels, s.value) for s in value)


def _same(a: list[tuple[object, float]], b: list[tuple[object, float]]) -> bool:
    return len(a) == len(b) and all(
        la == lb and (va == vb or (math.isnan(va) and math.isnan(vb))) for (la, va), (lb, vb) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_rule_evaluations_reusing_steps_equal_fresh_evaluations(expr: str) -> None:
    rng = random.Random(expr)
    store = Store(retention_ms=20 * 60_000)
    cached = Engine(store, subquery_step_ms=60_000, subquery_settle_ms=10_000)
    shared = cached.shared_results()
    counters = {"a": 0.0, "b": 0.0}
    for second in range(0, 90 * 60, 15):
        t = second * 1000
        for job in ("a", "b"):
            if rng.random() < 0.02:
                counters[job] = 0.0  # a reset
            counters[job] += rng.random() * 10
            store.add("c", counters[job], {"job": job}, timestamp_ms=t)
            store.add("g", rng.random(), {"job": job}, timestamp_ms=t)
        if second == 40 * 60:
            store.add("g", 5.0, {"job": "late"}, timestamp_ms=t)  # a new series mid-way
        if second % 120 == 0:
            store.trim(t)  # retention drops old samples, as the daemon's trim does
        if second % 60 == 0:
            fresh = Engine(store, subquery_step_ms=60_000).instant(expr, t)
            reused = cached.instant(expr, t, shared=shared, as_rule=True)
            assert _same(_values(reused), _values(fresh)), (expr, t)


def test_a_late_sample_within_the_settle_time_is_seen() -> None:
    store = Store(retention_ms=10**9)
    engine = Engine(store, subquery_step_ms=60_000, subquery_settle_ms=60_000)
    shared = engine.shared_results()
    expr = "sum_over_time(g[10m:1m])"
    for minute in range(20):
        store.add("g", 1.0, timestamp_ms=minute * 60_000)
        engine.instant(expr, minute * 60_000, shared=shared, as_rule=True)
    # A collector's pass commits a sample 30 s late, after the evaluation at 19m.
    store.add("g", 100.0, {"late": "1"}, timestamp_ms=19 * 60_000 - 30_000)
    t = 20 * 60_000
    store.add("g", 1.0, timestamp_ms=t)
    assert _values(engine.instant(expr, t, shared=shared, as_rule=True)) == _values(Engine(store).instant(expr, t))


def test_range_query_with_a_subquery_equals_its_steps() -> None:
    store = Store(retention_ms=10**9)
    for t in range(0, 3_600_000, 10_000):
        store.add("g", math.sin(t / 1e5), timestamp_ms=t)
    expr = "max_over_time(deriv(g[2m])[15m:30s])"
    result = Engine(store).range(expr, 1_800_000, 3_600_000, 60_000)
    for series in result:
        for ts, value in zip(series.timestamps, series.values, strict=True):
            assert [s.value for s in Engine(store).instant(expr, ts)] == [value]  # type: ignore[union-attr]


def test_reach_and_uncacheable_subqueries() -> None:
    node = parse("max_over_time((rate(x[5m] offset 1m))[1h:1m])")
    assert isinstance(node.args[0], Subquery)  # type: ignore[union-attr]
    # The offset reads 1m back (the window: 5m + 1m); a call reads no later than its step.
    assert reach(node.args[0].expr, 300_000) == (360_000, 0)  # type: ignore[union-attr]
    assert reach(parse("x @ 100"), 300_000) is None
    assert reach(parse("x - step()"), 300_000) is None


def test_the_cache_is_bounded() -> None:
    store = Store(retention_ms=10**9)
    for t in range(0, 3_600_000, 60_000):
        for i in range(50):
            store.add("g", 1.0, {"i": str(i)}, timestamp_ms=t)
    engine = Engine(store, subquery_settle_ms=0)
    shared = engine.shared_results()
    shared.subqueries = SubqueryCache(limit=1000)
    for t in range(1_800_000, 3_600_000, 60_000):
        value = engine.instant("count_over_time(g[30m:1m])", t, shared=shared, as_rule=True)
        assert _values(value) == _values(Engine(store).instant("count_over_time(g[30m:1m])", t))
        assert shared.subqueries._points <= 1000
