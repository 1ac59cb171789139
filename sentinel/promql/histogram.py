"""histogram_quantile over classic `le` buckets (Prometheus's `BucketQuantile`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from sentinel.promql import gomath
from sentinel.promql.labels import NAME, get
from sentinel.promql.model import Sample, Vector
from sentinel.store import Labels

if TYPE_CHECKING:
    from sentinel.promql.engine import Evaluator

__all__ = ["bucket_quantile", "histogram_quantile"]

_SMALL_DELTA = 1e-12


def _parse_le(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def histogram_quantile(
    ev: Evaluator,
    q: float,
    vec: Vector,
    quantile: Callable[[float, list[tuple[float, float]]], tuple[float, bool]] | None = None,
) -> Vector:
    """One quantile per bucket group (labels without `le`); `quantile` replaces `bucket_quantile`."""
    if q != q or q < 0 or q > 1:
        ev.annotations.warn(f"PromQL warning: quantile value should be between 0 and 1, got {gomath.format_g(q)}")
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for s in vec:
        upper = _parse_le(get(s.labels, "le"))
        if upper is None:
            ev.annotations.warn(
                f'PromQL warning: bucket label "le" is missing or has a malformed value of '
                f'"{get(s.labels, "le")}" for metric name "{get(s.labels, NAME)}"'
            )
            continue
        key = tuple(p for p in s.labels if p[0] != "le")
        groups.setdefault(key, []).append((upper, s.value))
    out = Vector()
    for key, buckets in groups.items():
        value, forced = (quantile or bucket_quantile)(q, buckets)
        if forced:
            ev.annotations.info(
                "PromQL info: input to histogram_quantile needed to be fixed for monotonicity "
                "(see https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile) "
                f'for metric name "{get(key, NAME)}"'
            )
        out.append(Sample(key, value, True))
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> tuple[float, bool]:
    """(quantile, whether counts had to be forced monotonic) from (upper bound, count) pairs."""
    if q != q:
        return math.nan, False
    if q < 0:
        return -math.inf, False
    if q > 1:
        return math.inf, False
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or ordered[-1][0] != math.inf:
        return math.nan, False
    merged: list[list[float]] = []
    for upper, count in ordered:
        if merged and merged[-1][0] == upper:
            merged[-1][1] += count
        else:
            merged.append([upper, count])
    forced = _ensure_monotonic(merged)
    if len(merged) < 2:
        return math.nan, forced
    observations = merged[-1][1]
    if observations == 0:
        return math.nan, forced
    rank = q * observations
    b = next((i for i in range(len(merged) - 1) if merged[i][1] >= rank), len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0], forced
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0], forced
    start = 0.0
    end = merged[b][0]
    count = merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    return start + (end - start) * (rank / count), forced


def _ensure_monotonic(buckets: list[list[float]]) -> bool:
    forced = False
    prev = buckets[0][1]
    for bucket in buckets[1:]:
        cur = bucket[1]
        if cur == prev:
            continue
        if gomath.almost_equal(prev, cur, _SMALL_DELTA):
            bucket[1] = prev  # floating-point noise, not a real decrease
            continue
        if cur < prev:
            bucket[1] = prev
            forced = True
            continue
        prev = cur
    return forced
