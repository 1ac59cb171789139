"""Functions of range vectors: the rate family, *_over_time, changes, resets, deriv, ...

Each kernel takes one series' (timestamps, values) arrays for the window and returns
a float, or None for "no output for this series". Kernels work on the arrays
directly (sum/min/max/len run in C) instead of building per-sample objects.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable

from sentinel.promql import stats
from sentinel.promql.model import PromQLError
from sentinel.store import RANGE_NONNEGATIVE

__all__ = ["HINTED_KERNELS", "KERNELS", "PARAM_KERNELS", "extrapolated_rate", "instant_value", "rate_from_summary"]

Kernel = Callable[["array[int]", "array[float]"], float | None]
HintedKernel = Callable[["array[int]", "array[float]", int], float | None]
"""A kernel that also takes the window's `RangeSeries.hints` bits."""


def extrapolated_rate(
    ts: array[int],
    vs: array[float],
    range_start: int,
    range_end: int,
    range_ms: int,
    *,
    counter: bool,
    rate: bool,
    reset_correction: float | None = None,
    from_summary: Callable[..., float | None] | None = None,
) -> float | None:
    """Prometheus's `extrapolatedRate` for rate, increase and delta.

    `reset_correction`, when the caller knows it (`RangeSeries.reset_correction`), saves
    the scan for counter resets. `from_summary` replaces `rate_from_summary` (for
    Prometheus 2's arithmetic).
    """
    n = len(vs)
    if n < 2:
        return None
    correction = 0.0
    if counter:
        correction = _reset_correction(vs) if reset_correction is None else reset_correction
    return (from_summary or rate_from_summary)(
        n, ts[0], ts[-1], vs[0], vs[-1], correction, range_start, range_end, range_ms, counter, rate
    )


