"""The Go values an alert template computes with, and the strconv rules that read and quote them.

Go's text/template works on reflected Go values; here each Go type that a Prometheus alert
template can meet has one Python stand-in:

    string            str          (`GoHTML`, a str subclass, for safeHtml's template.HTML)
    float64           float
    int               int          (never bool: bool is checked first everywhere)
    bool              bool
    nil / no value    None
    map[string]string Mapping[str, str]            (labels)
    map[string]any    `AnyMap`                      (what `args` returns)
    queryResult       `QueryResult` of `QuerySample` (what `query` returns)
    *time.Time        `GoTime`                      (what `toTime` returns)
    the alert data    `AlertData`                   (`.Labels`, `.Value`, ...)

The strconv helpers follow Go's grammar exactly, because template literals and the
numeric strings that `humanize` accepts are parsed by Go, not by Python.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import ClassVar, Literal

__all__ = [
    "AlertData",
    "AnyMap",
    "GoFuncError",
    "GoHTML",
    "GoMethod",
    "GoStruct",
    "GoTime",
    "GoUint8",
    "ParamKind",
    "QueryResult",
    "QuerySample",
    "format_rune",
    "go_parse_float",
    "go_parse_int",
    "go_quote",
    "go_type_name",
    "go_unquote",
    "go_unquote_char",
    "is_alnum",
    "is_true",
    "word_break_class",
]


class GoFuncError(Exception):
    """An error a template function returns; the executor reports it as `error calling NAME: ...`."""


class GoHTML(str):
    """Go's html/template.HTML: prints like a string, but is not assignable to a string parameter."""

    __slots__ = ()


class GoUint8(int):
    """A byte (what indexing a string yields): an integer that %T and errors call uint8."""

    __slots__ = ()


class AnyMap(dict[str, object]):
    """A Go map[string]interface{}: a missing key yields nil rather than ""."""


class GoStruct:
    """A Go struct (or pointer to one) whose exported fields a template can read."""

    go_type: ClassVar[str]
    pointer: ClassVar[bool] = False

    def fields(self) -> dict[str, object]:
        raise NotImplementedError


class AlertData(GoStruct):
    """The data Prometheus hands to alert templates (rules/alerting.go: AlertTemplateData)."""

    go_type = (
        "struct { Labels map[string]string; ExternalLabels map[string]string; ExternalURL string; Value interface {} }"
    )

    __slots__ = ("_fields",)

    def __init__(self, labels: Mapping[str, str], external_labels: Mapping[str, str], external_url: str, value: float):
        self._fields: dict[str, object] = {
            "Labels": labels,
            "ExternalLabels": external_labels,
            "ExternalURL": external_url,
            "Value": value,
        }

    def fields(self) -> dict[str, object]:
        return self._fields


class QuerySample(GoStruct):
    """One element of a `query` result: Prometheus's *template.sample."""

    go_type = "*template.sample"
    pointer = True

    __slots__ = ("labels", "value")

    def __init__(self, labels: dict[str, str], value: float):
        self.labels = labels
        self.value = value

    def fields(self) -> dict[str, object]:
        return {"Labels": self.labels, "Value": self.value}


class QueryResult(list[QuerySample]):
    """The result of `query`: Prometheus's template.queryResult."""


# How a function parameter takes its argument: "any" is interface{}, "value" the reflect.Value
# of Go's builtins (the same, but for error messages), the others are concrete Go types.
ParamKind = Literal["any", "value", "string", "sample", "samples"]


@dataclass(frozen=True)
class GoMethod:
    """A method bound to its receiver, with the kinds of its parameters."""

    params: tuple[ParamKind, ...]
    call: Callable[[list[object]], object]


