"""Linear-time regular expressions for log lines: RE2 (google-re2), matched on bytes.

Python's `re` backtracks: `NCCL WARN\\b.*?…` against one 80 KB line of `NCCL WARN `
repeated took 52 s and froze the daemon (issue 15, F9). RE2 guarantees time linear in
the line's length for every pattern, whatever the operator writes, so a log line can
cost milliseconds at most. The price is RE2's syntax: no lookarounds and no
backreferences (a pattern that uses them is refused with a clear message), and `\\z`
for the end of text.

Lines are matched as bytes (the readers hand bytes; decoding happens only for the
lines that match). Patterns are written as text and may name *fragments* of the
catalogue with `{{name}}` (the shared line-head grammar), expanded before compiling.

Speed: google-re2's public `search` wraps each call in a Python generator and a match
object (3-5 µs a call here); `LineRegex.spans` calls the compiled RE2 object's `Match`
directly (1-3 µs) and falls back to the public API if a future release moves it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import re2

__all__ = ["LineRegex", "RegexError", "Spans", "expand_fragments"]

Spans = Sequence[tuple[int, int]]
"""(start, end) of the whole match, then of each group; (-1, -1) for a group that did not take part."""

_FRAGMENT = re.compile(r"\{\{([a-z_][a-z0-9_]*)\}\}")
_MAX_EXPANSIONS = 32
_MAX_MEM = 32 << 20  # RE2's memory budget for one compiled pattern (default 8 MiB)


class RegexError(ValueError):
    """A pattern is not valid RE2 syntax, or names an unknown fragment."""


def expand_fragments(source: str, fragments: Mapping[str, str]) -> str:
    """`source` with every `{{name}}` replaced by its fragment (fragments may nest)."""
    text = source
    for _ in range(_MAX_EXPANSIONS):
        missing = [name for name in _FRAGMENT.findall(text) if name not in fragments]
        if missing:
            known = ", ".join(sorted(fragments)) or "none"
            raise RegexError(f"unknown fragment {{{{{missing[0]}}}}} (known: {known})")
        expanded = _FRAGMENT.sub(lambda m: fragments[m.group(1)], text)
        if expanded == text:
            return text
        text = expanded
    raise RegexError("fragments nest too deeply (a fragment that names itself?)")


def _options() -> Any:
    options = re2.Options()
    options.max_mem = _MAX_MEM
    options.log_errors = False
    return options


class LineRegex:
    """One compiled pattern, searched in one line of bytes."""

    __slots__ = ("_both", "_compiled", "_raw", "_unanchored", "groupindex", "pattern")

    def __init__(self, pattern: str, *, captures: bool = True) -> None:
        self.pattern = pattern
        options = _options()
        options.never_capture = not captures  # without groups RE2 answers from its DFA alone: fastest
        try:
            self._compiled = re2.compile(pattern, options)
        except re2.error as exc:
            raise RegexError(_explain(pattern, str(exc))) from None
        self.groupindex: dict[str, int] = {
            (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in self._compiled.groupindex.items()
        }
        self._raw = getattr(self._compiled, "_regexp", None)
        anchor = getattr(getattr(re2, "_re2", None), "RE2", None)
        self._unanchored = anchor.Anchor.UNANCHORED if anchor is not None and self._raw is not None else None
        self._both = anchor.Anchor.ANCHOR_BOTH if anchor is not None and self._raw is not None else None

    def spans(self, data: bytes, start: int = 0, end: int | None = None) -> Spans | None:
        """Spans of the first match in `data[start:end]` (offsets into `data`), or None."""
        stop = len(data) if end is None else end
        if self._unanchored is not None and self._raw is not None:
            found: Spans = self._raw.Match(self._unanchored, data, start, stop)
            return None if found[0][0] < 0 else found
        m = self._compiled.search(data, start, stop)
        if m is None:
            return None
        return [m.span(i) for i in range(len(self.groupindex) + 1)] if self.groupindex else [m.span()]

    def matches_exactly(self, data: bytes, start: int, end: int) -> bool:
        """True when the pattern matches all of `data[start:end]`."""
        if self._both is not None and self._raw is not None:
            return bool(self._raw.Match(self._both, data, start, end)[0][0] >= 0)
        return self._compiled.fullmatch(data, start, end) is not None


def _explain(pattern: str, message: str) -> str:
    hint = ""
    if re.search(r"\(\?<?[=!]", pattern):
        hint = " (lookahead and lookbehind are not supported: anchor the pattern to the line's structure instead)"
    elif re.search(r"\\[1-9]|\(\?P=", pattern):
        hint = " (backreferences are not supported)"
    elif "\\Z" in pattern:
        hint = " (write \\z for the end of the line)"
    return f"not a valid regular expression (RE2 syntax): {message}{hint}"