def rate_from_summary(
    n: int,
    first_t: int,
    last_t: int,
    first_v: float,
    last_v: float,
    correction: float,
    range_start: int,
    range_end: int,
    range_ms: int,
    counter: bool,
    rate: bool,
) -> float | None:
    """`extrapolated_rate` from a window's ends (`Series.window_summary`) and its counter correction."""
    if n < 2:
        return None
    result = last_v - first_v
    if counter:
        result += correction
    to_start = (first_t - range_start) / 1000
    to_end = (range_end - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average = sampled / (n - 1)
    threshold = average * 1.1
    if to_start >= threshold:
        to_start = average / 2
    if counter:
        # A counter cannot go below zero: do not extrapolate past the zero point.
        to_zero = to_start
        if result > 0 and first_v >= 0:
            to_zero = sampled * (first_v / result)
        if to_zero < to_start:
            to_start = to_zero
    if to_end >= threshold:
        to_end = average / 2
    factor = (sampled + to_start + to_end) / sampled
    if rate:
        factor /= range_ms / 1000
    return result * factor


def _reset_correction(vs: array[float]) -> float:
    """Sum of the values before each counter reset (a drop in value)."""
    as_list = vs.tolist()
    # Fast path in C: timsort returns a list unchanged exactly when no element is
    # smaller than its predecessor, which is Prometheus's definition of "no reset"
    # (NaNs included: list equality matches them by identity).
    if as_list == sorted(as_list):
        return 0.0
    correction = 0.0
    prev = as_list[0]
    for cur in as_list[1:]:
        if cur < prev:
            correction += prev
        prev = cur
    return correction


def instant_value(ts: array[int], vs: array[float], *, rate: bool) -> float | None:
    """irate/idelta: from the last two samples."""
    if len(vs) < 2:
        return None
    prev_v, last_v = vs[-2], vs[-1]
    # A drop in a counter is a reset: the new value is the increase since then.
    result = last_v if rate and last_v < prev_v else last_v - prev_v
    if rate:
        interval = ts[-1] - ts[-2]
        if interval == 0:
            return None
        result /= interval / 1000
    return result


def _nonnegative_sum(vs: array[float], hints: int) -> float | None:
    """The exact sum of a window known to hold no negative value (nor NaN), else None.

    Equal to `stats.kahan_sum`'s result: its fast path returns `math.fsum` unless
    len * max|v| > 1e11 * |sum|, and with no negative value the correctly rounded sum
    is at least the largest value, so (rounding being monotonic) len * max <= len * sum
    <= 1e11 * sum always holds. Only the max/min passes that test needs are skipped.
    """
    if not hints & RANGE_NONNEGATIVE:
        return None
    try:
        return math.fsum(vs)
    except (ValueError, OverflowError):
        return None  # an overflowing sum: let the general path decide


def _sum_hinted(ts: array[int], vs: array[float], hints: int) -> float | None:
    total = _nonnegative_sum(vs, hints)
    return stats.kahan_sum(vs) if total is None else total


def _avg_hinted(ts: array[int], vs: array[float], hints: int) -> float | None:
    total = _nonnegative_sum(vs, hints)
    return stats.mean(vs) if total is None else total / len(vs)


def _count(ts: array[int], vs: array[float]) -> float | None:
    return float(len(vs))


def _sum(ts: array[int], vs: array[float]) -> float | None:
    return stats.kahan_sum(vs)


def _avg(ts: array[int], vs: array[float]) -> float | None:
    return stats.mean(vs)


def _min(ts: array[int], vs: array[float]) -> float | None:
    return stats.nan_min(vs)


def _max(ts: array[int], vs: array[float]) -> float | None:
    return stats.nan_max(vs)


def _last(ts: array[int], vs: array[float]) -> float | None:
    return vs[-1]


def _first(ts: array[int], vs: array[float]) -> float | None:
    return vs[0]


def _present(ts: array[int], vs: array[float]) -> float | None:
    return 1.0


def _stddev(ts: array[int], vs: array[float]) -> float | None:
    return math.sqrt(stats.variance(vs))


def _stdvar(ts: array[int], vs: array[float]) -> float | None:
    return stats.variance(vs)


def _mad(ts: array[int], vs: array[float]) -> float | None:
    if any(v != v for v in vs):
        return math.nan  # Prometheus: a NaN sample makes the deviation NaN, not dropped
    median = stats.quantile(0.5, vs)
    return stats.quantile(0.5, [abs(v - median) for v in vs])


def _changes(ts: array[int], vs: array[float]) -> float | None:
    changes = 0
    prev = vs[0]
    for cur in vs[1:]:
        if not (cur == prev or (cur != cur and prev != prev)):
            changes += 1
        prev = cur
    return float(changes)


def _resets(ts: array[int], vs: array[float]) -> float | None:
    resets = 0
    prev = vs[0]
    for cur in vs[1:]:
        if cur < prev:
            resets += 1
        prev = cur
    return float(resets)


def _deriv(ts: array[int], vs: array[float]) -> float | None:
    if len(vs) < 2:
        return None
    # Regression around the first sample keeps x small (Prometheus issue 2674).
    return stats.linear_regression(ts, vs, ts[0])[0]


def _ts_of_extreme(better: Callable[[float, float], bool]) -> Kernel:
    def kernel(ts: array[int], vs: array[float]) -> float | None:
        best = vs[0]
        best_t = ts[0]
        for t, v in zip(ts, vs, strict=True):
            if better(v, best):
                best = v
                best_t = t
        return best_t / 1000

    return kernel


def _ts_of_last(ts: array[int], vs: array[float]) -> float | None:
    return ts[-1] / 1000


def _ts_of_first(ts: array[int], vs: array[float]) -> float | None:
    return ts[0] / 1000


KERNELS: dict[str, Kernel] = {
    "count_over_time": _count,
    "sum_over_time": _sum,
    "avg_over_time": _avg,
    "min_over_time": _min,
    "max_over_time": _max,
    "last_over_time": _last,
    "first_over_time": _first,
    "present_over_time": _present,
    "stddev_over_time": _stddev,
    "stdvar_over_time": _stdvar,
    "mad_over_time": _mad,
    "changes": _changes,
    "resets": _resets,
    "deriv": _deriv,
    "ts_of_max_over_time": _ts_of_extreme(lambda v, best: v >= best or best != best),
    "ts_of_min_over_time": _ts_of_extreme(lambda v, best: v <= best or best != best),
    "ts_of_last_over_time": _ts_of_last,
    "ts_of_first_over_time": _ts_of_first,
}


HINTED_KERNELS: dict[str, HintedKernel] = {
    "sum_over_time": _sum_hinted,
    "avg_over_time": _avg_hinted,
}
"""Kernels that use a window's hints; they take precedence over `KERNELS`."""


def _quantile_over_time(params: list[float]) -> Kernel:
    q = params[0]
    return lambda ts, vs: stats.quantile(q, vs)


def _predict_linear(t_ms: int, params: list[float]) -> Kernel:
    duration = params[0]

    def kernel(ts: array[int], vs: array[float]) -> float | None:
        if len(vs) < 2:
            return None
        slope, intercept = stats.linear_regression(ts, vs, t_ms)
        return slope * duration + intercept

    return kernel


def _double_exponential_smoothing(params: list[float]) -> Kernel:
    sf, tf = params
    if not 0 < sf < 1:
        raise PromQLError(f"invalid smoothing factor. Expected: 0 < sf < 1, got: {sf:f}")
    if not 0 < tf < 1:
        raise PromQLError(f"invalid trend factor. Expected: 0 < tf < 1, got: {tf:f}")

    def kernel(ts: array[int], vs: array[float]) -> float | None:
        if len(vs) < 2:
            return None
        s0 = 0.0
        s1 = vs[0]
        b = vs[1] - vs[0]
        for i in range(1, len(vs)):
            x = sf * vs[i]
            if i > 1:
                b = tf * (s1 - s0) + (1 - tf) * b
            y = (1 - sf) * (s1 + b)
            s0, s1 = s1, x + y
        return s1

    return kernel


def param_kernel(name: str, t_ms: int, params: list[float]) -> Kernel:
    """Kernels that take scalar parameters evaluated at the step time."""
    if name == "quantile_over_time":
        return _quantile_over_time(params)
    if name == "predict_linear":
        return _predict_linear(t_ms, params)
    return _double_exponential_smoothing(params)


PARAM_KERNELS = frozenset({"quantile_over_time", "predict_linear", "double_exponential_smoothing", "holt_winters"})
