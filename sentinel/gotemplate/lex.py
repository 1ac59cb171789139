"""Lexer for Go's text/template (text/template/parse/lex.go).

Turns template text into tokens the way Go's lexer does: text outside `{{ }}`, trim
markers (`{{- ` and ` -}}`) that eat adjacent whitespace, comments that must hug their
delimiters, and Go's number, string and character syntax. A lexical error becomes an
ERROR token, so the parser reports it only when it reaches it, as Go does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from sentinel.gotemplate.values import format_rune, go_quote, is_alnum

__all__ = ["T", "Token", "lex"]


class T(enum.Enum):
    """Token types (text/template/parse itemType)."""

    TEXT = enum.auto()
    LEFT_DELIM = enum.auto()
    RIGHT_DELIM = enum.auto()
    SPACE = enum.auto()
    IDENT = enum.auto()
    FIELD = enum.auto()
    VARIABLE = enum.auto()
    STRING = enum.auto()
    RAW_STRING = enum.auto()
    CHAR_CONSTANT = enum.auto()
    NUMBER = enum.auto()
    COMPLEX = enum.auto()
    BOOL = enum.auto()
    PIPE = enum.auto()
    LEFT_PAREN = enum.auto()
    RIGHT_PAREN = enum.auto()
    ASSIGN = enum.auto()
    DECLARE = enum.auto()
    CHAR = enum.auto()
    EOF = enum.auto()
    ERROR = enum.auto()
    # Keywords.
    BLOCK = enum.auto()
    BREAK = enum.auto()
    CONTINUE = enum.auto()
    DEFINE = enum.auto()
    DOT = enum.auto()
    ELSE = enum.auto()
    END = enum.auto()
    IF = enum.auto()
    NIL = enum.auto()
    RANGE = enum.auto()
    TEMPLATE = enum.auto()
    WITH = enum.auto()


_KEYWORDS = {
    "block": T.BLOCK,
    "break": T.BREAK,
    "continue": T.CONTINUE,
    "define": T.DEFINE,
    "else": T.ELSE,
    "end": T.END,
    "if": T.IF,
    "nil": T.NIL,
    "range": T.RANGE,
    "template": T.TEMPLATE,
    "with": T.WITH,
}
_KEYWORD_TYPES = frozenset(_KEYWORDS.values()) | {T.DOT}
_SPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class Token:
    typ: T
    pos: int
    val: str

    def __str__(self) -> str:
        # item.String(): how Go names a token in "unexpected X in Y".
        if self.typ is T.EOF:
            return "EOF"
        if self.typ is T.ERROR:
            return self.val
        if self.typ in _KEYWORD_TYPES:
            return f"<{self.val}>"
        if len(self.val) > 10:
            return go_quote(self.val[:10]) + "..."
        return go_quote(self.val)


class _Lexer:
    """Turns template text into tokens, ending with EOF or with the first ERROR."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.start = 0
        self.paren_depth = 0
        self.tokens: list[Token] = []

    def emit(self, typ: T) -> None:
        self.tokens.append(Token(typ, self.start, self.text[self.start : self.pos]))
        self.start = self.pos

    def error(self, message: str) -> Literal[False]:
        self.tokens.append(Token(T.ERROR, self.start, message))
        return False

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def at_right_delim(self, pos: int) -> tuple[bool, bool]:
        """(at "}}", with a " -" trim marker before it)."""
        text = self.text
        if pos + 1 < len(text) and text[pos] in _SPACE and text[pos + 1] == "-" and text.startswith("}}", pos + 2):
            return True, True
        return text.startswith("}}", pos), False

    def at_terminator(self) -> bool:
        c = self.peek()
        return c == "" or c in _SPACE or c in ".,|:)(" or self.text.startswith("}}", self.pos)

    def run(self) -> list[Token]:
        text = self.text
        while True:
            x = text.find("{{", self.pos)
            if x < 0:
                self.pos = len(text)
                if self.pos > self.start:
                    self.emit(T.TEXT)
                self.emit(T.EOF)
                return self.tokens
            trim_left = x + 3 < len(text) and text[x + 2] == "-" and text[x + 3] in _SPACE
            if x > self.start:
                end = x
                if trim_left:
                    while end > self.start and text[end - 1] in _SPACE:
                        end -= 1
                if end > self.start:
                    self.pos = end
                    self.emit(T.TEXT)
            self.start = self.pos = x + 2 + (2 if trim_left else 0)
            if text.startswith("/*", self.pos):
                if not self.lex_comment(x):
                    return self.tokens
                continue
            self.tokens.append(Token(T.LEFT_DELIM, x, "{{"))
            self.paren_depth = 0
            if not self.lex_action():
                return self.tokens

    def skip_trimmed_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1
        self.start = self.pos

    def lex_comment(self, delim_pos: int) -> bool:
        end = self.text.find("*/", self.pos + 2)
        if end < 0:
            self.start = delim_pos
            return self.error("unclosed comment")
        self.pos = end + 2
        delim, trim = self.at_right_delim(self.pos)
        if not delim:
            self.start = delim_pos
            return self.error("comment ends before closing delimiter")
        self.pos += 4 if trim else 2
        if trim:
            self.skip_trimmed_space()
        self.start = self.pos
        return True

    def lex_action(self) -> bool:
        """Tokens inside {{ }}; True once the closing delimiter is emitted."""
        while True:
            delim, trim = self.at_right_delim(self.pos)
            if delim:
                if self.paren_depth:
                    return self.error("unclosed left paren")
                return self.lex_right_delim(trim)
            c = self.peek()
            if c == "":
                return self.error("unclosed action")
            if c in _SPACE:
                if not self.lex_space():
                    continue
                return self.lex_right_delim(True)
            ok = self.lex_one(c)
            if not ok:
                return False

    def lex_right_delim(self, trim: bool) -> bool:
        if trim:
            self.pos += 2  # the " -" marker
        self.start = self.pos
        self.pos += 2
        self.emit(T.RIGHT_DELIM)
        if trim:
            self.skip_trimmed_space()
        return True

    def lex_space(self) -> bool:
        """Emit a run of spaces; True when it ends in " -}}" with nothing else left to emit."""
        n = 0
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1
            n += 1
        # A space before "-}}" belongs to the trim marker, not to the run of spaces.
        if self.text.startswith("-}}", self.pos):
            self.pos -= 1
            if n == 1:
                return True
        self.emit(T.SPACE)
        return False

    def lex_one(self, c: str) -> bool:
        """Lex the token starting with c; False after an error."""
        simple = {"=": T.ASSIGN, "|": T.PIPE}
        if c in simple:
            self.pos += 1
            self.emit(simple[c])
            return True
        if c == ":":
            if self.peek(1) != "=":
                return self.error("expected :=")
            self.pos += 2
            self.emit(T.DECLARE)
            return True
        if c == '"':
            return self.lex_quote('"', T.STRING, "unterminated quoted string")
        if c == "'":
            return self.lex_quote("'", T.CHAR_CONSTANT, "unterminated character constant")
        if c == "`":
            end = self.text.find("`", self.pos + 1)
            if end < 0:
                return self.error("unterminated raw quoted string")
            self.pos = end + 1
            self.emit(T.RAW_STRING)
            return True
        if c == "$":
            return self.lex_field_or_variable(T.VARIABLE)
        if c == "." and self.peek(1) != "" and not "0" <= self.peek(1) <= "9":
            return self.lex_field_or_variable(T.FIELD)
        if c in "+-." or "0" <= c <= "9":
            return self.lex_number()
        if is_alnum(c):
            return self.lex_identifier()
        if c == "(":
            self.paren_depth += 1
            self.pos += 1
            self.emit(T.LEFT_PAREN)
            return True
        if c == ")":
            # Go emits the paren before checking it, so the parser reports it in context.
            self.pos += 1
            self.emit(T.RIGHT_PAREN)
            self.paren_depth -= 1
            if self.paren_depth < 0:
                return self.error("unexpected right paren")
            return True
        if c.isascii() and c.isprintable():
            self.pos += 1
            self.emit(T.CHAR)
            return True
        return self.error(f"unrecognized character in action: {format_rune(ord(c))}")

    def lex_quote(self, quote: str, typ: T, unterminated: str) -> bool:
        self.pos += 1
        while True:
            c = self.peek()
            if c == "\\":
                self.pos += 1
                c = self.peek()
                if c not in ("", "\n"):
                    self.pos += 1
                    continue
            if c in ("", "\n"):
                return self.error(unterminated)
            self.pos += 1
            if c == quote:
                self.emit(typ)
                return True

    def lex_field_or_variable(self, typ: T) -> bool:
        self.pos += 1
        if self.at_terminator():
            self.emit(T.VARIABLE if typ is T.VARIABLE else T.DOT)
            return True
        while self.peek() and is_alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            return self.error(f"bad character {format_rune(ord(self.peek()))}")
        self.emit(typ)
        return True

    def lex_identifier(self) -> bool:
        while self.peek() and is_alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            return self.error(f"bad character {format_rune(ord(self.peek()))}")
        word = self.text[self.start : self.pos]
        self.emit(_KEYWORDS.get(word, T.BOOL if word in ("true", "false") else T.IDENT))
        return True

    def accept(self, chars: str) -> bool:
        if self.peek() and self.peek() in chars:
            self.pos += 1
            return True
        return False

    def accept_run(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.pos += 1

    def scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            if self.accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self.accept("oO"):
                digits = "01234567_"
            elif self.accept("bB"):
                digits = "01_"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if len(digits) == 11 and self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789_")
        if len(digits) == 23 and self.accept("pP"):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        if self.peek() and is_alnum(self.peek()):
            self.pos += 1
            return False
        return True

    def lex_number(self) -> bool:
        if not self.scan_number():
            return self.error(f"bad number syntax: {go_quote(self.text[self.start : self.pos])}")
        if self.peek() and self.peek() in "+-":
            # A complex constant such as 1+2i: no spaces, must end in i.
            if not self.scan_number() or self.text[self.pos - 1] != "i":
                return self.error(f"bad number syntax: {go_quote(self.text[self.start : self.pos])}")
            self.emit(T.COMPLEX)
            return True
        self.emit(T.NUMBER)
        return True


def lex(text: str) -> list[Token]:
    """All tokens of `text`, ending with EOF or with the first ERROR."""
    return _Lexer(text).run()
