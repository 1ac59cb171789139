"""In-memory time-series store with Prometheus semantics.

Each series keeps its samples in two compact `array` buffers (int64 milliseconds and
float64 values): 16 bytes per sample and no Python object per sample. Old samples are
dropped by advancing a head index and compacting once the dead prefix is large, so
trimming costs amortised O(1) per sample.

Staleness follows Prometheus: a source commits the full set of series it saw in one
pass (`Appender`); series it reported last time but not this time get a staleness
marker (a NaN with a reserved bit pattern), and lookups treat that marker as "gone".
"""

from __future__ import annotations

import math
import re
import struct
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "DEFAULT_LOOKBACK_MS",
    "DEFAULT_RETENTION_MS",
    "STALE_NAN",
    "Appender",
    "Labels",
    "MatchOp",
    "Matcher",
    "MetricMeta",
    "Sample",
    "Series",
    "Store",
    "is_stale_marker",
    "labels_from",
    "now_ms",
]

DEFAULT_RETENTION_MS = 15 * 60 * 1000
DEFAULT_LOOKBACK_MS = 5 * 60 * 1000

# Prometheus's staleness marker: value.StaleNaN = 0x7ff0000000000002.
_STALE_BITS = 0x7FF0000000000002
STALE_NAN: float = struct.unpack("<d", struct.pack("<Q", _STALE_BITS))[0]


def is_stale_marker(value: float) -> bool:
    """True for Prometheus's staleness NaN (an ordinary NaN is a real sample)."""
    if value == value:  # fast path: not NaN at all
        return False
    return bool(struct.unpack("<Q", struct.pack("<d", value))[0] == _STALE_BITS)


def now_ms() -> int:
    """Wall-clock time in Prometheus's millisecond timestamps."""
    return int(time.time() * 1000)


Labels = tuple[tuple[str, str], ...]
"""A sorted tuple of (name, value) pairs; `__name__` holds the metric name."""


def labels_from(name: str | None = None, labels: Mapping[str, str] | None = None, **extra: str) -> Labels:
    """Build a canonical label set; empty values are dropped as Prometheus does."""
    merged: dict[str, str] = {}
    if labels:
        merged.update(labels)
    merged.update(extra)
    if name is not None:
        merged["__name__"] = name
    return tuple(sorted((k, v) for k, v in merged.items() if v != ""))


def metric_name(labels: Labels) -> str:
    """The `__name__` of a label set, or the empty string."""
    for key, value in labels:
        if key == "__name__":
            return value
    return ""


class MatchOp(str, Enum):
    EQ = "="
    NE = "!="
    RE = "=~"
    NRE = "!~"


@dataclass(frozen=True)
class Matcher:
    """A PromQL label matcher; regexes are fully anchored like Prometheus's."""

    name: str
    op: MatchOp
    value: str

    def __post_init__(self) -> None:
        if self.op in (MatchOp.RE, MatchOp.NRE):
            object.__setattr__(self, "_regex", re.compile(f"(?s:{self.value})\\Z"))

    def matches(self, value: str) -> bool:
        if self.op is MatchOp.EQ:
            return value == self.value
        if self.op is MatchOp.NE:
            return value != self.value
        hit = self._regex.match(value) is not None  # type: ignore[attr-defined]
        return hit if self.op is MatchOp.RE else not hit


@dataclass(frozen=True)
class Sample:
    labels: Labels
    timestamp_ms: int
    value: float


@dataclass(frozen=True)
class MetricMeta:
    """Exposition metadata for one metric family."""

    type: str  # counter | gauge | info | histogram | summary | untyped
    help: str


