"""Subquery steps shared across evaluations: `x[12h:]` every minute computes one new step.

A subquery evaluates its inner expression at every aligned step of its window, and
consecutive evaluations (a rule every minute, the steps of a range query) share all
but a few of those steps: a `[12h:1m]` subquery evaluated each minute recomputed 719
of its 720 steps. `SubqueryCache` keeps each step's value and reuses it while it is
certain to be unchanged:

- *settled*: everything the step reads lies at or before `settled_before` — data that
  writers no longer change (they append in time order; a sample at most `settle_ms`
  late, see `Engine`). Within one range query all data counts as settled;
- *same series*: the inner selectors select the same series objects (the store's
  selection cache hands out a new tuple whenever a series is created or removed);
- *not trimmed*: no selected series has lost, to retention, samples the step's window
  reads (its first retained sample moved past the window's start).

Subqueries whose inner expression reads at a fixed time (`@`) or the query's own
range (`start()`, `end()`, `step()`) are not cached. Memory is bounded: only steps
inside the current window are kept, and at most `limit` points over all subqueries.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from sentinel.promql import syntax
from sentinel.promql.model import Value, Vector
from sentinel.store import Labels, Series

__all__ = ["Points", "SubqueryCache", "append_point", "reach"]

_QUERY_FUNCTIONS = frozenset({"start", "end", "step", "range"})


def reach(node: syntax.Node, lookback_ms: int) -> tuple[int, int] | None:
    """(ms before, ms after) the evaluation time that `node` reads; None if it reads fixed times."""
    if isinstance(node, syntax.Selector):
        return None if node.at is not None else (node.offset_ms + lookback_ms, -node.offset_ms)
    if isinstance(node, syntax.MatrixSel):
        sel = node.selector
        return None if sel.at is not None else (sel.offset_ms + node.range_ms, -sel.offset_ms)
    if isinstance(node, syntax.Subquery):
        inner = reach(node.expr, lookback_ms)
        if inner is None or node.at is not None:
            return None
        return node.offset_ms + node.range_ms + inner[0], -node.offset_ms + inner[1]
    if isinstance(node, syntax.Call) and node.name in _QUERY_FUNCTIONS:
        return None
    before = after = 0
    for child in syntax.children(node):
        sub = reach(child, lookback_ms)
        if sub is None:
            return None
        before, after = max(before, sub[0]), max(after, sub[1])
    return before, after


class Points:
    """The points of one output series over a run of steps: parallel lists, oldest first."""

    __slots__ = ("drop_name", "timestamps", "values")

    def __init__(self) -> None:
        self.timestamps: list[int] = []
        self.values: list[float] = []
        self.drop_name = False


@dataclass
class _Steps:
    """One subquery node's cached steps: a contiguous run [lo, hi] of them, per output series."""

    node: syntax.Subquery
    before: int
    after: int
    selections: list[tuple[Series, ...]]
    firsts: dict[int, int | None]
    series: dict[Labels, Points] = field(default_factory=dict)
    lo: int | None = None
    hi: int | None = None
    points: int = 0


Compute = Callable[[int], Value]
"""Evaluates the subquery's inner expression at one step time."""


class SubqueryCache:
    """Inner-step values of subqueries, per node; see the module docstring for validity."""

    def __init__(self, limit: int = 500_000) -> None:
        self.limit = limit
        self._nodes: dict[int, _Steps] = {}
        self._points = 0

    def evaluate(
        self,
        node: syntax.Subquery,
        lookback_ms: int,
        selections: list[tuple[Series, ...]],
        steps: range,
        settled_before: int | None,
        compute: Compute,
    ) -> dict[Labels, Points] | None:
        """The subquery's points at `steps`, reusing cached steps; None when it is not cacheable.

        `compute(ts)` must return a Vector (or raise); steps that read only settled data
        are cached for the next call.
        """
        entry = self._valid_entry(node, lookback_ms, selections)
        if entry is None:
            return None
        first, last, step = steps.start, steps[-1] if steps else steps.start - steps.step, steps.step
        if entry.lo is not None and (first < entry.lo or (first - entry.lo) % step or entry.hi is None):
            self._reset(entry)
        self._prune(entry, first)
        out: dict[Labels, Points] = {}
        cached_until = entry.hi if entry.hi is not None else first - step
        for labels, points in entry.series.items():
            end = bisect_right(points.timestamps, last) if cached_until > last else len(points.timestamps)
            if end:
                copy = out[labels] = Points()
                copy.timestamps = points.timestamps[:end]
                copy.values = points.values[:end]
                copy.drop_name = points.drop_name
        contiguous = True
        for ts in range(max(first, cached_until + step), last + 1, step):
            value = compute(ts)
            assert isinstance(value, Vector)
            for sample in value:
                append_point(out, sample.labels, ts, sample.value, sample.drop_name)
            settled = settled_before is None or ts + entry.after <= settled_before
            if contiguous and settled and self._points + len(value) <= self.limit:
                for sample in value:
                    append_point(entry.series, sample.labels, ts, sample.value, sample.drop_name)
                entry.lo = first if entry.lo is None else entry.lo
                entry.hi = ts
                entry.points += len(value)
                self._points += len(value)
            else:
                contiguous = False
        return out

    def clear(self) -> None:
        self._nodes.clear()
        self._points = 0

    def _valid_entry(
        self, node: syntax.Subquery, lookback_ms: int, selections: list[tuple[Series, ...]]
    ) -> _Steps | None:
        entry = self._nodes.get(id(node))
        if entry is None or entry.node is not node:
            extent = reach(node.expr, lookback_ms)
            if extent is None:
                return None
            if entry is not None:
                self._reset(entry)
            entry = self._nodes[id(node)] = _Steps(node, extent[0], extent[1], selections, _firsts(selections))
            return entry
        if len(entry.selections) != len(selections) or any(
            a is not b for a, b in zip(entry.selections, selections, strict=True)
        ):
            self._reset(entry)
            entry.selections = selections
            entry.firsts = _firsts(selections)
            return entry
        firsts = _firsts(selections)
        if firsts != entry.firsts:
            # Retention trimmed some series: steps whose window reaches before a moved
            # first sample may have read what is gone.
            moved = [t for key, t in firsts.items() if t is not None and t != entry.firsts.get(key)]
            entry.firsts = firsts
            if moved and entry.lo is not None and entry.lo - entry.before < max(moved):
                self._reset(entry)
        return entry

    def _prune(self, entry: _Steps, first: int) -> None:
        """Forget cached steps before `first` (the window moved on)."""
        if entry.lo is None or entry.lo >= first:
            return
        for labels in list(entry.series):
            points = entry.series[labels]
            cut = bisect_left(points.timestamps, first)
            if cut:
                del points.timestamps[:cut]
                del points.values[:cut]
                entry.points -= cut
                self._points -= cut
            if not points.timestamps:
                del entry.series[labels]
        entry.lo = first
        if entry.hi is not None and entry.hi < first:
            entry.lo = entry.hi = None

    def _reset(self, entry: _Steps) -> None:
        self._points -= entry.points
        entry.points = 0
        entry.series = {}
        entry.lo = entry.hi = None


def append_point(out: dict[Labels, Points], labels: Labels, ts: int, value: float, drop_name: bool) -> None:
    """Add one step's sample to the points of its series."""
    points = out.get(labels)
    if points is None:
        points = out[labels] = Points()
    points.timestamps.append(ts)
    points.values.append(value)
    if drop_name:
        points.drop_name = True


def _firsts(selections: list[tuple[Series, ...]]) -> dict[int, int | None]:
    return {id(series): series.first_timestamp for found in selections for series in found}
