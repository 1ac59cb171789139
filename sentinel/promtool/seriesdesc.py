"""Prometheus's check of an input series line (`metric{labels} values`), in its words.

promtool loads a test group's `input_series` as a promqltest `load` block, one line
`SERIES VALUES` per entry, and reports the first line its series-description parser
refuses as `LINE:COL: parse error: MESSAGE`, LINE being the entry's number and COL the
column in that line. This is a port of the part of Prometheus's lexer and grammar
that reads such a line (lex.go's statement, brace and value-sequence states; the
`series_description` rules of generated_parser.y), for its error messages only: the
values themselves are expanded by `sentinel.promtool.testformat`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["series_error"]

_KEYWORD_NUMBERS = {"inf", "nan"}
_DURATION_UNITS = ("ms", "s", "m", "h", "d", "w", "y")


@dataclass(frozen=True)
class _Item:
    kind: str  # identifier, string, number, space, "+", "-", "x", "_", "=", op, "{", "}", ",", eof
    value: str
    pos: int

    def desc(self) -> str:
        """Prometheus's Item.desc(): how `unexpected ...` names the token."""
        if self.kind == "eof":
            return "end of input"
        if self.kind == "identifier":
            return f"identifier {_go_q(self.value)}"
        if self.kind == "string":
            return f"string {_go_q_short(self.value)}"
        if self.kind == "number":
            return f"number {_go_q_short(self.value)}"
        if self.kind == "op":
            return f"<op:{self.value}>"
        if self.kind == "space":
            return '"<space>"'
        return _go_q(self.value)


