"""The functions an alert template can call: Go's text/template builtins and Prometheus's own.

Each function declares Go parameter kinds so the executor can apply Go's argument checks
("wrong number of args", "expected string; found 1") before the body runs; a body reports
failure by raising `GoFuncError`, which the executor turns into `error calling NAME: ...`.
Behaviour follows prometheus/template/template.go and prometheus/common's helpers.
"""

from __future__ import annotations

import ipaddress
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote_plus, urlsplit

from sentinel.alerting.template_format import format_float, go_sprint, go_sprintf, go_sprintln
from sentinel.alerting.template_values import (
    AnyMap,
    GoFuncError,
    GoHTML,
    GoTime,
    GoUint8,
    ParamKind,
    QueryResult,
    QuerySample,
    go_parse_float,
    go_quote,
    go_type_name,
    is_true,
    word_break_class,
)
from sentinel.goregex import RegexError, compile_go, searchable

__all__ = ["FUNCS", "PARAM_TYPES", "FuncEnv", "GoFunc", "ParamKind", "convert_to_float", "float_to_time"]

PARAM_TYPES: dict[str, str] = {
    "any": "interface {}",
    "value": "reflect.Value",
    "string": "string",
    "sample": "*template.sample",
    "samples": "template.queryResult",
}


class FuncEnv(Protocol):
    """What functions may ask of the render: the external URL and the query engine."""

    @property
    def external_url(self) -> str: ...

    def run_query(self, query: str) -> QueryResult: ...


@dataclass(frozen=True)
class GoFunc:
    """A template function: fixed parameter kinds, an optional variadic kind, and its body."""

    params: tuple[ParamKind, ...]
    variadic: ParamKind | None
    impl: Callable[[FuncEnv, list[object]], object]


# --- Go builtins -------------------------------------------------------------------------------


def _basic_kind(v: object) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    return None


def _eq(args: list[object]) -> bool:
    if len(args) < 2:
        raise GoFuncError("missing argument for comparison")
    a1 = args[0]
    k1 = _basic_kind(a1)
    for a in args[1:]:
        k2 = _basic_kind(a)
        if k1 != k2:
            # Go never converts between kinds: eq 1 1.0 is an error, not false.
            if a1 is not None and a is not None:
                raise GoFuncError("incompatible types for comparison")
            truth = False
        elif k1 is not None:
            truth = a1 == a
        elif a1 is None or a is None:
            truth = a1 is None and a is None
        elif go_type_name(a1) != go_type_name(a):
            raise GoFuncError(f"non-comparable types {go_sprint([a1])}: {go_type_name(a1)}, {go_type_name(a)}")
        elif isinstance(a1, (Mapping, list)):
            raise GoFuncError(f"non-comparable type {go_sprint([a1])}: {go_type_name(a1)}")
        else:
            truth = a1 is a  # pointers compare by identity
        if truth:
            return True
    return False


def _lt(a1: object, a2: object) -> bool:
    k1, k2 = _basic_kind(a1), _basic_kind(a2)
    if k1 is None or k2 is None:
        raise GoFuncError("invalid type for comparison")
    if k1 != k2:
        raise GoFuncError("incompatible types for comparison")
    if k1 == "bool":
        raise GoFuncError("invalid type for comparison")
    return bool(a1 < a2)  # type: ignore[operator]  # both int, both float or both str


def _le(a1: object, a2: object) -> bool:
    return _lt(a1, a2) or _eq([a1, a2])


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "replace")


def _length(v: object) -> int:
    if v is None:
        raise GoFuncError("len of nil pointer")
    if isinstance(v, str):
        return len(_utf8(v))  # Go's len of a string counts bytes
    if isinstance(v, (Mapping, list)):
        return len(v)
    raise GoFuncError(f"len of type {go_type_name(v)}")


def _index_arg(index: object, cap: int) -> int:
    if index is None:
        raise GoFuncError("cannot index slice/array with nil")
    if not isinstance(index, int) or isinstance(index, bool):
        raise GoFuncError(f"cannot index slice/array with type {go_type_name(index)}")
    if index < 0 or index > cap:
        raise GoFuncError(f"index out of range: {index}")
    return index


