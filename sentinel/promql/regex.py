"""Translate Go RE2 regular expressions (PromQL's dialect) to Python's `re`.

Differences handled: flags in the middle of a pattern (`a(?i)b` scopes to the rest of
the group in RE2; Python only allows global flags at the start), `\\z`, `\\Q...\\E`,
POSIX classes (`[[:alpha:]]`), and ASCII-only `\\d \\w \\s` (RE2's meaning).
Unicode classes (`\\pL`) have no `re` equivalent and are refused.
"""

from __future__ import annotations

import functools
import re

from sentinel.promql.model import PromQLError

__all__ = ["translate_regex"]

_POSIX = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}

_FLAGS = re.compile(r"\(\?([imsU-]+)\)")


@functools.lru_cache(maxsize=1024)
def translate_regex(pattern: str) -> str:
    """A Python pattern with the RE2 meaning of `pattern` (raises PromQLError if impossible)."""
    out: list[str] = []
    # Per open group, the inline flag scopes opened inside it (each needs a ")").
    scopes: list[list[str]] = [[]]
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i = _escape(pattern, i, out)
            continue
        if ch == "[":
            i = _char_class(pattern, i, out)
            continue
        if ch == "(":
            m = _FLAGS.match(pattern, i)
            if m is not None:
                flags = m.group(1)
                if "U" in flags:
                    raise PromQLError(f"unsupported regex flag U in {pattern!r}")
                out.append(f"(?{flags}:")
                scopes[-1].append(flags)
                i = m.end()
                continue
            out.append(ch)
            scopes.append([])
            i += 1
            continue
        if ch == ")":
            if len(scopes) > 1:
                out.append(")" * len(scopes.pop()))
            out.append(")")
            i += 1
            continue
        if ch == "|" and scopes[-1]:
            # RE2 flags last to the end of the group, across `|`: close, then reopen.
            active = scopes[-1]
            out.append(")" * len(active) + "|" + "".join(f"(?{f}:" for f in active))
            i += 1
            continue
        out.append(ch)
        i += 1
    out.append(")" * len(scopes[0]))
    translated = "(?a:" + "".join(out) + ")"
    try:
        re.compile(translated)
    except re.error as exc:
        raise PromQLError(f"invalid regular expression {pattern!r}: {exc}") from None
    return translated


def _escape(pattern: str, i: int, out: list[str]) -> int:
    nxt = pattern[i + 1] if i + 1 < len(pattern) else ""
    if nxt == "z":
        out.append("\\Z")
        return i + 2
    if nxt == "Q":
        end = pattern.find("\\E", i + 2)
        literal = pattern[i + 2 :] if end == -1 else pattern[i + 2 : end]
        out.append(re.escape(literal))
        return len(pattern) if end == -1 else end + 2
    if nxt in ("p", "P"):
        raise PromQLError(f"unsupported Unicode class \\{nxt} in regular expression {pattern!r}")
    out.append(pattern[i : i + 2])
    return i + 2


def _char_class(pattern: str, i: int, out: list[str]) -> int:
    """Copy a `[...]` class, expanding POSIX names; returns the index after it."""
    j = i + 1
    buf = ["["]
    if j < len(pattern) and pattern[j] == "^":
        buf.append("^")
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        buf.append("\\]")  # a leading "]" is literal
        j += 1
    while j < len(pattern):
        ch = pattern[j]
        if ch == "\\":
            buf.append(pattern[j : j + 2])
            j += 2
            continue
        if ch == "[" and pattern.startswith("[:", j):
            end = pattern.find(":]", j + 2)
            if end != -1:
                name = pattern[j + 2 : end]
                negated = name.startswith("^")
                cls = _POSIX.get(name.lstrip("^"))
                if cls is None:
                    raise PromQLError(f"invalid character class [:{name}:] in {pattern!r}")
                if negated:
                    raise PromQLError(f"negated POSIX class [:{name}:] is not supported in {pattern!r}")
                buf.append(cls)
                j = end + 2
                continue
        if ch == "[":
            buf.append("\\[")  # Python warns about possible nested sets
            j += 1
            continue
        if ch == "]":
            buf.append("]")
            out.append("".join(buf))
            return j + 1
        buf.append(ch)
        j += 1
    raise PromQLError(f"missing closing ] in regular expression {pattern!r}")
