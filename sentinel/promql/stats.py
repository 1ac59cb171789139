"""Numeric kernels shared by aggregations and *_over_time functions.

Sums and means follow Prometheus's Kahan-Neumaier algorithms exactly (its results for
ill-conditioned inputs are part of the conformance suite), with a C fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sentinel.promql import gomath

NAN = math.nan


# Above this condition number (sum of magnitudes / |sum|) Kahan-Neumaier summation may
# differ from the exact sum by more than a few ulps (bound: n * u * sum|x|), so the
# Prometheus algorithm itself is replayed to get Prometheus's answer.
_ILL_CONDITIONED = 1e11


def _well_conditioned_sum(values: Sequence[float]) -> float | None:
    """The exact sum when Prometheus's Kahan sum is certain to agree with it, else None."""
    try:
        total = math.fsum(values)
    except (ValueError, OverflowError):
        return None
    bound = len(values) * max(abs(max(values)), abs(min(values)))
    if bound <= _ILL_CONDITIONED * abs(total):
        return total
    return None


def kahan_sum(values: Sequence[float]) -> float:
    """Prometheus's Kahan-Neumaier sum.

    Well-conditioned inputs (nearly all) are summed exactly in C; only sums with
    heavy cancellation take the Python loop, where Prometheus's rounding shows.
    """
    fast = _well_conditioned_sum(values)
    if fast is not None:
        return fast
    total = 0.0
    comp = 0.0
    for v in values:
        total, comp = kahan_inc(v, total, comp)
    if math.isinf(total):
        return total
    return total + comp


def mean(values: Sequence[float]) -> float:
    """Prometheus's mean: Kahan sum / count, switching to an incremental mean on overflow."""
    n = len(values)
    fast = _well_conditioned_sum(values)
    if fast is not None:
        return fast / n
    total = values[0]
    comp = 0.0
    avg = 0.0
    incremental = False
    count = 1.0
    for i in range(1, n):
        v = values[i]
        count = float(i + 1)
        if not incremental:
            new_total, new_comp = kahan_inc(v, total, comp)
            if not math.isinf(new_total):
                total, comp = new_total, new_comp
                continue
            incremental = True
            avg = total / (count - 1)
            comp /= count - 1
        q = (count - 1) / count
        avg, comp = kahan_inc(v / count, q * avg, q * comp)
    if incremental:
        return avg + comp
    return total / count + comp / count


def variance(values: Sequence[float]) -> float:
    """Population variance (Welford's algorithm, as Prometheus's stdvar)."""
    count = 0
    avg = 0.0
    m2 = 0.0
    for v in values:
        count += 1
        delta = v - avg
        avg += delta / count
        m2 += delta * (v - avg)
    return m2 / count if count else NAN


def quantile(q: float, values: Sequence[float]) -> float:
    """Prometheus's `quantile`: linear interpolation, NaNs sorted first."""
    if not values or q != q:
        return NAN
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    nans = [v for v in values if v != v]
    ordered = nans + sorted(v for v in values if v == v)
    n = len(ordered)
    rank = q * (n - 1)
    lower = max(0, math.floor(rank))
    upper = min(n - 1, lower + 1)
    weight = rank - math.floor(rank)
    return ordered[lower] * (1 - weight) + ordered[upper] * weight


def nan_max(values: Sequence[float]) -> float:
    """Largest value; NaN only when every value is NaN (Prometheus's max)."""
    # The builtin skips NaNs except a leading one, which it returns; only then loop.
    best = max(values)
    if best == best:
        return best
    best = values[0]
    for v in values:
        if v > best or best != best:
            best = v
    return best


def nan_min(values: Sequence[float]) -> float:
    """Smallest value; NaN only when every value is NaN (Prometheus's min)."""
    best = min(values)
    if best == best:
        return best
    best = values[0]
    for v in values:
        if v < best or best != best:
            best = v
    return best


def kahan_inc(inc: float, total: float, comp: float) -> tuple[float, float]:
    """One step of Prometheus's Kahan-Neumaier summation."""
    t = total + inc
    if math.isinf(t):
        comp = 0.0
    elif abs(total) >= abs(inc):
        comp += (total - t) + inc
    else:
        comp += (inc - t) + total
    return t, comp


def linear_regression(ts: Sequence[int], vs: Sequence[float], intercept_ms: int) -> tuple[float, float]:
    """Least-squares slope (per second) and intercept at `intercept_ms`, as Prometheus."""
    first = vs[0]
    if all(v == first for v in vs):
        if math.isinf(first):
            return NAN, NAN
        return 0.0, first
    n = float(len(vs))
    sx = cx = sy = cy = sxy = cxy = sx2 = cx2 = 0.0
    for t, v in zip(ts, vs, strict=True):
        x = (t - intercept_ms) / 1e3
        sx, cx = kahan_inc(x, sx, cx)
        sy, cy = kahan_inc(v, sy, cy)
        sxy, cxy = kahan_inc(x * v, sxy, cxy)
        sx2, cx2 = kahan_inc(x * x, sx2, cx2)
    sx += cx
    sy += cy
    sxy += cxy
    sx2 += cx2
    cov = sxy - sx * sy / n
    var = sx2 - sx * sx / n
    slope = gomath.div(cov, var)
    return slope, sy / n - slope * sx / n
