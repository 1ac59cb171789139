"""`Series.window_summary` against a brute-force reading of the same window.

The summary takes shortcuts (the window's start computed from a steady sampling step,
break and NaN markers instead of scans); whatever the history of appends, overwrites,
trims and compactions, its answer must be what reading the samples gives, or None.
"""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.store import STALE_NAN, Series, labels_from

_VALUES = st.one_of(
    st.floats(min_value=-5, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, math.nan, STALE_NAN]),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from([0, 1, 1, 1, 2, 5, 1000, 1000, 1000, 997, 3000]), _VALUES),
        st.tuples(st.just("trim"), st.integers(0, 40_000), st.just(0.0)),
    ),
    max_size=120,
)


def _reference(series: Series, start: int, end: int) -> tuple[int, int, int, float, float, float] | None:
    ts, vs = series.raw()
    window = [(t, v) for t, v in zip(ts, vs, strict=True) if start < t <= end]
    if not window:
        return 0, 0, 0, 0.0, 0.0, 0.0
    if any(v != v for _, v in window):
        return None
    correction = 0.0
    for (_, prev), (_, cur) in itertools.pairwise(window):
        if cur < prev:
            correction += prev
    return len(window), window[0][0], window[-1][0], window[0][1], window[-1][1], correction


@settings(max_examples=400, deadline=None)
@given(_OPS, st.lists(st.tuples(st.integers(-2000, 50_000), st.integers(0, 40_000)), min_size=1, max_size=8))
def test_window_summary_is_what_the_samples_say(
    ops: list[tuple[str, int, float]], windows: list[tuple[int, int]]
) -> None:
    series = Series(labels_from("x"))
    t = 0
    for op, arg, value in ops:
        if op == "append":
            t += arg  # a gap of 0 overwrites the last sample
            series.append(t, value)
        else:
            series.trim_before(arg)
        for end, length in windows:
            got = series.window_summary(end - length, end)
            want = _reference(series, end - length, end)
            if got is None:
                continue  # "take the general path" is always allowed
            assert want is not None, (end, length)
            assert [repr(x) for x in got] == [repr(x) for x in want], (end, length)


def test_a_steady_series_is_summarised_without_the_general_path() -> None:
    series = Series(labels_from("x"))
    for i in range(1000):
        series.append(1_000 + i * 1000, float(i))
    series.trim_before(400_000)
    assert series.window_summary(700_500, 999_000) == (299, 701_000, 999_000, 700.0, 998.0, 0.0)