class Series:
    """One series: parallel timestamp and value buffers plus a live-window head index."""

    __slots__ = ("_head", "_nans", "_ts", "_vals", "labels")

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self._ts = array("q")
        self._vals = array("d")
        self._head = 0
        # NaNs ever appended (staleness markers among them); lets range reads skip the
        # per-sample marker scan for the common series that never had one.
        self._nans = 0

    def __len__(self) -> int:
        return len(self._ts) - self._head

    @property
    def last_timestamp(self) -> int | None:
        return self._ts[-1] if len(self._ts) > self._head else None

    @property
    def last_value(self) -> float | None:
        return self._vals[-1] if len(self._vals) > self._head else None

    def append(self, ts: int, value: float) -> bool:
        """Append in time order; an out-of-order or duplicate timestamp is refused."""
        if len(self._ts) > self._head:
            last = self._ts[-1]
            if ts < last:
                return False
            if ts == last:
                # Same timestamp: last write wins (a re-collected value, not a new sample).
                self._vals[-1] = value
                self._nans += value != value
                return True
        self._ts.append(ts)
        self._vals.append(value)
        self._nans += value != value
        return True

    def trim_before(self, cutoff_ms: int) -> None:
        """Forget samples older than `cutoff_ms`; compact when the dead prefix is big."""
        head = bisect_left(self._ts, cutoff_ms, lo=self._head)
        self._head = head
        if head > 1024 and head * 2 > len(self._ts):
            del self._ts[:head]
            del self._vals[:head]
            self._head = 0

    def latest_at(self, t_ms: int, lookback_ms: int) -> tuple[int, float] | None:
        """The newest sample in (t - lookback, t], or None if absent or stale."""
        i = bisect_right(self._ts, t_ms, lo=self._head) - 1
        if i < self._head:
            return None
        ts = self._ts[i]
        if ts <= t_ms - lookback_ms:
            return None
        value = self._vals[i]
        if is_stale_marker(value):
            return None
        return ts, value

    def range(self, start_ms: int, end_ms: int, *, left_open: bool = True) -> tuple[array[int], array[float]]:
        """Samples with start < ts <= end (left-closed when asked), stale markers removed."""
        lo = (bisect_right if left_open else bisect_left)(self._ts, start_ms, lo=self._head)
        hi = bisect_right(self._ts, end_ms, lo=lo)
        ts = self._ts[lo:hi]
        vals = self._vals[lo:hi]
        if self._nans and any(v != v for v in vals):
            keep = [i for i, v in enumerate(vals) if not is_stale_marker(v)]
            if len(keep) != len(vals):
                ts = array("q", (ts[i] for i in keep))
                vals = array("d", (vals[i] for i in keep))
        return ts, vals

    def raw(self) -> tuple[array[int], array[float]]:
        """Every retained sample, staleness markers included (for tests and export)."""
        return self._ts[self._head :], self._vals[self._head :]

    def nbytes(self) -> int:
        return self._ts.buffer_info()[1] * self._ts.itemsize + self._vals.buffer_info()[1] * self._vals.itemsize


class Appender:
    """Collects one pass of a source's samples; `commit` appends them and marks the rest stale."""

    def __init__(self, store: Store, source: str, timestamp_ms: int) -> None:
        self._store = store
        self._source = source
        self._ts = timestamp_ms
        self._samples: dict[Labels, float] = {}

    def add(self, name: str, value: float, labels: Mapping[str, str] | None = None, **extra: str) -> None:
        self._samples[labels_from(name, labels, **extra)] = float(value)

    def add_labels(self, labels: Labels, value: float) -> None:
        self._samples[labels] = float(value)

    def __len__(self) -> int:
        return len(self._samples)

    def commit(self) -> int:
        return self._store._commit(self._source, self._ts, self._samples)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()


