"""The PromQL engine: instant and range queries over a `Store`.

A range query is evaluated as one instant evaluation per step. That keeps a single
code path (the one the rule engine uses every second) and matches Prometheus's
results, because Prometheus's range evaluation is defined step by step too. Within
one query, each selector's series list is looked up once and reused for every step
and subquery point; across queries, the store caches selections until a series is
created or removed.

The rule engine runs many instant queries at one time that repeat sub-expressions;
`SharedResults` lets those queries reuse each other's results while the data they
read is unchanged.

`prometheus_compat=2` evaluates as Prometheus 2.42 does (see `prom2`): windows that
include their start (`[t - range, t]`, lookback `[t - 5m, t]`, subquery steps from the
first aligned time at or after the start), `__name__` dropped by each function or
operator at once (so duplicates fail there, not only in the final result), 2.42's
arithmetic (`prom2_math`), its legacy label-name rule, and its syntax.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from sentinel.promql import aggregations, binops, functions, subcache, syntax
from sentinel.promql.budget import QueryBudget
from sentinel.promql.labels import check_unique, without_name
from sentinel.promql.model import (
    Annotations,
    Matrix,
    PromQLError,
    RangeSeries,
    Sample,
    Scalar,
    String,
    Value,
    Vector,
)
from sentinel.promql.subcache import SubqueryCache
from sentinel.store import Labels, Series, Store

__all__ = ["DEFAULT_SUBQUERY_STEP_MS", "Engine", "Evaluator", "QueryResult", "SharedResults"]

DEFAULT_SUBQUERY_STEP_MS = 60_000
"""Step of `x[5m:]` subqueries (Prometheus uses the global evaluation interval)."""

PROMETHEUS_COMPAT_MODES = (2, 3)
"""`prometheus_compat` values: the Prometheus major version whose semantics to follow."""


def check_compat(value: object) -> int:
    """`value` as a compat mode, or ValueError naming the allowed ones."""
    if isinstance(value, bool) or value not in PROMETHEUS_COMPAT_MODES:
        raise ValueError(f"prometheus_compat must be 2 or 3, got {value!r}")
    assert isinstance(value, int)
    return value


@dataclass
class QueryResult:
    """A query's value plus the warnings and infos Prometheus would attach."""

    value: Value
    annotations: Annotations = field(default_factory=Annotations)


