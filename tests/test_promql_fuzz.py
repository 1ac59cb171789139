"""Fuzzing the PromQL evaluator (issue 15, item 4): only `PromQLError` may escape.

Expressions are generated from PromQL's grammar (selectors with every matcher kind,
ranges, subqueries, offsets and `@`, every function and aggregation Sentinel knows,
binary operators with matching modifiers, odd numbers), plus arbitrary text, and
evaluated as instant and range queries in both compatibility modes over a small store
holding NaNs, infinities, staleness markers, counter resets and huge values. Bounded:
a fixed number of examples, each under a query budget.
"""

from __future__ import annotations

import contextlib
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.promql import Engine, PromQLError
from sentinel.promql.budget import QueryBudget
from sentinel.store import STALE_NAN, Store

FUNCTIONS_1 = [
    "abs", "ceil", "floor", "exp", "sqrt", "ln", "log2", "log10", "sgn", "sin", "cos", "tan", "asin", "acos",
    "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "deg", "rad", "scalar", "timestamp", "sort",
    "sort_desc", "absent", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "hour", "minute",
    "month", "year", "histogram_count",
]  # fmt: skip
RANGE_FUNCTIONS = [
    "rate", "increase", "delta", "irate", "idelta", "changes", "resets", "deriv", "avg_over_time",
    "sum_over_time", "min_over_time", "max_over_time", "count_over_time", "last_over_time", "first_over_time",
    "stddev_over_time", "stdvar_over_time", "present_over_time", "absent_over_time", "mad_over_time",
    "ts_of_max_over_time", "ts_of_min_over_time", "ts_of_last_over_time",
]  # fmt: skip
AGGREGATIONS = ["sum", "avg", "min", "max", "count", "group", "stddev", "stdvar"]
PARAM_AGGREGATIONS = ["topk", "bottomk", "quantile", "limitk", "limit_ratio"]
OPERATORS = ["+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless", "atan2"]
NUMBERS = ["0", "1", "-1", "0.5", "1e308", "-1e308", "Inf", "-Inf", "NaN", "1e-320", "9223372036854775807", "0x10"]
METRICS = ["m", "c", "g", "missing"]
LABELS = ["job", "i", "le", "__name__", "zz"]
DURATIONS = ["1ms", "1s", "30s", "1m", "5m", "1h", "100y"]

names = st.sampled_from(METRICS)
numbers = st.sampled_from(NUMBERS)
durations = st.sampled_from(DURATIONS)


@st.composite
def selectors(draw: st.DrawFn) -> str:
    matchers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(LABELS),
                st.sampled_from(["=", "!=", "=~", "!~"]),
                st.sampled_from(["a", "", ".*", "a|b", "(a+)+$", "[0-9]+", "a(?i)B", "\\d", ".{3}(.+)+Z"]),
            ),
            max_size=3,
        )
    )
    body = ", ".join(f"{label}{op}{value!r}".replace("'", '"') for label, op, value in matchers)
    name = draw(names)
    return f"{name}{{{body}}}" if body else name


@st.composite
def modifiers(draw: st.DrawFn) -> str:
    text = ""
    if draw(st.booleans()):
        text += f" offset {draw(st.sampled_from(['1m', '-5m', '1h']))}"
    if draw(st.integers(0, 4)) == 0:
        text += f" @ {draw(st.sampled_from(['100', 'start()', 'end()', '1e9']))}"
    return text


def expressions() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        ranged = st.one_of(
            st.builds(lambda s, d, m: f"{s}[{d}]{m}", selectors(), durations, modifiers()),
            st.builds(lambda e, d, step: f"({e})[{d}:{step}]", inner, st.sampled_from(["5m", "1m"]),
                      st.sampled_from(["", "1m", "30s"])),
        )  # fmt: skip
        return st.one_of(
            st.builds(lambda f, e: f"{f}({e})", st.sampled_from(FUNCTIONS_1), inner),
            st.builds(lambda f, r: f"{f}({r})", st.sampled_from(RANGE_FUNCTIONS), ranged),
            st.builds(lambda q, r: f"quantile_over_time({q}, {r})", numbers, ranged),
            st.builds(lambda r, d: f"predict_linear({r}, {d})", ranged, numbers),
            st.builds(lambda r, a, b: f"double_exponential_smoothing({r}, {a}, {b})", ranged, numbers, numbers),
            st.builds(lambda q, e: f"histogram_quantile({q}, {e})", numbers, inner),
            st.builds(lambda e, a, b: f"clamp({e}, {a}, {b})", inner, numbers, numbers),
            st.builds(lambda e, n: f"round({e}, {n})", inner, numbers),
            st.builds(lambda e: f'label_replace({e}, "dst", "$1-$name", "job", "(.*)")', inner),
            st.builds(lambda e: f'label_join({e}, "dst", ",", "job", "i")', inner),
            st.builds(lambda e: f"vector(scalar({e}))", inner),
            st.builds(lambda a, e: f"{a}({e})", st.sampled_from(AGGREGATIONS), inner),
            st.builds(
                lambda a, mod, labels, e: f"{a} {mod} ({labels}) ({e})",
                st.sampled_from(AGGREGATIONS),
                st.sampled_from(["by", "without"]),
                st.sampled_from(["", "job", "job, i", "__name__"]),
                inner,
            ),
            st.builds(lambda a, p, e: f"{a}({p}, {e})", st.sampled_from(PARAM_AGGREGATIONS), numbers, inner),
            st.builds(lambda e: f'count_values("v", {e})', inner),
            st.builds(
                lambda lhs, op, mod, rhs: f"({lhs}) {op} {mod} ({rhs})",
                inner,
                st.sampled_from(OPERATORS),
                st.sampled_from(["", "bool", "on(job)", "ignoring(i)", "on(job) group_left(i)", "on() group_right"]),
                inner,
            ),
            st.builds(lambda e: f"-({e})", inner),
        )

    leaves = st.one_of(st.builds(lambda s, m: s + m, selectors(), modifiers()), numbers, st.just("time()"))
    return st.recursive(leaves, extend, max_leaves=6)


def _store() -> Store:
    store = Store(retention_ms=10**12)
    values = [1.0, 5.0, math.nan, 2.0, math.inf, -math.inf, 1e308, 0.0, STALE_NAN, -3.0, 7.0, 1e-320]
    for i in range(40):
        t = i * 15_000
        for job in ("a", "b"):
            store.add("m", values[i % len(values)], {"job": job, "i": str(i % 3)}, timestamp_ms=t)
            store.add("c", float(i * 10 % 70), {"job": job}, timestamp_ms=t)  # counter with resets
        for le in ("0.1", "1", "+Inf", "bad"):
            store.add("g", float(i), {"le": le, "job": "a"}, timestamp_ms=t)
    return store


STORE = _store()
ENGINES = [Engine(STORE), Engine(STORE, prometheus_compat=2)]


def _evaluate(expr: str) -> None:
    for engine in ENGINES:
        with contextlib.suppress(PromQLError):
            engine.instant_query(expr, 300_000, budget=QueryBudget(timeout_s=2, max_samples=200_000))
        with contextlib.suppress(PromQLError):
            engine.range_query(expr, 0, 600_000, 60_000, budget=QueryBudget(timeout_s=2, max_samples=200_000))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions())
def test_generated_expressions_raise_only_promql_errors(expr: str) -> None:
    _evaluate(expr)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("(){}[]\"'`,:@#+-*/^%=!~<> \n0123456789.eExmgcby_")), max_size=60))
def test_arbitrary_text_raises_only_promql_errors(text: str) -> None:
    _evaluate(text)