def _index(args: list[object]) -> object:
    item = args[0]
    if item is None:
        raise GoFuncError("index of untyped nil")
    for index in args[1:]:
        if item is None:
            raise GoFuncError("index of nil pointer")
        if isinstance(item, (str, list)):
            data = _utf8(item) if isinstance(item, str) else item
            x = _index_arg(index, len(data))
            if x == len(data):
                raise GoFuncError("reflect: slice index out of range")  # Go's reflect panics here
            item = GoUint8(data[x]) if isinstance(data, bytes) else data[x]  # a string's element is a byte
        elif isinstance(item, Mapping):
            if index is None:
                raise GoFuncError("value is nil; should be of type string")
            if type(index) is not str:
                raise GoFuncError(f"value has type {go_type_name(index)}; should be string")
            # A missing key gives the element type's zero value.
            item = item.get(index, None if isinstance(item, AnyMap) else "")
        else:
            raise GoFuncError(f"can't index item of type {go_type_name(item)}")
    return item


def _slice(args: list[object]) -> object:
    item, indexes = args[0], args[1:]
    if item is None:
        raise GoFuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise GoFuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise GoFuncError("cannot 3-index slice a string")
        data: bytes | list[object] = _utf8(item)
    elif isinstance(item, list):
        data = item
    else:
        raise GoFuncError(f"can't slice item of type {go_type_name(item)}")
    idx = [0, len(data), len(data)]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(index, len(data))
    if idx[0] > idx[1]:
        raise GoFuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise GoFuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    part = data[idx[0] : idx[1]]
    if isinstance(part, bytes):
        return part.decode("utf-8", "replace")
    return QueryResult(part) if isinstance(item, QueryResult) else part  # type: ignore[arg-type]


def _eval_args(args: list[object]) -> str:
    """The string html, js and urlquery escape: one string as is, else fmt.Sprint of all."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return go_sprint(args)


_HTML_ESCAPES = {"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"}
_JS_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}


def _js_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in _JS_ESCAPES:
            out.append(_JS_ESCAPES[ch])
        elif ord(ch) < 0x20 or (ord(ch) >= 0x80 and not ch.isprintable()):
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _query_escape(s: str) -> str:
    """url.QueryEscape: everything but [A-Za-z0-9-_.~] percent-encoded, space as '+'."""
    return quote_plus(s, safe="", encoding="utf-8", errors="replace")


def _call(args: list[object]) -> object:
    # Function values never reach a template here, so call can only fail, as Go's would.
    fn = args[0]
    if fn is None:
        raise GoFuncError("call of nil")
    raise GoFuncError(f"non-function {go_sprint([fn])} of type {go_type_name(fn)}")


def _and_or(args: list[object]) -> object:
    # Short-circuiting happens in the executor; this body only serves direct calls.
    return args[-1]


_BUILTINS: dict[str, GoFunc] = {
    "and": GoFunc(("value",), "value", lambda _env, a: _and_or(a)),
    "or": GoFunc(("value",), "value", lambda _env, a: _and_or(a)),
    "not": GoFunc(("value",), None, lambda _env, a: not is_true(a[0])[0]),
    "eq": GoFunc(("value",), "value", lambda _env, a: _eq(a)),
    "ne": GoFunc(("value", "value"), None, lambda _env, a: not _eq(a)),
    "lt": GoFunc(("value", "value"), None, lambda _env, a: _lt(a[0], a[1])),
    "le": GoFunc(("value", "value"), None, lambda _env, a: _le(a[0], a[1])),
    "gt": GoFunc(("value", "value"), None, lambda _env, a: not _le(a[0], a[1])),
    "ge": GoFunc(("value", "value"), None, lambda _env, a: not _lt(a[0], a[1])),
    "len": GoFunc(("value",), None, lambda _env, a: _length(a[0])),
    "index": GoFunc(("value",), "value", lambda _env, a: _index(a)),
    "slice": GoFunc(("value",), "value", lambda _env, a: _slice(a)),
    "call": GoFunc(("value",), "value", lambda _env, a: _call(a)),
    "print": GoFunc((), "any", lambda _env, a: go_sprint(a)),
    "printf": GoFunc(("string",), "any", lambda _env, a: go_sprintf(str(a[0]), a[1:])),
    "println": GoFunc((), "any", lambda _env, a: go_sprintln(a)),
    "html": GoFunc((), "any", lambda _env, a: "".join(_HTML_ESCAPES.get(c, c) for c in _eval_args(a))),
    "js": GoFunc((), "any", lambda _env, a: _js_escape(_eval_args(a))),
    "urlquery": GoFunc((), "any", lambda _env, a: _query_escape(_eval_args(a))),
}


# --- Prometheus: numbers and time --------------------------------------------------------------


def convert_to_float(v: object) -> float:
    """prometheus/common's ConvertToFloat: float64, Go integers and numeric strings."""
    if isinstance(v, float):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and not isinstance(v, GoHTML):
        try:
            return go_parse_float(v)
        except ValueError as e:
            raise GoFuncError(str(e)) from None
    raise GoFuncError(f"can't convert {go_type_name(v)} to float")