_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class GoTime:
    """A UTC *time.Time with the millisecond precision of Prometheus's model.Time."""

    go_type: ClassVar[str] = "*time.Time"
    __slots__ = ("ms",)

    def __init__(self, ms: int):
        self.ms = ms

    def datetime(self) -> datetime:
        return _EPOCH + timedelta(milliseconds=self.ms)

    def __str__(self) -> str:
        return self.format("2006-01-02 15:04:05.999999999 -0700 MST")

    def method(self, name: str) -> GoMethod | None:
        """The named exported method of time.Time, if this port offers it."""
        dt = self.datetime()
        simple: dict[str, Callable[[], object]] = {
            "String": self.__str__,
            "UTC": lambda: self,
            "Unix": lambda: self.ms // 1000,  # floor, as Go's Unix() is for times before 1970
            "UnixMilli": lambda: self.ms,
            "UnixNano": lambda: self.ms * 1_000_000,
            "Year": lambda: dt.year,
            "YearDay": lambda: dt.timetuple().tm_yday,
            "Day": lambda: dt.day,
            "Hour": lambda: dt.hour,
            "Minute": lambda: dt.minute,
            "Second": lambda: dt.second,
            "Nanosecond": lambda: dt.microsecond * 1000,
        }
        if name == "Format":
            return GoMethod(("string",), lambda args: self.format(str(args[0])))
        getter = simple.get(name)
        return None if getter is None else GoMethod((), lambda _args: getter())

    def format(self, layout: str) -> str:
        """time.Time.Format with Go's reference-time layout (2006-01-02 15:04:05 -0700 MST)."""
        dt = self.datetime()
        nanos = dt.microsecond * 1000
        out: list[str] = []
        i = 0
        while i < len(layout):
            token, length = _layout_token(layout, i)
            if token is None:
                out.append(layout[i])
                i += 1
                continue
            out.append(_format_token(token, dt, nanos))
            i += length
        return "".join(out)


def _starts_lower(s: str, i: int) -> bool:
    return i < len(s) and "a" <= s[i] <= "z"


_FIXED_TOKENS = (
    "January", "Jan", "Monday", "Mon", "MST", "2006", "002", "__2", "_2", "01", "02", "03", "04", "05", "06",
    "15", "-07:00:00", "-070000", "-07:00", "-0700", "-07", "Z07:00:00", "Z070000", "Z07:00", "Z0700", "Z07",
    "PM", "pm", "1", "2", "3", "4", "5",
)  # fmt: skip


def _layout_token(layout: str, i: int) -> tuple[str | None, int]:
    """The std chunk starting at layout[i], following time.nextStdChunk's precedence."""
    c = layout[i]
    if c in ".," and i + 1 < len(layout) and layout[i + 1] in "09":
        j = i + 1
        while j < len(layout) and layout[j] == layout[i + 1]:
            j += 1
        # Go only treats a run of one repeated digit as fractional seconds.
        if not (j < len(layout) and layout[j].isdigit()):
            return layout[i:j], j - i
    if c == "_" and layout.startswith("_2006", i):
        return None, 1  # a literal underscore, then the year
    for token in _FIXED_TOKENS:
        if layout.startswith(token, i):
            if token in ("Jan", "Mon") and _starts_lower(layout, i + 3):
                continue  # "Janet" and "Month" are words, not layout elements
            return token, len(token)
    return None, 1


def _format_token(token: str, dt: datetime, nanos: int) -> str:
    hour12 = dt.hour % 12 or 12
    yday = dt.timetuple().tm_yday
    values: dict[str, str] = {
        "January": _MONTHS[dt.month - 1],
        "Jan": _MONTHS[dt.month - 1][:3],
        "Monday": _DAYS[dt.weekday()],
        "Mon": _DAYS[dt.weekday()][:3],
        "MST": "UTC",
        "2006": f"{dt.year:04d}",
        "06": f"{dt.year % 100:02d}",
        "002": f"{yday:03d}",
        "__2": f"{yday:3d}",
        "_2": f"{dt.day:2d}",
        "01": f"{dt.month:02d}",
        "1": str(dt.month),
        "02": f"{dt.day:02d}",
        "2": str(dt.day),
        "15": f"{dt.hour:02d}",
        "03": f"{hour12:02d}",
        "3": str(hour12),
        "04": f"{dt.minute:02d}",
        "4": str(dt.minute),
        "05": f"{dt.second:02d}",
        "5": str(dt.second),
        "PM": "PM" if dt.hour >= 12 else "AM",
        "pm": "pm" if dt.hour >= 12 else "am",
    }
    if token in values:
        return values[token]
    if token.startswith("Z"):
        return "Z"  # always UTC, and ISO 8601 writes a zero offset as Z
    if token.startswith("-"):
        return "+" + "".join("0" if ch.isdigit() else ch for ch in token[1:])
    # Fractional seconds: ".000" keeps every digit, ".999" trims trailing zeros.
    digits = f"{nanos:09d}"[: len(token) - 1]
    if token[1] == "9":
        digits = digits.rstrip("0")
        return token[0] + digits if digits else ""
    return token[0] + digits


