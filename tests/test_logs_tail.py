"""File tailing on real files: rotation, truncation, recreation, new files, restarts, bad paths."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sentinel.logs.offsets import OffsetStore
from sentinel.logs.tail import FileSource, FileTailer

WAIT_S = 5.0  # generous: other test suites share the two cores


class RecordingSink:
    """A LineSink that keeps every line and problem, and lets a test wait for them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cut = 0
        self.problems: list[tuple[str, str | None]] = []
        self._state: dict[str, str | None] = {}
        self._cond = threading.Condition()

    def feed(self, data: bytes, cut: int = 0) -> None:
        with self._cond:
            self.lines.extend(data.decode("utf-8", "replace").split("\n")[:-1])
            self.cut += cut
            self._cond.notify_all()

    def problem(self, key: str, message: str | None) -> None:
        # Like SourcePipeline: what counts is a change of state (readers retry, and report each try).
        with self._cond:
            if self._state.get(key) != message:
                self._state[key] = message
                self.problems.append((key, message))
                self._cond.notify_all()

    def wait_lines(self, n: int, timeout: float = WAIT_S) -> list[str]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.lines) >= n, timeout)
            return list(self.lines)

    def wait_problem(self, timeout: float = WAIT_S) -> list[tuple[str, str | None]]:
        with self._cond:
            self._cond.wait_for(lambda: any(m for _, m in self.problems), timeout)
            return list(self.problems)


@contextmanager
def tailing(
    pattern: Path | str,
    state: Path,
    sink: RecordingSink,
    *,
    inotify: bool = True,
    max_line_bytes: int = 1024 * 1024,
    read_existing: bool = False,
    source_id: str = "file:w:logs",
) -> Iterator[FileTailer]:
    tailer = FileTailer(
        [FileSource(source_id, str(pattern), sink)],
        OffsetStore.load(state / "log_offsets.json"),
        max_line_bytes=max_line_bytes,
        poll_interval_s=0.05,
        rescan_interval_s=0.2,
        use_inotify=inotify,
        read_existing=read_existing,
        rotate_grace_s=0.5,
    )
    tailer.start()
    try:
        _settle(tailer)
        yield tailer
    finally:
        tailer.stop(2.0)
    assert tailer.error is None


def _settle(tailer: FileTailer) -> None:
    """Let the thread finish its initial scan (it opens the files that exist now)."""
    time.sleep(0.15)


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def numbered(a: int, b: int) -> str:
    return "".join(f"line {i}\n" for i in range(a, b))


def expect(a: int, b: int) -> list[str]:
    return [f"line {i}" for i in range(a, b)]


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


def test_first_start_begins_at_the_end_of_existing_files(logdir: Path, tmp_path: Path) -> None:
    (logdir / "a.log").write_text(numbered(0, 5))
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(logdir / "a.log", numbered(5, 8))
        assert sink.wait_lines(3) == expect(5, 8)


def test_read_existing_reads_files_from_their_start(logdir: Path, tmp_path: Path) -> None:
    (logdir / "a.log").write_text(numbered(0, 5))
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink, read_existing=True):
        assert sink.wait_lines(5) == expect(0, 5)


def test_partial_last_line_waits_for_its_newline(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "a.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, "half a li")
        time.sleep(0.3)
        assert sink.lines == []
        append(log, "ne\n")
        assert sink.wait_lines(1) == ["half a line"]


def test_over_long_line_is_cut_and_counted(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "a.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink, max_line_bytes=64):
        append(log, "x" * 1000 + "\nshort\n")
        assert sink.wait_lines(2) == ["x" * 64, "short"]
        assert sink.cut == 1


def test_rotation_by_rename_reads_old_file_to_its_end_then_the_new_one(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink) as tailer:
        with open(log, "a") as writer:
            writer.write(numbered(0, 3))
            writer.flush()
            assert sink.wait_lines(3) == expect(0, 3)
            os.rename(log, logdir / "app.log.1")
            writer.write(numbered(3, 6))  # the writer has not reopened yet
            writer.flush()
        log.write_text(numbered(6, 9))
        assert sink.wait_lines(9) == expect(0, 9)
        assert tailer.files_watched == 2  # the rotated file is kept open for its grace period
        time.sleep(1.0)
        assert tailer.files_watched == 1


def test_truncated_file_is_read_again_from_its_start(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, "first line is long\nsecond line is long\n")
        assert sink.wait_lines(2)
        os.truncate(log, 0)  # copytruncate
        append(log, "third\n")
        assert sink.wait_lines(3) == ["first line is long", "second line is long", "third"]


def test_deleted_and_recreated_file_is_followed(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, numbered(0, 2))
        assert sink.wait_lines(2)
        log.unlink()
        log.write_text(numbered(2, 4))
        append(log, numbered(4, 5))
        assert sink.wait_lines(5) == expect(0, 5)


def test_new_file_matching_the_glob_is_picked_up_from_its_start(logdir: Path, tmp_path: Path) -> None:
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink) as tailer:
        assert tailer.files_watched == 0
        (logdir / "worker-2.log").write_text(numbered(0, 3))
        (logdir / "ignored.txt").write_text("not matched\n")
        assert sink.wait_lines(3) == expect(0, 3)
        time.sleep(0.3)
        assert sink.lines == expect(0, 3)
        assert tailer.files_watched == 1


def test_directory_created_after_start_is_found(tmp_path: Path) -> None:
    sink = RecordingSink()
    with tailing(tmp_path / "later" / "*.log", tmp_path, sink):
        (tmp_path / "later").mkdir()
        (tmp_path / "later" / "a.log").write_text(numbered(0, 2))
        assert sink.wait_lines(2) == expect(0, 2)


def test_file_renamed_to_another_matching_name_is_not_read_twice(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "app.log*", tmp_path, sink):
        append(log, numbered(0, 3))
        assert sink.wait_lines(3)
        os.rename(log, logdir / "app.log.1")
        log.write_text(numbered(3, 5))
        assert sink.wait_lines(5) == expect(0, 5)
        time.sleep(1.0)  # past the rotation grace: the renamed file must stay followed, not re-read
        append(logdir / "app.log.1", numbered(5, 6))
        assert sink.wait_lines(6) == expect(0, 6)
        time.sleep(0.3)
        assert sink.lines == expect(0, 6)


def test_restart_resumes_from_saved_offsets_without_duplicates_or_gaps(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, numbered(0, 50))
        assert sink.wait_lines(50)
    append(log, numbered(50, 80))  # written while stopped
    append(log, "partial")  # a partial line at stop time is read once complete
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, " done\n")
        lines = sink.wait_lines(81)
    assert lines == [*expect(0, 80), "partial done"]


