"""Prometheus 2.42 syntax: what `promtool` 2.42 refuses that Prometheus 3 accepts.

Sentinel parses with promql-parser, which follows Prometheus 3. In Prometheus 2
compatibility mode (`prometheus_compat: 2`) an expression must also be one that
Prometheus 2.42 (Debian stable's promtool) parses, and a refusal must read exactly as
promtool prints it, e.g. `1:1: parse error: unknown function with name "info"`.

How: a port of 2.42's lexer (`promql/parser/lex.go`, the state functions unchanged in
behaviour, errors with the same wording and byte positions), then one pass over its
tokens that finds the constructs 2.42's grammar has no rule for:

- functions added after 2.42 (`info`, `limitk`, `mad_over_time`, `sort_by_label`, ...)
  and the `fill(...)` binary-operator modifiers, which 2.42 reads as function calls;
- quoted label and metric names (`{"a.b"="c"}`) and `or` between label matchers;
- quoted labels in `by (...)`, `on (...)` and `group_left (...)`;
- numbers where 2.42 wants a duration (`x[90]`, `offset 90`, `x[5m:30]`) and duration
  strings its `model.ParseDuration` refuses (`1.5m`);
- `start()`/`end()` anywhere but after `@` (2.42 reads them as metric names).

Errors come in the order 2.42's parser raises them: at the offending token, except an
unknown function, which its grammar reports when the call's `)` is reduced.

2.42's `holt_winters` is Prometheus 3's `double_exponential_smoothing` (same algorithm,
renamed in 3.0); `to_prometheus3` rewrites the name so promql-parser can read it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from sentinel.promql.model import PromQLError

__all__ = ["FUNCTIONS", "check", "go_quote", "to_prometheus3"]

FUNCTIONS = frozenset(
    {
        "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
        "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
        "count_over_time", "days_in_month", "day_of_month", "day_of_week", "day_of_year", "deg",
        "delta", "deriv", "exp", "floor", "histogram_count", "histogram_sum", "histogram_fraction",
        "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate", "label_replace",
        "label_join", "last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time",
        "minute", "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad",
        "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt",
        "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp",
        "vector", "year",
    }
)  # fmt: skip
"""The functions of Prometheus 2.42 (`promql/parser/functions.go` at v2.42.0)."""

# `key` in 2.42's lex.go: words lexed as keywords (case-insensitively) outside braces.
_OPERATOR_WORDS = frozenset({"and", "or", "unless", "atan2"})
_AGGREGATORS = frozenset(
    {"sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk", "count_values", "quantile"}
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | {"offset", "bool", "start", "end"}

_DURATION = re.compile("".join(f"(?:([0-9]+){unit})?" for unit in ("y", "w", "d", "h", "m", "s", "ms")))
_DURATION_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1000, 1)
_MAX_INT64 = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Token:
    """One lexer item: `kind` is IDENT, METRIC_IDENT, KEYWORD, AGGR, OP, NUMBER, DURATION,
    STRING, COMMENT, ERROR or the punctuation itself ("(", "{", ":", "@", ...)."""

    kind: str
    text: str
    pos: int  # index into the text (characters; converted to bytes for messages)


_State = Callable[[], "_State | None"]
"""A lexer state: consumes input, returns the next state (None: done)."""


class _Lexer:
    """2.42's state-machine lexer, one state method per Go state function."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.start = 0
        self.paren_depth = 0
        self.brace_open = False
        self.bracket_open = False
        self.got_colon = False
        self.string_open = ""
        self.width = 0
        self.tokens: list[Token] = []

    # -- primitives ------------------------------------------------------------------

    def next(self) -> str:
        """The next character, or "" at the end (Go's eof, which `backup` does not undo)."""
        if self.pos >= len(self.text):
            self.width = 0
            return ""
        self.width = 1
        ch = self.text[self.pos]
        self.pos += 1
        return ch

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def backup(self) -> None:
        self.pos -= self.width

    def emit(self, kind: str) -> None:
        self.tokens.append(Token(kind, self.text[self.start : self.pos], self.start))
        self.start = self.pos

    def ignore(self) -> None:
        self.start = self.pos

    def error(self, message: str) -> _State | None:
        """Go's `errorf`: record the error and stop lexing."""
        self.tokens.append(Token("ERROR", message, self.start))
        return None

    def accept(self, valid: str) -> bool:
        ch = self.next()
        if ch and ch in valid:
            return True
        self.backup()
        return False

    def accept_run(self, valid: str) -> None:
        while self.accept(valid):
            pass

    # -- states ------------------------------------------------------------------------

    def run(self) -> list[Token]:
        state: _State | None = self.statements
        while state is not None:
            state = state()
        return self.tokens

    def statements(self) -> _State | None:
        if self.brace_open:
            return self.inside_braces
        if self.text.startswith("#", self.pos):
            return self.line_comment
        r = self.next()
        if r == "":
            if self.paren_depth != 0:
                self.start = len(self.text)
                return self.error("unclosed left parenthesis")
            if self.bracket_open:
                self.start = len(self.text)
                return self.error("unclosed left bracket")
            self.pos = len(self.text)
            self.emit("EOF")
            return None
        if r == ",":
            self.emit(",")
        elif _is_space(r):
            return self.space
        elif r in "*/%+-^":
            self.emit("OP")
        elif r == "=":
            t = self.peek()
            if t == "=":
                self.next()
                self.emit("OP")
            elif t == "~":
                return self.error(f"unexpected character after '=': {_go_rune(t)}")
            else:
                self.emit("=")
        elif r == "!":
            t = self.next()
            if t != "=":
                return self.error(f"unexpected character after '!': {_go_rune(t)}")
            self.emit("OP")
        elif r in "<>":
            if self.peek() == "=":
                self.next()
            self.emit("OP")
        elif _is_digit(r) or (r == "." and _is_digit(self.peek())):
            self.backup()
            return self.number_or_duration
        elif r in "\"'":
            self.string_open = r
            return self.string
        elif r == "`":
            self.string_open = r
            return self.raw_string
        elif _is_alpha(r) or r == ":":
            if not self.bracket_open:
                self.backup()
                return self.keyword_or_identifier
            if self.got_colon:
                return self.error(f"unexpected colon {_go_rune(r)}")
            self.emit(":")
            self.got_colon = True
        elif r == "(":
            self.emit("(")
            self.paren_depth += 1
        elif r == ")":
            self.emit(")")
            self.paren_depth -= 1
            if self.paren_depth < 0:
                return self.error(f"unexpected right parenthesis {_go_rune(r)}")
        elif r == "{":
            self.emit("{")
            self.brace_open = True
            return self.inside_braces
        elif r == "[":
            if self.bracket_open:
                return self.error(f"unexpected left bracket {_go_rune(r)}")
            self.got_colon = False
            self.emit("[")
            while _is_space(self.peek()):
                self.next()
            self.ignore()
            self.bracket_open = True
            return self.duration
        elif r == "]":
            if not self.bracket_open:
                return self.error(f"unexpected right bracket {_go_rune(r)}")
            self.emit("]")
            self.bracket_open = False
        elif r == "@":
            self.emit("@")
        else:
            return self.error(f"unexpected character: {_go_rune(r)}")
        return self.statements

    def inside_braces(self) -> _State | None:
        if self.text.startswith("#", self.pos):
            return self.line_comment
        r = self.next()
        if r == "":
            return self.error("unexpected end of input inside braces")
        if _is_space(r):
            return self.space
        if _is_alpha(r):
            self.backup()
            return self.identifier
        if r == ",":
            self.emit(",")
        elif r in "\"'":
            self.string_open = r
            return self.string
        elif r == "`":
            self.string_open = r
            return self.raw_string
        elif r == "=":
            if self.next() != "~":
                self.backup()
            self.emit("MATCH_OP")
        elif r == "!":
            nr = self.next()
            if nr not in ("~", "="):
                return self.error(f"unexpected character after '!' inside braces: {_go_rune(nr)}")
            self.emit("MATCH_OP")
        elif r == "{":
            return self.error(f"unexpected left brace {_go_rune(r)}")
        elif r == "}":
            self.emit("}")
            self.brace_open = False
            return self.statements
        else:
            return self.error(f"unexpected character inside braces: {_go_rune(r)}")
        return self.inside_braces

    def escape(self) -> _State | None:
        ch = self.next()
        if ch in ("a", "b", "f", "n", "r", "t", "v", "\\") or ch == self.string_open:
            return self.string
        if ch == "":
            return self.error("escape sequence not terminated")
        if ch in "01234567":
            n, base, top = 3, 8, 255
        elif ch == "x":
            ch = self.next()
            n, base, top = 2, 16, 255
        elif ch == "u":
            ch = self.next()
            n, base, top = 4, 16, 0x10FFFF
        elif ch == "U":
            ch = self.next()
            n, base, top = 8, 16, 0x10FFFF
        else:
            return self.error(f"unknown escape sequence {_go_unicode(ch)}")
        x = 0
        while n > 0:
            d = int(ch, 16) if ch and ch in "0123456789abcdefABCDEF" else 16
            if d >= base:
                if ch == "":
                    return self.error("escape sequence not terminated")
                return self.error(f"illegal character {_go_unicode(ch)} in escape sequence")
            x = x * base + d
            n -= 1
            if n > 0:
                ch = self.next()
        if x > top or 0xD800 <= x < 0xE000:
            return self.error("escape sequence is an invalid Unicode code point")
        return self.string

    def string(self) -> _State | None:
        while True:
            ch = self.next()
            if ch == "\\":
                return self.escape
            if ch in ("", "\n"):
                return self.error("unterminated quoted string")
            if ch == self.string_open:
                break
        self.emit("STRING")
        return self.statements

    def raw_string(self) -> _State | None:
        while True:
            ch = self.next()
            if ch == "":
                return self.error("unterminated raw string")
            if ch == self.string_open:
                break
        self.emit("STRING")
        return self.statements

    def space(self) -> _State | None:
        while _is_space(self.peek()):
            self.next()
        self.ignore()
        return self.statements

    def line_comment(self) -> _State | None:
        self.pos += 1
        r = self.next()
        while r not in ("\r", "\n", ""):
            r = self.next()
        self.backup()
        self.emit("COMMENT")
        return self.statements

    def duration(self) -> _State | None:
        if self.scan_number():
            return self.error("missing unit character in duration")
        if not self.accept_remaining_duration():
            return self.error(f"bad duration syntax: {go_quote(self.text[self.start : self.pos])}")
        self.backup()
        self.emit("DURATION")
        return self.statements

    def number_or_duration(self) -> _State | None:
        if self.scan_number():
            self.emit("NUMBER")
            return self.statements
        if self.accept_remaining_duration():
            self.backup()
            self.emit("DURATION")
            return self.statements
        return self.error(f"bad number or duration syntax: {go_quote(self.text[self.start : self.pos])}")

    def accept_remaining_duration(self) -> bool:
        if not self.accept("smhdwy"):
            return False
        self.accept("s")
        while self.accept("0123456789"):
            self.accept_run("0123456789")
            if not self.accept("smhdw"):
                return False
            self.accept("s")
        return not _is_alnum(self.next())

    def scan_number(self) -> bool:
        digits = "0123456789"
        if self.accept("0") and self.accept("xX"):
            digits = "0123456789abcdefABCDEF"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789")
        return not _is_alnum(self.peek())

    def identifier(self) -> _State | None:
        while _is_alnum(self.next()):
            pass
        self.backup()
        self.emit("IDENT")
        return self.inside_braces if self.brace_open else self.statements

    def keyword_or_identifier(self) -> _State | None:
        while True:
            r = self.next()
            if not (_is_alnum(r) or r == ":"):
                break
        self.backup()
        word = self.text[self.start : self.pos].lower()
        if word in _OPERATOR_WORDS:
            self.emit("OP")
        elif word in _AGGREGATORS:
            self.emit("AGGR")
        elif word in _KEYWORDS:
            self.emit("KEYWORD")
        elif ":" not in word:
            self.emit("IDENT")
        else:
            self.emit("METRIC_IDENT")
        return self.statements


