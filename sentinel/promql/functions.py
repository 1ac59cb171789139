"""PromQL function calls: dispatch, instant-vector functions and range-vector wrappers."""

from __future__ import annotations

import calendar
import math
import re
from array import array
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from sentinel.goregex import RegexError, compile_go, searchable
from sentinel.promql import gomath, prom2_math, rangefuncs, syntax
from sentinel.promql.histogram import histogram_quantile
from sentinel.promql.labels import NAME, check_unique, get, valid_label_name, with_label
from sentinel.promql.model import PromQLError, Sample, Scalar, Value, Vector
from sentinel.promql.prom2 import go_quote
from sentinel.store import LabelMatcher, Labels, MatchOp

if TYPE_CHECKING:
    from sentinel.promql.engine import Evaluator

__all__ = ["call"]

Handler = Callable[["Evaluator", syntax.Call, int], Value]

INF = math.inf
NAN = math.nan


# -- math with Go's results instead of Python exceptions ------------------------------


def _log(fn: Callable[[float], float]) -> Callable[[float], float]:
    def wrapped(x: float) -> float:
        if x > 0:
            return fn(x)
        if x == 0:
            return -INF
        return NAN  # negative or NaN

    return wrapped


def _guard(fn: Callable[[float], float], overflow: Callable[[float], float] | None = None) -> Callable[[float], float]:
    def wrapped(x: float) -> float:
        try:
            return fn(x)
        except OverflowError:
            return overflow(x) if overflow is not None else INF
        except ValueError:
            return NAN

    return wrapped


def _atanh(x: float) -> float:
    if x == 1:
        return INF
    if x == -1:
        return -INF
    return _guard(math.atanh)(x)


def _ceil(x: float) -> float:
    return x if math.isinf(x) or x != x else float(math.ceil(x))


def _floor(x: float) -> float:
    return x if math.isinf(x) or x != x else float(math.floor(x))


def _sgn(x: float) -> float:
    if x > 0:
        return 1.0
    if x < 0:
        return -1.0
    return x  # 0 or NaN


MATH: dict[str, Callable[[float], float]] = {
    "abs": abs,
    "ceil": _ceil,
    "floor": _floor,
    "exp": _guard(math.exp),
    "sqrt": _guard(math.sqrt),
    "ln": _log(math.log),
    "log2": _log(math.log2),
    "log10": _log(math.log10),
    "sgn": _sgn,
    "sin": _guard(math.sin),
    "cos": _guard(math.cos),
    "tan": _guard(math.tan),
    "asin": _guard(math.asin),
    "acos": _guard(math.acos),
    "atan": math.atan,
    "sinh": _guard(math.sinh, lambda x: math.copysign(INF, x)),
    "cosh": _guard(math.cosh),
    "tanh": math.tanh,
    "asinh": math.asinh,
    "acosh": _guard(math.acosh),
    "atanh": _atanh,
    "deg": lambda x: x * 180 / math.pi,
    "rad": lambda x: x * math.pi / 180,
}


# -- dispatch ------------------------------------------------------------------------


