"""PromQL parse errors in Prometheus's words: `1:7: parse error: unexpected end of input`.

Sentinel parses with promql-parser, whose messages carry no position and name types
its own way (`expected type matrix ... got vector`). promtool prints Prometheus's
parser's message with the line and column of the offending token. This module turns
promql-parser's message into that text where the position follows from the message
and the expression alone (end of input, the stray parenthesis, the unknown function,
an argument of the wrong type, a token the grammar does not expect), and otherwise
keeps promql-parser's message with the position of the expression's start.
"""

from __future__ import annotations

import re

from sentinel.promql import syntax
from sentinel.promql.model import PromQLError

__all__ = ["parse_error"]

_TYPE_NAMES = {"matrix": "range vector", "vector": "instant vector", "scalar": "scalar", "string": "string"}
_BINARY_TAIL = re.compile(
    r"(?:\+|-|\*|/|%|\^|==|!=|<=|>=|<|>|\band\b|\bor\b|\bunless\b|\batan2\b)"
    r"(?:\s*\bbool\b)?(?:\s*\b(?:on|ignoring)\s*\([^)]*\))?(?:\s*\b(?:group_left|group_right)(?:\s*\([^)]*\))?)?\s*$"
)


def parse_error(expr: str, compat: int = 3) -> str | None:
    """None when `expr` parses; else the message promtool prints after `could not parse expression: `.

    The engine's parser decides (`syntax.parse`, which in mode 2 refuses what 2.42 cannot
    parse, with 2.42's message and position); a message without a position is
    promql-parser's, put into Prometheus's words here.
    """
    try:
        syntax.parse(expr, compat)
    except PromQLError as exc:
        message = str(exc)
        if _POSITIONED.match(message):
            return message
        return _prometheus_text(expr, message.removeprefix("parse error: "))
    return None


_POSITIONED = re.compile(r"^\d+:\d+: parse error: ")


def _position(expr: str, offset: int) -> str:
    """Prometheus's `line:col` (both 1-based, col in bytes... here characters) of offset."""
    line = expr.count("\n", 0, offset) + 1
    col = offset - (expr.rfind("\n", 0, offset) + 1) + 1
    return f"{line}:{col}"


def _end(expr: str) -> str:
    return _position(expr, len(expr))


def _prometheus_text(expr: str, message: str) -> str:
    if message.startswith("unclosed left parenthesis") or message.startswith("unexpected end of input"):
        return f"{_end(expr)}: parse error: {message}"
    if message.startswith("unexpected right parenthesis"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                return f"{_position(expr, i + 1)}: parse error: unexpected right parenthesis ')'"
    m = re.match(r"unknown function with name '(.*)'", message)
    if m:
        offset = max(expr.find(m.group(1)), 0)
        return f'{_position(expr, offset)}: parse error: unknown function with name "{m.group(1)}"'
    m = re.match(r"expected type (\w+) in call to function '(\w+)', got (\w+)", message)
    if m:
        want, func, got = m.groups()
        call = re.search(rf"\b{re.escape(func)}\s*\(\s*", expr)
        offset = call.end() if call else 0
        return (
            f"{_position(expr, offset)}: parse error: expected type {_TYPE_NAMES.get(want, want)} "
            f'in call to function "{func}", got {_TYPE_NAMES.get(got, got)}'
        )
    if message == "invalid promql query" and _BINARY_TAIL.search(expr.rstrip()):
        return f"{_end(expr.rstrip())}: parse error: unexpected end of input"
    return f"1:1: parse error: {message}"
