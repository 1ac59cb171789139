"""Go's fmt package for template values: Sprint, Sprintln, Sprintf and strconv.FormatFloat.

Templates print through fmt, so every number an alert shows goes through Go's rules,
which differ from Python's in small ways that users see: `%v` of a float is the shortest
round-trip form, in exponent form from 1e+06 up and below 1e-04 (`1e+06`, `0.1`, `5`);
infinities print as `+Inf`; a verb that does not fit its operand prints
`%!d(float64=1.5)` instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from sentinel.gotemplate.values import (
    GoStruct,
    GoTime,
    format_rune,
    go_quote,
    go_type_name,
)

__all__ = ["format_float", "go_format", "go_sprint", "go_sprintf", "go_sprintln"]


def format_float(v: float, verb: str, prec: int) -> str:
    """strconv.FormatFloat(v, verb, prec, 64) for verbs e E f g G x X; prec -1 is shortest."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if verb in "xX":
        text = _hex_float(v)
        return text.upper() if verb == "X" else text
    if prec >= 0:
        if verb in "gG" and prec == 0:
            prec = 1
        return f"%.{prec}{verb}" % v
    return _shortest(v, verb)


def _shortest(v: float, verb: str) -> str:
    """FormatFloat with precision -1: the fewest digits that read back as v."""
    sign = "-" if math.copysign(1.0, v) < 0 else ""
    if v == 0:
        digits, dp = "0", 1
    else:
        # repr() gives the shortest round-trip digits, as Go's shortest formatting does.
        t = Decimal(repr(abs(v))).as_tuple()
        significant = "".join(map(str, t.digits)).lstrip("0")
        dp = len(significant) + int(t.exponent)  # position of the decimal point
        digits = significant.rstrip("0")
    exp = dp - 1
    lower = verb.lower()
    # Go switches %v/%g to exponent form outside [1e-4, 1e+06) for the shortest form.
    if lower == "e" or (lower == "g" and (exp < -4 or exp >= 6)):
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        e = "E" if verb.isupper() else "e"
        return f"{sign}{mantissa}{e}{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{sign}0.{'0' * -dp}{digits}"
    if dp >= len(digits):
        return sign + digits + "0" * (dp - len(digits))
    return f"{sign}{digits[:dp]}.{digits[dp:]}"


def _hex_float(v: float) -> str:
    """%x of a float: -0x1.8p+01 (normalised mantissa, at least two exponent digits)."""
    sign = "-" if math.copysign(1.0, v) < 0 else ""
    if v == 0:
        return f"{sign}0x0p+00"
    m, e = math.frexp(abs(v))
    bits = int((m * 2 - 1) * (1 << 52))  # 52 fraction bits of the normalised mantissa
    frac = f"{bits:013x}".rstrip("0")
    exp = e - 1
    return f"{sign}0x1{'.' + frac if frac else ''}p{'-' if exp < 0 else '+'}{abs(exp):02d}"


@dataclass
class _Flags:
    plus: bool = False
    minus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    wid: int | None = None
    prec: int | None = None


def _pad(s: str, f: _Flags) -> str:
    if f.wid is None or f.wid <= len(s):
        return s
    fill = ("0" if f.zero else " ") * (f.wid - len(s))
    return s + " " * (f.wid - len(s)) if f.minus else fill + s


def _fmt_integer(v: int, verb: str, f: _Flags) -> str:
    if verb == "c":
        return _pad(chr(v) if 0 <= v <= 0x10FFFF else "\ufffd", f)
    if verb == "q":
        return _pad(go_quote(chr(v) if 0 <= v <= 0x10FFFF else "\ufffd", "'", f.plus), f)
    if verb == "U":
        text = f"U+{v:04X}" if f.prec is None else f"U+{v:0{f.prec}X}"
        if f.sharp and 0 <= v <= 0x10FFFF:
            text = format_rune(v).replace(f"U+{v:04X}", text, 1)
        return _pad(text, f)
    base = {"b": 2, "o": 8, "O": 8, "x": 16, "X": 16}.get(verb, 10)
    digits = format(abs(v), {2: "b", 8: "o", 16: "x", 10: "d"}[base])
    if verb == "X":
        digits = digits.upper()
    # Precision (or zero padding with a width) asks for a minimum number of digits.
    prec = 0
    if f.prec is not None:
        if f.prec == 0 and v == 0:
            return " " * (f.wid or 0)
        prec = f.prec
    elif f.zero and f.wid is not None and not f.minus:
        prec = f.wid - (1 if v < 0 or f.plus or f.space else 0)
    digits = digits.rjust(prec, "0")
    if f.sharp:
        if base == 2:
            digits = "0b" + digits
        elif base == 8 and not digits.startswith("0"):
            digits = "0" + digits
        elif base == 16:
            digits = ("0X" if verb == "X" else "0x") + digits
    if verb == "O":
        digits = "0o" + digits
    sign = "-" if v < 0 else "+" if f.plus else " " if f.space else ""
    return _pad(sign + digits, _Flags(minus=f.minus, wid=f.wid))


