"""Reusing an alert's rendered labels and annotations while its inputs are the same.

An alerting rule's templates are rendered for every active alert at every evaluation,
as Prometheus does, and a firing alert's inputs rarely change from one second to the
next: its labels never do, and its value often stays put (`increase(...) > 0` while
the count holds). Rendering walks the template tree in Python (about a fifth of a full
evaluation of bench/rules_eval.py's 200 rules with 221 alerts firing), so the result
is kept and reused when the same template meets the same inputs again.

This is exact because a template that calls neither `query` nor `call` is a pure
function of what `TemplateContext` holds besides the query function: the sample's
labels and value and the evaluator's external labels and URL (fixed per evaluator,
which owns one cache). A template naming either function anywhere in its text is
never cached; that check is on the text, so it can only err towards rendering again.
Values are keyed with their sign, so `-0.0` and `0.0` (equal as floats, but printed
differently) never share an entry; a NaN never equals itself, so it simply misses.

Memory stays bounded by what is alive: entries used during one evaluation are kept
for the next one only (two generations), so alerts that resolved are forgotten.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

__all__ = ["RenderCache"]

_IMPURE = re.compile(r"\b(?:query|call)\b")

_Key = tuple[str, tuple[tuple[str, str], ...], float, bool]


class RenderCache:
    """Rendered template texts keyed by (template text, labels, value)."""

    __slots__ = ("_current", "_previous", "_pure")

    def __init__(self) -> None:
        self._current: dict[_Key, str] = {}
        self._previous: dict[_Key, str] = {}
        self._pure: dict[str, bool] = {}

    def render(self, text: str, labels: Mapping[str, str], value: float, render: Callable[[], str]) -> str:
        """`render()`'s result for this text and these inputs, computed at most once per pair of evaluations."""
        pure = self._pure.get(text)
        if pure is None:
            pure = self._pure[text] = _IMPURE.search(text) is None
        if not pure:
            return render()
        key = (text, tuple(labels.items()), value, math.copysign(1.0, value) < 0)
        hit = self._current.get(key)
        if hit is not None:
            return hit
        hit = self._previous.get(key)
        if hit is None:
            hit = render()
        self._current[key] = hit
        return hit

    def next_evaluation(self) -> None:
        """Keep what this evaluation used for the next one; forget the rest."""
        self._previous = self._current
        self._current = {}
        if len(self._pure) > 4096:  # rule texts only change on reload
            self._pure.clear()
