"""Parsing of scraped `/metrics` bodies into store label sets.

Two formats, chosen by the response's Content-Type:

- Prometheus text 0.0.4 (what vLLM and SGLang serve): parsed here by `TextParser`,
  which caches each distinct series text (`name{labels}`) to its final store label set.
  A scrape of an unchanged engine then costs one dict lookup, one split and one
  `float()` per line. prometheus-client's own parser is pure Python too and takes
  ~35 ms for a 2,000-series vLLM body, more than a 1 s scrape loop should spend per
  worker; this one stays exact on the grammar and is checked against prometheus-client
  by a differential property test.
- OpenMetrics 1.0: parsed by prometheus-client's `openmetrics.parser` (engines only
  send it when asked, and Sentinel never asks), with its errors mapped to `ParseError`.

Relabelling follows a Prometheus scrape with `honor_labels: false`: every series gets
the target's labels (`worker`); a `worker` label already on the wire becomes
`exported_worker`. Empty label values are dropped, as Prometheus does. Sample
timestamps on the wire are ignored: the store stamps a whole pass with its time.

A worker's /metrics is input from outside, so it may not write Sentinel's own series:
a scraped `sentinel_*`, `ALERTS` or `ALERTS_FOR_STATE` is renamed `exported_<name>`
(like a clashing label), so a worker exporting `sentinel_probe_cuda_ooms_total` cannot
fire CudaOOM. Bounds follow Prometheus's scrape config (`ScrapeLimits`): more series
than `sample_limit`, or a series over `label_limit` labels or the name and value
length limits, fails the whole body with `LimitError`. They are checked when a series
is first seen (then cached), so an unchanged body costs nothing more. A series given
twice keeps its first sample and the later ones are counted in `duplicates`, as
Prometheus 2.x does (it drops them, counts them in
`prometheus_target_scrapes_sample_duplicate_timestamp_total` and keeps the scrape up).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sentinel.store import Labels

__all__ = [
    "RESERVED_NAMES",
    "LimitError",
    "ParseError",
    "ParsedMetrics",
    "ScrapeLimits",
    "TextParser",
    "build_labels",
    "is_openmetrics",
    "parse_openmetrics",
]

RESERVED_NAMES = frozenset({"ALERTS", "ALERTS_FOR_STATE"})
"""Series names Sentinel writes itself besides its `sentinel_` prefix; never taken from a scrape."""
_RESERVED_PREFIX = "sentinel_"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_PAIR = r'[ \t]*[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"'
# Each run of blanks has exactly one place to go (no `[ \t]*[ \t]*`): a failing match
# backtracks linearly, not quadratically, on a line padded with blanks.
_LABEL_BLOCK = re.compile(rf"(?:{_PAIR}[ \t]*,)*(?:{_PAIR})?[ \t]*")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_ESCAPE = re.compile(r"\\[\\\"n]")

# Bounds the series cache: label values that churn (a request id in a label) must not
# grow it forever. Cleared wholesale: the next scrape refills it at parse-from-scratch cost.
_CACHE_MAX = 50_000


class ParseError(ValueError):
    """The body is not valid exposition text; the message names the first bad line."""


class LimitError(ParseError):
    """The body crosses one of the `ScrapeLimits`; `reason` is `sample_limit` or `label_limit`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ScrapeLimits:
    """Prometheus's per-scrape limits (0 means none, as in Prometheus)."""

    sample_limit: int = 0
    label_limit: int = 0
    label_name_length_limit: int = 0
    label_value_length_limit: int = 0

    def check_series(self, labels: Labels, where: str) -> None:
        """Raise `LimitError` when one series' labels cross a limit."""
        if self.label_limit and len(labels) > self.label_limit:
            raise LimitError("label_limit", f"{where}: {len(labels)} labels, more than label_limit {self.label_limit}")
        for name, value in labels:
            if self.label_name_length_limit and len(name) > self.label_name_length_limit:
                raise LimitError(
                    "label_limit",
                    f"{where}: label name {name[:40]!r}... longer than label_name_length_limit "
                    f"{self.label_name_length_limit}",
                )
            if self.label_value_length_limit and len(value) > self.label_value_length_limit:
                raise LimitError(
                    "label_limit",
                    f"{where}: value of label {name[:40]!r} longer than label_value_length_limit "
                    f"{self.label_value_length_limit}",
                )

    def check_samples(self, count: int) -> None:
        if self.sample_limit and count > self.sample_limit:
            raise LimitError("sample_limit", f"more than sample_limit {self.sample_limit} series in the body")


@dataclass
class ParsedMetrics:
    """One parsed body: samples by final label set, plus what the collector needs from it.

    `sums` adds up the samples of the metric names the parser was asked to watch (all
    label sets together; NaN samples skipped), `names` holds every sample name seen.
    """

    samples: dict[Labels, float] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    sums: dict[str, float] = field(default_factory=dict)
    lines: int = 0
    duplicates: int = 0  # samples of a series already given earlier in the body (dropped)

    def by_name(self, name: str) -> Iterable[tuple[Labels, float]]:
        """Every (labels, value) whose metric name is `name` (a scan: call it rarely)."""
        for labels, value in self.samples.items():
            if _name_of(labels) == name:
                yield labels, value


def build_labels(name: str, labels: Mapping[str, str], target: Mapping[str, str]) -> Labels:
    """Final store labels: wire labels, then the target's, clashes renamed `exported_*`.

    A name that is Sentinel's own (`sentinel_*`, `ALERTS`...) is renamed `exported_<name>`.
    """
    # Reserved `__*` names are the scraper's, never the target's: dropped.
    merged = {(f"exported_{k}" if k in target else k): v for k, v in labels.items() if not k.startswith("__")}
    merged.update(target)
    merged["__name__"] = f"exported_{name}" if is_reserved_name(name) else name
    return tuple(sorted(item for item in merged.items() if item[1] != ""))


