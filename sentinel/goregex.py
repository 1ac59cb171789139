"""Go's regular expressions (RE2 syntax) in linear time, for PromQL matchers and templates.

PromQL label matchers, `label_replace` and the template functions `match` and
`reReplaceAll` take Go `regexp` patterns. Python's `re` is a backtracking engine:
`{uuid=~".{16}(.+)+Z"}` froze the daemon for 15 s against eight GPU UUIDs, and time
doubles per character. Go (and RE2, which Go's package follows) guarantee time linear
in the input, so Sentinel matches with RE2 itself (`google-re2`), whose syntax is
Go's; no translation to Python syntax is needed (the two earlier translators, one for
PromQL and one for templates, disagreed on `a(?i)b`).

Differences from Go that remain are refused rather than silently different: `\\C` (any
byte) exists only in RE2. Errors read like Go's (`error parsing regexp: missing
closing ): `(``).

A call into RE2 costs several microseconds (mostly the binding), so results of the
anchored label matchers, which see the same label values every evaluation, are
memoized per pattern (bounded).
"""

from __future__ import annotations

import functools
from typing import Any

import re2

__all__ = ["LabelRegex", "RegexError", "compile_go"]


class RegexError(ValueError):
    """An invalid pattern, worded as Go's `regexp.Compile` error."""


# RE2's error code texts and Go's wording of the same error.
_GO_WORDING = {
    "missing )": "missing closing )",
    "missing ]": "missing closing ]",
    "trailing \\": "trailing backslash at end of expression",
    "no argument for repetition operator": "missing argument to repetition operator",
    "invalid repetition size": "invalid repeat count",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "invalid named capture group": "invalid named capture",
}

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors come back as exceptions; RE2 would also print them


@functools.lru_cache(maxsize=1024)
def compile_go(pattern: str, *, dot_nl: bool = False) -> Any:
    """`regexp.Compile(pattern)` as an RE2 object (`dot_nl`: as if wrapped in `(?s:...)`)."""
    _refuse_re2_only(pattern)
    try:
        return re2.compile(f"(?s:{pattern})" if dot_nl else pattern, _OPTIONS)
    except re2.error as exc:
        raise RegexError(_go_message(pattern, exc)) from None
    except UnicodeEncodeError:
        raise RegexError(f"error parsing regexp: invalid UTF-8: `{pattern}`") from None


def _refuse_re2_only(pattern: str) -> None:
    i = pattern.find("\\C")
    while i != -1:
        # An escaped backslash before it ("\\\\C") makes it a literal "C".
        backslashes = len(pattern[:i]) - len(pattern[:i].rstrip("\\"))
        if backslashes % 2 == 0:
            raise RegexError("error parsing regexp: invalid escape sequence: `\\C`")
        i = pattern.find("\\C", i + 2)


def _go_message(pattern: str, exc: Exception) -> str:
    raw = exc.args[0] if exc.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    code, _, arg = text.partition(": ")
    wording = _GO_WORDING.get(code, code)
    if code == "trailing \\":
        return f"error parsing regexp: {wording}"
    return f"error parsing regexp: {wording}: `{arg or pattern}`"


def searchable(text: str) -> str:
    """`text` as RE2 can take it: lone surrogates (not UTF-8) become "?" (same length)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


class LabelRegex:
    """A fully anchored matcher (`^(?s:pattern)$`, PromQL's `=~`) with memoized answers."""

    __slots__ = ("_memo", "_regex", "pattern")

    _MEMO_LIMIT = 8192

    def __init__(self, pattern: str, *, dot_nl: bool = True) -> None:
        self.pattern = pattern
        self._regex = compile_go(pattern, dot_nl=dot_nl)
        self._memo: dict[str, bool] = {}

    def fullmatch(self, value: str) -> bool:
        hit = self._memo.get(value)
        if hit is None:
            hit = self._regex.fullmatch(searchable(value)) is not None
            if len(self._memo) >= self._MEMO_LIMIT:
                self._memo.clear()  # label churn: only speed is lost
            self._memo[value] = hit
        return hit