def _fmt_float(v: float, verb: str, f: _Flags) -> str:
    go_verb = "g" if verb == "v" else "f" if verb == "F" else verb
    default_prec = 6 if go_verb in "eEf" else -1
    num = format_float(v, go_verb, f.prec if f.prec is not None else default_prec)
    if num[0] not in "+-":
        num = "+" + num
    if f.space and num[0] == "+" and not f.plus:
        num = " " + num[1:]
    if num[1] in "IN":
        # Infinities and NaN are never zero padded; NaN only shows a sign when asked to.
        if num[1] == "N" and not f.space and not f.plus:
            num = num[1:]
        return _pad(num, _Flags(minus=f.minus, wid=f.wid))
    if f.plus or num[0] != "+":
        if f.zero and f.wid is not None and f.wid > len(num) and not f.minus:
            return num[0] + "0" * (f.wid - len(num)) + num[1:]
        return _pad(num, f)
    return _pad(num[1:], f)


def _fmt_string(s: str, verb: str, f: _Flags) -> str:
    if f.prec is not None:
        s = s[: f.prec]
    if verb in "vs":
        return _pad(s, f)
    if verb == "q":
        if f.sharp and "`" not in s and all(ch == "\t" or ch.isprintable() for ch in s):
            return _pad(f"`{s}`", f)
        return _pad(go_quote(s, '"', f.plus), f)
    # %x / %X: hex of the UTF-8 bytes, optionally spaced (% x) and prefixed (%#x).
    data = s.encode("utf-8", "replace")
    if f.prec is not None:
        data = data[: f.prec]
    prefix = ("0X" if verb == "X" else "0x") if f.sharp else ""
    pieces = [format(b, "02X" if verb == "X" else "02x") for b in data]
    if not pieces:
        return " " * (f.wid or 0)
    text = " ".join(prefix + p for p in pieces) if f.space else prefix + "".join(pieces)
    return _pad(text, _Flags(minus=f.minus, wid=f.wid))


def _print_arg(arg: object, verb: str, f: _Flags) -> str:
    """One operand under one verb, as fmt's printArg does."""
    if verb == "T":
        return _pad(go_type_name(arg), f)
    if arg is None:
        return _pad("<nil>", f) if verb == "v" else _bad_verb(arg, verb, f)
    if isinstance(arg, bool):
        return _pad("true" if arg else "false", f) if verb in "tv" else _bad_verb(arg, verb, f)
    if isinstance(arg, int):
        return _fmt_integer(arg, verb, f) if verb in "vdboOxXcqU" else _bad_verb(arg, verb, f)
    if isinstance(arg, float):
        return _fmt_float(arg, verb, f) if verb in "vgGeEfFxX" else _bad_verb(arg, verb, f)
    if isinstance(arg, str):
        return _fmt_string(arg, verb, f) if verb in "vsqxX" else _bad_verb(arg, verb, f)
    if isinstance(arg, GoTime):
        # *time.Time is a fmt.Stringer: string verbs print its String().
        return _fmt_string(str(arg), verb, f) if verb in "vsqxX" else _bad_verb(arg, verb, f)
    if isinstance(arg, Mapping):
        items = (f"{_print_arg(k, verb, f)}:{_print_arg(arg[k], verb, f)}" for k in sorted(arg))
        return "map[" + " ".join(items) + "]"
    if isinstance(arg, GoStruct):
        body = "{" + " ".join(_print_arg(v, verb, f) for v in arg.fields().values()) + "}"
        return ("&" if arg.pointer else "") + body
    if isinstance(arg, list):
        return "[" + " ".join(_print_arg(v, verb, f) for v in arg) + "]"
    return _bad_verb(arg, verb, f)


def _bad_verb(arg: object, verb: str, f: _Flags) -> str:
    # Go prints the operand with %v under the same flags, e.g. %!f(int=01) for "%.2f" of 1.
    if arg is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({go_type_name(arg)}={_print_arg(arg, 'v', f)})"


def go_sprint(args: Sequence[object]) -> str:
    """fmt.Sprint: operands with %v, a space between two operands when neither is a string."""
    out: list[str] = []
    prev_string = False
    for i, arg in enumerate(args):
        is_string = isinstance(arg, str)
        if i > 0 and not is_string and not prev_string:
            out.append(" ")
        out.append(_print_arg(arg, "v", _Flags()))
        prev_string = is_string
    return "".join(out)


def go_sprintln(args: Sequence[object]) -> str:
    """fmt.Sprintln: operands with %v, always space-separated, newline-terminated."""
    return " ".join(_print_arg(arg, "v", _Flags()) for arg in args) + "\n"


