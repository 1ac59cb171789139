"""Prometheus 2.42's arithmetic where it differs from Prometheus 3's (compat mode 2).

Each function transcribes the v2.42.0 Go code (`promql/engine.go`, `functions.go`,
`quantile.go`) operation for operation, so results agree to the last bit with
`promtool` 2.42, which tests written for Prometheus 2 encode:

- `sum` adds left to right without compensation; `avg` keeps an incremental mean;
  `stddev`/`stdvar` start Welford's recurrence from the first sample (3.x: Kahan sums);
- `avg_over_time` and `stddev_over_time` use Kahan-compensated incremental forms;
- rate/increase clamp the extrapolation to the counter's zero point *before* deciding
  whether to extrapolate to the window start (3.x: after);
- `histogram_quantile` forces bucket counts monotonic without 3.x's 1e-12 tolerance;
- Kahan steps never reset the compensation on an infinite sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "avg",
    "avg_over_time",
    "bucket_quantile",
    "kahan_inc",
    "linear_regression",
    "rate_from_summary",
    "stddev_over_time",
    "stdvar_over_time",
    "stdvar",
    "sum_",
]


def kahan_inc(inc: float, total: float, comp: float) -> tuple[float, float]:
    """2.42's `kahanSumInc`."""
    t = total + inc
    if abs(total) >= abs(inc):
        comp += (total - t) + inc
    else:
        comp += (inc - t) + total
    return t, comp


def sum_(values: Sequence[float]) -> float:
    """The `sum` aggregation: `group.value += s.V` in input order."""
    total = values[0]
    for v in values[1:]:
        total += v
    return total


def avg(values: Sequence[float]) -> float:
    """The `avg` aggregation: an incremental mean, Inf-aware as in 2.42."""
    mean = values[0]
    count = 1
    for v in values[1:]:
        count += 1
        if math.isinf(mean):
            if math.isinf(v) and (mean > 0) == (v > 0):
                continue
            if not math.isinf(v) and v == v:
                continue
        mean += v / count - mean / count
    return mean


def stdvar(values: Sequence[float]) -> float:
    """The `stdvar` aggregation (and, square-rooted, `stddev`)."""
    mean = values[0]
    value = 0.0
    count = 1
    for v in values[1:]:
        count += 1
        delta = v - mean
        mean += delta / count
        value += delta * (v - mean)
    return value / count


def avg_over_time(values: Sequence[float]) -> float:
    mean = count = comp = 0.0
    for v in values:
        count += 1
        if math.isinf(mean):
            if math.isinf(v) and (mean > 0) == (v > 0):
                continue
            if not math.isinf(v) and v == v:
                continue
        mean, comp = kahan_inc(v / count - mean / count, mean, comp)
    if math.isinf(mean):
        return mean
    return mean + comp


def stdvar_over_time(values: Sequence[float]) -> float:
    count = mean = c_mean = aux = c_aux = 0.0
    for v in values:
        count += 1
        delta = v - (mean + c_mean)
        mean, c_mean = kahan_inc(delta / count, mean, c_mean)
        aux, c_aux = kahan_inc(delta * (v - (mean + c_mean)), aux, c_aux)
    return (aux + c_aux) / count


def stddev_over_time(values: Sequence[float]) -> float:
    return math.sqrt(stdvar_over_time(values))


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
    """2.42's `extrapolatedRate` from a window's ends (see `rangefuncs.rate_from_summary`)."""
    if n < 2:
        return None
    result = last_v - first_v
    if counter:
        result += correction
    to_start = (first_t - range_start) / 1000
    to_end = (range_end - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average = sampled / (n - 1)
    if counter and result > 0 and first_v >= 0:
        to_zero = sampled * (first_v / result)
        if to_zero < to_start:
            to_start = to_zero
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    factor = interval / sampled
    if rate:
        factor /= range_ms / 1000
    return result * factor


def linear_regression(ts: Sequence[int], vs: Sequence[float], intercept_ms: int) -> tuple[float, float]:
    """2.42's `linearRegression`: slope per second and intercept at `intercept_ms`."""
    n = sum_x = c_x = sum_y = c_y = sum_xy = c_xy = sum_x2 = c_x2 = 0.0
    init_y = vs[0]
    const_y = True
    for i, (t, v) in enumerate(zip(ts, vs, strict=True)):
        if const_y and i > 0 and v != init_y:
            const_y = False
        n += 1.0
        x = (t - intercept_ms) / 1e3
        sum_x, c_x = kahan_inc(x, sum_x, c_x)
        sum_y, c_y = kahan_inc(v, sum_y, c_y)
        sum_xy, c_xy = kahan_inc(x * v, sum_xy, c_xy)
        sum_x2, c_x2 = kahan_inc(x * x, sum_x2, c_x2)
    if const_y:
        if math.isinf(init_y):
            return math.nan, math.nan
        return 0.0, init_y
    sum_x += c_x
    sum_y += c_y
    sum_xy += c_xy
    sum_x2 += c_x2
    cov = sum_xy - sum_x * sum_y / n
    var = sum_x2 - sum_x * sum_x / n
    slope = _go_div(cov, var)
    return slope, sum_y / n - slope * sum_x / n


def _go_div(a: float, b: float) -> float:
    """IEEE division as Go does it (Python raises on division by zero)."""
    if b != 0:
        return a / b
    if a != a or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """2.42's `bucketQuantile` over (upper bound, count) pairs."""
    if q != q:
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or ordered[-1][0] != math.inf:
        return math.nan
    merged: list[list[float]] = []
    for upper, count in ordered:
        if merged and merged[-1][0] == upper:
            merged[-1][1] += count
        else:
            merged.append([upper, count])
    top = merged[0][1]
    for bucket in merged[1:]:
        if bucket[1] > top:
            top = bucket[1]
        elif bucket[1] < top:
            bucket[1] = top
    if len(merged) < 2:
        return math.nan
    observations = merged[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(merged) - 1) if merged[i][1] >= rank), len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start = 0.0
    end = merged[b][0]
    count = merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    return start + (end - start) * (rank / count)
