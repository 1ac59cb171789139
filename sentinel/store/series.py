"""In-memory time-series store with Prometheus semantics.

Each series keeps its samples in two compact `array` buffers (int64 milliseconds and
float64 values): 16 bytes per sample and no Python object per sample. Old samples are
dropped by advancing a head index and compacting once the dead prefix reaches a quarter
of the live samples (`_should_compact`): a compaction copies at most four live samples
per dead one it frees, so trimming stays amortised O(1) per sample, and a series holds
at most 1.25 times its retention (the old rule waited for 1,024 dead samples, which
held retention plus 1,024 samples per series: bench/store_bench.py --plateau).

A source that takes input from outside (a worker's /metrics, an in-worker probe) can
be given a series budget (`limit_source`): it may hold that many series, live or ended
but retained. With fresh names every pass, the oldest ended series are removed to make
room, and when every held series is live the new ones are refused; both are counted
per source (`series_evicted`, `series_refused`). Metric names whose last series was
removed are forgotten too, so churning names cannot grow any index without bound.

Staleness follows Prometheus: a source commits the full set of series it saw in one
pass (`Appender`); series it reported last time but not this time get a staleness
marker (a NaN with a reserved bit pattern), and lookups treat that marker as "gone".

For the rule engine, which asks the same questions every second, the store keeps a
selection cache (valid until a series is created or removed) and data versions per
metric name (`changed_since`), so callers can reuse results computed from data that
has not changed. Every write goes through `Store` (or an `Appender`), which bumps them.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from sentinel.goregex import LabelRegex
from sentinel.runtime.clock import wall_clock as _wall_clock

__all__ = [
    "DEFAULT_LOOKBACK_MS",
    "DEFAULT_RETENTION_MS",
    "RANGE_NONNEGATIVE",
    "STALE_NAN",
    "Appender",
    "Labels",
    "MatchOp",
    "LabelMatcher",
    "MetricMeta",
    "Sample",
    "Series",
    "Store",
    "is_stale_marker",
    "labels_from",
    "now_ms",
]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_MS = 15 * 60 * 1000
DEFAULT_LOOKBACK_MS = 5 * 60 * 1000

# Prometheus's staleness marker: value.StaleNaN = 0x7ff0000000000002.
_STALE_BITS = 0x7FF0000000000002
STALE_NAN: float = struct.unpack("<d", struct.pack("<Q", _STALE_BITS))[0]


RANGE_NONNEGATIVE = 1
"""`Series.range_hinted` hint: every value in the window is >= 0 (so none is NaN)."""


def is_stale_marker(value: float) -> bool:
    """True for Prometheus's staleness NaN (an ordinary NaN is a real sample)."""
    if value == value:  # fast path: not NaN at all
        return False
    return bool(struct.unpack("<Q", struct.pack("<d", value))[0] == _STALE_BITS)


def now_ms() -> int:
    """Sentinel's wall-clock time in Prometheus's millisecond timestamps; it never steps back."""
    return _wall_clock.now_ms()


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
class LabelMatcher:
    """A PromQL label matcher; regexes (Go/RE2 syntax) are fully anchored like Prometheus's.

    Regexes run on RE2 (`goregex`): linear time, whatever the pattern. `dot_nl=False`
    is Prometheus 2's meaning of `.` (not a newline); 3.x wraps patterns in `(?s:...)`.
    An invalid pattern raises `goregex.RegexError` (a ValueError).
    """

    name: str
    op: MatchOp
    value: str
    dot_nl: bool = True

    def __post_init__(self) -> None:
        if self.op in (MatchOp.RE, MatchOp.NRE):
            object.__setattr__(self, "_regex", LabelRegex(self.value, dot_nl=self.dot_nl))

    def matches(self, value: str) -> bool:
        if self.op is MatchOp.EQ:
            return value == self.value
        if self.op is MatchOp.NE:
            return value != self.value
        hit: bool = self._regex.fullmatch(value)  # type: ignore[attr-defined]
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


_COMPACT_MIN_DEAD = 16


