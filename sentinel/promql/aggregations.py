"""Aggregation operators (sum, avg, topk, quantile, count_values, limitk, ...) with by/without."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sentinel.promql import gomath, prom2_math, stats
from sentinel.promql.labels import NAME, LabelMemo, format_value, valid_label_name, with_label
from sentinel.promql.model import PromQLError, Sample, Value, Vector
from sentinel.promql.syntax import Aggregate, StringLit
from sentinel.promql.xxhash import labels_hash
from sentinel.store import Labels

if TYPE_CHECKING:
    from sentinel.promql.engine import Evaluator

__all__ = ["aggregate"]

_MAX_UINT64 = float(2**64 - 1)


def _stddev(values: Sequence[float]) -> float:
    return math.sqrt(stats.variance(values))


# Aggregations that reduce a group's values to one number.
_REDUCERS: dict[str, Callable[[Sequence[float]], float]] = {
    "sum": stats.kahan_sum,
    "avg": stats.mean,
    "min": stats.nan_min,
    "max": stats.nan_max,
    "count": lambda values: float(len(values)),
    "group": lambda values: 1.0,
    "stddev": _stddev,
    "stdvar": stats.variance,
}


_PROM2_REDUCERS: dict[str, Callable[[Sequence[float]], float]] = {
    "sum": prom2_math.sum_,
    "avg": prom2_math.avg,
    "stddev": lambda values: math.sqrt(prom2_math.stdvar(values)),
    "stdvar": prom2_math.stdvar,
}
"""Reducers whose Prometheus 2.42 arithmetic differs from 3.x's (compat mode 2)."""


def grouping_fn(node: Aggregate) -> Callable[[Labels], Labels]:
    """Map a sample's labels to its group's labels (which are also the output labels)."""
    return _grouping(node.without, node.grouping)


@functools.lru_cache(maxsize=1024)
def _grouping(without: bool, grouping: tuple[str, ...]) -> Callable[[Labels], Labels]:
    if without:
        dropped = frozenset((*grouping, NAME))
        return LabelMemo(lambda labels: tuple(p for p in labels if p[0] not in dropped))
    if not grouping:
        return lambda labels: ()
    kept = frozenset(grouping)
    return LabelMemo(lambda labels: tuple(p for p in labels if p[0] in kept))


def aggregate(ev: Evaluator, node: Aggregate, t: int) -> Value:
    """Evaluate one aggregation at time t."""
    op = node.op
    param: float | str | None = None
    if node.param is not None:
        if op == "count_values":
            if not isinstance(node.param, StringLit):
                raise PromQLError("count_values needs a string label name")
            param = node.param.value
        else:
            param = ev.eval_scalar(node.param, t)
    vec = ev.eval_vector(node.expr, t)
    reducer = (_PROM2_REDUCERS.get(op) if ev.compat == 2 else None) or _REDUCERS.get(op)
    if reducer is not None:
        return _reduce(vec, grouping_fn(node), reducer)
    if op in ("topk", "bottomk", "limitk", "limit_ratio"):
        assert isinstance(param, float)
        return _select_k(ev, op, param, vec, grouping_fn(node))
    if op == "quantile":
        assert isinstance(param, float)
        if param != param or param < 0 or param > 1:
            ev.annotations.warn(
                f"PromQL warning: quantile value should be between 0 and 1, got {gomath.format_g(param)}"
            )
        return _reduce(vec, grouping_fn(node), lambda values: stats.quantile(param, values))
    if op == "count_values":
        assert isinstance(param, str)
        return _count_values(ev, param, vec, grouping_fn(node))
    raise PromQLError(f"unsupported aggregation {op!r}")


def _reduce(vec: Vector, group_of: Callable[[Labels], Labels], reducer: Callable[[Sequence[float]], float]) -> Vector:
    labelsets = [s.labels for s in vec]
    values = [s.value for s in vec]
    keys, members = _GROUPINGS.get(group_of, labelsets)
    # Delayed name removal: a group kept by `__name__` drops it if any member would.
    drops = [s.drop_name for s in vec]
    if all(drops):
        return Vector([Sample(key, reducer([values[i] for i in idx]), True) for key, idx in members])
    dropped = {key for key, drop in zip(keys, drops, strict=True) if drop}
    return Vector([Sample(key, reducer([values[i] for i in idx]), key in dropped) for key, idx in members])