def _parse_num(s: str, i: int) -> tuple[int | None, int]:
    j = i
    while j < len(s) and s[j].isdigit() and s[j].isascii():
        j += 1
    if j == i:
        return None, i
    n = int(s[i:j])
    return (None, j) if n > 1_000_000 else (n, j)  # fmt rejects absurd widths


class _Printf:
    """State of one fmt.Sprintf call: the format cursor and the operand cursor."""

    def __init__(self, fmt: str, args: Sequence[object]):
        self.fmt = fmt
        self.args = args
        self.arg_num = 0
        self.reordered = False
        self.good_arg_num = True
        self.out: list[str] = []

    def arg_number(self, i: int) -> tuple[int, bool]:
        """An explicit operand index like [2] at fmt[i]: (new i, found)."""
        if i >= len(self.fmt) or self.fmt[i] != "[":
            return i, False
        self.reordered = True
        close = self.fmt.find("]", i + 1)
        if close < 0 or len(self.fmt) - i < 3:
            self.good_arg_num = False
            return i + 1, False
        n, j = _parse_num(self.fmt, i + 1)
        if n is None or j != close:
            self.good_arg_num = False
            return close + 1, False
        if 1 <= n <= len(self.args):
            self.arg_num = n - 1
            return close + 1, True
        self.good_arg_num = False
        return close + 1, True

    def int_from_arg(self) -> int | None:
        if self.arg_num >= len(self.args):
            return None
        arg = self.args[self.arg_num]
        self.arg_num += 1
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) <= 1_000_000:
            return arg
        return None

    def run(self) -> str:
        fmt, end = self.fmt, len(self.fmt)
        i = 0
        while i < end:
            self.good_arg_num = True
            j = fmt.find("%", i)
            if j < 0:
                self.out.append(fmt[i:])
                break
            self.out.append(fmt[i:j])
            i = self.one_verb(j + 1)
        if not self.reordered and self.arg_num < len(self.args):
            extra = (
                "<nil>" if a is None else f"{go_type_name(a)}={_print_arg(a, 'v', _Flags())}"
                for a in self.args[self.arg_num :]
            )
            self.out.append("%!(EXTRA " + ", ".join(extra) + ")")
        return "".join(self.out)

    def one_verb(self, i: int) -> int:
        """Format the verb whose flags start at fmt[i]; return the index after it."""
        fmt, end = self.fmt, len(self.fmt)
        f = _Flags()
        while i < end and fmt[i] in "#0+- ":
            c = fmt[i]
            if c == "#":
                f.sharp = True
            elif c == "0":
                f.zero = not f.minus  # zero padding only ever pads on the left
            elif c == "+":
                f.plus = True
            elif c == "-":
                f.minus, f.zero = True, False
            else:
                f.space = True
            i += 1
        i, after_index = self.arg_number(i)
        if i < end and fmt[i] == "*":
            i += 1
            f.wid = self.int_from_arg()
            if f.wid is None:
                self.out.append("%!(BADWIDTH)")
            elif f.wid < 0:
                f.wid, f.minus, f.zero = -f.wid, True, False
            after_index = False
        else:
            f.wid, i = _parse_num(fmt, i)
            if after_index and f.wid is not None:
                self.good_arg_num = False
        if i + 1 < end and fmt[i] == ".":
            i += 1
            if after_index:
                self.good_arg_num = False
            i, after_index = self.arg_number(i)
            if i < end and fmt[i] == "*":
                i += 1
                f.prec = self.int_from_arg()
                if f.prec is not None and f.prec < 0:
                    f.prec = None
                if f.prec is None:
                    self.out.append("%!(BADPREC)")
                after_index = False
            else:
                f.prec, i = _parse_num(fmt, i)
                if f.prec is None:
                    f.prec = 0
        if not after_index:
            i, after_index = self.arg_number(i)
        if i >= end:
            self.out.append("%!(NOVERB)")
            return i
        verb = fmt[i]
        i += 1
        if verb == "%":
            self.out.append("%")
        elif not self.good_arg_num:
            self.out.append(f"%!{verb}(BADINDEX)")
        elif self.arg_num >= len(self.args):
            self.out.append(f"%!{verb}(MISSING)")
        else:
            if verb == "v":
                # %+v and %#v select struct-field and Go-syntax forms; plain values ignore them.
                f.plus = f.sharp = False
            self.out.append(_print_arg(self.args[self.arg_num], verb, f))
            self.arg_num += 1
        return i


def go_sprintf(fmt: str, args: Sequence[object]) -> str:
    """fmt.Sprintf with Go's verbs, flags, widths, precisions, [n] indexes and error forms."""
    return _Printf(fmt, args).run()


def go_format(verb: str, value: object) -> str:
    """Format one value with one Go printf directive, e.g. go_format("%.2f", 0.5) == "0.50"."""
    return go_sprintf(verb, [value])