def _should_compact(dead: int, live: int) -> bool:
    """Compact once the dead prefix is a quarter of the live samples (and not tiny).

    Copying `live` samples to free `dead >= live / 4` costs at most 4 copies per freed
    sample: amortised O(1), and the buffer never exceeds 1.25 x the live window (plus
    the 16-sample floor that keeps tiny series from compacting on every trim).
    """
    return dead >= _COMPACT_MIN_DEAD and dead * 4 >= live


class Series:
    """One series: parallel timestamp and value buffers plus a live-window head index."""

    __slots__ = (
        "_break_at",
        "_break_before",
        "_head",
        "_nan_at",
        "_neg_at",
        "_regular_from",
        "_step",
        "_ts",
        "_vals",
        "labels",
        "name",
    )

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.name = metric_name(labels)
        self._ts = array("q")
        self._vals = array("d")
        self._head = 0
        # Buffer indexes that let a window skip per-sample scans (`range_hinted`); -1 for
        # none. A "break" is an index i whose value is not >= the one before (a counter
        # reset, or a NaN on either side). `_break_at` is the newest break and every other
        # break is at or before `_break_before`. `_nan_at` and `_neg_at` are at or after
        # the newest NaN and the newest value not >= 0. They only err towards "later",
        # which costs a scan, never a wrong answer.
        self._break_at = -1
        self._break_before = -1
        self._nan_at = -1
        self._neg_at = -1
        # Every timestamp from buffer index `_regular_from` on is `_step` after the one
        # before it (collectors sample at a steady interval), so a window's first
        # timestamp is known from the last one by arithmetic, without reading the
        # buffer where the window starts (`window_summary`: a cache miss per series).
        self._regular_from = 0
        self._step = 0

    def __len__(self) -> int:
        return len(self._ts) - self._head

    @property
    def first_timestamp(self) -> int | None:
        """The oldest retained sample's time (it grows when retention trims the series)."""
        return self._ts[self._head] if len(self._ts) > self._head else None

    @property
    def last_timestamp(self) -> int | None:
        return self._ts[-1] if len(self._ts) > self._head else None

    @property
    def last_value(self) -> float | None:
        return self._vals[-1] if len(self._vals) > self._head else None

    def append(self, ts: int, value: float) -> bool:
        """Append in time order; an out-of-order or duplicate timestamp is refused.

        Write through `Store` (or an `Appender`) rather than here: the store's data
        versions, which cached query results depend on, only see writes made there.
        """
        n = len(self._ts)
        if n > self._head:
            last = self._ts[-1]
            if ts < last:
                return False
            if ts == last:
                # Same timestamp: last write wins (a re-collected value, not a new sample).
                self._vals[-1] = value
                # Whether n - 1 is a break may have changed either way: from now on treat
                # every index up to it as a possible break (windows over it scan).
                self._break_at = self._break_before = n - 1
                if value != value:
                    self._nan_at = n - 1
                if not value >= 0:
                    self._neg_at = n - 1
                return True
            if not value >= self._vals[-1]:
                self._break_before = self._break_at
                self._break_at = n
            if ts - last != self._step:
                self._step = ts - last
                self._regular_from = n - 1
        else:
            self._regular_from = n
        if value != value:
            self._nan_at = n
        if not value >= 0:
            self._neg_at = n
        self._ts.append(ts)
        self._vals.append(value)
        return True

    def trim_before(self, cutoff_ms: int) -> None:
        """Forget samples older than `cutoff_ms`; compact when the dead prefix is big."""
        head = bisect_left(self._ts, cutoff_ms, lo=self._head)
        self._head = head
        if _should_compact(head, len(self._ts) - head):
            del self._ts[:head]
            del self._vals[:head]
            self._head = 0
            self._break_at -= head
            self._break_before -= head
            self._nan_at -= head
            self._neg_at -= head
            self._regular_from = max(0, self._regular_from - head)

    def _after(self, t_ms: int) -> int:
        """`bisect_right(self._ts, t_ms, self._head)`, usually without the search.

        Samples mostly come at a steady interval, so stepping back from the last sample
        by the last interval lands on the answer, checked with one or two reads next to
        each other. Bisection's dozen reads scattered over the buffer are cache misses
        when thousands of series are read in a row. Timestamps strictly increase, so the
        check is exact; a miss falls back to bisection over the side it ruled in.
        """
        tss = self._ts
        head = self._head
        n = len(tss)
        if n == head:
            return n
        last = tss[-1]
        if t_ms >= last:
            return n
        if n - head == 1:
            return head  # t < the only sample
        guess = n + (t_ms - last) // (last - tss[-2])  # in [.., n - 1] as t < last
        if guess <= head:
            guess = head + 1
        if tss[guess - 1] > t_ms:
            below = guess - 1
            if below > head and tss[below - 1] <= t_ms:
                return below
            return bisect_right(tss, t_ms, head, below)
        if tss[guess] <= t_ms:
            above = guess + 1  # <= n - 1, as tss[guess] <= t < tss[n - 1]
            if tss[above] > t_ms:
                return above
            return bisect_right(tss, t_ms, above + 1, n)
        return guess

    def latest_at(self, t_ms: int, lookback_ms: int) -> tuple[int, float] | None:
        """The newest sample in (t - lookback, t], or None if absent or stale."""
        i = self._after(t_ms) - 1
        if i < self._head:
            return None
        tss = self._ts
        ts = tss[i]
        if ts <= t_ms - lookback_ms:
            return None
        value = self._vals[i]
        if value != value and is_stale_marker(value):
            return None
        return ts, value

    def range(self, start_ms: int, end_ms: int, *, left_open: bool = True) -> tuple[array[int], array[float]]:
        """Samples with start < ts <= end (left-closed when asked), stale markers removed."""
        ts, vals, _, _ = self.range_hinted(start_ms, end_ms, left_open=left_open)
        return ts, vals

    def range_hinted(
        self, start_ms: int, end_ms: int, *, left_open: bool = True
    ) -> tuple[array[int], array[float], int, float | None]:
        """`range` plus what is known about the window without a per-sample scan.

        Returns (timestamps, values, hints, counter correction). `hints` has
        `RANGE_NONNEGATIVE` when every value is >= 0 (none is NaN); 0 means unknown. The
        counter correction, when not None, is exactly what summing, left to right from
        0.0, each value followed by a smaller one gives (Prometheus's counter-reset
        correction); None means unknown.
        """
        tss = self._ts
        lo = self._after(start_ms) if left_open else bisect_left(tss, start_ms, self._head)
        hi = max(lo, self._after(end_ms))
        ts = tss[lo:hi]
        vals = self._vals[lo:hi]
        # A NaN (maybe a staleness marker) at or after the window start: scan.
        if self._nan_at >= lo and any(v != v for v in vals):
            keep = [i for i, v in enumerate(vals) if not is_stale_marker(v)]
            if len(keep) != len(vals):
                ts = array("q", (ts[i] for i in keep))
                vals = array("d", (vals[i] for i in keep))
            return ts, vals, 0, None
        hints = RANGE_NONNEGATIVE if self._neg_at < lo else 0
        return ts, vals, hints, self._correction(lo, hi)

    def window_summary(self, start_ms: int, end_ms: int) -> tuple[int, int, int, float, float, float] | None:
        """For samples in (start, end]: count, first and last timestamp, first and last value
        and counter correction (see `range_hinted`), all without copying or scanning them.

        None when that takes a scan (a NaN in the window, or several counter resets):
        use `range_hinted` then. An empty window gives a count of 0.
        """
        tss = self._ts
        n = len(tss)
        if n == self._head:
            return 0, 0, 0, 0.0, 0.0, 0.0
        last = tss[-1]
        step = self._step
        if end_ms >= last and start_ms < last and step > 0:
            # The usual window of a steadily sampled series (this runs for every series
            # of every rate() window): where it starts, and its first timestamp, follow
            # from the last timestamp and the step, without reading the buffer there.
            count = (last - start_ms + step - 1) // step  # samples in (start, last]
            lo = n - count
            if lo > self._head and lo - 1 >= self._regular_from:
                if self._nan_at >= lo:
                    return None
                last_break = self._break_at
                vals = self._vals
                if last_break <= lo or (last_break >= n and self._break_before <= lo):
                    correction = 0.0
                elif self._break_before <= lo:
                    correction = 0.0 + vals[last_break - 1]
                else:
                    return None
                return count, last - (count - 1) * step, last, vals[lo], vals[-1], correction
        # `_after(start_ms)` for the usual window inside the buffer, inlined; anything
        # else takes the general path.
        lo = n + (start_ms - last) // (last - tss[-2]) if n - self._head > 1 and start_ms < last else -1
        if not (self._head < lo < n and tss[lo - 1] <= start_ms < tss[lo]):
            lo = self._after(start_ms)
        hi = n if end_ms >= last else max(lo, self._after(end_ms))
        if lo == hi:
            return 0, 0, 0, 0.0, 0.0, 0.0
        if self._nan_at >= lo:
            return None
        # `_correction`, inlined: this runs for every series of every rate() window.
        last_break = self._break_at
        vals = self._vals
        if last_break <= lo or (last_break >= hi and self._break_before <= lo):
            correction = 0.0
        elif self._break_before <= lo:
            correction = 0.0 + vals[last_break - 1]
        else:
            return None
        return hi - lo, tss[lo], tss[hi - 1], vals[lo], vals[hi - 1], correction

    def _correction(self, lo: int, hi: int) -> float | None:
        """The counter correction of buffer window [lo, hi) holding no NaN, if known."""
        # No NaN in the window, so every break inside it is a real drop.
        last_break = self._break_at
        if last_break <= lo or (last_break >= hi and self._break_before <= lo):
            return 0.0
        if self._break_before <= lo:
            # Exactly one drop in the window, at `last_break`: 0.0 + the value before it.
            return 0.0 + self._vals[last_break - 1]
        return None

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
        # Series budgets (`limit_source`): source -> limit, source -> series it holds in
        # creation order, series -> the limited source holding it; and the counts.
        self._limits: dict[str, int] = {}
        self._held: dict[str, dict[Labels, None]] = {}
        self._holder: dict[Labels, str] = {}
        self.series_evicted: dict[str, int] = {}
        self.series_refused: dict[str, int] = {}
        self._limit_logged: dict[str, float] = {}
        self._meta: dict[str, MetricMeta] = {}
        self.out_of_order_total = 0
        # Cache invalidation. `_generation` counts series created or removed (selections
        # change only then: appends never do); `_name_generation` holds, per metric name,
        # the `_generation` of its last such change. `_version` counts writes; `_name_version`
        # holds, per metric name, the `_version` of its last write. A writer updates
        # `_name_version` during its write and `_version` last, so a reader that took
        # `_version` before reading data sees any later (or concurrent) write as a change.
        self._generation = 0
        self._name_generation: dict[str, int] = {}
        self._version = 0
        self._name_version: dict[str, int] = {}
        # What a name forgotten after its last series went away reads as (see _remove).
        self._forgotten_version = 0
        self._forgotten_generation = 0
        # matchers -> (generation when selected, the name they select by or None, series)
        self._select_cache: dict[tuple[LabelMatcher, ...], tuple[int, str | None, tuple[Series, ...]]] = {}

    # -- writing -----------------------------------------------------------------

    def appender(self, source: str, timestamp_ms: int | None = None) -> Appender:
        """Start one pass of `source`; series it does not report again go stale."""
        return Appender(self, source, now_ms() if timestamp_ms is None else timestamp_ms)

    def limit_source(self, source: str, max_series: int | None) -> None:
        """Let `source` hold at most `max_series` series (None: no limit); see the module docstring."""
        with self._lock:
            if max_series is None:
                self._limits.pop(source, None)
                return
            self._limits[source] = max_series
            self._held.setdefault(source, {})
            self.series_evicted.setdefault(source, 0)
            self.series_refused.setdefault(source, 0)

    def append(self, labels: Labels, timestamp_ms: int, value: float, *, owner: str | None = None) -> bool:
        """Append one sample outside any source's staleness tracking.

        `owner` names a limited source whose budget a new series counts against (a
        refused series returns False).
        """
        with self._lock:
            if owner is not None and labels not in self._series and not self._room_for(owner, ()):
                return False
            series = self._get_or_create(labels, owner)
            written = series.append(timestamp_ms, float(value))
            if written:
                self._touch(series.name)
            return written

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
            self._touch(series.name)
            return base + by

    def mark_stale(self, labels: Labels, timestamp_ms: int) -> None:
        """Write a staleness marker now (a series that ended, e.g. a removed worker)."""
        with self._lock:
            series = self._series.get(labels)
            if series is not None and not _ends_stale(series) and series.append(timestamp_ms, STALE_NAN):
                self._touch(series.name)

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

    def _get_or_create(self, labels: Labels, owner: str | None = None) -> Series:
        series = self._series.get(labels)
        if series is None:
            series = Series(labels)
            self._series[labels] = series
            self._by_name.setdefault(series.name, set()).add(labels)
            if owner is not None and owner in self._limits:
                self._held[owner][labels] = None
                self._holder[labels] = owner
            # A new series is empty, so no query result changes until its first sample,
            # whose write bumps the data versions; only selections change now.
            self._new_generation(series.name)
        return series

    def _new_generation(self, name: str) -> None:
        """Record that series of `name` were created or removed (call with the lock held)."""
        generation = self._generation + 1
        self._name_generation[name] = generation
        self._generation = generation

    def _touch(self, name: str) -> None:
        """Record a write to series of `name` (call with the lock held, after the write)."""
        version = self._version + 1
        self._name_version[name] = version
        self._version = version

    def _room_for(self, source: str, keep: Mapping[Labels, float] | tuple[()]) -> bool:
        """Whether `source` may create one more series, evicting one it no longer reports if needed.

        Call with the lock held. `keep` is the pass being committed: its series stay.
        """
        limit = self._limits.get(source)
        if limit is None:
            return True
        held = self._held[source]
        if len(held) < limit:
            return True
        current = keep if keep else self._owned.get(source, set())
        for _ in range(len(held)):
            labels = next(iter(held))
            if labels in current:
                # Live: to the back of the queue, so the next search does not look at it again.
                del held[labels]
                held[labels] = None
                continue
            version = self._version + 1
            self._remove(labels, version)
            self._version = version
            self.series_evicted[source] += 1
            self._log_limit(source, limit)
            return True
        self.series_refused[source] += 1
        self._log_limit(source, limit)
        return False

    def _log_limit(self, source: str, limit: int) -> None:
        # Churn runs at thousands of series a second: one line a minute per source.
        now = time.monotonic()
        if now - self._limit_logged.get(source, -_LIMIT_LOG_EVERY_S) >= _LIMIT_LOG_EVERY_S:
            self._limit_logged[source] = now
            log.warning(
                "%s holds %d series, its limit: %d ended series removed early, %d new ones refused so far "
                "(sentinel_store_series_evicted_total, sentinel_store_series_refused_total)",
                source,
                limit,
                self.series_evicted[source],
                self.series_refused[source],
            )

    def _commit(self, source: str, ts: int, samples: Mapping[Labels, float]) -> int:
        with self._lock:
            written = 0
            limited = source in self._limits
            refused = False
            # One version for the whole pass, published after its last write (see __init__).
            version = self._version + 1
            name_version = self._name_version
            for labels, value in samples.items():
                series = self._series.get(labels)
                if series is None:
                    if limited and not self._room_for(source, samples):
                        refused = True
                        continue
                    version = max(version, self._version + 1)  # an eviction may have used one
                    series = self._get_or_create(labels, source if limited else None)
                if series.append(ts, value):
                    written += 1
                    name_version[series.name] = version
                else:
                    self.out_of_order_total += 1
            if written:
                self._version = version
            previous = self._owned.get(source, set())
            # A refused series never became one, so it has nothing to go stale. (Evictions
            # spare this pass's series, so without a refusal every one of them exists.)
            current = {labels for labels in samples if labels in self._series} if refused else set(samples)
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
            version = self._version + 1
            trimmed = False
            for labels in list(self._series):
                series = self._series[labels]
                before = len(series)
                series.trim_before(cutoff)
                if len(series) != before:
                    self._name_version[series.name] = version
                    trimmed = True
                if len(series) == 0:
                    self._remove(labels, version)
                    removed += 1
            if trimmed:
                self._version = version
        return removed

    def _remove(self, labels: Labels, version: int) -> None:
        """Delete a series (call with the lock held; `version` is the write version to publish).

        A name left without series is forgotten from the per-name indexes: readers then
        see it at the versions of its removal, so a cached result that used it is redone.
        """
        series = self._series.pop(labels)
        owner = self._holder.pop(labels, None)
        if owner is not None:
            self._held[owner].pop(labels, None)
        name = series.name
        self._new_generation(name)
        names = self._by_name.get(name)
        if names is not None:
            names.discard(labels)
            if names:
                self._name_version[name] = version  # results over the name lost a series
            else:
                del self._by_name[name]
                self._forgotten_generation = self._name_generation.pop(name)
                self._name_version.pop(name, None)
                self._forgotten_version = max(self._forgotten_version, version)

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._series)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def get(self, labels: Labels) -> Series | None:
        return self._series.get(labels)

    def select(self, matchers: Sequence[LabelMatcher]) -> list[Series]:
        """Series whose labels satisfy every matcher (a missing label reads as "")."""
        return list(self.select_cached(matchers))

    def select_cached(self, matchers: Sequence[LabelMatcher]) -> tuple[Series, ...]:
        """`select` as a shared, immutable tuple.

        Cached until a series of the selected name is created or removed (for matchers
        without a `__name__` equality: until any series is).
        """
        key = tuple(matchers)
        hit = self._select_cache.get(key)
        if hit is not None:
            generation, name, found = hit
            if name is None:
                if self._generation == generation:
                    return found
            elif self._name_generation.get(name, self._forgotten_generation) <= generation:
                return found
        with self._lock:
            name_eq = next((m for m in key if m.name == "__name__" and m.op is MatchOp.EQ), None)
            found = tuple(self._select(key, name_eq))
            if len(self._select_cache) >= _SELECT_CACHE_LIMIT:
                self._select_cache.clear()
            self._select_cache[key] = (self._generation, None if name_eq is None else name_eq.value, found)
            return found

    def _select(self, matchers: tuple[LabelMatcher, ...], name_eq: LabelMatcher | None) -> Iterable[Series]:
        candidates: Iterable[Labels]
        candidates = self._by_name.get(name_eq.value, ()) if name_eq is not None else self._series
        # The name index already decided the name matcher; check only the others.
        rest = [m for m in matchers if m is not name_eq]
        series = self._series
        if not rest:
            return [series[labels] for labels in candidates]
        out = []
        for labels in candidates:
            as_dict = dict(labels)
            if all(m.matches(as_dict.get(m.name, "")) for m in rest):
                out.append(series[labels])
        return out

    @property
    def version(self) -> int:
        """Counts writes; take it before reading data, then ask `changed_since`."""
        return self._version

    def changed_since(self, version: int, names: Iterable[str] | None) -> bool:
        """Whether series named in `names` (None: any series) may have changed since `version`.

        Covers samples appended or trimmed and series created or removed; `version`
        must have been read (`self.version`) before the data it guards.
        """
        if names is None:
            return self._version != version
        name_version = self._name_version
        forgotten = self._forgotten_version
        return any(name_version.get(name, forgotten) > version for name in names)

    def instant(self, matchers: Sequence[LabelMatcher], t_ms: int, lookback_ms: int | None = None) -> list[Sample]:
        """Instant-vector lookup: each series' newest non-stale sample within lookback."""
        lb = self.lookback_ms if lookback_ms is None else lookback_ms
        out = []
        for series in self.select(matchers):
            hit = series.latest_at(t_ms, lb)
            if hit is not None:
                out.append(Sample(series.labels, hit[0], hit[1]))
        return out

    def range(
        self, matchers: Sequence[LabelMatcher], start_ms: int, end_ms: int
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


_SELECT_CACHE_LIMIT = 4096
_LIMIT_LOG_EVERY_S = 60.0


def _ends_stale(series: Series) -> bool:
    last = series.last_value
    return last is not None and is_stale_marker(last)
