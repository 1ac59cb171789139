"""The log collector end to end: real files, a fake journalctl, a kmsg FIFO, the store and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sentinel.collectors.base import CollectorRunner
from sentinel.config.models import LogCollectorConfig, LogSource, WorkerConfig
from sentinel.logs import KernelSourceSpec, LogCollector
from sentinel.store import Store, labels_from
from sentinel.store.events import Event, EventBus

WAIT_S = 5.0
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79 GiB"
WARN = "node-01:189884:189884 [3] NCCL WARN Call to ibv_poll_cq() returned -1"
XID = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus."


class Harness:
    """A collector with its store and bus, and the events it published (with arrival times)."""

    def __init__(self, collector: LogCollector, store: Store, bus: EventBus) -> None:
        self.collector = collector
        self.store = store
        self.bus = bus
        self.events: list[tuple[float, Event]] = []
        self.counter_at_publish: list[float | None] = []
        self._arrived = asyncio.Event()
        bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.events.append((time.perf_counter(), event))
        self._arrived.set()
        labels = labels_from(
            "sentinel_log_events_total",
            {"worker": event.labels["worker"], "source": event.labels["source"], "event": event.kind},
        )
        series = self.store.get(labels)
        self.counter_at_publish.append(series.last_value if series else None)

    async def wait_events(self, n: int, timeout: float = WAIT_S) -> list[Event]:
        """The events so far, once there are at least `n` (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.events) < n and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return [e for _, e in self.events]

    def kinds(self) -> list[str]:
        return [e.kind for _, e in self.events]

    def value(self, name: str, **labels: str) -> float | None:
        series = self.store.get(labels_from(name, labels))
        return series.last_value if series is not None else None

    async def collect(self) -> None:
        await CollectorRunner(self.collector, self.store).tick()


@asynccontextmanager
async def running(
    tmp_path: Path,
    workers: list[WorkerConfig],
    *,
    config: LogCollectorConfig | None = None,
    store: Store | None = None,
    **kwargs: object,
) -> AsyncIterator[Harness]:
    store = store or Store()
    bus = EventBus()
    bus.bind_loop(asyncio.get_running_loop())
    collector = LogCollector(
        config or LogCollectorConfig(poll_interval=0.05, rescan_interval=0.2),
        workers,
        store,
        bus,
        tmp_path / "state",
        **kwargs,  # type: ignore[arg-type]
    )
    harness = Harness(collector, store, bus)
    await collector.start()
    await asyncio.sleep(0.15)  # the tailer's initial scan
    try:
        yield harness
    finally:
        await collector.close()


def file_worker(pattern: Path | str, name: str = "w1") -> WorkerConfig:
    return WorkerConfig(name=name, logs=(LogSource(path=str(pattern)),))


async def append(path: Path, text: str) -> None:
    def write() -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    await asyncio.to_thread(write)


async def test_written_line_becomes_an_event_within_100ms_with_inotify(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    async with running(tmp_path, [file_worker(tmp_path / "*.log")]) as h:
        assert h.collector.inotify_active
        latencies = []
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)  # one small write() per line: what a logger does
        try:
            for i in range(20):
                written = time.perf_counter()
                os.write(fd, f"{WARN} #{i}\n".encode())
                await h.wait_events(2 * (i + 1))
                latencies.append(h.events[-1][0] - written)
                await asyncio.sleep(0.01)
        finally:
            os.close(fd)
    latencies.sort()
    p50, p90 = statistics.median(latencies), latencies[int(0.9 * len(latencies)) - 1]
    assert p50 < 0.1, f"median line-to-event latency {p50 * 1000:.1f} ms"
    assert p90 < 0.1, f"p90 line-to-event latency {p90 * 1000:.1f} ms"


