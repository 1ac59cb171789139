"""The log collector: worker logs and the kernel log, matched against the catalogue.

Reader threads (one file tailer for all globs, one per journal unit, one for the
kernel log) read, check and match; a batch of matches hops onto the event loop with
`call_soon_threadsafe`. There, each match bumps `sentinel_log_events_total` in the
store first and is then published on the bus, so a rule re-evaluated on the event
already sees the new count; the whole path from a written line to the event takes a
few milliseconds with inotify.

`collect()` runs once a second: it re-writes every event counter (so none drops out
of an instant query's lookback while nothing happens) and the reader statistics.
Counters continue from the store's values when the collector is rebuilt by a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sentinel.collectors.base import CollectorUnavailable
from sentinel.config.models import LogCollectorConfig, WorkerConfig
from sentinel.logs.journal import JournalReader
from sentinel.logs.kernel import KernelReader, KernelSourceSpec
from sentinel.logs.matcher import Match, Matcher
from sentinel.logs.offsets import OffsetStore
from sentinel.logs.patterns import Catalogue
from sentinel.logs.pipeline import ReaderThread, SourcePipeline, SourceStats
from sentinel.logs.tail import FileSource, FileTailer
from sentinel.store import Appender, Store, is_stale_marker, labels_from, now_ms
from sentinel.store.events import Event, EventBus

__all__ = ["OFFSETS_FILE", "LogCollector"]

log = logging.getLogger(__name__)

OFFSETS_FILE = "log_offsets.json"
MAX_MESSAGE_CHARS = 2000  # an event's message: enough for any real fault line, bounded for notifications
KERNEL_SOURCE = "kernel"

EVENTS_TOTAL = "sentinel_log_events_total"
LINES_TOTAL = "sentinel_log_lines_total"
TRUNCATED_TOTAL = "sentinel_log_lines_truncated_total"
INVALID_TOTAL = "sentinel_log_lines_invalid_total"
READ_ERRORS_TOTAL = "sentinel_log_read_errors_total"
FILES_WATCHED = "sentinel_log_files_watched"
RATE_LIMITED_TOTAL = "sentinel_log_events_rate_limited_total"
BALANCEDNESS = "sentinel_moe_balancedness"

_META = {
    EVENTS_TOTAL: ("counter", "Log lines that matched a catalogue pattern, by worker, source and event id."),
    LINES_TOTAL: ("counter", "Log lines read, by source."),
    TRUNCATED_TOTAL: ("counter", "Log lines longer than max_line_bytes, cut to that length."),
    INVALID_TOTAL: ("counter", "Log lines with bytes that are not UTF-8 text (replaced) or NUL bytes."),
    READ_ERRORS_TOTAL: ("counter", "Failures to read a log source (counted when a failure starts or changes)."),
    FILES_WATCHED: ("gauge", "Log files open: current ones and rotated ones still being read."),
    RATE_LIMITED_TOTAL: ("counter", "Matched lines counted but not published as events (flood protection)."),
    BALANCEDNESS: ("gauge", "MoE expert load balancedness (mean/max tokens per GPU; 1.0 is perfect)."),
}

EventKey = tuple[str, str, str]  # worker, source, event


@dataclass
class _Window:
    start_ms: int
    count: int = 0


class LogCollector:
    """Follows every worker's log sources (and optionally the kernel log); see the module doc."""

    name = "logs"

    def __init__(
        self,
        config: LogCollectorConfig,
        workers: Sequence[WorkerConfig],
        store: Store,
        bus: EventBus,
        state_dir: Path,
        *,
        kernel: bool | KernelSourceSpec = False,
        journalctl: str = "journalctl",
        inotify: bool = True,
        read_existing: bool = False,
        catalogue: Catalogue | None = None,
        max_events_per_s: int = 50,
        rotate_grace_s: float = 5.0,
        interval_s: float = 1.0,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = max(2.0, interval_s)
        self._config = config
        self._store = store
        self._bus = bus
        self._offsets_path = Path(state_dir) / OFFSETS_FILE
        self._journalctl = journalctl
        self._inotify = inotify
        self._read_existing = read_existing
        self._max_events_per_s = max_events_per_s
        self._rotate_grace_s = rotate_grace_s
        self.catalogue = catalogue if catalogue is not None else Catalogue.load(config.patterns)
        self._matcher = Matcher(self.catalogue)
        self._pipelines: list[SourcePipeline] = []
        self._file_sources: list[FileSource] = []
        self._journal_specs: list[tuple[str, str, SourcePipeline]] = []  # unit, source id, pipeline
        for worker in workers:
            for src in worker.logs:
                if src.path is not None:
                    pipeline = self._pipeline(worker.name, src.path)
                    self._file_sources.append(FileSource(f"file:{worker.name}:{src.path}", src.path, pipeline))
                elif src.journal_unit is not None:
                    pipeline = self._pipeline(worker.name, f"journal:{src.journal_unit}")
                    self._journal_specs.append(
                        (src.journal_unit, f"journal:{worker.name}:{src.journal_unit}", pipeline)
                    )
        spec = KernelSourceSpec() if kernel is True else kernel or None
        self._kernel_spec: KernelSourceSpec | None = spec
        self._kernel_pipeline = self._pipeline("", KERNEL_SOURCE) if spec is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._offsets: OffsetStore | None = None
        self._tailer: FileTailer | None = None
        self._readers: list[ReaderThread] = []
        self._counts: dict[EventKey, float] = {}
        self._windows: dict[EventKey, _Window] = {}
        self._rate_limited: dict[EventKey, int] = {}
        self._latest: dict[tuple[str, str], dict[str, object]] = {}
        for name, (kind, text) in _META.items():
            store.set_meta(name, kind, text)

    def _pipeline(self, worker: str, source: str) -> SourcePipeline:
        pipeline = SourcePipeline(worker, source, self._matcher, self._handoff)
        self._pipelines.append(pipeline)
        return pipeline

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load offsets and start the reader threads (idempotent)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._offsets = offsets = await asyncio.to_thread(OffsetStore.load, self._offsets_path)
        self._seed_counts()
        cfg = self._config
        readers: list[ReaderThread] = []
        if self._file_sources:
            self._tailer = FileTailer(
                self._file_sources,
                offsets,
                max_line_bytes=cfg.max_line_bytes,
                poll_interval_s=cfg.poll_interval,
                rescan_interval_s=cfg.rescan_interval,
                use_inotify=self._inotify,
                read_existing=self._read_existing,
                rotate_grace_s=self._rotate_grace_s,
            )
            readers.append(self._tailer)
        for unit, source_id, pipeline in self._journal_specs:
            readers.append(
                JournalReader(
                    unit, source_id, pipeline, offsets, max_line_bytes=cfg.max_line_bytes, journalctl=self._journalctl
                )
            )
        if self._kernel_spec is not None and self._kernel_pipeline is not None:
            readers.append(KernelReader(self._kernel_spec, self._kernel_pipeline, max_line_bytes=cfg.max_line_bytes))
        self._readers = readers
        for reader in readers:
            reader.start()
        log.info(
            "logs: following %d file glob(s), %d journal unit(s)%s; %d patterns",
            len(self._file_sources),
            len(self._journal_specs),
            ", the kernel log" if self._kernel_spec is not None else "",
            len(self.catalogue.patterns),
        )

    async def close(self) -> None:
        """Stop the readers; offsets are saved on the way out."""
        readers, self._readers = self._readers, []
        if readers:
            await asyncio.to_thread(_stop_all, readers, 0.6)
        if self._offsets is not None:
            await asyncio.to_thread(self._offsets.persist)
        self._tailer = None
        self._loop = None  # a later start() begins afresh from the saved offsets

    # -- one pass ------------------------------------------------------------------------

    async def collect(self, out: Appender) -> None:
        """Reader statistics into `out`; every event counter re-written to the store."""
        for reader in self._readers:
            if reader.error is not None:
                raise CollectorUnavailable(f"{reader.thread_name} failed: {reader.error!r}")
            if not reader.alive and not reader.stopping:
                raise CollectorUnavailable(f"{reader.thread_name} is not running")
        by_source: dict[str, SourceStats] = {}
        for pipeline in self._pipelines:
            total = by_source.setdefault(pipeline.source, SourceStats())
            st = pipeline.stats
            total.lines += st.lines
            total.cut += st.cut
            total.invalid += st.invalid
            total.read_errors += st.read_errors
        for source, st in by_source.items():
            out.add(LINES_TOTAL, st.lines, source=source)
            out.add(TRUNCATED_TOTAL, st.cut, source=source)
            out.add(INVALID_TOTAL, st.invalid, source=source)
            out.add(READ_ERRORS_TOTAL, st.read_errors, source=source)
        out.add(FILES_WATCHED, self._tailer.files_watched if self._tailer is not None else 0)
        for (worker, source, event), n in self._rate_limited.items():
            out.add(RATE_LIMITED_TOTAL, n, worker=worker, source=source, event=event)
        ts = now_ms()
        for key, count in self._counts.items():
            self._store.add(EVENTS_TOTAL, count, _event_labels(key), ts)

    # -- views -----------------------------------------------------------------------------

    def latest_lines(self) -> list[dict[str, object]]:
        """The newest raw line of each (worker, event), for the API and notifications."""
        return [dict(v) for _, v in sorted(self._latest.items())]

    @property
    def inotify_active(self) -> bool:
        """True when the file tailer is woken by inotify (False: polling)."""
        return self._tailer is not None and self._tailer.inotify_active

    # -- from the reader threads to the loop ---------------------------------------------

    def _handoff(self, pipeline: SourcePipeline, matches: list[Match], ts: int) -> None:
        """Runs in a reader thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(self._deliver, pipeline, matches, ts)

    def _deliver(self, pipeline: SourcePipeline, matches: list[Match], ts: int) -> None:
        """Runs on the loop: count in the store first, then publish."""
        worker, source = pipeline.worker, pipeline.source
        write_ts = now_ms()
        touched: set[EventKey] = set()
        balancedness: float | None = None
        for m in matches:
            key = (worker, source, m.event)
            self._counts[key] = self._counts.get(key, 0.0) + 1
            touched.add(key)
            if m.event == "expert_balancedness" and m.value is not None:
                balancedness = m.value
        for key in touched:
            self._store.add(EVENTS_TOTAL, self._counts[key], _event_labels(key), write_ts)
        if balancedness is not None:
            # `origin` keeps this apart from the same worker's metrics- or probe-fed series.
            self._store.add(BALANCEDNESS, balancedness, {"worker": worker, "origin": "log"}, write_ts)
        for m in matches:
            key = (worker, source, m.event)
            labels = {**m.labels, "worker": worker, "source": source}
            message = m.line if len(m.line) <= MAX_MESSAGE_CHARS else m.line[:MAX_MESSAGE_CHARS] + "…"
            self._latest[(worker, m.event)] = {
                "worker": worker,
                "source": source,
                "event": m.event,
                "labels": labels,
                "value": m.value,
                "line": message,
                "timestamp_ms": ts,
            }
            if not self._admit(key, write_ts):
                self._rate_limited[key] = self._rate_limited.get(key, 0) + 1
                continue
            metrics = (EVENTS_TOTAL, BALANCEDNESS) if m.event == "expert_balancedness" else (EVENTS_TOTAL,)
            self._bus.publish(
                Event(
                    kind=m.event,
                    source="log",
                    labels=labels,
                    value=m.value,
                    message=message,
                    timestamp_ms=ts,
                    metrics=metrics,
                )
            )

    def _admit(self, key: EventKey, ts: int) -> bool:
        """At most `max_events_per_s` events per (worker, source, event) each second."""
        window = self._windows.get(key)
        if window is None or ts - window.start_ms >= 1000:
            window = self._windows[key] = _Window(ts)
        window.count += 1
        return window.count <= self._max_events_per_s

    def _seed_counts(self) -> None:
        """Zero every known counter, or continue from the store (a reload rebuilt us)."""
        sources = [(p.worker, p.source) for p in self._pipelines]
        for worker, source in sources:
            for event in self.catalogue.event_ids:
                key = (worker, source, event)
                series = self._store.get(labels_from(EVENTS_TOTAL, _event_labels(key)))
                last = series.last_value if series is not None else None
                self._counts[key] = last if last is not None and not is_stale_marker(last) and last == last else 0.0


def _event_labels(key: EventKey) -> dict[str, str]:
    worker, source, event = key
    return {"worker": worker, "source": source, "event": event}


def _stop_all(readers: Sequence[ReaderThread], timeout: float) -> None:
    """Signal every reader first, then join them, so they wind down in parallel."""
    for reader in readers:
        reader.signal_stop()
    deadline = time.monotonic() + timeout
    for reader in readers:
        reader.stop(max(0.05, deadline - time.monotonic()))