def _g4(v: float) -> str:
    return format_float(v, "g", 4)


def _scaled(v: float, base: float, big: tuple[str, ...], small: tuple[str, ...] = ()) -> str:
    """Divide (or multiply) by base until |v| fits, as humanize and humanize1024 do."""
    prefix = ""
    if abs(v) >= 1 or not small:
        for p in big:
            if abs(v) < base:
                break
            prefix, v = p, v / base
    else:
        for p in small:
            if abs(v) >= 1:
                break
            prefix, v = p, v * base
    return _g4(v) + prefix


def humanize(v: float) -> str:
    """Prometheus's humanize: SI prefixes with 4 significant digits (1.235M, 120m)."""
    if v == 0 or math.isnan(v) or math.isinf(v):
        return _g4(v)
    return _scaled(v, 1000, ("k", "M", "G", "T", "P", "E", "Z", "Y"), ("m", "u", "n", "p", "f", "a", "z", "y"))


def humanize1024(v: float) -> str:
    """Prometheus's humanize1024: binary prefixes (1ki, 1Mi), plain %.4g up to 1."""
    if abs(v) <= 1 or math.isnan(v) or math.isinf(v):
        return _g4(v)
    return _scaled(v, 1024, ("ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"))


def _go_int64(v: float) -> int:
    """Go's int64(v) on amd64: truncation toward zero, MinInt64 when out of range."""
    return int(v) if -(2.0**63) <= v < 2.0**63 else -(2**63)


def _go_quo(a: int, b: int) -> int:
    """Go's integer division, truncating toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _go_rem(a: int, b: int) -> int:
    return a - b * _go_quo(a, b)


def humanize_duration(v: float) -> str:
    """prometheus/common's HumanizeDuration: 1d 2h 3m 4s, 1m 30s, 2.5s, 123.5ms."""
    if math.isnan(v) or math.isinf(v):
        return _g4(v)
    if v == 0:
        return _g4(v) + "s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = _go_int64(v)
        seconds, minutes = _go_rem(whole, 60), _go_rem(_go_quo(whole, 60), 60)
        hours, days = _go_rem(_go_quo(whole, 3600), 24), _go_quo(whole, 86400)
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(v)}s"
    return _scaled(v, 1000, (), ("m", "u", "n", "p", "f", "a", "z", "y")) + "s"


def float_to_time(v: float) -> GoTime:
    """Prometheus's floatToTime: Unix seconds to a UTC time truncated to the millisecond."""
    if math.isnan(v) or math.isinf(v):
        raise GoFuncError("value is NaN or Inf")
    ns = v * 1e9
    if ns >= 2.0**63 or ns < -(2.0**63):
        raise GoFuncError(
            f"{format_float(v, 'g', -1)} cannot be represented as a nanoseconds timestamp since it overflows int64"
        )
    whole_ns = int(ns)  # Go's int64() and model.TimeFromUnixNano both truncate toward zero
    ms = abs(whole_ns) // 1_000_000
    return GoTime(ms if whole_ns >= 0 else -ms)


def humanize_timestamp(v: float) -> str:
    """prometheus/common's HumanizeTimestamp: 2015-06-23 13:19:44.128 +0000 UTC."""
    if math.isnan(v) or math.isinf(v):
        return _g4(v)
    return str(float_to_time(v))


_DURATION_UNITS = {"y": (1, 365 * 86400_000), "w": (2, 7 * 86400_000), "d": (3, 86400_000)}
_DURATION_UNITS |= {"h": (4, 3600_000), "m": (5, 60_000), "s": (6, 1000), "ms": (7, 1)}


def parse_duration(text: str) -> float:
    """model.ParseDuration in seconds: 1h2m10ms is 3720.01; units must shrink left to right."""
    if text == "0":
        return 0.0
    if text == "":
        raise GoFuncError("empty duration string")
    invalid = GoFuncError(f"not a valid duration string: {go_quote(text)}")
    total_ms, last, s = 0, 0, text
    while s:
        digits = len(s) - len(s.lstrip("0123456789"))
        if digits == 0:
            raise invalid
        value, s = int(s[:digits]), s[digits:]
        unit_len = next((i for i, ch in enumerate(s) if "0" <= ch <= "9"), len(s))
        if unit_len == 0:
            raise invalid
        unit, s = s[:unit_len], s[unit_len:]
        if unit not in _DURATION_UNITS:
            raise GoFuncError(f"unknown unit {go_quote(unit)} in duration {go_quote(text)}")
        order, ms = _DURATION_UNITS[unit]
        if order <= last:
            raise invalid
        last = order
        total_ms += value * ms
        if total_ms * 1_000_000 > 2**63 - 1:
            raise GoFuncError("duration out of range")
    return total_ms * 1_000_000 / 1e9