def _is_space(r: str) -> bool:
    return r in (" ", "\t", "\n", "\r") and r != ""


def _is_digit(r: str) -> bool:
    return r != "" and "0" <= r <= "9"


def _is_alpha(r: str) -> bool:
    return r == "_" or ("a" <= r <= "z") or ("A" <= r <= "Z")


def _is_alnum(r: str) -> bool:
    return r != "" and (_is_alpha(r) or _is_digit(r))


# -- Go formatting -------------------------------------------------------------------------

_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(text: str) -> str:
    """Go's `strconv.Quote` (`%q` of a string)."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable() and ch not in ("\u00ad",):
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _go_rune(ch: str) -> str:
    """Go's `%q` of a rune."""
    if ch == "":
        return "'\ufffd'"  # Go's eof rune (-1) prints as the replacement character
    if ch == "'":
        return "'\\''"
    quoted = go_quote(ch)[1:-1]
    return f"'{quoted}'" if ch != '"' else "'\"'"


def _go_unicode(ch: str) -> str:
    """Go's `%#U` of a rune: `U+0071 'q'`."""
    if ch == "":
        return "U+FFFFFFFFFFFFFFFF"
    code = f"U+{ord(ch):04X}"
    return f"{code} '{ch}'" if ch.isprintable() else code