def is_reserved_name(name: str) -> bool:
    """Whether a scraped metric name is one of Sentinel's own."""
    return name.startswith(_RESERVED_PREFIX) or name in RESERVED_NAMES


def is_openmetrics(content_type: str | None) -> bool:
    """True when a Content-Type header announces OpenMetrics rather than Prometheus text."""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/openmetrics-text"


class TextParser:
    """Parses Prometheus text 0.0.4 bodies of one target, caching series across scrapes."""

    def __init__(
        self, target: Mapping[str, str], watch: Iterable[str] = (), limits: ScrapeLimits | None = None
    ) -> None:
        self._target = dict(target)
        self._watch = frozenset(watch)
        self._limits = limits or ScrapeLimits()
        # series text -> (store labels, metric name, watched?)
        self._cache: dict[str, tuple[Labels, str, bool]] = {}

    @property
    def cached_series(self) -> int:
        """Series texts known from earlier bodies (0 before the first parse)."""
        return len(self._cache)

    def parse(self, text: str) -> ParsedMetrics:
        """Parse a whole body; raises ParseError on the first invalid line."""
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        cache = self._cache
        out = ParsedMetrics()
        samples, names, sums = out.samples, out.names, out.sums
        sample_limit = self._limits.sample_limit or len(text)  # a sample takes at least 2 bytes
        lineno = 0
        for raw in text.split("\n"):
            lineno += 1
            line = raw.strip()
            if not line or line[0] == "#":
                continue  # HELP/TYPE and other comments carry nothing the store keeps
            brace = line.find("{")
            if brace >= 0:
                # A label value may hold "}", but the value and timestamp after the
                # last one cannot: rfind finds the real end of the label block.
                end = line.rfind("}")
                if end < brace:
                    raise ParseError(f"line {lineno}: unterminated label set")
                key = line[: end + 1]
                rest = line[end + 1 :].split()
            else:
                parts = line.split()
                key = parts[0]
                rest = parts[1:]
            entry = cache.get(key)
            if entry is None:
                entry = self._series(key, brace, lineno)
                cache[key] = entry
            value = _value(rest, lineno)
            labels, name, watched = entry
            if labels in samples:
                out.duplicates += 1  # Prometheus keeps the first and drops the rest
                continue
            samples[labels] = value
            if len(samples) > sample_limit:
                self._limits.check_samples(len(samples))
            names.add(name)
            if watched and value == value:
                sums[name] = sums.get(name, 0.0) + value
        out.lines = lineno
        return out

    def _series(self, key: str, brace: int, lineno: int) -> tuple[Labels, str, bool]:
        if brace < 0:
            name, wire = key, {}
        else:
            name = key[:brace].strip()
            wire = _parse_label_block(key[brace + 1 : -1], lineno)
        if not _METRIC_NAME.match(name):
            raise ParseError(f"line {lineno}: invalid metric name {name[:80]!r}")
        labels = build_labels(name, wire, self._target)
        self._limits.check_series(labels, f"line {lineno}")
        return labels, name, name in self._watch


def _parse_label_block(block: str, lineno: int) -> dict[str, str]:
    # One regex validates the whole block, a second one lists its pairs: two C-level
    # scans per new series instead of a Python loop over its labels.
    if not _LABEL_BLOCK.fullmatch(block):
        raise ParseError(f"line {lineno}: invalid label set {block[:80]!r}")
    pairs = _LABEL_PAIR.findall(block)
    labels = {key: _ESCAPE.sub(_unescape, value) if "\\" in value else value for key, value in pairs}
    if len(labels) != len(pairs):
        raise ParseError(f"line {lineno}: a label is given twice in {block[:80]!r}")
    return labels


def _unescape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group(0)]


def _value(rest: list[str], lineno: int) -> float:
    if not 1 <= len(rest) <= 2:
        raise ParseError(f"line {lineno}: expected a value and an optional timestamp")
    token = rest[0]
    if "_" in token:  # float() takes 1_000; Prometheus's parser does not
        raise ParseError(f"line {lineno}: invalid value {token[:40]!r}")
    try:
        value = float(token)
        if len(rest) == 2:
            int(rest[1])
    except ValueError:
        raise ParseError(f"line {lineno}: invalid value or timestamp {' '.join(rest)[:60]!r}") from None
    return value


def parse_openmetrics(
    text: str, target: Mapping[str, str], watch: Iterable[str] = (), limits: ScrapeLimits | None = None
) -> ParsedMetrics:
    """Parse an OpenMetrics body with prometheus-client; any failure is a ParseError."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    watched = frozenset(watch)
    bounds = limits or ScrapeLimits()
    out = ParsedMetrics()
    try:
        for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
            for sample in family.samples:
                name, value = sample.name, float(sample.value)
                labels = build_labels(name, sample.labels, target)
                if labels in out.samples:
                    out.duplicates += 1
                    continue
                bounds.check_series(labels, f"series {name[:80]}")
                out.samples[labels] = value
                bounds.check_samples(len(out.samples))
                out.names.add(name)
                if name in watched and not math.isnan(value):
                    out.sums[name] = out.sums.get(name, 0.0) + value
    except ParseError:
        raise
    except Exception as exc:
        # Third-party code on untrusted input: whatever it raises (ValueError mostly,
        # but also IndexError/KeyError on some truncations) means "not a valid body".
        raise ParseError(f"invalid OpenMetrics body: {type(exc).__name__}: {str(exc)[:200]}") from None
    out.lines = text.count("\n") + 1
    return out


def _name_of(labels: Labels) -> str:
    for key, value in labels:
        if key == "__name__":
            return value
    return ""
