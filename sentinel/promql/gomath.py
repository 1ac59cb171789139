"""Float operations with Go's IEEE-754 results where Python's `math` raises instead.

Prometheus returns NaN or ±Inf for domain errors and overflow (`1/0`, `ln(0)`,
`exp(1000)`); Python raises ZeroDivisionError, ValueError or OverflowError.
"""

from __future__ import annotations

import math

INF = math.inf
NAN = math.nan


def div(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return NAN
        return math.copysign(INF, a) * math.copysign(1.0, b)


def mod(a: float, b: float) -> float:
    """Go's `math.Mod`: the result has the sign of `a`; NaN for b == 0 or infinite a."""
    try:
        return math.fmod(a, b)
    except ValueError:
        return NAN


def pow_(a: float, b: float) -> float:
    """Go's `math.Pow` special cases."""
    try:
        result = math.pow(a, b)
    except OverflowError:
        # |a| > 1 with a huge exponent; the sign follows a for odd integer b.
        if a < 0 and b == math.floor(b) and int(b) % 2 == 1:
            return -INF
        return INF
    except ValueError:
        if a == 0:
            # 0 ** negative: ±Inf (the sign of a for odd integer exponents).
            if b == math.floor(b) and int(b) % 2 == 1:
                return math.copysign(INF, a)
            return INF
        return NAN
    return result


def go_max(a: float, b: float) -> float:
    """Go's `math.Max`: NaN wins, +Inf wins over NaN."""
    if a == INF or b == INF:
        return INF
    if a != a or b != b:
        return NAN
    return a if a > b else b


def go_min(a: float, b: float) -> float:
    """Go's `math.Min`: NaN wins, -Inf wins over NaN."""
    if a == -INF or b == -INF:
        return -INF
    if a != a or b != b:
        return NAN
    return a if a < b else b


def almost_equal(a: float, b: float, epsilon: float) -> bool:
    """Prometheus's `almost.Equal` (relative comparison; NaN equals NaN)."""
    if a != a and b != b:
        return True
    if a == b:
        return True
    min_normal = 2.2250738585072014e-308
    abs_sum = abs(a) + abs(b)
    diff = abs(a - b)
    if a == 0 or b == 0 or abs_sum < min_normal:
        return diff < epsilon * min_normal
    return diff / min(abs_sum, 1.7976931348623157e308) < epsilon


def to_int64(value: float) -> int:
    """Go's float64 → int64 conversion, saturating where Go's is undefined."""
    if value != value:
        return -(2**63)
    if value >= 2**63:
        return 2**63 - 1
    if value <= -(2**63):
        return -(2**63)
    return int(value)


def format_g(value: float) -> str:
    """Go's `%g` for the numbers quoted in warnings (1.1, -1, NaN, +Inf)."""
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:g}"