class Store:
    """The single source of truth for the exporter and the rule engine."""

    def __init__(self, retention_ms: int = DEFAULT_RETENTION_MS, lookback_ms: int = DEFAULT_LOOKBACK_MS) -> None:
        self.retention_ms = retention_ms
        self.lookback_ms = lookback_ms
        self._lock = threading.RLock()
        self._series: dict[Labels, Series] = {}
        self._by_name: dict[str, set[Labels]] = {}
        self._owned: dict[str, set[Labels]] = {}  # source -> series it reported last pass
        self._meta: dict[str, MetricMeta] = {}
        self.out_of_order_total = 0

    # -- writing -----------------------------------------------------------------

    def appender(self, source: str, timestamp_ms: int | None = None) -> Appender:
        """Start one pass of `source`; series it does not report again go stale."""
        return Appender(self, source, now_ms() if timestamp_ms is None else timestamp_ms)

    def append(self, labels: Labels, timestamp_ms: int, value: float) -> bool:
        """Append one sample outside any source's staleness tracking."""
        with self._lock:
            return self._get_or_create(labels).append(timestamp_ms, float(value))

    def add(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        timestamp_ms: int | None = None,
        **extra: str,
    ) -> bool:
        """Convenience form of `append` taking a metric name and label mapping."""
        ts = now_ms() if timestamp_ms is None else timestamp_ms
        return self.append(labels_from(name, labels, **extra), ts, value)

    def inc(
        self,
        name: str,
        by: float = 1.0,
        labels: Mapping[str, str] | None = None,
        timestamp_ms: int | None = None,
        **extra: str,
    ) -> float:
        """Increment a counter series (starting at 0) and return its new value."""
        key = labels_from(name, labels, **extra)
        ts = now_ms() if timestamp_ms is None else timestamp_ms
        with self._lock:
            series = self._get_or_create(key)
            last = series.last_value
            base = 0.0 if last is None or math.isnan(last) else last
            series.append(max(ts, series.last_timestamp or ts), base + by)
            return base + by

    def mark_stale(self, labels: Labels, timestamp_ms: int) -> None:
        """Write a staleness marker now (a series that ended, e.g. a removed worker)."""
        with self._lock:
            series = self._series.get(labels)
            if series is not None and not _ends_stale(series):
                series.append(timestamp_ms, STALE_NAN)

    def drop_source(self, source: str, timestamp_ms: int | None = None) -> None:
        """Mark every series of a source stale (the source was removed)."""
        self._commit(source, now_ms() if timestamp_ms is None else timestamp_ms, {})
        with self._lock:
            self._owned.pop(source, None)

    def set_meta(self, name: str, type_: str, help_: str) -> None:
        with self._lock:
            self._meta[name] = MetricMeta(type_, help_)

    def meta(self, name: str) -> MetricMeta | None:
        return self._meta.get(name)

    def _get_or_create(self, labels: Labels) -> Series:
        series = self._series.get(labels)
        if series is None:
            series = Series(labels)
            self._series[labels] = series
            self._by_name.setdefault(metric_name(labels), set()).add(labels)
        return series

    def _commit(self, source: str, ts: int, samples: Mapping[Labels, float]) -> int:
        with self._lock:
            written = 0
            for labels, value in samples.items():
                if self._get_or_create(labels).append(ts, value):
                    written += 1
                else:
                    self.out_of_order_total += 1
            previous = self._owned.get(source, set())
            current = set(samples)
            for labels in previous - current:
                self.mark_stale(labels, ts)
            self._owned[source] = current
            return written

    # -- retention ---------------------------------------------------------------

    def trim(self, now: int | None = None) -> int:
        """Apply retention; series left empty are removed. Returns series removed."""
        cutoff = (now_ms() if now is None else now) - self.retention_ms
        removed = 0
        with self._lock:
            for labels in list(self._series):
                series = self._series[labels]
                series.trim_before(cutoff)
                if len(series) == 0:
                    del self._series[labels]
                    names = self._by_name.get(metric_name(labels))
                    if names is not None:
                        names.discard(labels)
                        if not names:
                            del self._by_name[metric_name(labels)]
                    removed += 1
        return removed

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._series)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def get(self, labels: Labels) -> Series | None:
        return self._series.get(labels)

    def select(self, matchers: Sequence[Matcher]) -> list[Series]:
        """Series whose labels satisfy every matcher (a missing label reads as "")."""
        with self._lock:
            candidates: Iterable[Labels]
            name_eq = next((m for m in matchers if m.name == "__name__" and m.op is MatchOp.EQ), None)
            candidates = list(self._by_name.get(name_eq.value, ())) if name_eq is not None else list(self._series)
            out = []
            for labels in candidates:
                as_dict = dict(labels)
                if all(m.matches(as_dict.get(m.name, "")) for m in matchers):
                    out.append(self._series[labels])
            return out

    def instant(self, matchers: Sequence[Matcher], t_ms: int, lookback_ms: int | None = None) -> list[Sample]:
        """Instant-vector lookup: each series' newest non-stale sample within lookback."""
        lb = self.lookback_ms if lookback_ms is None else lookback_ms
        out = []
        for series in self.select(matchers):
            hit = series.latest_at(t_ms, lb)
            if hit is not None:
                out.append(Sample(series.labels, hit[0], hit[1]))
        return out

    def range(
        self, matchers: Sequence[Matcher], start_ms: int, end_ms: int
    ) -> list[tuple[Labels, array[int], array[float]]]:
        """Range read over (start, end] for every matching series that has samples there."""
        out = []
        for series in self.select(matchers):
            ts, vals = series.range(start_ms, end_ms)
            if len(ts):
                out.append((series.labels, ts, vals))
        return out

    def latest(self, name: str) -> list[Sample]:
        """Every series of `name` whose last sample is live (for exposition)."""
        out = []
        with self._lock:
            for labels in self._by_name.get(name, ()):
                series = self._series[labels]
                ts, value = series.last_timestamp, series.last_value
                if ts is not None and value is not None and not is_stale_marker(value):
                    out.append(Sample(labels, ts, value))
        return out

    def nbytes(self) -> int:
        """Bytes held by sample buffers (allocated capacity, not just used)."""
        with self._lock:
            return sum(s.nbytes() for s in self._series.values())

    def sample_count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._series.values())


def _ends_stale(series: Series) -> bool:
    last = series.last_value
    return last is not None and is_stale_marker(last)
