"""The render cache of alert templates gives exactly what rendering every time gives."""

from __future__ import annotations

import math
import random

import pytest

from sentinel.promql import Engine
from sentinel.rules import rendercache
from sentinel.rules.group import GroupEvaluator
from sentinel.rules.query import engine_query
from sentinel.rules.rendercache import RenderCache
from sentinel.rules.rulefile import Rule, RuleGroup
from sentinel.store import Store, labels_from

ANNOTATIONS = {
    "summary": "{{ $labels.job }} at {{ $value }}",
    "human": '{{ $value | humanize }} / {{ printf "%.3f" $value }}',
    "queried": '{{ with query "sum(x)" }}{{ . | first | value }}{{ end }}',
    "broken": "{{ index $labels 3 }}",
    "external": "{{ $externalLabels.site }} {{ $externalURL }}",
}


def _group() -> RuleGroup:
    rules = (
        Rule(
            "alert",
            "X",
            "x",
            "t.yml",
            "g",
            0,
            0,
            labels={"sev": "{{ if gt $value 1.0 }}high{{ end }}"},
            annotations=dict(ANNOTATIONS),
        ),
        Rule("alert", "Neg", "-x", "t.yml", "g", 1, 0, annotations=dict(ANNOTATIONS)),
    )
    return RuleGroup("g", "t.yml", 1000, 0, 0, {}, rules)


def _evaluator(store: Store) -> GroupEvaluator:
    return GroupEvaluator(
        _group(),
        store,
        engine_query(Engine(store)),
        interval_ms=1000,
        external_labels={"site": "a"},
        external_url="http://x",
    )


def _snapshot(ev: GroupEvaluator) -> list[object]:
    out: list[object] = []
    for health in ev.health:
        for key, alert in sorted(health.active.items()):
            out.append((key, sorted(alert.labels.items()), sorted(alert.annotations.items()), repr(alert.value)))
    return out


def test_cached_rendering_matches_rendering_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluators over one store, one with the cache bypassed: same alerts, same texts, every tick."""
    rng = random.Random(3)
    store = Store()
    cached, fresh = _evaluator(store), _evaluator(store)
    original = RenderCache.render
    values = [0.0, -0.0, 1.0, 2.5, math.nan, -1.0, 1e300, math.inf]
    for step in range(60):
        t = 1_000_000 + step * 1000
        for job in ("a", "b", "c"):
            # Values repeat often (cache hits), change sometimes, and include -0.0 and NaN.
            value = rng.choice(values) if rng.random() < 0.3 else float(step // 10)
            store.append(labels_from("x", {"job": job}), t, value)
        cached.evaluate(t)
        monkeypatch.setattr(RenderCache, "render", lambda self, text, labels, value, render: render())
        fresh.evaluate(t)
        monkeypatch.setattr(RenderCache, "render", original)
        assert _snapshot(cached) == _snapshot(fresh), f"step {step}"
    assert _snapshot(cached)  # alerts were active


def test_signed_zero_and_impure_templates_are_not_shared() -> None:
    cache = RenderCache()
    calls: list[str] = []

    def render(tag: str) -> str:
        calls.append(tag)
        return tag

    assert cache.render("{{ $value }}", {}, 0.0, lambda: render("+0")) == "+0"
    assert cache.render("{{ $value }}", {}, -0.0, lambda: render("-0")) == "-0"
    assert cache.render("{{ $value }}", {}, 0.0, lambda: render("again")) == "+0"
    text = '{{ query "up" }}'
    assert cache.render(text, {}, 1.0, lambda: render("q1")) == "q1"
    assert cache.render(text, {}, 1.0, lambda: render("q2")) == "q2"
    assert calls == ["+0", "-0", "q1", "q2"]


def test_entries_live_two_evaluations_at_most() -> None:
    cache = RenderCache()
    count = 0

    def render() -> str:
        nonlocal count
        count += 1
        return "r"

    cache.render("{{ $value }}", {"a": "1"}, 1.0, render)
    cache.next_evaluation()
    cache.render("{{ $value }}", {"a": "1"}, 1.0, render)  # from the previous evaluation
    cache.next_evaluation()
    cache.next_evaluation()  # an evaluation that did not use it: forgotten
    cache.render("{{ $value }}", {"a": "1"}, 1.0, render)
    assert count == 2
    assert rendercache.__doc__
