"""Xid policy, NVRM line parsing, de-duplication and the one kernel log reader (real files, FIFOs, subprocesses)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sentinel.collectors.xid import (
    KernelXid,
    XidDeduplicator,
    kernel_xids,
    normalise_pci_bus_id,
    parse_nvrm_line,
)
from sentinel.collectors.xid_policy import XidPolicy, XidPolicyError
from sentinel.config.models import XidOverride
from sentinel.logs import Catalogue, LogMatcher
from sentinel.logs.kernel import KernelLog, KernelSourceSpec
from sentinel.logs.matcher import Match

XID_79 = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus."
XID_48 = (
    "NVRM: Xid (PCI:0000:3b:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error "
    "(DBE) has been detected on GPU in the framebuffer at partition 2, subpartition 0."
)


class Collected:
    """Thread-safe subscriber of the kernel log that keeps its Xids, with a wait."""

    def __init__(self) -> None:
        self.items: list[KernelXid] = []
        self._cond = threading.Condition()

    def __call__(self, matches: list[Match], _ts: int) -> None:
        with self._cond:
            self.items.extend(kernel_xids(matches))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 3.0) -> list[KernelXid]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)


MATCHER = LogMatcher(Catalogue.load())


@pytest.fixture
def reader_factory() -> Iterator[Callable[..., KernelLog]]:
    """`make(mode, subscriber, kmsg_path=..., journal_argv=...)`: a started-later KernelLog, stopped at the end."""
    made: list[KernelLog] = []

    def make(
        mode: str,
        subscriber: Callable[[list[Match], int], None],
        *,
        kmsg_path: Path | None = None,
        journal_argv: list[str] | None = None,
    ) -> KernelLog:
        spec = KernelSourceSpec(path=kmsg_path, argv=tuple(journal_argv) if journal_argv else None, mode=mode)  # type: ignore[arg-type]
        kernel_log = KernelLog(spec, MATCHER)
        kernel_log.subscribe(subscriber)
        made.append(kernel_log)
        return kernel_log

    yield make
    for kernel_log in made:
        while kernel_log.alive:
            kernel_log.stop()


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


# -- policy ------------------------------------------------------------------------


def test_shipped_policy_classifies_the_catalogue() -> None:
    policy = XidPolicy.load()
    assert policy.classify(79).xid_class == "hardware"
    assert policy.classify(79).action == "reboot_host"
    assert policy.classify(13).xid_class == "application"
    assert policy.classify(13).action == "restart_worker"
    assert policy.classify(63).xid_class == "informational"
    assert policy.classify(48).action == "reset_gpu"
    for xid in (13, 31, 43, 45, 48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 140, 154):
        assert xid in policy


def test_unknown_xid_is_classed_unknown() -> None:
    info = XidPolicy.load().classify(4242)
    assert (info.xid_class, info.action) == ("unknown", "none")
    assert "4242" in info.description


def test_overrides_change_one_field_and_can_add_xids() -> None:
    policy = XidPolicy.load(
        {
            13: XidOverride.model_validate({"class": "hardware"}),
            200: XidOverride(action="reset_gpu", description="site-specific"),
        }
    )
    assert policy.classify(13).xid_class == "hardware"
    assert policy.classify(13).action == "restart_worker"  # untouched fields keep the shipped value
    assert policy.classify(200).action == "reset_gpu"
    assert policy.classify(200).xid_class == "unknown"
    assert policy.classify(79).xid_class == "hardware"


def test_broken_policy_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("xids:\n  79: {class: hardwear, action: reboot_host, description: x}\n")
    with pytest.raises(XidPolicyError, match=r"policy.yaml: xids\.79\.class: expected one of"):
        XidPolicy.load(path=path)
    path.write_text("xids:\n  79: {class: hardware, action: reboot_host}\n")
    with pytest.raises(XidPolicyError, match=r"xids\.79\.description"):
        XidPolicy.load(path=path)


# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "xid"),
    [
        (XID_79, 79),
        (XID_48, 48),
        ("3,1234,5678901,-;" + XID_79, 79),  # /dev/kmsg record
        ("[12345.678901] " + XID_79, 79),  # dmesg
        ("kernel: " + XID_79, 79),  # syslog / journal short form
        ("NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.", 79),  # older drivers: no Xid line
    ],
)
def test_nvrm_lines_give_xid_and_normalised_pci(line: str, xid: int) -> None:
    hit = parse_nvrm_line(line)
    assert hit is not None
    assert hit.xid == xid
    assert hit.pci_bus_id == "0000:3b:00.0"


@pytest.mark.parametrize(
    "line",
    [
        "NVRM: GPU at PCI:0000:3b:00: GPU-5e1f0c3a-1111-2222-3333-444455556666",
        "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.127.05",
        "Out of memory: Killed process 4242 (python3) total-vm:1234kB",
        "",
    ],
)
def test_other_kernel_lines_are_not_xids(line: str) -> None:
    assert parse_nvrm_line(line) is None


def test_xid_detail_is_kept() -> None:
    hit = parse_nvrm_line(XID_79)
    assert hit is not None and hit.message.startswith("pid=1234, name=python3")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),  # NVML
        ("PCI:0000:3b:00", "0000:3b:00.0"),  # kernel Xid line
        ("0000:3b:00.0", "0000:3b:00.0"),  # sysfs
        ("3b:00.0", "0000:3b:00.0"),
        ("00010000:18:00.1", "00010000:18:00.1"),  # a domain above 0xffff keeps 8 digits
    ],
)
def test_pci_bus_ids_normalise_to_one_form(raw: str, expected: str) -> None:
    assert normalise_pci_bus_id(raw) == expected


# -- de-duplication ------------------------------------------------------------------


def test_one_xid_from_both_sources_counts_once() -> None:
    now = [100.0]
    dedup = XidDeduplicator(5.0, clock=lambda: now[0])
    assert dedup.admit(("0000:3b:00.0", 79), "nvml")
    now[0] += 1.0
    assert not dedup.admit(("0000:3b:00.0", 79), "kernel")


def test_repeats_from_one_source_all_count() -> None:
    now = [0.0]
    dedup = XidDeduplicator(5.0, clock=lambda: now[0])
    admitted = []
    for _ in range(10):  # an Xid storm: each event is real
        admitted.append(dedup.admit(("gpu5", 13), "nvml"))
        now[0] += 0.5
    assert all(admitted)


def test_storm_from_both_sources_counts_each_event_once() -> None:
    now = [0.0]
    dedup = XidDeduplicator(5.0, clock=lambda: now[0])
    counted = 0
    for _ in range(6):
        counted += dedup.admit("k", "nvml")
        counted += dedup.admit("k", "kernel")
        now[0] += 0.5
    assert counted == 6


def test_same_xid_after_the_window_counts_again() -> None:
    now = [0.0]
    dedup = XidDeduplicator(5.0, clock=lambda: now[0])
    assert dedup.admit("k", "nvml")
    now[0] = 6.0
    assert dedup.admit("k", "kernel")
    assert dedup.admit("other", "kernel")  # different keys never match each other


# -- the reader --------------------------------------------------------------------


def test_kmsg_reader_tails_a_real_file_from_its_end(tmp_path: Path, reader_factory: Callable[..., KernelLog]) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("3,1,100,-;" + XID_48 + "\n")  # history: handled before we started
    got = Collected()
    reader = reader_factory("kmsg", got, kmsg_path=kmsg)
    reader.start()
    time.sleep(0.3)  # let the thread open and seek
    append(
        kmsg,
        "6,2,200,-;usb 1-1: new high-speed USB device\n"
        "3,3,300,-;" + XID_79 + "\n SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n",
    )
    items = got.wait_for(1)
    assert [(i.xid, i.pci_bus_id) for i in items] == [(79, "0000:3b:00.0")]
    assert reader.source == "kmsg"


def test_kmsg_reader_reads_a_fifo(tmp_path: Path, reader_factory: Callable[..., KernelLog]) -> None:
    fifo = tmp_path / "kmsg.fifo"
    os.mkfifo(fifo)
    got = Collected()
    reader_factory("kmsg", got, kmsg_path=fifo).start()
    time.sleep(0.2)
    with fifo.open("w") as writer:
        writer.write("3,7,700,-;" + XID_79 + "\n")
        writer.flush()
        writer.write("3,8,800,-;NVRM: Xid (PCI:0000:18:00): 13, pid=99, name=vllm, Graphics Exception\n")
        writer.flush()
        items = got.wait_for(2)
    assert [(i.xid, i.pci_bus_id) for i in items] == [(79, "0000:3b:00.0"), (13, "0000:18:00.0")]


def test_journal_reader_runs_a_real_subprocess_and_stops_within_a_second(
    reader_factory: Callable[..., KernelLog],
) -> None:
    script = (
        f"import sys, time\nprint({XID_79!r}, flush=True)\nprint('NVRM: something else', flush=True)\ntime.sleep(60)\n"
    )
    got = Collected()
    reader = reader_factory("journal", got, journal_argv=[sys.executable, "-c", script])
    reader.start()
    items = got.wait_for(1, timeout=10)
    assert [i.xid for i in items] == [79]
    assert reader.source == "journal"
    started = time.perf_counter()
    reader.stop(1.0)
    assert time.perf_counter() - started < 1.0
    assert not reader.alive


def test_kmsg_reader_stops_within_a_second(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    kernel_log = KernelLog(KernelSourceSpec(path=kmsg, argv=None, mode="kmsg"), MATCHER)
    kernel_log.start()
    time.sleep(0.1)
    started = time.perf_counter()
    kernel_log.stop(1.0)
    assert time.perf_counter() - started < 1.0
    assert not kernel_log.alive


def test_auto_prefers_kmsg_then_journal(tmp_path: Path, reader_factory: Callable[..., KernelLog]) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    with_kmsg = reader_factory("auto", Collected(), kmsg_path=kmsg, journal_argv=[sys.executable, "-c", "pass"])
    with_kmsg.start()
    no_kmsg = reader_factory(
        "auto",
        Collected(),
        kmsg_path=tmp_path / "missing",
        journal_argv=[sys.executable, "-c", "import time; time.sleep(30)"],
    )
    no_kmsg.start()
    deadline = time.monotonic() + 3
    while (with_kmsg.source is None or no_kmsg.source is None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (with_kmsg.source, no_kmsg.source) == ("kmsg", "journal")


def test_without_any_source_it_reports_once_counts_a_read_error_and_keeps_retrying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sentinel.logs")
    spec = KernelSourceSpec(path=tmp_path / "missing", argv=("/nonexistent/journalctl", "-k"), mode="kmsg")
    kernel_log = KernelLog(spec, MATCHER)
    kernel_log.start()
    try:
        deadline = time.monotonic() + 3
        while kernel_log.source != "off" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kernel_log.source == "off"
        assert kernel_log.alive  # it retries: /dev/kmsg may become readable
        assert kernel_log.pipeline.stats.read_errors == 1
        reports = [r for r in caplog.records if "no kernel log" in r.getMessage()]
        assert len(reports) == 1
    finally:
        kernel_log.stop()


def test_off_mode_starts_no_thread() -> None:
    kernel_log = KernelLog(KernelSourceSpec(mode="off"), MATCHER)
    kernel_log.start()
    assert kernel_log.source == "off"
    assert not kernel_log.alive
    kernel_log.stop()


def test_the_reader_runs_once_for_all_users_and_stops_with_the_last(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    kernel_log = KernelLog(KernelSourceSpec(path=kmsg, argv=None), MATCHER)
    first, second = Collected(), Collected()
    kernel_log.subscribe(first)
    kernel_log.subscribe(second)
    kernel_log.start()
    kernel_log.start()
    reader = kernel_log.reader
    try:
        time.sleep(0.2)
        append(kmsg, XID_79 + "\n")
        assert [i.xid for i in first.wait_for(1)] == [79]
        assert [i.xid for i in second.wait_for(1)] == [79]
        kernel_log.stop()
        assert kernel_log.alive and kernel_log.reader is reader  # one user left
    finally:
        kernel_log.stop()
    assert not kernel_log.alive


def test_a_failing_callback_does_not_stop_the_reader(tmp_path: Path, reader_factory: Callable[..., KernelLog]) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    got = Collected()

    def flaky(matches: list[Match], ts: int) -> None:
        if any(hit.xid == 13 for hit in kernel_xids(matches)):
            raise RuntimeError("subscriber bug")
        got(matches, ts)

    reader_factory("kmsg", flaky, kmsg_path=kmsg).start()
    time.sleep(0.2)
    append(kmsg, "NVRM: Xid (PCI:0000:3b:00): 13, pid=1, name=x, boom\n")  # the subscriber fails on this block
    time.sleep(0.3)
    append(kmsg, XID_79 + "\n")
    assert [i.xid for i in got.wait_for(1)] == [79]
