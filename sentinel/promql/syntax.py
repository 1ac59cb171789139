"""PromQL syntax tree: promql-parser's AST converted once into plain, typed Python nodes.

The Rust-backed AST is converted because (a) every attribute read on it crosses the
FFI boundary, which the hot path cannot afford, (b) its matchers must become the
store's `Matcher` (with compiled regexes) anyway, and (c) typed frozen dataclasses
let mypy check the evaluator. `parse` caches by text, so a rule is parsed once.

Nodes are interned: equal sub-expressions of different expressions (`rate(x[5m])` in
`rate(x[5m]) > 1` and in `rate(x[5m]) > 5`) are one object, so the rule engine can
share their results by identity (`engine.SharedResults`).
"""

from __future__ import annotations

import contextvars
import functools
import math
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import promql_parser as pp

from sentinel.goregex import RegexError
from sentinel.promql import guard, prom2
from sentinel.promql.model import PromQLError
from sentinel.store import Matcher, MatchOp

__all__ = [
    "Aggregate",
    "At",
    "Binary",
    "Call",
    "MatrixSel",
    "Node",
    "NumberLit",
    "Selector",
    "StringLit",
    "Subquery",
    "Unary",
    "VectorMatching",
    "metric_deps",
    "metric_names",
    "parse",
    "selectors",
]


@dataclass(frozen=True, slots=True)
class At:
    """An `@` modifier: a fixed time, or the query's start()/end()."""

    kind: str  # "at" | "start" | "end"
    t_ms: int = 0


@dataclass(frozen=True, slots=True)
class NumberLit:
    value: float


@dataclass(frozen=True, slots=True)
class StringLit:
    value: str


@dataclass(frozen=True, slots=True)
class Selector:
    """An instant vector selector; `alternatives` holds `{a="1" or b="2"}` matcher sets."""

    name: str | None
    alternatives: tuple[tuple[Matcher, ...], ...]
    offset_ms: int
    at: At | None
    text: str


@dataclass(frozen=True, slots=True)
class MatrixSel:
    selector: Selector
    range_ms: int


@dataclass(frozen=True, slots=True)
class Subquery:
    expr: Node
    range_ms: int
    step_ms: int | None
    offset_ms: int
    at: At | None


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Aggregate:
    op: str
    expr: Node
    param: Node | None
    grouping: tuple[str, ...]
    without: bool


@dataclass(frozen=True, slots=True)
class VectorMatching:
    """How two vectors' samples pair up; `on=False` means `ignoring` (or no clause)."""

    card: str  # "one-to-one" | "many-to-one" | "one-to-many" | "many-to-many"
    on: bool
    labels: tuple[str, ...]
    include: tuple[str, ...]
    fill_lhs: float | None = None
    fill_rhs: float | None = None


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node
    matching: VectorMatching | None
    return_bool: bool


@dataclass(frozen=True, slots=True)
class Unary:
    """Unary minus (the parser drops unary plus)."""

    expr: Node


Node = NumberLit | StringLit | Selector | MatrixSel | Subquery | Call | Aggregate | Binary | Unary


def parse(text: str, compat: int = 3) -> Node:
    """Parse PromQL text into a `Node`; results are cached by text.

    `compat=2` also refuses what Prometheus 2.42 cannot parse (`prom2.check`, with
    promtool's message) and reads its `holt_winters`.
    """
    return _parse(text, compat)


@functools.lru_cache(maxsize=4096)
def _parse(text: str, compat: int) -> Node:
    # Bounded before the Rust parser, which can overflow its stack (see `guard`).
    guard.check_text(text)
    if compat == 2:
        prom2.check(text)
        text = prom2.to_prometheus3(text)
    elif compat != 3:
        raise ValueError(f"prometheus_compat must be 2 or 3, got {compat!r}")
    try:
        raw = pp.parse(text)
    except ValueError as exc:
        raise PromQLError(f"parse error: {exc}") from exc
    token = _DOT_NL.set(compat == 3)
    try:
        return convert(raw)
    except RecursionError:
        raise PromQLError("query too deeply nested") from None
    finally:
        _DOT_NL.reset(token)


def convert(raw: Any) -> Node:
    """Convert one promql-parser expression (recursively); the result is interned."""
    kind = type(raw).__name__
    converter = _CONVERTERS.get(kind)
    if converter is None:
        raise PromQLError(f"unsupported expression type {kind}")
    return intern(converter(raw))


_INTERNED: dict[Hashable, Node] = {}
_N = TypeVar("_N", bound=Node)
_INTERN_LIMIT = 100_000


