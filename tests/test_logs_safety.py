"""Log globs and hostile files (issue 15, C11 and F9): symlinks, /proc, a block that never finishes matching."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from sentinel.logs.offsets import OffsetStore
from sentinel.logs.safepath import check_log_path
from sentinel.logs.tail import FileSource, FileTailer
from tests.test_logs_tail import RecordingSink, append, tailing

OTHER_UID = 4242


def _chown_link(link: Path, uid: int) -> None:
    try:
        os.lchown(link, uid, uid)
    except PermissionError:
        pytest.skip("needs root to give a symlink another owner (CI runs as root)")


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


def test_a_link_made_by_another_user_to_a_file_it_does_not_own_is_refused(logdir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("RuntimeError: CUDA error: out of memory\n")  # would match, if read
    link = logdir / "worker.log"
    link.symlink_to(secret)
    _chown_link(link, OTHER_UID)
    reason = check_log_path(str(link))
    assert reason is not None and f"owned by uid {OTHER_UID}" in reason


def test_a_link_by_root_or_by_the_targets_owner_is_followed(logdir: Path, tmp_path: Path) -> None:
    real = tmp_path / "pods" / "0.log"
    real.parent.mkdir()
    real.write_text("")
    link = logdir / "container.log"  # as the kubelet makes them, as root
    link.symlink_to(real)
    assert check_log_path(str(link)) is None
    if os.geteuid() != 0:
        pytest.skip("needs root to give files another owner (CI runs as root)")
    os.chown(real, OTHER_UID, OTHER_UID)
    _chown_link(link, OTHER_UID)  # the target's owner linked it: grants nothing
    assert check_log_path(str(link)) is None


def test_a_linked_directory_on_the_way_is_judged_too(logdir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    (elsewhere / "shadow.log").write_text("x\n")
    hop = logdir / "sub"
    hop.symlink_to(elsewhere)
    _chown_link(hop, OTHER_UID)
    assert check_log_path(str(hop / "shadow.log")) is not None


@pytest.mark.parametrize("target", ["/proc/self/environ", "/proc/self/status", "/dev/null"])
def test_kernel_pseudo_files_are_never_logs(logdir: Path, target: str) -> None:
    link = logdir / "x.log"
    link.symlink_to(target)
    reason = check_log_path(str(link))
    assert reason is not None and "pseudo-file" in reason


def test_the_tailer_reports_a_refused_link_and_reads_the_other_files(logdir: Path, tmp_path: Path) -> None:
    (logdir / "evil.log").symlink_to("/proc/self/environ")
    good = logdir / "good.log"
    good.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(good, "hello\n")
        assert sink.wait_lines(1) == ["hello"]
        problems = sink.wait_problem()
        time.sleep(0.5)  # several rescans: still reported once, never read
    refused = [m for key, m in problems if key.endswith("evil.log") and m]
    assert len(refused) == 1 and "pseudo-file" in refused[0]
    assert sink.lines == ["hello"]


def test_a_file_that_reports_size_zero_yet_holds_data_is_not_read_in_a_loop(tmp_path: Path) -> None:
    # /proc/self/status read directly (as a configured path): size 0, yet data.
    sink = RecordingSink()
    offsets = OffsetStore.load(tmp_path / "o.json")
    tailer = FileTailer(
        [FileSource("file:w:proc", "/proc/self/status", sink)],
        offsets,
        max_line_bytes=4096,
        poll_interval_s=0.05,
        rescan_interval_s=0.1,
        use_inotify=False,
        read_existing=True,
    )
    tailer.start()
    try:
        problems = sink.wait_problem()
        time.sleep(0.5)
    finally:
        tailer.stop(2.0)
    assert sink.lines == []  # refused by path before a byte was read
    assert [m for _, m in problems if m] and len([m for _, m in problems if m]) == 1


class BlockingSink(RecordingSink):
    """A sink whose matching of one block never ends (as a catastrophic regex once did)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def feed(self, data: bytes, cut: int = 0) -> None:
        if b"POISON" in data:
            self.entered.set()
            self.release.wait(10)
        super().feed(data, cut)


def test_a_block_that_never_finishes_matching_is_behind_the_saved_offset(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "w.log"
    log.write_text("")
    sink = BlockingSink()
    offsets = OffsetStore.load(tmp_path / "log_offsets.json", min_interval_s=0.0)
    tailer = FileTailer(
        [FileSource("file:w:logs", str(logdir / "*.log"), sink)],
        offsets,
        max_line_bytes=4096,
        poll_interval_s=0.05,
        rescan_interval_s=0.2,
        use_inotify=False,
    )
    tailer.start()
    try:
        time.sleep(0.2)
        append(log, "ok\nPOISON line\n")
        assert sink.entered.wait(5)
        offsets.persist()  # what the collector's once-a-second save does meanwhile
        saved = json.loads((tmp_path / "log_offsets.json").read_text())
        [entry] = saved["files"]
        assert entry["offset"] == log.stat().st_size  # past the poison: a restart will not read it again
    finally:
        sink.release.set()
        tailer.stop(2.0)


async def test_a_source_named_twice_is_read_once(tmp_path: Path) -> None:
    import asyncio

    from sentinel.config.models import LogCollectorConfig, LogSource, WorkerConfig
    from sentinel.logs import LogCollector
    from sentinel.store import Store
    from sentinel.store.events import EventBus

    log = tmp_path / "w.log"
    log.write_text("")
    worker = WorkerConfig(name="w", logs=(LogSource(path=str(log)), LogSource(path=str(log))))
    bus, store = EventBus(), Store()
    bus.bind_loop(asyncio.get_running_loop())
    events: list[object] = []
    arrived = asyncio.Event()

    def on_event(event: object) -> None:
        events.append(event)
        arrived.set()

    bus.subscribe(on_event)
    config = LogCollectorConfig(poll_interval=0.05, rescan_interval=0.2)
    collector = LogCollector(config, [worker], store, bus, tmp_path)
    await collector.start()
    try:
        await asyncio.sleep(0.3)
        append(log, "RuntimeError: CUDA error: out of memory\n")
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.sleep(0.3)  # room for a second, wrong, event
    finally:
        await collector.close()
    assert len(events) == 1
