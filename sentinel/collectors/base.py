"""What a collector is, and the runner that owns one refresh of it.

A collector observes one source and writes one pass of samples into an `Appender`.
The runner (the "update coordinator") bounds each pass by a timeout, catches every
error, keeps the collector's health as data (exported as `sentinel_collector_*`),
logs once when a collector fails and once when it recovers, and commits the pass so
that series the source no longer reports go stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sentinel.runtime.timeouts import wait_for
from sentinel.store import Appender, Store, labels_from, now_ms

__all__ = [
    "Collector",
    "CollectorHealth",
    "CollectorRunner",
    "CollectorUnavailable",
    "declare_collector_metrics",
]

log = logging.getLogger(__name__)


class CollectorUnavailable(Exception):
    """The source cannot be read at all (no driver, no file); the reason is shown as is."""


@runtime_checkable
class Collector(Protocol):
    """Anything with a name, an interval, a timeout and an async `collect`."""

    name: str
    interval_s: float
    timeout_s: float

    async def start(self) -> None:
        """Start background threads or sessions; called once before the first pass."""

    async def collect(self, out: Appender) -> None:
        """Write one pass of samples into `out`; raise when the pass failed."""

    async def close(self) -> None:
        """Release threads, sessions and files."""


@dataclass
class CollectorHealth:
    name: str
    up: bool = False
    last_error: str | None = None
    last_success_ms: int | None = None
    last_duration_s: float = 0.0
    errors_total: int = 0
    missed_ticks_total: int = 0
    ever_ran: bool = field(default=False, repr=False)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "up": self.up,
            "last_error": self.last_error,
            "last_success_ms": self.last_success_ms,
            "last_duration_seconds": round(self.last_duration_s, 6),
            "errors_total": self.errors_total,
            "missed_ticks_total": self.missed_ticks_total,
        }


def declare_collector_metrics(store: Store) -> None:
    store.set_meta("sentinel_collector_up", "gauge", "1 when the collector's last pass succeeded.")
    store.set_meta("sentinel_collector_errors_total", "counter", "Failed collector passes.")
    store.set_meta("sentinel_collector_duration_seconds", "gauge", "Duration of the collector's last pass.")
    store.set_meta(
        "sentinel_collector_missed_ticks_total",
        "counter",
        "Ticks skipped because the previous pass was still running or the loop was late.",
    )
    store.set_meta(
        "sentinel_collector_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the collector's last successful pass.",
    )


class CollectorRunner:
    """Runs one collector pass at a time and records its health in the store."""

    def __init__(self, collector: Collector, store: Store, health: CollectorHealth | None = None) -> None:
        self.collector = collector
        self.store = store
        # A reload hands the previous health over, so counters continue instead of resetting.
        self.health = health if health is not None else CollectorHealth(collector.name)
        self._running = False
        declare_collector_metrics(store)
        # Counters exist from the start, so `rate()` sees the first error.
        self._write_counter("sentinel_collector_errors_total", self.health.errors_total)
        self._write_counter("sentinel_collector_missed_ticks_total", self.health.missed_ticks_total)

    @property
    def name(self) -> str:
        return self.collector.name

    async def tick(self) -> None:
        """One bounded pass; never raises."""
        if self._running:
            # The scheduler never overlaps runs of a job; belt and braces for direct calls.
            self.note_missed_tick()
            return
        self._running = True
        started = time.perf_counter()
        pass_ts = now_ms()
        out = self.store.appender(self.collector.name, pass_ts)
        error: str | None = None
        try:
            await wait_for(self.collector.collect(out), timeout=self.collector.timeout_s)
        except asyncio.TimeoutError:
            error = f"pass took longer than its {self.collector.timeout_s:g}s timeout"
        except CollectorUnavailable as exc:
            error = str(exc)
        except asyncio.CancelledError:
            self._running = False
            raise
        except Exception as exc:  # a collector bug must not kill the loop
            error = f"{type(exc).__name__}: {exc}"
            log.debug("collector %s raised", self.name, exc_info=True)
        finally:
            self._running = False
        duration = time.perf_counter() - started
        if error is None:
            out.commit()
        else:
            # A failed pass reports nothing: its series go stale, like a failed scrape.
            self.store.appender(self.collector.name, pass_ts).commit()
        self._record(error, duration, pass_ts)

    def note_missed_tick(self, count: int = 1) -> None:
        """`count` ticks were skipped (the scheduler's missed-tick callback)."""
        self.health.missed_ticks_total += count
        self._write_counter("sentinel_collector_missed_ticks_total", self.health.missed_ticks_total)

    def _record(self, error: str | None, duration: float, ts: int) -> None:
        h = self.health
        was_up, had_run, old_error = h.up, h.ever_ran, h.last_error
        h.last_duration_s = duration
        h.ever_ran = True
        labels = {"collector": self.name}
        if error is None:
            h.up = True
            h.last_error = None
            h.last_success_ms = ts
            self.store.add("sentinel_collector_last_success_timestamp_seconds", ts / 1000.0, labels, ts)
            if had_run and not was_up:
                log.info("collector %s recovered", self.name)
        else:
            h.up = False
            h.errors_total += 1
            h.last_error = error
            self._write_counter("sentinel_collector_errors_total", h.errors_total, ts)
            # Log on change only: up -> down, first failure, or a different reason.
            if was_up or not had_run or error != old_error:
                log.warning("collector %s failed: %s", self.name, error)
        self.store.add("sentinel_collector_up", 1.0 if h.up else 0.0, labels, ts)
        self.store.add("sentinel_collector_duration_seconds", duration, labels, ts)

    def _write_counter(self, name: str, value: float, ts: int | None = None) -> None:
        self.store.append(labels_from(name, collector=self.name), now_ms() if ts is None else ts, value)

    def retire(self) -> None:
        """Mark this collector's series stale (it was removed by a reload)."""
        ts = now_ms()
        self.store.drop_source(self.name, ts)
        for name in (
            "sentinel_collector_up",
            "sentinel_collector_errors_total",
            "sentinel_collector_duration_seconds",
            "sentinel_collector_missed_ticks_total",
            "sentinel_collector_last_success_timestamp_seconds",
        ):
            self.store.mark_stale(labels_from(name, collector=self.name), ts)