def intern(node: _N) -> _N:
    """The canonical object equal to `node` (its children must be interned already).

    Equal means the same type, identical child objects and exactly equal fields, floats
    compared by bit pattern (so `0` and `-0`, or two NaNs, are never confused).
    """
    key = (type(node), *(_field_key(getattr(node, f.name)) for f in fields(node)))
    if len(_INTERNED) >= _INTERN_LIMIT:
        _INTERNED.clear()  # only sharing is lost; nodes stay valid
    return _INTERNED.setdefault(key, node)  # type: ignore[return-value]  # equal key: same type


def _field_key(value: object) -> Hashable:
    if isinstance(value, _NODE_TYPES):
        # Identity: the table holds the parent, which keeps the child (and its id) alive.
        return ("node", id(value))
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, tuple):
        return tuple(_field_key(v) for v in value)
    if isinstance(value, VectorMatching):
        return (VectorMatching, *(_field_key(getattr(value, f.name)) for f in fields(value)))
    assert isinstance(value, str | int | bool | At | Matcher | None), type(value)
    return value


def _ms(delta: timedelta | None) -> int:
    if delta is None:
        return 0
    # timedelta keeps microseconds exactly; Prometheus durations are whole milliseconds.
    return (delta.days * 86_400_000) + (delta.seconds * 1000) + (delta.microseconds // 1000)


def _at(raw: Any) -> At | None:
    if raw is None:
        return None
    kind = raw.type
    if kind == pp.AtModifierType.Start:
        return At("start")
    if kind == pp.AtModifierType.End:
        return At("end")
    try:
        when = raw.at
    except OverflowError as exc:
        raise PromQLError(f"@ timestamp out of range: {exc}") from exc
    except BaseException as exc:
        # promql-parser panics (a BaseException) converting times before 1970.
        if type(exc).__name__ != "PanicException":
            raise
        raise PromQLError("negative @ timestamps are not supported") from None
    # Integer arithmetic on the aware datetime avoids float rounding of the epoch.
    delta = when - _EPOCH
    return At("at", _ms(delta))


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_MATCH_OPS = {
    "Equal": MatchOp.EQ,
    "NotEqual": MatchOp.NE,
    "Re": MatchOp.RE,
    "NotRe": MatchOp.NRE,
}


def _enum_name(value: Any) -> str:
    # pyo3 enums have no `.name`; their str() is "Type.Member".
    return str(value).rsplit(".", 1)[-1]


def _matcher(raw: Any) -> Matcher:
    op = _MATCH_OPS[_enum_name(raw.op)]
    try:
        # Prometheus 3 lets `.` match a newline (it wraps patterns in `(?s:...)`); 2.x does not.
        return Matcher(raw.name, op, raw.value, dot_nl=_DOT_NL.get())
    except RegexError as exc:
        raise PromQLError(f"invalid regular expression {raw.value!r}: {exc}") from None


_DOT_NL: contextvars.ContextVar[bool] = contextvars.ContextVar("dot_nl", default=True)
"""Whether regex matchers being converted follow Prometheus 3's `.` (per thread)."""


def _selector(raw: Any) -> Selector:
    matchers = raw.matchers
    base = tuple(_matcher(m) for m in matchers.matchers)
    name = raw.name
    if name is not None and not any(m.name == "__name__" for m in base):
        base = (Matcher("__name__", MatchOp.EQ, name), *base)
    alternatives: tuple[tuple[Matcher, ...], ...]
    if matchers.or_matchers:
        name_m = tuple(m for m in base if m.name == "__name__")
        alternatives = tuple(name_m + tuple(_matcher(m) for m in group) for group in matchers.or_matchers)
    else:
        alternatives = (base,)
    return Selector(name, alternatives, _ms(raw.offset), _at(raw.at), str(raw))


def _matrix(raw: Any) -> MatrixSel:
    return MatrixSel(intern(_selector(raw.vector_selector)), _ms(raw.range))


def _subquery(raw: Any) -> Subquery:
    step = _ms(raw.step) if raw.step is not None else None
    return Subquery(convert(raw.expr), _ms(raw.range), step or None, _ms(raw.offset), _at(raw.at))


def _call(raw: Any) -> Call:
    return Call(raw.func.name, tuple(convert(a) for a in raw.args))


def _aggregate(raw: Any) -> Aggregate:
    modifier = raw.modifier
    grouping: tuple[str, ...] = ()
    without = False
    if modifier is not None:
        grouping = tuple(modifier.labels)
        without = modifier.type == pp.AggModifierType.Without
    param = convert(raw.param) if raw.param is not None else None
    return Aggregate(str(raw.op), convert(raw.expr), param, grouping, without)


_CARDS = {
    "OneToOne": "one-to-one",
    "ManyToOne": "many-to-one",
    "OneToMany": "one-to-many",
    "ManyToMany": "many-to-many",
}

_SET_OPS = frozenset({"and", "or", "unless"})


def _binary(raw: Any) -> Binary:
    op = str(raw.op).strip()
    lhs = convert(raw.lhs)
    rhs = convert(raw.rhs)
    modifier = raw.modifier
    matching: VectorMatching | None = None
    return_bool = False
    if modifier is not None:
        return_bool = bool(modifier.return_bool)
        card = _CARDS[_enum_name(modifier.card)]
        on = False
        labels: tuple[str, ...] = ()
        if modifier.matching is not None:
            on = modifier.matching.type == pp.LabelModifierType.Include
            labels = tuple(modifier.matching.labels)
        fill = modifier.fill_values
        matching = VectorMatching(
            card,
            on,
            labels,
            tuple(modifier.group_labels or ()),
            None if fill is None else fill.lhs,
            None if fill is None else fill.rhs,
        )
    if op in _SET_OPS and (matching is None or matching.card != "many-to-many"):
        on, labels = (matching.on, matching.labels) if matching else (False, ())
        matching = VectorMatching("many-to-many", on, labels, ())
    if matching is None:
        matching = VectorMatching("one-to-one", False, (), ())
    return Binary(op, lhs, rhs, matching, return_bool)


_NODE_TYPES = (NumberLit, StringLit, Selector, MatrixSel, Subquery, Call, Aggregate, Binary, Unary)


def _unary(raw: Any) -> Node:
    inner = convert(raw.expr)
    if isinstance(inner, NumberLit):
        return NumberLit(-inner.value)
    return Unary(inner)


def _number(raw: Any) -> Node:
    return NumberLit(float(raw.val))


def _string(raw: Any) -> Node:
    return StringLit(str(raw.val))


def _paren(raw: Any) -> Node:
    # Parentheses only group; the tree already encodes precedence.
    return convert(raw.expr)


_CONVERTERS: dict[str, Callable[[Any], Node]] = {
    "NumberLiteral": _number,
    "StringLiteral": _string,
    "VectorSelector": _selector,
    "MatrixSelector": _matrix,
    "SubqueryExpr": _subquery,
    "Call": _call,
    "AggregateExpr": _aggregate,
    "BinaryExpr": _binary,
    "UnaryExpr": _unary,
    "ParenExpr": _paren,
}


def children(node: Node) -> tuple[Node, ...]:
    """Direct sub-expressions of a node."""
    if isinstance(node, MatrixSel):
        return (node.selector,)
    if isinstance(node, Subquery | Unary):
        return (node.expr,)
    if isinstance(node, Call):
        return node.args
    if isinstance(node, Aggregate):
        return (node.expr,) if node.param is None else (node.param, node.expr)
    if isinstance(node, Binary):
        return (node.lhs, node.rhs)
    return ()


def selectors(node: Node) -> list[Selector]:
    """Every vector selector in the expression, in source order."""
    out: list[Selector] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Selector):
            out.append(current)
        stack.extend(reversed(children(current)))
    return out


