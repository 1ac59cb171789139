"""Small operations on the store's `Labels` (a sorted tuple of (name, value) pairs)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from decimal import Decimal

from sentinel.promql.model import PromQLError
from sentinel.store import Labels

NAME = "__name__"

_LEGACY_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def valid_label_name(name: str, compat: int = 3) -> bool:
    """Prometheus 3 takes any UTF-8 name; 2.42 (`compat=2`) only `[a-zA-Z_][a-zA-Z0-9_]*`."""
    if compat == 2:
        return _LEGACY_NAME.match(name) is not None
    return bool(name) and name.isprintable()


def get(labels: Labels, name: str) -> str:
    """The value of `name`, or "" when absent (Prometheus treats both alike)."""
    for key, value in labels:
        if key == name:
            return value
    return ""


def _without_name(labels: Labels) -> Labels:
    return tuple(pair for pair in labels if pair[0] != NAME)


def without_name(labels: Labels) -> Labels:
    """The label set without `__name__`."""
    return _WITHOUT_NAME(labels)


def keep_only(labels: Labels, names: Collection[str]) -> Labels:
    return tuple(pair for pair in labels if pair[0] in names)


def drop(labels: Labels, names: Collection[str]) -> Labels:
    return tuple(pair for pair in labels if pair[0] not in names)


def with_label(labels: Labels, name: str, value: str) -> Labels:
    """Set (or, for an empty value, delete) one label, keeping the tuple sorted."""
    kept = [pair for pair in labels if pair[0] != name]
    if value != "":
        kept.append((name, value))
        kept.sort()
    return tuple(kept)


def format_labels(labels: Labels) -> str:
    """Go's `labels.String()`: `{__name__="x", job="a"}` (used in error messages)."""
    parts = []
    for key, value in labels:
        shown = key if _LEGACY_NAME.match(key) else json.dumps(key)
        parts.append(f"{shown}={json.dumps(value, ensure_ascii=False)}")
    return "{" + ", ".join(parts) + "}"


def format_series(labels: Labels) -> str:
    """PromQL notation `name{job="a"}` (for reports)."""
    name = get(labels, NAME)
    rest = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in labels if k != NAME)
    return f"{name}{{{rest}}}"


def format_value(value: float) -> str:
    """Go's `strconv.FormatFloat(v, 'f', -1, 64)`: shortest digits, never an exponent."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def check_unique(labelsets: Iterable[Labels]) -> None:
    """Refuse two samples with one label set, as Prometheus does after each step."""
    seen: set[Labels] = set()
    for labels in labelsets:
        if labels in seen:
            raise PromQLError("vector cannot contain metrics with the same labelset")
        seen.add(labels)


class LabelMemo:
    """Memoizes a pure function of a label set.

    The rule engine evaluates the same expressions over the same series every
    second, so label transforms (dropping `__name__`, grouping keys, matching
    signatures) repeat; a dict lookup is several times cheaper than rebuilding the
    tuple. The table is cleared when it grows large (series churn).
    """

    __slots__ = ("_cache", "_fn", "_limit")

    def __init__(self, fn: Callable[[Labels], Labels], limit: int = 100_000) -> None:
        self._fn = fn
        self._cache: dict[Labels, Labels] = {}
        self._limit = limit

    def __call__(self, labels: Labels) -> Labels:
        cached = self._cache.get(labels)
        if cached is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            cached = self._cache[labels] = self._fn(labels)
        return cached

    def map(self, labelsets: list[Labels]) -> list[Labels]:
        """`[self(labels) for labels in labelsets]`, with the cache lookups in one C loop."""
        get = self._cache.get
        found = [get(labels) for labels in labelsets]
        if None in found:
            return [self(labels) if hit is None else hit for labels, hit in zip(labelsets, found, strict=True)]
        return found  # type: ignore[return-value]  # no None left


_WITHOUT_NAME = LabelMemo(_without_name)