class Engine:
    """Evaluates PromQL over a `Store` with Prometheus 3.x semantics (or 2.42's: `prometheus_compat=2`)."""

    def __init__(
        self,
        store: Store,
        lookback_ms: int = 300_000,
        subquery_step_ms: int = DEFAULT_SUBQUERY_STEP_MS,
        *,
        prometheus_compat: int = 3,
        subquery_settle_ms: int = 60_000,
    ) -> None:
        """`subquery_settle_ms`: how late a sample may still be written (writers append in time
        order, a collector's pass at most this long after its timestamp); rule evaluations
        reuse subquery steps that read only older data (`subcache`)."""
        self.store = store
        self.lookback_ms = lookback_ms
        self.subquery_step_ms = subquery_step_ms
        self.prometheus_compat = check_compat(prometheus_compat)
        self.subquery_settle_ms = subquery_settle_ms

    def parse(self, expr: str | syntax.Node) -> syntax.Node:
        """`expr` parsed with this engine's syntax (Prometheus 2.42's refuses more)."""
        return syntax.parse(expr, self.prometheus_compat) if isinstance(expr, str) else expr

    def instant(
        self, expr: str | syntax.Node, t_ms: int, *, shared: SharedResults | None = None, as_rule: bool = False
    ) -> Value:
        """Evaluate at one time; the result is a Vector, Scalar, Matrix or String.

        With `shared` (from `shared_results`), sub-expression results are reused across
        the calls that pass it; the value is the same as without it. `as_rule` evaluates
        as Prometheus evaluates a rule: its expression as re-printed, which sorts each
        selector's matchers (only `absent()` can tell).
        """
        node = self.parse(expr)
        if shared is None or not shared.begin(self, t_ms):
            ev = Evaluator(self, t_ms, t_ms, is_range=False, as_rule=as_rule)
        else:
            ev = Evaluator(
                self,
                t_ms,
                t_ms,
                is_range=False,
                shared=shared,
                as_rule=as_rule,
                subqueries=shared.subqueries,
                settled_before=t_ms - self.subquery_settle_ms,
            )
        return finish(ev.eval(node, t_ms))

    def shared_results(self) -> SharedResults:
        """A result cache for a sequence of `instant` calls made by one thread (the rule engine's)."""
        return SharedResults(self)

    def range(self, expr: str | syntax.Node, start_ms: int, end_ms: int, step_ms: int) -> Matrix:
        """Evaluate at start, start+step, ... end; one series per distinct label set."""
        return self.range_query(expr, start_ms, end_ms, step_ms).value  # type: ignore[return-value]

    def instant_query(self, expr: str | syntax.Node, t_ms: int, *, budget: QueryBudget | None = None) -> QueryResult:
        """Like `instant`, with annotations; `budget` bounds its time and samples."""
        node = self.parse(expr)
        ev = Evaluator(self, t_ms, t_ms, is_range=False, budget=budget)
        value = finish(_guarded(ev.eval, node, t_ms))
        return QueryResult(value, ev.annotations)

    def range_query(
        self,
        expr: str | syntax.Node,
        start_ms: int,
        end_ms: int,
        step_ms: int,
        *,
        budget: QueryBudget | None = None,
    ) -> QueryResult:
        """Like `range`, with annotations; `budget` bounds its time and samples."""
        if step_ms <= 0:
            raise PromQLError("zero or negative query resolution step widths are not accepted")
        if end_ms < start_ms:
            raise PromQLError("end timestamp must not be before start time")
        node = self.parse(expr)
        # Consecutive steps share most subquery steps; within one query all data is settled.
        ev = Evaluator(
            self, start_ms, end_ms, is_range=True, step_ms=step_ms, budget=budget, subqueries=SubqueryCache()
        )
        series: dict[Labels, tuple[list[int], list[float]]] = {}
        for t in range(start_ms, end_ms + 1, step_ms):
            if budget is not None:
                budget.check()
            value = _guarded(ev.eval, node, t)
            if budget is not None:
                budget.hold(len(value) if isinstance(value, Vector) else 1)
            if isinstance(value, Scalar):
                points = series.setdefault((), ([], []))
                points[0].append(t)
                points[1].append(value.value)
                continue
            if not isinstance(value, Vector):
                kind = "range vector" if isinstance(value, Matrix) else "string"
                raise PromQLError(f'invalid expression type "{kind}" for range query, must be Scalar or instant Vector')
            for sample in finish_vector(value):
                points = series.setdefault(sample.labels, ([], []))
                points[0].append(t)
                points[1].append(sample.value)
        matrix = Matrix(RangeSeries(labels, _ints(ts), _floats(vs)) for labels, (ts, vs) in series.items())
        matrix.sort(key=lambda s: s.labels)
        return QueryResult(matrix, ev.annotations)


def _guarded(evaluate: Callable[[syntax.Node, int], Value], node: syntax.Node, t: int) -> Value:
    """`evaluate(node, t)`, with a stack too deep for Python reported as a query error."""
    try:
        return evaluate(node, t)
    except RecursionError:
        raise PromQLError("query too deeply nested to evaluate") from None


def finish_vector(value: Vector) -> Vector:
    """Apply delayed `__name__` removal and refuse duplicate label sets, as Prometheus does last.

    Without a name to drop the labels are already unique (selectors, aggregations,
    binary operators and label functions each guarantee it), so only renamed
    vectors are checked.
    """
    if any(s.drop_name for s in value):
        value = Vector(Sample(without_name(s.labels), s.value) if s.drop_name else s for s in value)
        check_unique(s.labels for s in value)
    return value


def finish(value: Value) -> Value:
    """`finish_vector` for any query result (range vectors of instant queries included)."""
    if isinstance(value, Vector):
        return finish_vector(value)
    if isinstance(value, Matrix):
        if any(s.drop_name for s in value):
            value = Matrix(
                RangeSeries(without_name(s.labels), s.timestamps, s.values) if s.drop_name else s for s in value
            )
        check_unique(s.labels for s in value)
    return value