def call(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    """Evaluate one function call at time t."""
    name = node.name
    simple = MATH.get(name)
    if simple is not None:
        vec = ev.eval_vector(node.args[0], t)
        return Vector(Sample(s.labels, simple(s.value), True) for s in vec)
    if name in _RANGE_FUNCS:
        return _range_function(ev, node, t)
    handler = _HANDLERS.get(name)
    if handler is None:
        raise PromQLError(f"function {name!r} is not supported")
    return handler(ev, node, t)


# -- range-vector functions ------------------------------------------------------------

_RATES = {
    "rate": (True, True),
    "increase": (True, False),
    "delta": (False, False),
}
_RANGE_FUNCS = frozenset({*_RATES, "irate", "idelta", *rangefuncs.KERNELS, *rangefuncs.PARAM_KERNELS})
# Prometheus keeps the metric name for these two: they return an input sample unchanged.
_KEEP_NAME = frozenset({"last_over_time", "first_over_time"})
_COUNTER_SUFFIXES = ("_total", "_sum", "_count", "_bucket")


def _range_function(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    name = node.name
    if name == "quantile_over_time":
        matrix_arg, params = node.args[1], [ev.eval_scalar(node.args[0], t)]
        q = params[0]
        if q != q or q < 0 or q > 1:
            ev.annotations.warn(f"PromQL warning: quantile value should be between 0 and 1, got {gomath.format_g(q)}")
    else:
        matrix_arg = node.args[0]
        params = [ev.eval_scalar(a, t) for a in node.args[1:]]
    rates = _RATES.get(name)
    if rates is not None and isinstance(matrix_arg, syntax.MatrixSel):
        return _rate_of_selector(ev, matrix_arg, t, *rates)
    matrix, range_end, range_ms = ev.eval_range_arg(matrix_arg, t)
    keep_name = name in _KEEP_NAME
    out = Vector()
    append = out.append
    if rates is not None:
        counter, is_rate = rates
        range_start = range_end - range_ms
        from_summary = prom2_math.rate_from_summary if ev.compat == 2 else None
        for series in matrix:
            value = rangefuncs.extrapolated_rate(
                series.timestamps,
                series.values,
                range_start,
                range_end,
                range_ms,
                counter=counter,
                rate=is_rate,
                reset_correction=series.reset_correction,
                from_summary=from_summary,
            )
            if value is not None:
                append(Sample(series.labels, value, True))
        if counter and out:
            _note_non_counters(ev, matrix_arg, (s.labels for s in matrix if len(s) > 1))
        return out
    if name in ("irate", "idelta"):
        for series in matrix:
            value = rangefuncs.instant_value(series.timestamps, series.values, rate=name == "irate")
            if value is not None:
                append(Sample(series.labels, value, True))
        return out
    hinted = rangefuncs.HINTED_KERNELS.get(name) if ev.compat == 3 else None
    if hinted is not None:
        for series in matrix:
            value = hinted(series.timestamps, series.values, series.hints)
            if value is not None:
                append(Sample(series.labels, value, series.drop_name if keep_name else True))
        return out
    kernel = (_PROM2_KERNELS.get(name) if ev.compat == 2 else None) or rangefuncs.KERNELS.get(name)
    if kernel is None:
        if ev.compat == 2 and name == "predict_linear":
            kernel = _prom2_predict_linear(t, params[0])
        else:
            kernel = rangefuncs.param_kernel(name, t, params)
    for series in matrix:
        value = kernel(series.timestamps, series.values)
        if value is not None:
            append(Sample(series.labels, value, series.drop_name if keep_name else True))
    return out


def _prom2_deriv(ts: array[int], vs: array[float]) -> float | None:
    if len(vs) < 2:
        return None
    return prom2_math.linear_regression(ts, vs, ts[0])[0]


def _prom2_predict_linear(t_ms: int, duration: float) -> rangefuncs.Kernel:
    def kernel(ts: array[int], vs: array[float]) -> float | None:
        if len(vs) < 2:
            return None
        slope, intercept = prom2_math.linear_regression(ts, vs, t_ms)
        return slope * duration + intercept

    return kernel


_PROM2_KERNELS: dict[str, rangefuncs.Kernel] = {
    "avg_over_time": lambda ts, vs: prom2_math.avg_over_time(vs),
    "stddev_over_time": lambda ts, vs: prom2_math.stddev_over_time(vs),
    "stdvar_over_time": lambda ts, vs: prom2_math.stdvar_over_time(vs),
    "deriv": _prom2_deriv,
}
"""Range kernels whose Prometheus 2.42 arithmetic differs from 3.x's (compat mode 2)."""


def _rate_of_selector(ev: Evaluator, arg: syntax.MatrixSel, t: int, counter: bool, is_rate: bool) -> Value:
    """rate/increase/delta straight from the store: most windows need only their ends.

    The same numbers as over `select_range`'s copies; a window that needs a scan (a NaN,
    several counter resets) still gets one. Prometheus 3's arithmetic for the usual
    window (2+ samples) is inlined here: this loop runs for every series of every
    rate() in every rule, every second, and a call per series cost a sixth of it.
    """
    sel = arg.selector
    range_ms = arg.range_ms
    range_end = ev.resolve_time(sel.at, sel.offset_ms, t)
    range_start = range_end - range_ms
    read_start = range_start - ev.closed_shift
    out = Vector()
    append = out.append
    prom3 = ev.compat == 3
    from_summary = rangefuncs.rate_from_summary if prom3 else prom2_math.rate_from_summary
    per_second = range_ms / 1000
    # Series with 2+ samples, for the annotation (which needs them only without a name).
    summed: list[Labels] | None = [] if counter and not sel.name else None
    # The terms that depend only on the window's timestamps, kept from the previous
    # series: series sampled together share them (one collector's pass), so most series
    # cost a subtraction, a comparison and a product. Same operations, same order.
    shape: tuple[int, int, int] | None = None
    to_start = to_end = sampled = factor = 0.0
    for series in ev.series_for(sel):
        summary = series.window_summary(read_start, range_end)
        if summary is None:
            ts, vs, _, correction = series.range_hinted(read_start, range_end)
            n = len(ts)
            value = rangefuncs.extrapolated_rate(
                ts,
                vs,
                range_start,
                range_end,
                range_ms,
                counter=counter,
                rate=is_rate,
                reset_correction=correction,
                from_summary=from_summary,
            )
        else:
            n, first_t, last_t, first_v, last_v, correction = summary
            if n < 2:
                continue
            if not prom3:
                value = from_summary(
                    n, first_t, last_t, first_v, last_v, correction, range_start, range_end, range_ms, counter, is_rate
                )
            else:
                # `rangefuncs.rate_from_summary`, operation for operation.
                result = last_v - first_v
                if counter:
                    result += correction
                if shape != (n, first_t, last_t):
                    shape = (n, first_t, last_t)
                    to_start = (first_t - range_start) / 1000
                    to_end = (range_end - last_t) / 1000
                    sampled = (last_t - first_t) / 1000
                    average = sampled / (n - 1)
                    threshold = average * 1.1
                    if to_start >= threshold:
                        to_start = average / 2
                    if to_end >= threshold:
                        to_end = average / 2
                    factor = (sampled + to_start + to_end) / sampled
                    if is_rate:
                        factor /= per_second
                if counter and result > 0 and first_v >= 0 and sampled * (first_v / result) < to_start:
                    # Extrapolation stops at the counter's zero point: this series' own factor.
                    series_factor = (sampled + sampled * (first_v / result) + to_end) / sampled
                    if is_rate:
                        series_factor /= per_second
                    value = result * series_factor
                else:
                    value = result * factor
        if summed is not None and n > 1:
            summed.append(series.labels)
        if value is not None:
            append(Sample(series.labels, value, True))
    if counter and out:
        _note_non_counters(ev, arg, summed or ())
    return out


def _note_non_counters(ev: Evaluator, arg: syntax.Node, summed: Iterable[Labels]) -> None:
    """Prometheus's info annotation for rate/increase over a name that is not a counter's.

    `summed` lists the labels of the input series with 2 or more samples.
    """
    if isinstance(arg, syntax.MatrixSel) and arg.selector.name:
        # The common `rate(name[5m])`: one name, known without looking at each series.
        names = {arg.selector.name}
    else:
        names = {get(labels, NAME) for labels in summed}
    for name in sorted(names):
        if name and not name.endswith(_COUNTER_SUFFIXES):
            ev.annotations.info(
                f'PromQL info: metric might not be a counter, name does not end in _total/_sum/_count/_bucket: "{name}"'
            )


# -- handlers for the remaining functions -----------------------------------------------


def _time(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(t / 1000)


def _pi(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(math.pi)


def _start(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(ev.start_ms / 1000)


def _end(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(ev.end_ms / 1000)


def _step(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(ev.step_ms / 1000)


def _range(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar((ev.end_ms - ev.start_ms) / 1000)


def _vector(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Vector([Sample((), ev.eval_scalar(node.args[0], t))])


def _scalar(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    return Scalar(vec[0].value if len(vec) == 1 else NAN)


def _min_of(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(gomath.go_min(ev.eval_scalar(node.args[0], t), ev.eval_scalar(node.args[1], t)))


def _max_of(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return Scalar(gomath.go_max(ev.eval_scalar(node.args[0], t), ev.eval_scalar(node.args[1], t)))


def _timestamp(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    arg = node.args[0]
    if isinstance(arg, syntax.Selector):
        # A selector's samples keep their own timestamps here, not the evaluation time.
        return ev.select_timestamps(arg, t)
    vec = ev.eval_vector(arg, t)
    return Vector(Sample(s.labels, t / 1000, True) for s in vec)


def _round(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    to_nearest = ev.eval_scalar(node.args[1], t) if len(node.args) > 1 else 1.0
    inverse = gomath.div(1.0, to_nearest)

    def rnd(x: float) -> float:
        # Prometheus rounds half up: floor(x * inverse + 0.5) / inverse.
        scaled = x * inverse + 0.5
        if math.isinf(scaled) or scaled != scaled:
            return gomath.div(scaled, inverse)
        return gomath.div(float(math.floor(scaled)), inverse)

    return Vector(Sample(s.labels, rnd(s.value), True) for s in vec)


def _clamp(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    low = ev.eval_scalar(node.args[1], t)
    high = ev.eval_scalar(node.args[2], t)
    if high < low:
        return Vector()
    return Vector(Sample(s.labels, gomath.go_max(low, gomath.go_min(high, s.value)), True) for s in vec)


def _clamp_min(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    low = ev.eval_scalar(node.args[1], t)
    return Vector(Sample(s.labels, gomath.go_max(low, s.value), True) for s in vec)


def _clamp_max(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    high = ev.eval_scalar(node.args[1], t)
    return Vector(Sample(s.labels, gomath.go_min(high, s.value), True) for s in vec)


def _sort_warning(ev: Evaluator) -> None:
    if ev.is_range:
        ev.annotations.warn(
            "PromQL warning: sort is ineffective for range queries since results are always ordered by labels"
        )


def _by_value(vec: Vector, descending: bool) -> Vector:
    numbers = sorted((s for s in vec if s.value == s.value), key=lambda s: s.value, reverse=descending)
    return Vector(numbers + [s for s in vec if s.value != s.value])


def _sort(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    _sort_warning(ev)
    return _by_value(ev.eval_vector(node.args[0], t), descending=False)


def _sort_desc(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    _sort_warning(ev)
    return _by_value(ev.eval_vector(node.args[0], t), descending=True)


_CHUNKS = re.compile(r"(\d+)")


def _natural_key(value: str) -> tuple[tuple[int, int | str], ...]:
    """Natural ordering: digit runs compare as numbers ("a2" < "a10")."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _CHUNKS.split(value) if part)


def _sort_by_label_impl(ev: Evaluator, node: syntax.Call, t: int, *, descending: bool) -> Value:
    _sort_warning(ev)
    vec = ev.eval_vector(node.args[0], t)
    names = [ev.eval_string(a) for a in node.args[1:]]
    # Python's sort is stable: sort by the full label set first, then by each key label.
    ordered = sorted(vec, key=lambda s: s.labels, reverse=descending)
    ordered.sort(key=lambda s: tuple(_natural_key(get(s.labels, n)) for n in names), reverse=descending)
    return Vector(ordered)


def _sort_by_label(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return _sort_by_label_impl(ev, node, t, descending=False)


def _sort_by_label_desc(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return _sort_by_label_impl(ev, node, t, descending=True)


_GO_TEMPLATE = re.compile(r"\$(?:\$|\{([^}]*)\}|([A-Za-z0-9_]+))")


def expand_template(template: str, match: Any) -> str:
    """Go's `regexp.Expand`: `$1`, `${1}`, `$name`, `${name}`, `$$`; unknown groups expand to ""."""

    def group(ref: str) -> str:
        try:
            return match.group(int(ref) if ref.isdigit() else ref) or ""
        except (IndexError, KeyError):  # no such group
            return ""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        ref = m.group(1) if m.group(1) is not None else m.group(2)
        return group(ref)

    return _GO_TEMPLATE.sub(replace, template)


def _label_replace(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    dst, replacement, src, pattern = (ev.eval_string(a) for a in node.args[1:5])
    try:
        # Prometheus 3 compiles `^(?s:regex)$`, 2.x `^(?:regex)$`.
        regex = compile_go(pattern, dot_nl=ev.compat == 3)
    except RegexError:
        raise PromQLError(f"invalid regular expression in label_replace(): {pattern}") from None
    if not valid_label_name(dst, ev.compat):
        raise PromQLError(f"invalid destination label name in label_replace(): {dst}")
    out = Vector()
    # The same label values come back every evaluation; RE2 calls cost microseconds.
    replaced = _REPLACEMENTS.setdefault((id(regex), regex, replacement), {})
    if len(replaced) > _REPLACEMENT_LIMIT:
        replaced.clear()
    for s in vec:
        value = get(s.labels, src)
        if value in replaced:
            expanded = replaced[value]
        else:
            m = regex.fullmatch(searchable(value))
            expanded = replaced[value] = None if m is None else expand_template(replacement, m)
        if expanded is None:
            out.append(s)
            continue
        labels = with_label(s.labels, dst, expanded)
        out.append(Sample(labels, s.value, s.drop_name and dst != NAME))
    check_unique(s.labels for s in out)
    return out


_REPLACEMENT_LIMIT = 8192
# (id, compiled regex, replacement) -> {source value: expansion or None for no match}.
# The compiled regex is kept in the key so its id cannot be reused while the entry lives.
_REPLACEMENTS: dict[tuple[int, Any, str], dict[str, str | None]] = {}


def _label_join(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    vec = ev.eval_vector(node.args[0], t)
    dst = ev.eval_string(node.args[1])
    sep = ev.eval_string(node.args[2])
    sources = [ev.eval_string(a) for a in node.args[3:]]
    if not valid_label_name(dst, ev.compat):
        raise PromQLError(f"invalid destination label name in label_join(): {dst}")
    for src in sources:
        if not valid_label_name(src, ev.compat):
            raise PromQLError(f"invalid source label name in label_join(): {src}")
    out = Vector()
    for s in vec:
        joined = sep.join(get(s.labels, src) for src in sources)
        labels = with_label(s.labels, dst, joined)
        out.append(Sample(labels, s.value, s.drop_name and dst != NAME))
    check_unique(s.labels for s in out)
    return out


def _absent_labels(arg: syntax.Node, as_rule: bool) -> Labels:
    """Labels of absent()'s output: the selector's equality matchers (conflicts removed).

    Matchers apply in order: an equality sets its label unless an earlier equality set
    it, anything else removes it (Prometheus's `createLabelsForAbsentFunction`). A rule
    runs its re-printed expression (`expr.String()`), in which matchers are sorted by
    their text, so `absent(x{k="c", j="j", j!~"z"})` gives `{j="j", k="c"}` in a rule
    and `{k="c"}` as a query.
    """
    if isinstance(arg, syntax.MatrixSel):
        arg = arg.selector
    if not isinstance(arg, syntax.Selector) or len(arg.alternatives) != 1:
        return ()
    matchers = [m for m in arg.alternatives[0] if m.name != NAME]
    if as_rule:
        matchers.sort(key=_printed_matcher)
    result: dict[str, str] = {}
    seen: set[str] = set()
    for m in matchers:
        if m.op is MatchOp.EQ and m.name not in seen:
            result[m.name] = m.value
            seen.add(m.name)
        else:
            result.pop(m.name, None)
    return tuple(sorted((k, v) for k, v in result.items() if v != ""))


def _printed_matcher(m: LabelMatcher) -> str:
    """A matcher as Prometheus prints it (`name=~"value"`), which is what rule expressions sort by."""
    name = m.name if _LEGACY_LABEL_NAME.fullmatch(m.name) else go_quote(m.name)
    return f"{name}{m.op.value}{go_quote(m.value)}"


_LEGACY_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _absent(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    if ev.eval_vector(node.args[0], t):
        return Vector()
    return Vector([Sample(_absent_labels(node.args[0], ev.as_rule), 1.0)])


def _absent_over_time(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    matrix, _, _ = ev.eval_range_arg(node.args[0], t)
    if matrix:
        return Vector()
    return Vector([Sample(_absent_labels(node.args[0], ev.as_rule), 1.0)])


def _date_function(part: Callable[[_Civil], float]) -> Handler:
    def handler(ev: Evaluator, node: syntax.Call, t: int) -> Value:
        if not node.args:
            return Vector([Sample((), part(_civil(t // 1000)))])
        vec = ev.eval_vector(node.args[0], t)
        out = Vector()
        for s in vec:
            if s.value != s.value or math.isinf(s.value):
                out.append(Sample(s.labels, NAN, True))
                continue
            # Go's time.Unix(int64(v), 0): truncate toward zero.
            out.append(Sample(s.labels, part(_civil(gomath.to_int64(s.value))), True))
        return out

    return handler


class _Civil(NamedTuple):
    year: int
    month: int
    day: int
    hour: int
    minute: int
    weekday: int  # 0 = Sunday
    yday: int


def _civil(seconds: int) -> _Civil:
    """UTC calendar fields of a Unix time, for any int64 (datetime stops at year 9999).

    Howard Hinnant's days-to-civil algorithm on the proleptic Gregorian calendar.
    """
    days, rem = divmod(seconds, 86_400)
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    yday = _CUMULATIVE_DAYS[month - 1] + day + (1 if month > 2 and calendar.isleap(year) else 0)
    return _Civil(year, month, day, rem // 3600, rem % 3600 // 60, (days + 4) % 7, yday)


_CUMULATIVE_DAYS = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)


def _days_in_month(c: _Civil) -> float:
    if c.month == 2:
        return 29.0 if calendar.isleap(c.year) else 28.0
    return 30.0 if c.month in (4, 6, 9, 11) else 31.0


_DATE_PARTS: dict[str, Callable[[_Civil], float]] = {
    "day_of_month": lambda c: float(c.day),
    "day_of_week": lambda c: float(c.weekday),
    "day_of_year": lambda c: float(c.yday),
    "days_in_month": _days_in_month,
    "hour": lambda c: float(c.hour),
    "minute": lambda c: float(c.minute),
    "month": lambda c: float(c.month),
    "year": lambda c: float(c.year),
}


def _histogram_quantile(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    q = ev.eval_scalar(node.args[0], t)
    vec = ev.eval_vector(node.args[1], t)
    if ev.compat == 2:
        return histogram_quantile(ev, q, vec, lambda q, buckets: (prom2_math.bucket_quantile(q, buckets), False))
    return histogram_quantile(ev, q, vec)


def _native_only(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    raise PromQLError(f"{node.name}() needs native histograms, which Sentinel does not store (float samples only)")


_HANDLERS: dict[str, Handler] = {
    "time": _time,
    "pi": _pi,
    "start": _start,
    "end": _end,
    "step": _step,
    "range": _range,
    "vector": _vector,
    "scalar": _scalar,
    "min_of": _min_of,
    "max_of": _max_of,
    "timestamp": _timestamp,
    "round": _round,
    "clamp": _clamp,
    "clamp_min": _clamp_min,
    "clamp_max": _clamp_max,
    "sort": _sort,
    "sort_desc": _sort_desc,
    "sort_by_label": _sort_by_label,
    "sort_by_label_desc": _sort_by_label_desc,
    "label_replace": _label_replace,
    "label_join": _label_join,
    "absent": _absent,
    "absent_over_time": _absent_over_time,
    "histogram_quantile": _histogram_quantile,
    **{name: _date_function(part) for name, part in _DATE_PARTS.items()},
    **{
        name: _native_only
        for name in (
            "histogram_count",
            "histogram_sum",
            "histogram_avg",
            "histogram_stddev",
            "histogram_stdvar",
            "histogram_fraction",
        )
    },
}
