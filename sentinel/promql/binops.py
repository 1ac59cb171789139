"""Binary operators: arithmetic, comparison (with `bool`), set operators, vector matching."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

from sentinel.promql import gomath
from sentinel.promql.labels import NAME, LabelMemo, drop, format_labels, keep_only
from sentinel.promql.model import PromQLError, Sample, Scalar, Value, Vector
from sentinel.promql.syntax import Binary, VectorMatching
from sentinel.store import Labels

if TYPE_CHECKING:
    from sentinel.promql.engine import Evaluator

__all__ = ["binary"]

# The operator module's functions are the Python operators themselves, called from C.
ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": gomath.div,
    "%": gomath.mod,
    "^": gomath.pow_,
    "atan2": math.atan2,
}

COMPARISON: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}

SET_OPERATORS = frozenset({"and", "or", "unless"})


def binary(ev: Evaluator, node: Binary, t: int) -> Value:
    """Evaluate one binary expression at time t."""
    lhs = ev.eval(node.lhs, t)
    rhs = ev.eval(node.rhs, t)
    op = node.op
    if op in SET_OPERATORS:
        if not isinstance(lhs, Vector) or not isinstance(rhs, Vector):
            raise PromQLError(f"set operator {op!r} not allowed in binary scalar expression")
        assert node.matching is not None
        return _set_op(op, lhs, rhs, node.matching)
    if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
        return Scalar(_scalar_op(op, lhs.value, rhs.value, node.return_bool))
    if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
        return _vector_scalar(op, lhs, rhs.value, swapped=False, return_bool=node.return_bool)
    if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
        return _vector_scalar(op, rhs, lhs.value, swapped=True, return_bool=node.return_bool)
    if isinstance(lhs, Vector) and isinstance(rhs, Vector):
        assert node.matching is not None
        return _vector_vector(op, lhs, rhs, node.matching, node.return_bool, ev.compat)
    raise PromQLError(f"binary operator {op!r} needs scalar or instant vector operands")


def _duplicate_pair(one: Vector, sig: Callable[[Labels], Labels], compat: int) -> tuple[str, str]:
    """The two series a many-to-many error names, in the order Prometheus names them.

    Both versions scan the series in storage order (sorted by labels) and stop at the
    first repeated signature: 2.42 names the later series first, 3 sorts the two texts.
    """
    seen: dict[Labels, Labels] = {}
    for labels in sorted(s.labels for s in one):
        key = sig(labels)
        earlier = seen.get(key)
        if earlier is not None:
            later_text, earlier_text = format_labels(labels), format_labels(earlier)
            if compat == 2:
                return later_text, earlier_text
            return min(later_text, earlier_text), max(later_text, earlier_text)
        seen[key] = labels
    raise AssertionError("no duplicate signature")


def _scalar_op(op: str, a: float, b: float, return_bool: bool) -> float:
    arith = ARITHMETIC.get(op)
    if arith is not None:
        return arith(a, b)
    compare = COMPARISON[op]
    if not return_bool:
        raise PromQLError("comparisons between scalars must use BOOL modifier")
    return 1.0 if compare(a, b) else 0.0


def _vector_scalar(op: str, vec: Vector, scalar: float, *, swapped: bool, return_bool: bool) -> Vector:
    arith = ARITHMETIC.get(op)
    if arith is not None:
        if swapped:
            return Vector([Sample(s.labels, arith(scalar, s.value), True) for s in vec])
        return Vector([Sample(s.labels, arith(s.value, scalar), True) for s in vec])
    compare = COMPARISON[op]
    if return_bool:
        if swapped:
            return Vector([Sample(s.labels, 1.0 if compare(scalar, s.value) else 0.0, True) for s in vec])
        return Vector([Sample(s.labels, 1.0 if compare(s.value, scalar) else 0.0, True) for s in vec])
    # A filter keeps the vector's own sample, whichever side the scalar is on.
    if swapped:
        return Vector([s for s in vec if compare(scalar, s.value)])
    return Vector([s for s in vec if compare(s.value, scalar)])


@functools.lru_cache(maxsize=1024)
def signature_fn(matching: VectorMatching) -> Callable[[Labels], Labels]:
    """The label subset two samples must share to match.

    `on(...)` compares exactly the listed labels (`__name__` only when listed);
    `ignoring(...)` and no clause compare all others, never the metric name.
    """
    if matching.on:
        names = frozenset(matching.labels)
        return LabelMemo(lambda labels: tuple(p for p in labels if p[0] in names))
    ignored = frozenset((*matching.labels, NAME))
    return LabelMemo(lambda labels: tuple(p for p in labels if p[0] not in ignored))


def _set_op(op: str, lhs: Vector, rhs: Vector, matching: VectorMatching) -> Vector:
    sig = signature_fn(matching)
    if op == "and":
        if not lhs or not rhs:
            return Vector()
        right = {sig(s.labels) for s in rhs}
        return Vector(s for s in lhs if sig(s.labels) in right)
    if op == "unless":
        if not lhs or not rhs:
            return lhs
        right = {sig(s.labels) for s in rhs}
        return Vector(s for s in lhs if sig(s.labels) not in right)
    if not lhs:
        return rhs
    if not rhs:
        return lhs
    left = {sig(s.labels) for s in lhs}
    out = Vector(lhs)
    out.extend(s for s in rhs if sig(s.labels) not in left)
    return out


def _vector_vector(
    op: str, lhs: Vector, rhs: Vector, matching: VectorMatching, return_bool: bool, compat: int = 3
) -> Vector:
    card = matching.card
    if card == "many-to-many":
        raise PromQLError("many-to-many only allowed for set operators")
    fill = matching.fill_lhs is not None or matching.fill_rhs is not None
    if (not lhs or not rhs) and not fill:
        return Vector()
    swapped = card == "one-to-many"
    many, one = (rhs, lhs) if swapped else (lhs, rhs)
    sig = signature_fn(matching)
    arith = ARITHMETIC.get(op)
    compare = COMPARISON.get(op)
    drop_name = arith is not None

    # The "one" side must be unique per signature; otherwise it is many-to-many.
    one_by_sig: dict[Labels, Sample] = {}
    for s in one:
        key = sig(s.labels)
        duplicate = one_by_sig.get(key)
        if duplicate is not None:
            side = "left" if swapped else "right"
            first, second = _duplicate_pair(one, sig, compat)
            raise PromQLError(
                f"found duplicate series for the match group {format_labels(key)} on the {side} hand-side "
                f"of the operation: [{first}, {second}];"
                "many-to-many matching not allowed: matching labels must be unique on one side"
            )
        one_by_sig[key] = s

    result_labels = _result_labels_fn(matching, drop_name)
    one_to_one = card == "one-to-one"
    matched: dict[Labels, set[Labels] | None] = {}
    out = Vector()
    many_fill = matching.fill_lhs if swapped else matching.fill_rhs
    for s in many:
        key = sig(s.labels)
        partner = one_by_sig.get(key)
        if partner is None:
            if many_fill is None:
                continue
            partner = Sample(s.labels, many_fill)
        if one_to_one:
            # Checked before filtering: a comparison must not hide an ambiguous match.
            if key in matched:
                raise PromQLError(
                    "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)"
                )
            matched[key] = None
        left, right = (partner.value, s.value) if swapped else (s.value, partner.value)
        if arith is not None:
            value = arith(left, right)
        else:
            assert compare is not None
            keep = compare(left, right)
            if return_bool:
                value = 1.0 if keep else 0.0
            elif keep:
                value = left
            else:
                continue
        labels = result_labels(s.labels, partner.labels)
        if not one_to_one:
            inserted = matched.get(key)
            if inserted is None:
                inserted = matched[key] = set()
            if labels in inserted:
                raise PromQLError("multiple matches for labels: grouping labels must ensure unique matches")
            inserted.add(labels)
        out.append(Sample(labels, value, return_bool or (s.drop_name and not drop_name)))
    if fill:
        _fill_unmatched_one_side(out, many, one_by_sig, sig, matching, swapped, op, return_bool)
    return out


class _PairMemo:
    """Memoizes `_result_labels` for one matching: the same pairs recur every evaluation."""

    __slots__ = ("_cache", "_drop_name", "_matching")

    def __init__(self, matching: VectorMatching, drop_name: bool) -> None:
        self._matching = matching
        self._drop_name = drop_name
        self._cache: dict[tuple[Labels, Labels], Labels] = {}

    def __call__(self, many: Labels, one: Labels) -> Labels:
        key = (many, one)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= 100_000:
                self._cache.clear()  # series churn
            matching = self._matching
            cached = self._cache[key] = _result_labels(many, one, matching, self._drop_name, matching.include)
        return cached


@functools.lru_cache(maxsize=1024)
def _result_labels_fn(matching: VectorMatching, drop_name: bool) -> _PairMemo:
    return _PairMemo(matching, drop_name)


def _result_labels(
    many: Labels, one: Labels, matching: VectorMatching, drop_name: bool, include: tuple[str, ...]
) -> Labels:
    labels = many
    if drop_name:
        labels = tuple(p for p in labels if p[0] != NAME)
    if matching.card == "one-to-one":
        names = frozenset(matching.labels)
        labels = keep_only(labels, names) if matching.on else drop(labels, names)
    if include:
        extra = dict(labels)
        one_map = dict(one)
        for name in include:
            value = one_map.get(name, "")
            if value:
                extra[name] = value
            else:
                extra.pop(name, None)
        labels = tuple(sorted(extra.items()))
    return labels


def _fill_unmatched_one_side(
    out: Vector,
    many: Vector,
    one_by_sig: dict[Labels, Sample],
    sig: Callable[[Labels], Labels],
    matching: VectorMatching,
    swapped: bool,
    op: str,
    return_bool: bool,
) -> None:
    """`fill(...)`: pair "one"-side samples that matched nothing with the fill value."""
    one_fill = matching.fill_rhs if swapped else matching.fill_lhs
    if one_fill is None:
        return
    seen = {sig(s.labels) for s in many}
    arith = ARITHMETIC.get(op)
    compare = COMPARISON.get(op)
    for key, s in one_by_sig.items():
        if key in seen:
            continue
        left, right = (s.value, one_fill) if swapped else (one_fill, s.value)
        if arith is not None:
            value = arith(left, right)
        else:
            assert compare is not None
            keep = compare(left, right)
            if return_bool:
                value = 1.0 if keep else 0.0
            elif keep:
                value = left
            else:
                continue
        labels = _result_labels(s.labels, s.labels, matching, arith is not None, ())
        out.append(Sample(labels, value, return_bool))