class SharedResults:
    """Results of sub-expressions shared by the instant queries of one thread.

    The rules of a group are evaluated at one time and repeat sub-expressions
    (`rate(x[5m]) > 5` for a warning, `> 10` for a page; the same selector joined in
    several rules). Parsed nodes are interned, so equal sub-expressions are one object;
    this cache keeps each node's instant-vector or scalar result at the current
    evaluation time, and reuses it while the store reports no write to the metrics the
    node reads (`Store.changed_since`) — a recording rule earlier in the group, or a
    collector, invalidates exactly the results that read what it wrote. Entries for
    other times are dropped when the evaluation time moves on.

    Shared results are never mutated (no evaluation step modifies its operands).
    Annotations of a reused result are not raised again, which is why only `instant`
    (which returns no annotations) takes this cache. Calls from a thread other than
    the first one to use it bypass the cache.
    """

    _LIMIT = 50_000

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._owner: int | None = None
        self._t: int | None = None
        # (id(node), t) -> (node, store version before evaluating, metric deps, value)
        self._entries: dict[tuple[int, int], tuple[syntax.Node, int, frozenset[str] | None, Value]] = {}
        # id(node) -> (node, metric names it reads, None for any)
        self._deps: dict[int, tuple[syntax.Node, frozenset[str] | None]] = {}
        # Subquery steps, kept across evaluation times (only settled data: `subcache`).
        self.subqueries = SubqueryCache()

    def begin(self, engine: Engine, t_ms: int) -> bool:
        """Start one query at `t_ms`; False when this cache cannot serve it."""
        ident = threading.get_ident()
        if self._owner is None:
            self._owner = ident
        if ident != self._owner or engine is not self._engine:
            return False
        if t_ms != self._t or len(self._entries) >= self._LIMIT:
            self._entries.clear()
            self._t = t_ms
        if len(self._deps) >= self._LIMIT:
            self._deps.clear()
        return True

    def eval(self, ev: Evaluator, node: syntax.Node, t: int) -> Value:
        """`node`'s value at `t`: reused when its inputs are unchanged, else computed."""
        key = (id(node), t)
        store = ev.store
        entry = self._entries.get(key)
        if entry is not None and entry[0] is node and not store.changed_since(entry[1], entry[2]):
            return entry[3]
        version = store.version
        value = _HANDLERS[type(node)](ev, node, t)
        if isinstance(value, Vector | Scalar):
            known = self._deps.get(id(node))
            if known is None or known[0] is not node:
                known = self._deps[id(node)] = (node, syntax.metric_deps(node))
            self._entries[key] = (node, version, known[1], value)
        return value


def _series_labels(series: Series) -> Labels:
    return series.labels


def _ints(values: list[int]) -> array[int]:
    return array("q", values)


def _floats(values: list[float]) -> array[float]:
    return array("d", values)