def go_type_name(v: object) -> str:
    """The name Go's %T prints for the Go value `v` stands for."""
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, GoUint8):
        return "uint8"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, GoHTML):
        return "template.HTML"
    if isinstance(v, str):
        return "string"
    if isinstance(v, AnyMap):
        return "map[string]interface {}"
    if isinstance(v, Mapping):
        return "map[string]string"
    if isinstance(v, QueryResult):
        return "template.queryResult"
    if isinstance(v, (GoStruct, GoTime)):
        return v.go_type
    if isinstance(v, list):
        return "[]interface {}"
    return type(v).__name__


def is_true(v: object) -> tuple[bool, bool]:
    """Go's template truth: (truth, ok); ok is False for values with no truth."""
    if v is None:
        return False, True
    if isinstance(v, (bool, int, float)):
        return v != 0, True  # NaN != 0, so NaN is true as in Go
    if isinstance(v, (str, Mapping, list)):
        return len(v) > 0, True
    if isinstance(v, (GoStruct, GoTime)):
        return True, True  # non-nil pointers and structs are always true
    return False, False


# --- strconv ---------------------------------------------------------------------------------


def format_rune(r: int) -> str:
    """Go's %#U: U+0041 'A' (the character only when printable)."""
    ch = chr(r) if 0 <= r <= 0x10FFFF else "\ufffd"
    text = f"U+{r:04X}"
    return f"{text} '{ch}'" if _is_print(ch) else text


def _is_print(ch: str) -> bool:
    # unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space;
    # Python's isprintable draws the same line.
    return ch.isprintable() and not (0xD800 <= ord(ch) <= 0xDFFF)


def go_quote(s: str, quote: str = '"', ascii_only: bool = False) -> str:
    """strconv.Quote (or QuoteRune with quote="'", QuoteToASCII with ascii_only)."""
    out = [quote]
    for ch in s:
        r = ord(ch)
        if ch == quote or ch == "\\":
            out.append("\\" + ch)
        elif _is_print(ch) and not (ascii_only and r >= 0x80):
            out.append(ch)
        elif ch in _ESCAPES_OUT:
            out.append(_ESCAPES_OUT[ch])
        elif r < 0x20 or r == 0x7F:
            out.append(f"\\x{r:02x}")
        elif r < 0x10000:
            out.append(f"\\u{0xFFFD if 0xD800 <= r <= 0xDFFF else r:04x}")
        else:
            out.append(f"\\U{r:08x}")
    out.append(quote)
    return "".join(out)


_ESCAPES_OUT = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
_ESCAPES_IN = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_HEX = "0123456789abcdefABCDEF"


def go_unquote_char(s: str, i: int, quote: str) -> tuple[int, bool, int]:
    """strconv.UnquoteChar at s[i]: (value, is_byte, next index); raises ValueError on bad syntax."""
    ch = s[i]
    if ch == quote and quote in "'\"":
        raise ValueError("invalid syntax")
    if ch != "\\":
        return ord(ch), False, i + 1
    if i + 1 >= len(s):
        raise ValueError("invalid syntax")
    c = s[i + 1]
    if c in _ESCAPES_IN:
        return _ESCAPES_IN[c], False, i + 2
    if c in "'\"":
        if c != quote:
            raise ValueError("invalid syntax")
        return ord(c), False, i + 2
    if c in "xuU":
        n = {"x": 2, "u": 4, "U": 8}[c]
        digits = s[i + 2 : i + 2 + n]
        if len(digits) != n or any(d not in _HEX for d in digits):
            raise ValueError("invalid syntax")
        value = int(digits, 16)
        if c != "x" and (value > 0x10FFFF or 0xD800 <= value <= 0xDFFF):
            raise ValueError("invalid syntax")
        return value, c == "x", i + 2 + n
    if "0" <= c <= "7":
        digits = s[i + 1 : i + 4]
        if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
            raise ValueError("invalid syntax")
        return int(digits, 8), True, i + 4
    raise ValueError("invalid syntax")


def go_unquote(lit: str) -> str:
    """strconv.Unquote for a "double-quoted" or `raw` Go string literal; ValueError("invalid syntax")."""
    if len(lit) < 2 or lit[0] != lit[-1] or lit[0] not in '"`':
        raise ValueError("invalid syntax")
    body = lit[1:-1]
    if lit[0] == "`":
        if "`" in body:
            raise ValueError("invalid syntax")
        return body.replace("\r", "")  # Go drops carriage returns from raw strings
    if "\n" in body:
        raise ValueError("invalid syntax")
    buf = bytearray()
    i = 0
    while i < len(body):
        value, is_byte, i = go_unquote_char(body, i, '"')
        buf += bytes([value]) if is_byte else chr(value).encode("utf-8", "surrogatepass")
    # \x and octal escapes may spell bytes that are not UTF-8; Python strings cannot hold them.
    return buf.decode("utf-8", "replace")