def _item_desc(tok: Token) -> str:
    """2.42's `Item.desc()` for the token kinds our errors name."""
    if tok.kind == "STRING":
        shown = go_quote(tok.text[:10]) + "..." if len(tok.text.encode()) > 10 else go_quote(tok.text)
        return f"string {shown}"
    if tok.kind == "NUMBER":
        shown = go_quote(tok.text[:10]) + "..." if len(tok.text.encode()) > 10 else go_quote(tok.text)
        return f"number {shown}"
    if tok.kind == "IDENT":
        return f"identifier {go_quote(tok.text)}"
    if tok.kind == "(":
        return '"("'
    return go_quote(tok.text)


# -- the check -----------------------------------------------------------------------------


def _position(text: str, pos: int) -> str:
    """`line:col:` as Go's ParseErr prints it (bytes from the last newline, 1-based)."""
    before = text[:pos].encode()
    line = before.count(b"\n") + 1
    last_break = before.rfind(b"\n")
    return f"{line}:{len(before) - last_break}"


def _duration_error(text: str) -> str | None:
    """`model.ParseDuration`'s refusal of a duration token, or None."""
    if text == "0":
        return None
    m = _DURATION.fullmatch(text)
    if m is None:
        return f"not a valid duration string: {go_quote(text)}"
    total_ns = 0
    for part, unit_ms in zip(m.groups(), _DURATION_MS, strict=True):
        if part is None:
            continue
        n = min(int(part), _MAX_INT64)
        if n > _MAX_INT64 // (unit_ms * 1_000_000):
            return "duration out of range"
        total_ns += n * unit_ms * 1_000_000
        if total_ns > _MAX_INT64:
            return "duration out of range"
    return None