class Evaluator:
    """State of one query: its time bounds, annotations and per-query selector cache."""

    def __init__(
        self,
        engine: Engine,
        start_ms: int,
        end_ms: int,
        *,
        is_range: bool,
        step_ms: int = 0,
        shared: SharedResults | None = None,
        as_rule: bool = False,
        budget: QueryBudget | None = None,
        subqueries: SubqueryCache | None = None,
        settled_before: int | None = None,
    ) -> None:
        self.store = engine.store
        self.lookback_ms = engine.lookback_ms
        self.subquery_step_ms = engine.subquery_step_ms
        self.compat = engine.prometheus_compat
        # Timestamps are whole milliseconds, so Prometheus 2's closed window [s, e] is the
        # open (s - 1, e] that the store reads: every read widens by this much.
        self.closed_shift = 1 if self.compat == 2 else 0
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.is_range = is_range
        self.step_ms = step_ms
        self.as_rule = as_rule
        self.budget = budget
        self._subqueries = subqueries
        self._settled_before = settled_before
        self.annotations = Annotations()
        self._series_cache: dict[int, tuple[Series, ...]] = {}
        self._shared = shared

    # -- dispatch -----------------------------------------------------------------

    def eval(self, node: syntax.Node, t: int) -> Value:
        """Evaluate `node` at time `t` (ms)."""
        if self._shared is not None and type(node) in _SHAREABLE:
            value = self._shared.eval(self, node, t)
        else:
            handler = _HANDLERS.get(type(node))
            if handler is None:
                raise PromQLError(f"cannot evaluate {type(node).__name__}")
            value = handler(self, node, t)
        if self.compat == 2 and isinstance(value, Vector):
            # Prometheus 2 drops `__name__` in each function and operator, and refuses
            # duplicate label sets right there.
            return finish_vector(value)
        return value

    def eval_vector(self, node: syntax.Node, t: int) -> Vector:
        value = self.eval(node, t)
        if not isinstance(value, Vector):
            raise PromQLError(f"expected instant vector, got {type(value).__name__.lower()}")
        return value

    def eval_scalar(self, node: syntax.Node, t: int) -> float:
        value = self.eval(node, t)
        if isinstance(value, Scalar):
            return value.value
        raise PromQLError(f"expected scalar, got {type(value).__name__.lower()}")

    def eval_string(self, node: syntax.Node) -> str:
        if isinstance(node, syntax.StringLit):
            return node.value
        raise PromQLError("expected string literal")

    # -- time --------------------------------------------------------------------

    def resolve_time(self, at: syntax.At | None, offset_ms: int, t: int) -> int:
        """The time a selector or subquery reads at: `@` (or t), minus offset."""
        if at is None:
            base = t
        elif at.kind == "start":
            base = self.start_ms
        elif at.kind == "end":
            base = self.end_ms
        else:
            base = at.t_ms
        return base - offset_ms

    # -- selectors ---------------------------------------------------------------

    def series_for(self, sel: syntax.Selector) -> tuple[Series, ...]:
        """The store series a selector matches (looked up once per query)."""
        key = id(sel)
        cached = self._series_cache.get(key)
        if cached is not None:
            return cached
        if len(sel.alternatives) == 1:
            found = self.store.select_cached(sel.alternatives[0])
        else:
            merged: dict[Labels, Series] = {}
            for group in sel.alternatives:
                for series in self.store.select_cached(group):
                    merged[series.labels] = series
            found = tuple(merged.values())
        if self.compat == 2:
            # Prometheus reads series sorted by labels, and 2.42's plain `sum` adds in
            # that order: the same order gives the same rounding.
            found = tuple(sorted(found, key=_series_labels))
        self._series_cache[key] = found
        return found

    def select_instant(self, sel: syntax.Selector, t: int) -> Vector:
        """Each matching series' newest non-stale sample in (t - lookback, t]."""
        te = self.resolve_time(sel.at, sel.offset_ms, t)
        lookback = self.lookback_ms + self.closed_shift
        out = Vector()
        append = out.append
        for series in self.series_for(sel):
            hit = series.latest_at(te, lookback)
            if hit is not None:
                append(Sample(series.labels, hit[1]))
        return out

    def select_timestamps(self, sel: syntax.Selector, t: int) -> Vector:
        """Like `select_instant`, but each value is the sample's own timestamp in seconds."""
        te = self.resolve_time(sel.at, sel.offset_ms, t)
        out = Vector()
        lookback = self.lookback_ms + self.closed_shift
        for series in self.series_for(sel):
            hit = series.latest_at(te, lookback)
            if hit is not None:
                out.append(Sample(series.labels, hit[0] / 1000, drop_name=True))
        return out

    def select_range(self, sel: syntax.Selector, range_ms: int, t: int) -> tuple[Matrix, int]:
        """Samples in (te - range, te] per series ([te - range, te] in mode 2), plus te (the window's end)."""
        te = self.resolve_time(sel.at, sel.offset_ms, t)
        start = te - range_ms - self.closed_shift
        out = Matrix()
        append = out.append
        for series in self.series_for(sel):
            ts, vs, hints, correction = series.range_hinted(start, te)
            if len(ts):
                append(RangeSeries(series.labels, ts, vs, False, hints, correction))
        if self.budget is not None:
            self.budget.peek(sum(len(s) for s in out))
        return out, te

    def eval_range_arg(self, node: syntax.Node, t: int) -> tuple[Matrix, int, int]:
        """A range-vector argument: (series, window end, range length)."""
        if isinstance(node, syntax.MatrixSel):
            matrix, te = self.select_range(node.selector, node.range_ms, t)
            return matrix, te, node.range_ms
        if isinstance(node, syntax.Subquery):
            matrix, te = self.subquery(node, t)
            return matrix, te, node.range_ms
        raise PromQLError("expected range vector argument")

    def subquery(self, node: syntax.Subquery, t: int) -> tuple[Matrix, int]:
        """Evaluate the inner expression at each aligned step in (te - range, te]."""
        te = self.resolve_time(node.at, node.offset_ms, t)
        step = node.step_ms or self.subquery_step_ms
        # Prometheus aligns subquery steps to absolute multiples of the step: the first
        # after the window's start (3.x), or at or after it (2.x).
        first = ((te - node.range_ms - self.closed_shift) // step + 1) * step
        steps = range(first, te + 1, step)
        budget = self.budget
        held = 0

        def compute(ts: int) -> Vector:
            nonlocal held
            if budget is not None:
                budget.check()
            value = self.eval(node.expr, ts)
            if isinstance(value, Scalar):
                value = Vector([Sample((), value.value)])
            if not isinstance(value, Vector):
                raise PromQLError("subquery is only allowed on instant vector")
            if budget is not None:
                held += len(value)
                budget.hold(len(value))
            return value

        try:
            points = None
            if self._subqueries is not None:
                selections = [
                    self.store.select_cached(g) for sel in syntax.selectors(node.expr) for g in sel.alternatives
                ]
                points = self._subqueries.evaluate(
                    node, self.lookback_ms + self.closed_shift, selections, steps, self._settled_before, compute
                )
            if points is None:
                points = {}
                for ts in steps:
                    for sample in compute(ts):
                        subcache.append_point(points, sample.labels, ts, sample.value, sample.drop_name)
            if budget is not None:
                total = sum(len(p.timestamps) for p in points.values())
                budget.hold(total - held)
                held = total
        finally:
            if budget is not None:
                budget.release(held)
        matrix = Matrix(
            RangeSeries(labels, _ints(p.timestamps), _floats(p.values), p.drop_name) for labels, p in points.items()
        )
        return matrix, te


def _eval_number(ev: Evaluator, node: syntax.NumberLit, t: int) -> Value:
    return Scalar(node.value)


def _eval_string(ev: Evaluator, node: syntax.StringLit, t: int) -> Value:
    return String(node.value)


def _eval_selector(ev: Evaluator, node: syntax.Selector, t: int) -> Value:
    return ev.select_instant(node, t)


def _eval_matrix(ev: Evaluator, node: syntax.MatrixSel, t: int) -> Value:
    return ev.select_range(node.selector, node.range_ms, t)[0]


def _eval_subquery(ev: Evaluator, node: syntax.Subquery, t: int) -> Value:
    return ev.subquery(node, t)[0]


def _eval_unary(ev: Evaluator, node: syntax.Unary, t: int) -> Value:
    value = ev.eval(node.expr, t)
    if isinstance(value, Scalar):
        return Scalar(-value.value)
    if isinstance(value, Vector):
        return Vector(Sample(s.labels, -s.value, True) for s in value)
    raise PromQLError("unary minus needs a scalar or instant vector")


def _eval_call(ev: Evaluator, node: syntax.Call, t: int) -> Value:
    return functions.call(ev, node, t)


def _eval_aggregate(ev: Evaluator, node: syntax.Aggregate, t: int) -> Value:
    return aggregations.aggregate(ev, node, t)


def _eval_binary(ev: Evaluator, node: syntax.Binary, t: int) -> Value:
    return binops.binary(ev, node, t)


_SHAREABLE = frozenset({syntax.Selector, syntax.Call, syntax.Aggregate, syntax.Binary, syntax.Unary})
"""Nodes whose (instant vector or scalar) results `SharedResults` keeps."""

_HANDLERS: dict[type, Callable[[Evaluator, syntax.Node, int], Value]] = {
    syntax.NumberLit: _eval_number,  # type: ignore[dict-item]
    syntax.StringLit: _eval_string,  # type: ignore[dict-item]
    syntax.Selector: _eval_selector,  # type: ignore[dict-item]
    syntax.MatrixSel: _eval_matrix,  # type: ignore[dict-item]
    syntax.Subquery: _eval_subquery,  # type: ignore[dict-item]
    syntax.Unary: _eval_unary,  # type: ignore[dict-item]
    syntax.Call: _eval_call,  # type: ignore[dict-item]
    syntax.Aggregate: _eval_aggregate,  # type: ignore[dict-item]
    syntax.Binary: _eval_binary,  # type: ignore[dict-item]
}