def _underscore_ok(s: str) -> bool:
    """strconv's rule: underscores only between digits (or after a base prefix)."""
    saw = "^"
    i = 0
    if s[:1] in ("+", "-"):
        s = s[1:]
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i = 2
        saw = "0"
        hexa = s[1].lower() == "x"
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9" or (hexa and "a" <= c.lower() <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
        i += 1
    return saw != "_"


def go_parse_int(text: str, unsigned: bool = False) -> int | None:
    """strconv.ParseInt(text, 0, 64) (or ParseUint); None when Go would fail."""
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        if unsigned:
            return None
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if not s:
        return None
    base = 10
    body = s
    if len(s) >= 2 and s[0] == "0" and s[1] in "xXoObB":
        base = {"x": 16, "o": 8, "b": 2}[s[1].lower()]
        body = s[2:]
    elif len(s) > 1 and s[0] == "0":
        base, body = 8, s[1:]  # Go's base-0 rule: a leading 0 means octal
    if "_" in body or "_" in s:
        if not _underscore_ok(s):
            return None
        body = body.replace("_", "")
    if not body:
        return None
    try:
        value = sign * int(body, base)
    except ValueError:
        return None
    lo, hi = (0, 2**64 - 1) if unsigned else (-(2**63), 2**63 - 1)
    return value if lo <= value <= hi else None


def go_parse_float(text: str) -> float:
    """strconv.ParseFloat(text, 64), raising ValueError with Go's message."""

    def fail(reason: str) -> ValueError:
        return ValueError(f"strconv.ParseFloat: parsing {go_quote(text)}: {reason}")

    s = text
    body = s[1:] if s[:1] in ("+", "-") else s
    negative = s[:1] == "-"
    if body.lower() in ("inf", "infinity"):
        return -math.inf if negative else math.inf
    if body.lower() == "nan":
        return math.nan
    if "_" in s:
        if not _underscore_ok(s):
            raise fail("invalid syntax")
        body = body.replace("_", "")
    if body[:2].lower() == "0x":
        mantissa, p, exponent = body[2:].lower().partition("p")
        # Go requires the binary exponent of a hexadecimal float.
        if not p or not exponent.lstrip("+-").isdigit() or not mantissa.replace(".", "", 1):
            raise fail("invalid syntax")
        if any(ch not in "0123456789abcdef." for ch in mantissa):
            raise fail("invalid syntax")
        try:
            value = float.fromhex(("-" if negative else "") + "0x" + body[2:])
        except (ValueError, OverflowError):
            raise fail("value out of range") from None
        return value
    if not body or any(ch not in "0123456789.eE+-" for ch in body) or body[0] in "+-":
        raise fail("invalid syntax")
    try:
        value = float(("-" if negative else "") + body)
    except ValueError:
        raise fail("invalid syntax") from None
    if math.isinf(value):
        raise fail("value out of range")
    return value


def is_alnum(ch: str) -> bool:
    """text/template's isAlphaNumeric: '_', a Unicode letter or a decimal digit."""
    return ch == "_" or ch.isalpha() or ch.isdecimal()


def word_break_class(ch: str) -> str:
    """A rune's class for x/text/cases title casing: "letter", "mid" or "break"."""
    if ch in _MID:
        return "mid"
    if ch.isalpha() or ch.isdecimal() or ch in _EXTEND_NUM_LET:
        return "letter"
    if unicodedata.category(ch) in ("Mn", "Mc", "Me", "Cf"):
        return "letter"  # Extend, Format and ZWJ do not end a word
    return "break"


# Word_Break MidLetter, MidNumLet and Single_Quote (Unicode 15).
_MID = frozenset(":\u00b7\u0387\u055f\u05f4\u2027\ufe13\ufe55\uff1a.\u2018\u2019\u2024\ufe52\uff07\uff0e'")
_EXTEND_NUM_LET = frozenset("_\u203f\u2040\u2054\ufe33\ufe34\ufe4d\ufe4e\ufe4f\uff3f")