# --- Prometheus: strings -----------------------------------------------------------------------


def _simple_case(s: str, upper: bool) -> str:
    """strings.ToUpper/ToLower: per-rune simple case mapping (ß stays ß, İ lowers to i)."""
    out = []
    for ch in s:
        mapped = ch.upper() if upper else ch.lower()
        if len(mapped) > 1:
            # A full mapping adding combining marks (İ -> i + dot) keeps its base as Go does.
            base_only = all(unicodedata.combining(c) for c in mapped[1:])
            mapped = mapped[0] if base_only else ch
        out.append(mapped)
    return "".join(out)


def title(s: str) -> str:
    """cases.Title(language.AmericanEnglish, cases.NoLower): capitalise each word's first cased letter.

    Words break as x/text/cases breaks them: digits, '_' and marks continue a word; "'"
    ":" and "." continue it unless doubled; everything else ends it. So "don't" becomes
    "Don't" and "foo.bar" stays one word.
    """
    out = []
    mid_word = False
    prev_mid = False
    for ch in s:
        cls = word_break_class(ch)
        if prev_mid and cls == "mid":
            mid_word = False
        if ch.isupper() or ch.islower() or ch.istitle():
            out.append(ch if mid_word else ch.title())
            mid_word = True
        else:
            out.append(ch)
            if cls == "break":
                mid_word = False
        prev_mid = cls == "mid"
    return "".join(out)


def _split_host_port(hostport: str) -> tuple[str, str] | None:
    """net.SplitHostPort; None where Go returns an error."""
    i = hostport.rfind(":")
    if i < 0:
        return None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 != i:
            return None
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host, j, k = hostport[:i], 0, 0
        if ":" in host:
            return None
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return None
    return host, hostport[i + 1 :]


def _is_ip(host: str) -> bool:
    if "%" in host:
        return False  # Go's ParseIP takes no IPv6 zone
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def strip_port(hostport: str) -> str:
    """stripPort: the host of host:port, or the input when it has no port."""
    split = _split_host_port(hostport)
    return hostport if split is None else split[0]


def strip_domain(hostport: str) -> str:
    """stripDomain: the first label of a host name, keeping any port; IPs untouched."""
    split = _split_host_port(hostport)
    host, port = (hostport, "") if split is None else split
    if _is_ip(host):
        return hostport
    host = host.split(".")[0]
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- Prometheus: regular expressions ------------------------------------------------------------
# Go's regexp package is RE2: `goregex` compiles with RE2 itself (linear time, Go's syntax).


def _compile(pattern: str) -> Any:
    try:
        return compile_go(pattern)
    except RegexError as e:
        raise GoFuncError(str(e)) from None


def _expand(template: str, m: Any) -> str:
    """regexp.Expand: $1, ${1}, $name, ${name} and $$ in a replacement."""
    out: list[str] = []
    while True:
        before, dollar, template = template.partition("$")
        out.append(before)
        if not dollar:
            return "".join(out)
        if template.startswith("$"):
            out.append("$")
            template = template[1:]
            continue
        brace = template.startswith("{")
        body = template[1:] if brace else template
        n = 0
        while n < len(body) and (body[n].isalpha() or body[n].isdecimal() or body[n] == "_"):
            n += 1
        if n == 0 or (brace and not body.startswith("}", n)):
            out.append("$")  # malformed: a literal dollar
            continue
        name = body[:n]
        template = body[n + 1 :] if brace else body[n:]
        group: str | int = name
        if name.isascii() and name.isdigit() and not (name.startswith("0") and len(name) > 1):
            group = int(name)
        if isinstance(group, int) and group > (m.re.groups or 0):
            continue
        if isinstance(group, str) and group not in m.re.groupindex:
            continue
        out.append(m.group(group) or "")


