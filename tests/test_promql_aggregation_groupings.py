"""Aggregations reuse their input's grouping while the label sets repeat: same results as grouping anew."""

from __future__ import annotations

import random

import pytest

from sentinel.promql import Engine, Vector, aggregations
from sentinel.store import Store, labels_from

EXPRS = [
    "sum by (a) (x)",
    "avg without (b) (x)",
    "max by (a) (rate(x[1m]))",
    "count(x)",
    "stddev by (b) (x)",
    "quantile by (a) (0.9, x)",
    "sum by (__name__) ({__name__=~'x|y'})",
    "min by (a, b) (x * 2)",
]


def _results(engine: Engine, t: int) -> list[list[tuple[object, str, bool]]]:
    out = []
    for expr in EXPRS:
        value = engine.instant(expr, t)
        assert isinstance(value, Vector)
        out.append(sorted((s.labels, repr(s.value), s.drop_name) for s in value))
    return out


def test_cached_groupings_give_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    store = Store(retention_ms=3_600_000)
    engine = Engine(store)
    live = {(f"a{i % 5}", f"b{i % 7}", i) for i in range(40)}
    for step in range(120):
        t = 1_000_000 + step * 1000
        if step % 15 == 0:  # series come and go, so the label sets change now and then
            live = {k for k in live if rng.random() > 0.2} | {(f"a{rng.randrange(6)}", "b0", rng.randrange(1000))}
        for a, b, i in sorted(live):
            value = rng.choice([float(step * (i + 1)), -0.0, 1e308, float(rng.randrange(10))])
            store.append(labels_from("x", {"a": a, "b": b, "i": str(i)}), t, value)
            store.append(labels_from("y", {"a": a, "i": str(i)}), t, value + 1)
        if step < 60:
            continue
        cached = _results(engine, t)
        monkeypatch.setattr(aggregations._Groupings, "_MIN_INPUT", 10**9)
        fresh = _results(engine, t)
        monkeypatch.undo()
        assert cached == fresh, step