class _ParseError(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos
        self.message = message


def _go_q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _go_q_short(text: str) -> str:
    # Item.String(): values longer than 10 bytes are cut to 10 and marked.
    return _go_q(text[:10]) + "..." if len(text) > 10 else _go_q(text)


def _go_rune(ch: str) -> str:
    return "'\\''" if ch == "'" else f"'{ch}'" if ch.isprintable() else repr(ch)


def _is_alpha(ch: str) -> bool:
    return ch == "_" or ("a" <= ch.lower() <= "z")


def _is_alnum(ch: str) -> bool:
    return _is_alpha(ch) or ch.isdigit()


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def scan_number(self) -> bool:
        """lex.go's scanNumber in series-description mode (no hex; `x` may follow)."""
        while self.peek().isdigit():
            self.pos += 1
        if self.peek() == ".":
            self.pos += 1
            while self.peek().isdigit():
                self.pos += 1
        if self.peek() in ("e", "E"):
            self.pos += 1
            if self.peek() in ("+", "-"):
                self.pos += 1
            while self.peek().isdigit():
                self.pos += 1
        nxt = self.peek()
        return nxt == "x" or not _is_alnum(nxt)

    def identifier(self) -> str:
        start = self.pos
        while _is_alnum(self.peek()) or self.peek() == ":":
            self.pos += 1
        return self.text[start : self.pos]

    def string(self) -> _Item:
        start = self.pos
        quote = self.peek()
        self.pos += 1
        while True:
            ch = self.peek()
            if ch == "":
                raise _ParseError(start, "unterminated quoted string")
            if ch == "\\" and quote != "`":
                self.pos += 2
                continue
            if ch == "\n" and quote != "`":
                raise _ParseError(start, "unterminated quoted string")
            self.pos += 1
            if ch == quote:
                return _Item("string", self.text[start : self.pos], start)

    def metric(self) -> list[_Item]:
        """The tokens up to the end of the metric (identifier and/or label set)."""
        items: list[_Item] = []
        while self.peek() in (" ", "\t"):
            self.pos += 1
        ch = self.peek()
        if ch.isdigit() or (ch == "." and self.peek(1).isdigit()):
            start = self.pos
            if not self.scan_number() or self.peek() == "x":
                self.pos = start
                while self.peek().isdigit():
                    self.pos += 1
                raise _ParseError(start, f"bad number or duration syntax: {_go_q(self.text[start : self.pos])}")
            items.append(_Item("number", self.text[start : self.pos], start))
            return items
        if _is_alpha(ch) or ch == ":":
            start = self.pos
            items.append(_Item("identifier", self.identifier(), start))
        if self.peek() == "{":
            items.append(_Item("{", "{", self.pos))
            self.pos += 1
            items.extend(self.inside_braces())
        return items

    def inside_braces(self) -> list[_Item]:
        items: list[_Item] = []
        while True:
            ch = self.peek()
            start = self.pos
            if ch == "":
                raise _ParseError(start, "unexpected end of input inside braces")
            if ch in (" ", "\t", "\n", "\r"):
                self.pos += 1
            elif _is_alpha(ch):
                items.append(_Item("identifier", self.identifier(), start))
            elif ch in ('"', "'", "`"):
                items.append(self.string())
            elif ch == ",":
                items.append(_Item(",", ",", start))
                self.pos += 1
            elif ch == "}":
                items.append(_Item("}", "}", start))
                self.pos += 1
                return items
            elif (ch == "=" and self.peek(1) == "~") or (ch == "!" and self.peek(1) in ("=", "~")):
                items.append(_Item("op", self.text[start : start + 2], start))
                self.pos += 2
            elif ch == "=":
                items.append(_Item("=", "=", start))
                self.pos += 1
            else:
                raise _ParseError(start, f"unexpected character inside braces: {_go_rune(ch)}")

    def values(self) -> list[_Item]:
        """lexValueSequence: the tokens of the values part."""
        items: list[_Item] = []
        while True:
            ch = self.peek()
            start = self.pos
            if ch == "":
                items.append(_Item("eof", "", start))
                return items
            if ch in (" ", "\t", "\n", "\r"):
                while self.peek() in (" ", "\t", "\n", "\r"):
                    self.pos += 1
                items.append(_Item("space", " ", start))
            elif ch in "+-x_":
                items.append(_Item(ch, ch, start))
                self.pos += 1
            elif ch.isdigit() or (ch == "." and self.peek(1).isdigit()):
                if not self.scan_number():
                    self.pos += 1
                    raise _ParseError(start, f"bad number syntax: {_go_q(self.text[start : self.pos])}")
                items.append(_Item("number", self.text[start : self.pos], start))
            elif _is_alpha(ch):
                word = self.identifier()
                kind = "number" if word.lower() in _KEYWORD_NUMBERS else "identifier"
                items.append(_Item(kind, word, start))
            else:
                raise _ParseError(start, f"unexpected character in series sequence: {_go_rune(ch)}")


def _check_label_set(items: list[_Item], eof_pos: int) -> None:
    """label_set: `{` (identifier `=` string (`,` ...)*)? `,`? `}`."""
    i = 1  # after "{"
    expect_item = True
    while i < len(items):
        item = items[i]
        if item.kind == "}":
            return
        if expect_item:
            if item.kind != "identifier":
                raise _ParseError(item.pos, f'unexpected {item.desc()} in label set, expected identifier or "}}"')
            nxt = items[i + 1] if i + 1 < len(items) else _Item("eof", "", eof_pos)
            if nxt.kind != "=":
                raise _ParseError(nxt.pos, f'unexpected {nxt.desc()} in label set, expected "="')
            val = items[i + 2] if i + 2 < len(items) else _Item("eof", "", eof_pos)
            if val.kind != "string":
                raise _ParseError(val.pos, f"unexpected {val.desc()} in label set, expected string")
            i += 3
            expect_item = False
        else:
            if item.kind != ",":
                raise _ParseError(item.pos, f'unexpected {item.desc()} in label set, expected "," or "}}"')
            i += 1
            expect_item = True


def _check_values(items: list[_Item]) -> None:
    """series_values: items separated by spaces; an item is `_`, `_xN`, V, `VxN`, `V+DxN`."""
    i = 0

    def at(k: int) -> _Item:
        return items[min(k, len(items) - 1)]

    def unexpected(item: _Item, mid_item: bool) -> _ParseError:
        if mid_item:
            return _ParseError(item.pos, f"unexpected {item.desc()} in series values")
        return _ParseError(item.pos, f"unexpected {item.desc()}")

    def times(k: int) -> int:
        # `x` then an unsigned integer
        count = at(k)
        if count.kind != "number" or not count.value.isdigit():
            raise unexpected(count, True)
        return k + 1

    while True:
        item = at(i)
        if item.kind == "eof":
            return
        if item.kind == "space":
            i += 1
            continue
        if i > 0 and at(i - 1).kind not in ("space",):
            raise unexpected(item, False)
        if item.kind == "_":
            i += 1
            if at(i).kind == "x":
                i = times(i + 1)
            continue
        if item.kind in ("+", "-"):
            if at(i + 1).kind != "number":
                raise unexpected(at(i + 1), True)
            i += 2
        elif item.kind == "number":
            i += 1
        elif item.kind == "identifier":
            if item.value != "stale":
                raise _ParseError(item.pos, f'unexpected {item.desc()} in series values, expected number or "stale"')
            i += 1
        else:
            raise unexpected(item, False)
        if at(i).kind in ("+", "-"):
            if at(i + 1).kind != "number":
                raise unexpected(at(i + 1), True)
            if at(i + 2).kind != "x":
                raise unexpected(at(i + 2), True)
            i = times(i + 3)
        elif at(i).kind == "x":
            i = times(i + 1)


def series_error(series: str, values: str, number: int) -> str | None:
    """promtool's error for input series `number` (1-based), or None when it parses."""
    line = f"{series} {values}".strip()
    lexer = _Lexer(line)
    try:
        metric = lexer.metric()
        if not metric:
            item = _Item("eof", "", lexer.pos) if lexer.pos >= len(line) else None
            if item is not None:
                raise _ParseError(item.pos, "unexpected end of input")
        if metric and metric[-1].kind == "number":
            raise _ParseError(metric[-1].pos, f"unexpected {metric[-1].desc()}")
        if any(i.kind == "{" for i in metric):
            brace = next(k for k, i in enumerate(metric) if i.kind == "{")
            _check_label_set(metric[brace:], lexer.pos)
        _check_values(lexer.values())
    except _ParseError as exc:
        col = exc.pos - (line.rfind("\n", 0, exc.pos) + 1) + 1
        row = number + line.count("\n", 0, exc.pos)
        return f"{row}:{col}: parse error: {exc.message}"
    return None