class _Groupings:
    """The groups of an aggregation's input, kept while the next input has the same label sets.

    A rule's `sum by (job) (rate(x[5m]))` sees the same series in the same order every
    second, so which input goes to which group is worked out once and then checked:
    the label sets are compared by identity (the store's own tuples), one C loop, far
    cheaper than hashing each one into its group again. Groups keep the order of their
    first member and members their input order, so every reducer sees its values in
    exactly the order it would otherwise.
    """

    _SLOTS = 256
    _MIN_INPUT = 16  # smaller inputs group faster than they are checked and stored

    def __init__(self) -> None:
        # (id(group_of), len, id(first labels), id(last labels)) -> (group_of, label sets, keys, members)
        self._slots: dict[
            tuple[int, int, int, int],
            tuple[Callable[[Labels], Labels], list[Labels], list[Labels], list[tuple[Labels, list[int]]]],
        ] = {}

    def get(
        self, group_of: Callable[[Labels], Labels], labelsets: list[Labels]
    ) -> tuple[list[Labels], list[tuple[Labels, list[int]]]]:
        """Each input's group key, and each group's key with its members' positions."""
        slot = None
        if len(labelsets) >= self._MIN_INPUT:
            slot = (id(group_of), len(labelsets), id(labelsets[0]), id(labelsets[-1]))
            entry = self._slots.get(slot)
            if entry is not None and entry[0] is group_of and entry[1] == labelsets:
                return entry[2], entry[3]
        keys = group_of.map(labelsets) if isinstance(group_of, LabelMemo) else [group_of(ls) for ls in labelsets]
        groups: dict[Labels, list[int]] = {}
        for i, key in enumerate(keys):
            idx = groups.get(key)
            if idx is None:
                groups[key] = [i]
            else:
                idx.append(i)
        members = list(groups.items())
        if slot is not None:
            if len(self._slots) >= self._SLOTS:
                self._slots.clear()
            # The entry holds the label sets, so their ids cannot be reused while it lives.
            self._slots[slot] = (group_of, labelsets, keys, members)
        return keys, members


_GROUPINGS = _Groupings()


def _select_k(ev: Evaluator, op: str, param: float, vec: Vector, group_of: Callable[[Labels], Labels]) -> Vector:
    """topk/bottomk/limitk/limit_ratio: keep whole input samples, labels untouched."""
    if op == "limit_ratio":
        if param != param:
            raise PromQLError("Ratio value is NaN")
        ratio = param
        if ratio > 1 or ratio < -1:
            ratio = 1.0 if ratio > 1 else -1.0
            ev.annotations.warn(
                "PromQL warning: ratio value should be between -1 and 1, "
                f"got {gomath.format_g(param)}, capping to {gomath.format_g(ratio)}"
            )
        if ratio == 0:
            return Vector()
        return Vector(s for s in vec if _ratio_keep(ratio, s.labels))
    if param != param:
        raise PromQLError("Parameter value is NaN")
    k = gomath.to_int64(param)
    if k < 1:
        return Vector()
    groups: dict[Labels, list[Sample]] = {}
    # Series order decides ties and limitk's choice; Prometheus reads series sorted by labels.
    for s in sorted(vec, key=lambda s: s.labels):
        groups.setdefault(group_of(s.labels), []).append(s)
    out = Vector()
    for members in groups.values():
        if op == "limitk":
            out.extend(members[:k])
            continue
        numbers = [s for s in members if s.value == s.value]
        nans = [s for s in members if s.value != s.value]
        numbers.sort(key=lambda s: s.value, reverse=op == "topk")
        out.extend((numbers + nans)[:k])
    return out


def _ratio_keep(ratio: float, labels: Labels) -> bool:
    offset = labels_hash(labels) / _MAX_UINT64
    return (ratio >= 0 and offset < ratio) or (ratio < 0 and offset >= 1.0 + ratio)


def _count_values(ev: Evaluator, label: str, vec: Vector, group_of: Callable[[Labels], Labels]) -> Vector:
    if not valid_label_name(label, ev.compat):
        raise PromQLError(f"invalid label name {label!r}")
    counts: dict[Labels, int] = {}
    for s in vec:
        key = with_label(group_of(s.labels), label, format_value(s.value))
        counts[key] = counts.get(key, 0) + 1
    return Vector(Sample(key, float(n)) for key, n in counts.items())