async def test_polling_fallback_delivers_events_when_inotify_is_disabled(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    async with running(tmp_path, [file_worker(tmp_path / "*.log")], inotify=False) as h:
        assert not h.collector.inotify_active
        await append(log, OOM + "\n")
        assert [e.kind for e in await h.wait_events(1)] == ["cuda_oom"]


async def test_event_has_labels_value_message_metrics_and_is_counted_before_publication(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    pattern = str(tmp_path / "*.log")
    async with running(tmp_path, [file_worker(pattern)]) as h:
        await append(log, "noise\n" + WARN + "\n")
        events = await h.wait_events(2)
    assert [e.kind for e in events] == ["nccl_warn", "nccl_net_error"]
    warn = events[0]
    assert warn.source == "log"
    assert dict(warn.labels) == {"host": "node-01", "cuda_dev": "3", "worker": "w1", "source": pattern}
    assert warn.message == WARN
    assert warn.metrics == ("sentinel_log_events_total",)
    # The rule engine, reacting to the event, already sees the new count.
    assert h.counter_at_publish == [1.0, 1.0]


async def test_expert_balancedness_sets_the_moe_gauge(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    async with running(tmp_path, [file_worker(tmp_path / "*.log", name="qwen")]) as h:
        await append(log, "INFO EPLB step: avg_tokens=512.00, max_tokens=730, balancedness=0.7014\n")
        [event] = await h.wait_events(1)
        assert event.value == pytest.approx(0.7014)
        assert event.metrics == ("sentinel_log_events_total", "sentinel_moe_balancedness")
        assert h.value("sentinel_moe_balancedness", worker="qwen", origin="log") == pytest.approx(0.7014)


async def test_metrics_count_lines_truncation_files_and_events(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    pattern = str(tmp_path / "*.log")
    config = LogCollectorConfig(poll_interval=0.05, rescan_interval=0.2, max_line_bytes=200)
    async with running(tmp_path, [file_worker(pattern)], config=config) as h:
        await append(log, "a\n" + "y" * 500 + "\n" + OOM + "\n")
        await h.wait_events(1)
        await h.collect()
        assert h.value("sentinel_log_lines_total", source=pattern) == 3
        assert h.value("sentinel_log_lines_truncated_total", source=pattern) == 1
        assert h.value("sentinel_log_read_errors_total", source=pattern) == 0
        assert h.value("sentinel_log_files_watched") == 1
        assert h.value("sentinel_log_events_total", worker="w1", source=pattern, event="cuda_oom") == 1
        # Every known event starts at 0, so rate() sees the first one.
        assert h.value("sentinel_log_events_total", worker="w1", source=pattern, event="xid") == 0
        assert h.value("sentinel_collector_up", collector="logs") == 1
        assert h.store.meta("sentinel_log_events_total") is not None


async def test_latest_line_of_each_worker_and_event_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    async with running(tmp_path, [file_worker(tmp_path / "*.log")]) as h:
        await append(log, OOM + " first\n" + OOM + " second\n")
        await h.wait_events(2)
        [latest] = h.collector.latest_lines()
    assert latest["worker"] == "w1"
    assert latest["event"] == "cuda_oom"
    assert latest["line"] == OOM + " second"


async def test_a_flood_of_matches_is_counted_in_full_but_published_at_a_bounded_rate(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    pattern = str(tmp_path / "*.log")
    async with running(tmp_path, [file_worker(pattern)], max_events_per_s=10) as h:
        await append(log, (OOM + "\n") * 500)
        deadline = time.monotonic() + WAIT_S
        while h.value("sentinel_log_events_total", worker="w1", source=pattern, event="cuda_oom") != 500:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await h.collect()
        published = len(h.events)
        assert 10 <= published < 100
        limited = h.value("sentinel_log_events_rate_limited_total", worker="w1", source=pattern, event="cuda_oom")
        assert limited == 500 - published


async def test_restart_continues_from_offsets_without_duplicate_events(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    workers = [file_worker(tmp_path / "*.log")]
    async with running(tmp_path, workers) as h:
        await append(log, OOM + " 1\n")
        await h.wait_events(1)
    await append(log, OOM + " 2\n")  # while stopped
    async with running(tmp_path, workers, store=h.store) as h2:
        await append(log, OOM + " 3\n")
        events = await h2.wait_events(2)
        await asyncio.sleep(0.2)
        assert [e.message[-1] for e in events] == ["2", "3"]
        # The counter continues from the store instead of restarting at 0 (a reload rebuilds the collector).
        source = str(tmp_path / "*.log")
        assert h2.value("sentinel_log_events_total", worker="w1", source=source, event="cuda_oom") == 3


async def test_bad_sources_are_counted_and_do_not_stall_the_others_or_the_loop(tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    good.write_text("")
    dir_path = tmp_path / "dir.log"
    dir_path.mkdir()
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"")
    workers = [
        file_worker(good, "good"),
        file_worker(dir_path, "dir"),
        file_worker(binary, "blob"),
        file_worker(tmp_path / "missing" / "*.log", "missing"),
    ]
    config = LogCollectorConfig(poll_interval=0.05, rescan_interval=0.2, max_line_bytes=4096)
    async with running(tmp_path, workers, config=config) as h:
        junk = os.urandom(64 * 1024).replace(b"\n", b"") + b"\n\xff\xfeRuntimeError: CUDA error: out of memory\n"
        await asyncio.to_thread(binary.write_bytes, junk)
        ticks = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.3:  # the loop keeps turning while readers deal with bad input
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 10
        await append(good, OOM + "\n")
        events = await h.wait_events(2)
        assert sorted(e.labels["worker"] for e in events) == ["blob", "good"]
        await h.collect()
        assert h.value("sentinel_log_read_errors_total", source=str(dir_path)) == 1
        assert h.value("sentinel_log_lines_invalid_total", source=str(binary)) == 2
        assert h.value("sentinel_log_lines_truncated_total", source=str(binary)) == 1
        assert h.value("sentinel_collector_up", collector="logs") == 1


# -- journal ---------------------------------------------------------------------------

FAKE_JOURNALCTL = """#!{python}
import json, sys, time
args = sys.argv[1:]
with open({argv_log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
after = next((a.split("=", 1)[1] for a in args if a.startswith("--after-cursor=")), None)
entries = json.load(open({entries!r}))
start = 0
if after is not None:
    known = [i for i, e in enumerate(entries) if e["__CURSOR"] == after]
    if not known:
        sys.exit("Failed to seek to cursor: Invalid argument")
    start = known[0] + 1
for e in entries[start:]:
    print(json.dumps(e), flush=True)
time.sleep(60)
"""


def fake_journalctl(tmp_path: Path, entries: list[dict[str, object]]) -> tuple[Path, Path, Callable[[], None]]:
    """A `journalctl` stand-in that prints `entries` as JSON (honouring --after-cursor), then waits."""
    entries_file = tmp_path / "entries.json"
    argv_log = tmp_path / "argv.log"
    script = tmp_path / "journalctl"
    script.write_text(FAKE_JOURNALCTL.format(python=sys.executable, argv_log=str(argv_log), entries=str(entries_file)))
    script.chmod(0o755)

    def save() -> None:
        entries_file.write_text(json.dumps(entries))

    save()
    return script, argv_log, save


async def test_journal_source_follows_a_unit_and_resumes_after_its_cursor(tmp_path: Path) -> None:
    entries: list[dict[str, object]] = [
        {"__CURSOR": "c1", "MESSAGE": "starting"},
        {"__CURSOR": "c2", "MESSAGE": OOM},
        {"__CURSOR": "c3", "MESSAGE": list(b"\xffEngineCore encountered a fatal error.")},
    ]
    script, argv_log, save = fake_journalctl(tmp_path, entries)
    worker = WorkerConfig(name="w1", logs=(LogSource(journal_unit="vllm.service"),))
    async with running(tmp_path, [worker], journalctl=str(script)) as h:
        events = await h.wait_events(2)
        assert [e.kind for e in events] == ["cuda_oom", "engine_dead"]
        assert events[0].labels["source"] == "journal:vllm.service"
        assert events[1].message == "\ufffdEngineCore encountered a fatal error."
        await h.collect()
        assert h.value("sentinel_log_lines_total", source="journal:vllm.service") == 3
    first = json.loads(argv_log.read_text().splitlines()[0])
    assert first[:2] == ["--follow", "--output=json"] and "--unit=vllm.service" in first and "--lines=0" in first
    entries.append({"__CURSOR": "c4", "MESSAGE": "RuntimeError: CUDA error: out of memory"})
    save()
    async with running(tmp_path, [worker], journalctl=str(script)) as h:
        await h.wait_events(1)
        await asyncio.sleep(0.2)
        assert [e.message for _, e in h.events] == ["RuntimeError: CUDA error: out of memory"]
    second = json.loads(argv_log.read_text().splitlines()[1])
    assert "--after-cursor=c3" in second


async def test_journalctl_that_cannot_run_is_reported_and_retried(tmp_path: Path) -> None:
    worker = WorkerConfig(name="w1", logs=(LogSource(journal_unit="vllm.service"),))
    async with running(tmp_path, [worker], journalctl=str(tmp_path / "no-such-journalctl")) as h:
        await asyncio.sleep(0.2)
        await h.collect()
        assert h.value("sentinel_log_read_errors_total", source="journal:vllm.service") == 1
        assert h.value("sentinel_collector_up", collector="logs") == 1


# -- kernel ----------------------------------------------------------------------------


async def test_kernel_xid_records_from_a_kmsg_fifo_become_host_level_xid_events(tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    spec = KernelSourceSpec(path=fifo, argv=None)
    async with running(tmp_path, [], kernel=spec) as h:
        writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)
        try:
            records = (
                b"6,1001,5000000,-;usb 1-1: new high-speed USB device\n"
                + f"3,1002,5000100,-;{XID}\n".encode()
                + b" SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n"
                + b"3,1003,5000200,-;Out of memory: Killed process 4242 (python3) total-vm:8123kB, anon-rss:765kB\n"
            )
            await asyncio.to_thread(os.write, writer, records)
            events = await h.wait_events(3)
        finally:
            os.close(writer)
    assert [e.kind for e in events] == ["xid", "gpu_fallen_off_bus", "host_oom_kill"]
    xid = events[0]
    assert dict(xid.labels) == {"xid": "79", "pci_bus_id": "0000:3b:00.0", "worker": "", "source": "kernel"}
    assert xid.value == 79
    assert xid.message == XID


async def test_kernel_log_falls_back_to_a_command_when_the_path_cannot_be_opened(tmp_path: Path) -> None:
    script = tmp_path / "dmesg-follow"
    script.write_text(f"#!/bin/sh\necho '{XID}'\nexec sleep 60\n")
    script.chmod(0o755)
    spec = KernelSourceSpec(path=tmp_path / "no-kmsg", argv=(str(script),))
    async with running(tmp_path, [], kernel=spec) as h:
        events = await h.wait_events(2)
    assert [e.kind for e in events] == ["xid", "gpu_fallen_off_bus"]
    assert events[0].labels["worker"] == ""


async def test_kernel_log_in_a_regular_file_is_read_as_it_grows(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg.txt"
    kmsg.write_text(f"3,1,1,-;{XID}\n")  # old: not replayed
    async with running(tmp_path, [], kernel=KernelSourceSpec(path=kmsg, argv=None)) as h:
        await append(kmsg, "3,2,2,-;NVRM: Xid (PCI:0000:5e:00): 48, pid=1, name=python3, DBE\n")
        events = await h.wait_events(1)
        await asyncio.sleep(0.2)
    assert [(e.kind, e.labels["xid"]) for e in events] == [("xid", "48")]


async def test_no_kernel_log_at_all_is_reported_and_the_collector_stays_up(tmp_path: Path) -> None:
    spec = KernelSourceSpec(path=tmp_path / "no-kmsg", argv=None)
    async with running(tmp_path, [], kernel=spec) as h:
        await asyncio.sleep(0.1)
        await h.collect()
        await h.collect()
        assert h.value("sentinel_log_read_errors_total", source="kernel") == 1
        assert h.value("sentinel_collector_up", collector="logs") == 1


async def test_journal_cursor_that_journalctl_rejects_is_dropped(tmp_path: Path) -> None:
    entries: list[dict[str, object]] = [{"__CURSOR": "c1", "MESSAGE": "starting"}]
    script, argv_log, save = fake_journalctl(tmp_path, entries)
    worker = WorkerConfig(name="w1", logs=(LogSource(journal_unit="vllm.service"),))
    async with running(tmp_path, [worker], journalctl=str(script)) as h:
        deadline = time.monotonic() + WAIT_S
        while not h.collector._offsets or not h.collector._offsets.cursor("journal:w1:vllm.service"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    entries[:] = [{"__CURSOR": "x9", "MESSAGE": OOM}]  # the journal was vacuumed: c1 is gone
    save()
    async with running(tmp_path, [worker], journalctl=str(script)) as h:
        # First try with --after-cursor=c1 fails; the retry (after about a second) starts from now.
        await h.wait_events(1, timeout=WAIT_S)
        calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
        assert "--after-cursor=c1" in calls[1]
        assert "--lines=0" in calls[2]
        assert [e.kind for _, e in h.events] == ["cuda_oom"]
