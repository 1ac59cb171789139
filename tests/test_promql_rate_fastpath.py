"""rate/increase/delta over a selector (the store-summary path) against the reference kernel.

`functions._rate_of_selector` reads each window's ends from the store and shares the
timestamp terms between series sampled together; `rangefuncs.extrapolated_rate` over
the window's samples is the plain transcription of Prometheus. They must agree to the
bit, whatever the series: aligned or not, counters started at zero (the zero-point
clamp), resets, gaps, NaNs and staleness markers.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.promql import Engine, Vector
from sentinel.promql.rangefuncs import extrapolated_rate
from sentinel.store import STALE_NAN, Store, labels_from

_RATES = {"rate": (True, True), "increase": (True, False), "delta": (False, False)}

_series = st.tuples(
    st.integers(0, 3),  # timestamp jitter pattern
    st.sampled_from([0, 0, 150, 330, 385, 398]),  # first sample (inside a window: the zero-point clamp)
    st.floats(min_value=0, max_value=50),  # start value (0: the zero-point clamp)
    st.lists(
        st.one_of(st.floats(min_value=0, max_value=20), st.sampled_from([-30.0, math.nan, STALE_NAN])),
        min_size=0,
        max_size=3,
    ),  # odd increments sprinkled in
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_series, min_size=1, max_size=12), st.sampled_from([30_000, 60_000, 300_000]), st.integers(0, 999))
def test_selector_path_equals_reference_kernel(
    specs: list[tuple[int, int, float, list[float]]], range_ms: int, phase: int
) -> None:
    store = Store(retention_ms=3_600_000)
    base = 1_000_000
    for k, (jitter, born, start, odd) in enumerate(specs):
        labels = labels_from("c_total", {"k": str(k)})
        value = start
        for i in range(born, 400):
            t = base + i * 1000 + (i % 7 if jitter == 1 else 0) + (k if jitter == 2 else 0)
            if jitter == 3 and i % 50 == 17:
                continue  # a missed scrape
            if i == born:
                value = start  # a counter born at 0 (or near it): extrapolation stops at zero
            elif odd and i % 97 == 5:
                inc = odd[(i // 97) % len(odd)]
                value = inc if inc != inc or inc < 0 else value + inc
            else:
                value = (0.0 if value != value or value < 0 else value) + 3.0 + (k % 3)
            store.append(labels, t, value)
    engine = Engine(store)
    t_eval = base + 399_000 + phase
    for fn, (counter, is_rate) in _RATES.items():
        got = engine.instant(f"{fn}(c_total[{range_ms // 1000}s])", t_eval)
        assert isinstance(got, Vector)
        want: dict[object, float] = {}
        for series in store.select_cached(engine.parse("c_total").alternatives[0]):  # type: ignore[attr-defined]
            ts, vs = series.range(t_eval - range_ms, t_eval)
            value = extrapolated_rate(ts, vs, t_eval - range_ms, t_eval, range_ms, counter=counter, rate=is_rate)
            if value is not None:
                want[tuple(p for p in series.labels if p[0] != "__name__")] = value
        assert {s.labels: repr(s.value) for s in got} == {k: repr(v) for k, v in want.items()}, fn
