"""Bounds on PromQL text, checked before promql-parser sees it.

promql-parser (Rust, through pyo3) recurses once per level of the syntax tree and
copies each subtree as it hands the tree to Python, so its stack use grows with depth
and its time and memory with (number of nodes) x (depth). Measured on the 2-core
machine of BENCHMARKS.md: a chain `1-1-...-1` of 4,500 terms overflows the 8 MiB main
thread stack and kills the process with SIGSEGV; 2,000 terms take 3.3 s and 570 MB;
8,000 nested parentheses 4.3 GB. Sentinel's own conversion and evaluation recurse
too (Python's limit is 1,000 frames). So every text is measured first, in one linear
pass over its tokens, and refused with a `PromQLError` when it is:

- longer than `MAX_QUERY_LENGTH` bytes;
- deeper than `MAX_DEPTH`: parentheses, brackets, function calls and aggregations, plus
  one level per binary or unary operator (an operator chain nests one level per term);
- more work to parse than `MAX_PARSE_WORK`, the sum over tokens of the depth at which
  each sits (the (nodes x depth) that the parser's time follows; a chain of n terms
  costs about n^2 / 2).

The limits are constants, not settings: they keep the process alive, and at them the
parse takes under 0.1 s and 30 MB here (a chain of 245 terms; 128 nested calls).
Real expressions stay far below: a typical alert rule is 10 levels deep with a work
of about 150.
"""

from __future__ import annotations

from sentinel.promql.model import PromQLError

__all__ = ["MAX_DEPTH", "MAX_PARSE_WORK", "MAX_QUERY_LENGTH", "check_text", "measure"]

MAX_QUERY_LENGTH = 64 * 1024
"""Bytes of PromQL text (Prometheus itself is bounded only by its HTTP body limit)."""

MAX_DEPTH = 128
"""Nesting levels, counting each operator of a chain as one."""

MAX_PARSE_WORK = 60_000
"""Sum of the nesting depth of each token: the parser's cost, 1-1.6 us each here."""

_OPERATOR_CHARS = frozenset("+-*/%^<>=!")
_OPERATOR_WORDS = frozenset({"and", "or", "unless", "atan2"})
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = frozenset(")]}")
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:.")


def measure(text: str) -> tuple[int, int]:
    """(maximum depth, parse work) of a PromQL text, in one pass; any text is accepted."""
    # Per open bracket: its closing character and the operators seen at its level.
    stack: list[tuple[str, int]] = []
    ops = 0  # operators at the current (innermost) level
    depth = 1  # 1 + sum over levels of (1 + operators at that level)
    deepest = 1
    work = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if ch == "#":
            end = text.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        if ch in "\"'`":
            i = _skip_string(text, i)
            work += depth
            continue
        in_selector = bool(stack) and stack[-1][0] in "]}"
        if ch in _OPEN:
            stack.append((_OPEN[ch], ops))
            ops = 0
            depth += 1
        elif ch in _CLOSE:
            if stack and stack[-1][0] == ch:
                depth -= 1 + ops
                ops = stack.pop()[1]
        elif ch in _OPERATOR_CHARS:
            j = i + 1
            while j < n and text[j] in _OPERATOR_CHARS and j - i < 2:
                j += 1
            if not in_selector:
                ops += 1
                depth += 1
            work += depth
            i = j
            deepest = max(deepest, depth)
            continue
        elif ch in _WORD_CHARS:
            j = i + 1
            while j < n and text[j] in _WORD_CHARS:
                j += 1
            if not in_selector and text[i:j].lower() in _OPERATOR_WORDS:
                ops += 1
                depth += 1
            work += depth
            i = j
            deepest = max(deepest, depth)
            continue
        work += depth
        deepest = max(deepest, depth)
        i += 1
    return deepest, work


def _skip_string(text: str, i: int) -> int:
    """Index after the string literal starting at `i` (the end of text if unterminated)."""
    quote = text[i]
    j = i + 1
    n = len(text)
    while j < n:
        ch = text[j]
        if ch == "\\" and quote != "`":
            j += 2
            continue
        if ch == quote:
            return j + 1
        j += 1
    return n


def check_text(text: str) -> None:
    """Raise PromQLError when `text` exceeds a limit; call before parsing."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_QUERY_LENGTH:
        raise PromQLError(f"query too long: {size} bytes, the limit is {MAX_QUERY_LENGTH}")
    depth, work = measure(text)
    if depth > MAX_DEPTH:
        raise PromQLError(
            f"query too deeply nested: {depth} levels (parentheses, calls and operator chains), "
            f"the limit is {MAX_DEPTH}"
        )
    if work > MAX_PARSE_WORK:
        raise PromQLError(
            f"query too complex to parse: work {work} (tokens x nesting depth), the limit is {MAX_PARSE_WORK}; "
            "split long operator chains, e.g. with parentheses"
        )