def test_file_rotated_away_while_stopped_is_read_to_its_end_before_the_new_one(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        append(log, numbered(0, 10))
        assert sink.wait_lines(10)
    append(log, numbered(10, 20))
    os.rename(log, logdir / "app.log.1")
    log.write_text(numbered(20, 30))
    with tailing(logdir / "*.log", tmp_path, sink):
        assert sink.wait_lines(30) == expect(0, 30)


def test_new_file_created_while_stopped_is_read_from_its_start(logdir: Path, tmp_path: Path) -> None:
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        pass
    (logdir / "new.log").write_text(numbered(0, 4))
    with tailing(logdir / "*.log", tmp_path, sink):
        assert sink.wait_lines(4) == expect(0, 4)


def test_polling_fallback_follows_writes_and_rotation_without_inotify(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink, inotify=False) as tailer:
        assert not tailer.inotify_active
        append(log, numbered(0, 3))
        assert sink.wait_lines(3) == expect(0, 3)
        os.rename(log, logdir / "app.log.old")
        log.write_text(numbered(3, 5))
        assert sink.wait_lines(5) == expect(0, 5)


def test_log_path_that_becomes_a_directory_is_reported_once_and_reading_goes_on(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("")
    other = logdir / "other.log"
    other.write_text("")
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink) as tailer:
        append(log, "before\n")
        assert sink.wait_lines(1)
        log.unlink()
        log.mkdir()
        problems = sink.wait_problem()
        assert any("is a directory" in (m or "") for _, m in problems)
        time.sleep(0.5)  # several rescans: still reported once
        assert sum(1 for _, m in sink.problems if m and "is a directory" in m) == 1
        append(other, "after\n")
        assert sink.wait_lines(2) == ["before", "after"]
        assert tailer.alive


def test_unreadable_file_is_reported_once_and_read_once_permission_returns(
    logdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root in CI, where chmod 000 does not deny reading: deny it at open() instead.
    log = logdir / "app.log"
    denied = threading.Event()
    denied.set()
    real_open = os.open

    def guarded_open(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if denied.is_set() and os.fspath(path) == str(log):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        log.write_text(numbered(0, 2))
        problems = sink.wait_problem()
        assert problems[0] == (str(log), f"cannot open {log}: Permission denied")
        time.sleep(0.5)
        assert [m for _, m in sink.problems if m] == [f"cannot open {log}: Permission denied"]
        denied.clear()
        assert sink.wait_lines(2) == expect(0, 2)
        assert sink.problems[-1] == (str(log), None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_is_reported(logdir: Path, tmp_path: Path) -> None:
    log = logdir / "app.log"
    log.write_text("x\n")
    log.chmod(0)
    sink = RecordingSink()
    with tailing(logdir / "*.log", tmp_path, sink):
        assert any("Permission denied" in (m or "") for _, m in sink.wait_problem())


@pytest.mark.wallclock
def test_stop_saves_offsets_and_returns_quickly(logdir: Path, tmp_path: Path) -> None:
    (logdir / "a.log").write_text("")
    sink = RecordingSink()
    tailer = FileTailer(
        [FileSource("file:w:logs", str(logdir / "*.log"), sink)],
        OffsetStore.load(tmp_path / "log_offsets.json"),
        max_line_bytes=1024,
    )
    tailer.start()
    time.sleep(0.1)
    append(logdir / "a.log", "one\n")
    sink.wait_lines(1)
    started = time.monotonic()
    tailer.stop(2.0)
    assert time.monotonic() - started < 1.5  # well inside the 2 s it was given
    assert '"offset": 4' in (tmp_path / "log_offsets.json").read_text()