def check(text: str) -> None:
    """Raise PromQLError with promtool 2.42's message if 2.42 would not parse `text`.

    Only the differences from Prometheus 3 are looked for: run promql-parser as well.
    """
    found = _first_error(text)
    if found is not None:
        pos, message = found
        raise PromQLError(f"{_position(text, pos)}: parse error: {message}")


def _first_error(text: str) -> tuple[int, str] | None:
    tokens = [t for t in _Lexer(text).run() if t.kind != "COMMENT"]
    # Per open "(": the unknown function it calls (reported when it closes), if any.
    open_calls: list[Token | None] = []
    brace_state = ""  # inside {}: what comes next ("name", "op", "value", "sep")
    grouping_depth: int | None = None  # len(open_calls) inside `by (...)` and friends
    in_bracket = after_colon = False
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        kind = tok.kind
        if kind == "ERROR":
            return tok.pos, tok.text
        if brace_state:
            if kind == "}":
                brace_state = ""
            elif brace_state == "name":
                if kind == "STRING":
                    return tok.pos, f'unexpected {_item_desc(tok)} in label matching, expected identifier or "}}"'
                brace_state = "op"
            elif brace_state == "op":
                brace_state = "value"
            elif brace_state == "value":
                brace_state = "sep"
            elif kind == ",":
                brace_state = "name"
            elif kind == "IDENT":
                return tok.pos, f'unexpected {_item_desc(tok)} in label matching, expected "," or "}}"'
            continue
        if kind == "{":
            brace_state = "name"
            continue
        if kind == "[":
            in_bracket, after_colon = True, False
            continue
        if kind == "]":
            in_bracket = False
            continue
        if kind == ":" and in_bracket:
            after_colon = True
            continue
        if kind == "DURATION":
            problem = _duration_error(tok.text)
            if problem is not None:
                return tok.pos, problem
            continue
        if kind == "NUMBER":
            if in_bracket and after_colon:
                return tok.pos, f'unexpected {_item_desc(tok)} in subquery selector, expected duration or "]"'
            offset_before = prev is not None and _is_word(prev, "offset")
            signed = (
                prev is not None
                and prev.kind == "OP"
                and prev.text in "+-"
                and i >= 2
                and _is_word(tokens[i - 2], "offset")
            )
            if offset_before or signed:
                return tok.pos, f"unexpected {_item_desc(tok)} in offset, expected duration"
            continue
        if kind == "STRING" and grouping_depth is not None and grouping_depth == len(open_calls):
            return tok.pos, f"unexpected {_item_desc(tok)} in grouping opts, expected label"
        if kind == "(":
            call: Token | None = None
            if prev is not None:
                if prev.kind == "IDENT" and prev.text not in FUNCTIONS:
                    call = prev
                elif prev.kind == "METRIC_IDENT":
                    return tok.pos, 'unexpected "("'
                elif prev.kind == "KEYWORD" and prev.text.lower() in ("start", "end"):
                    before = tokens[i - 2] if i >= 2 else None
                    if before is None or before.kind != "@":
                        return tok.pos, 'unexpected "("'
                elif prev.kind == "KEYWORD" and prev.text.lower() in _GROUPING and grouping_depth is None:
                    grouping_depth = len(open_calls) + 1
            open_calls.append(call)
            continue
        if kind == ")":
            if grouping_depth is not None and grouping_depth == len(open_calls):
                grouping_depth = None
            call = open_calls.pop() if open_calls else None
            if call is not None:
                return call.pos, f"unknown function with name {go_quote(call.text)}"
    return None


def _is_word(tok: Token, word: str) -> bool:
    return tok.kind == "KEYWORD" and tok.text.lower() == word


def to_prometheus3(text: str) -> str:
    """The text with 2.42's `holt_winters(` calls renamed to `double_exponential_smoothing(`."""
    if "holt_winters" not in text:
        return text
    tokens = [t for t in _Lexer(text).run() if t.kind != "COMMENT"]
    out: list[str] = []
    last = 0
    for tok, nxt in itertools.pairwise(tokens):
        if tok.kind == "IDENT" and tok.text == "holt_winters" and nxt.kind == "(":
            out.append(text[last : tok.pos])
            out.append("double_exponential_smoothing")
            last = tok.pos + len(tok.text)
    out.append(text[last:])
    return "".join(out)