def metric_names(expr: str | Node) -> set[str]:
    """Metric names an expression reads (from `name{...}` and `{__name__="..."}`).

    A selector without an equality on `__name__` (e.g. `{job="x"}` or a regex on the
    name) can read any metric; it contributes no name, so callers that need to know
    "reads everything" should check `reads_any_metric` as well.
    """
    node = parse(expr) if isinstance(expr, str) else expr
    names: set[str] = set()
    for sel in selectors(node):
        for group in sel.alternatives:
            for m in group:
                if m.name == "__name__" and m.op is MatchOp.EQ:
                    names.add(m.value)
    return names


def metric_deps(node: Node) -> frozenset[str] | None:
    """The metric names whose data `node`'s result depends on; None when it may read any."""
    names: set[str] = set()
    for sel in selectors(node):
        for group in sel.alternatives:
            found = [m.value for m in group if m.name == "__name__" and m.op is MatchOp.EQ]
            if not found:
                return None
            names.update(found)
    return frozenset(names)


def reads_any_metric(expr: str | Node) -> bool:
    """True when some selector has no `__name__="..."` equality (it may read any metric)."""
    node = parse(expr) if isinstance(expr, str) else expr
    return any(
        not any(m.name == "__name__" and m.op is MatchOp.EQ for m in group)
        for sel in selectors(node)
        for group in sel.alternatives
    )


def is_nan_literal(node: Node) -> bool:
    return isinstance(node, NumberLit) and math.isnan(node.value)