def re_replace_all(pattern: str, repl: str, text: str) -> str:
    """regexp.MustCompile(pattern).ReplaceAllString(text, repl), Go's empty-match rule included."""
    try:
        compiled = _compile(pattern)
    except GoFuncError as e:
        quoted = f"`{pattern}`" if "`" not in pattern else go_quote(pattern)
        raise GoFuncError(f"regexp: Compile({quoted}): {e}") from None
    out: list[str] = []
    search, last_end = 0, 0
    haystack = searchable(text)
    while search <= len(text):
        m = compiled.search(haystack, search)
        if m is None:
            break
        start, end = m.span()
        out.append(text[last_end:start])
        # An empty match right after a previous match is not replaced again.
        if end > last_end or start == 0:
            out.append(_expand(repl, m))
        last_end = end
        search = search + 1 if search + 1 > end else end
    out.append(text[last_end:])
    return "".join(out)


# --- Prometheus: query results -----------------------------------------------------------------


def _sample(v: object) -> QuerySample:
    if not isinstance(v, QuerySample):
        raise GoFuncError("runtime error: invalid memory address or nil pointer dereference")
    return v


def _first(v: object) -> QuerySample:
    if isinstance(v, QueryResult) and v:
        return v[0]
    raise GoFuncError("first() called on vector with no elements")


def _sort_by_label(label: str, v: object) -> object:
    if not isinstance(v, QueryResult):
        return v
    v.sort(key=lambda s: s.labels.get(label, ""))  # stable and in place, like sort.Stable
    return v


def _to_time(v: object) -> GoTime:
    return float_to_time(convert_to_float(v))


def _external_url(env: FuncEnv) -> str:
    return env.external_url


def _path_prefix(env: FuncEnv) -> str:
    return urlsplit(env.external_url).path


def _match(pattern: str, text: str) -> bool:
    return _compile(pattern).search(searchable(text)) is not None


def _s(fn: Callable[[str], object]) -> GoFunc:
    """A one-string-argument function."""
    return GoFunc(("string",), None, lambda _env, a: fn(str(a[0])))


def _n(fn: Callable[[float], object]) -> GoFunc:
    """A one-number-argument function that takes what ConvertToFloat takes."""
    return GoFunc(("any",), None, lambda _env, a: fn(convert_to_float(a[0])))


_PROMETHEUS: dict[str, GoFunc] = {
    "query": GoFunc(("string",), None, lambda env, a: env.run_query(str(a[0]))),
    "first": GoFunc(("samples",), None, lambda _env, a: _first(a[0])),
    "label": GoFunc(("string", "sample"), None, lambda _env, a: _sample(a[1]).labels.get(str(a[0]), "")),
    "value": GoFunc(("sample",), None, lambda _env, a: _sample(a[0]).value),
    "strvalue": GoFunc(("sample",), None, lambda _env, a: _sample(a[0]).labels.get("__value__", "")),
    "sortByLabel": GoFunc(("string", "samples"), None, lambda _env, a: _sort_by_label(str(a[0]), a[1])),
    "args": GoFunc((), "any", lambda _env, a: AnyMap((f"arg{i}", v) for i, v in enumerate(a))),
    "reReplaceAll": GoFunc(("string",) * 3, None, lambda _env, a: re_replace_all(str(a[0]), str(a[1]), str(a[2]))),
    "match": GoFunc(("string", "string"), None, lambda _env, a: _match(str(a[0]), str(a[1]))),
    "safeHtml": _s(GoHTML),
    "title": _s(title),
    "toUpper": _s(lambda s: _simple_case(s, upper=True)),
    "toLower": _s(lambda s: _simple_case(s, upper=False)),
    "graphLink": _s(lambda s: f"/graph?g0.expr={_query_escape(s)}&g0.tab=0"),
    "tableLink": _s(lambda s: f"/graph?g0.expr={_query_escape(s)}&g0.tab=1"),
    "stripPort": _s(strip_port),
    "stripDomain": _s(strip_domain),
    "parseDuration": _s(parse_duration),
    "humanize": _n(humanize),
    "humanize1024": _n(humanize1024),
    "humanizeDuration": _n(humanize_duration),
    "humanizePercentage": _n(lambda v: _g4(v * 100) + "%"),
    "humanizeTimestamp": _n(humanize_timestamp),
    "toTime": GoFunc(("any",), None, lambda _env, a: _to_time(a[0])),
    "externalURL": GoFunc((), None, lambda env, _a: _external_url(env)),
    "pathPrefix": GoFunc((), None, lambda env, _a: _path_prefix(env)),
}

FUNCS: Mapping[str, GoFunc] = {**_BUILTINS, **_PROMETHEUS}
"""Every function a template may call, by name."""
