"""Following log files by glob, in one thread, through rotation, truncation and restarts.

The tailer watches the directories of its globs with inotify (a write wakes it at
once) and also polls every `poll_interval_s` as a safety net: inotify misses writes
to a file moved to another directory and does not work on some network file systems;
without inotify the poll alone drives it. A file is known by (device, inode):

- rotation by rename: the old file stays open and is read to its end before the new
  file at the path, then closed once it has been quiet for `rotate_grace_s`;
- delete and recreate: the same, the deleted file is drained through its open fd;
- truncation (copytruncate): a size below the read position restarts at 0;
- a file renamed to another name that the glob also matches is simply followed.

Which files a glob may read is `sentinel.logs.safepath`'s rule: a symlink only where
its owner could read the target anyway, never a kernel pseudo-file (a file that reports
size 0 yet holds data is recognised as one too).

Positions go to the `OffsetStore` as each block is read, before it is matched, so a
block that kills the daemon while being matched is not read again after the restart
(the collector also saves offsets every second from the event loop's side). On start a known file resumes at
its offset; a file of a source watched last time but never seen (created while
Sentinel was down) starts at 0; other existing files start at their end (old history
is not replayed as new events). A file rotated away while Sentinel was down is found
by its inode among its old directory's entries and read to its end first.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import select
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sentinel.logs import inotify as ino
from sentinel.logs.lines import LineSplitter
from sentinel.logs.offsets import FileOffset, OffsetStore
from sentinel.logs.pipeline import LineSink, ReaderThread
from sentinel.logs.safepath import check_log_path

__all__ = ["FileSource", "FileTailer"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
READ_BUDGET = 4 * 1024 * 1024  # per file per wake, so one busy file cannot starve the others
_DIR_MASK = (
    ino.IN_MODIFY
    | ino.IN_ATTRIB
    | ino.IN_CLOSE_WRITE
    | ino.IN_MOVED_FROM
    | ino.IN_MOVED_TO
    | ino.IN_CREATE
    | ino.IN_DELETE
    | ino.IN_DELETE_SELF
    | ino.IN_MOVE_SELF
    | ino.IN_ONLYDIR
)
# Events after which the set of files behind the globs may have changed.
_STRUCTURAL = (
    ino.IN_ATTRIB
    | ino.IN_MOVED_FROM
    | ino.IN_MOVED_TO
    | ino.IN_CREATE
    | ino.IN_DELETE
    | ino.IN_DELETE_SELF
    | ino.IN_MOVE_SELF
    | ino.IN_IGNORED
    | ino.IN_Q_OVERFLOW
)


@dataclass(frozen=True)
class FileSource:
    """One glob of one worker; `id` keys its offsets (e.g. `file:worker:/var/log/x/*.log`)."""

    id: str
    glob: str
    sink: LineSink


class _Tracked:
    """One open file."""

    __slots__ = ("current", "dev", "fd", "ino", "last_growth", "path", "pos", "retired_at", "source", "splitter")

    def __init__(
        self, source: FileSource, path: str, fd: int, st: os.stat_result, pos: int, splitter: LineSplitter, now: float
    ) -> None:
        self.source = source
        self.path = path
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.pos = pos
        self.splitter = splitter
        self.current = True
        self.last_growth = now
        self.retired_at = now

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.source.id, self.dev, self.ino)

    def offset(self) -> FileOffset:
        consumed = self.pos - len(self.splitter.carry)
        return FileOffset(self.source.id, self.path, self.dev, self.ino, consumed, self.splitter.discarding)


class FileTailer(ReaderThread):
    """Follows every file matched by `sources` in one daemon thread."""

    thread_name = "sentinel-log-tail"

    def __init__(
        self,
        sources: Sequence[FileSource],
        offsets: OffsetStore,
        *,
        max_line_bytes: int,
        poll_interval_s: float = 0.25,
        rescan_interval_s: float = 2.0,
        use_inotify: bool = True,
        read_existing: bool = False,
        rotate_grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._sources = tuple(sources)
        self._offsets = offsets
        self._max_line_bytes = max_line_bytes
        self._poll_interval_s = poll_interval_s
        self._rescan_interval_s = rescan_interval_s
        self._want_inotify = use_inotify
        self._read_existing = read_existing
        self._rotate_grace_s = rotate_grace_s
        self._clock = clock
        self._inotify: ino.Inotify | None = None
        self._poller = select.poll()
        self._watches: dict[str, int] = {}  # directory -> watch descriptor
        self._unwatchable: set[str] = set()  # directories whose watch failed (logged once)
        self._files: dict[tuple[str, int, int], _Tracked] = {}  # insertion order = age: older read first
        self._current: dict[tuple[str, str], _Tracked] = {}  # (source id, path) -> file at that path
        self._known_paths: dict[str, set[str]] = {}  # source id -> its log paths (files, or files once)
        self._pseudo: set[tuple[int, int]] = set()  # files that report size 0 yet hold data (procfs)
        self._last_rescan = 0.0

    # -- lifecycle --------------------------------------------------------------------

    @property
    def files_watched(self) -> int:
        """Open files: current ones and rotated ones still being drained."""
        return len(self._files)

    @property
    def inotify_active(self) -> bool:
        return self._inotify is not None

    def run(self) -> None:
        try:
            self._setup_inotify()
            self._initial_scan()
            more = self._read_all()
            while not self._stop.is_set():
                structural = self._wait(0.0 if more else self._poll_interval_s)
                if self._stop.is_set():
                    break
                now = self._clock()
                if structural or now - self._last_rescan >= self._rescan_interval_s:
                    self._rescan()
                more = self._read_all()
                self._close_quiet_rotated()
                self._offsets.maybe_persist()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for tracked in self._files.values():
            self._offsets.set_file(tracked.offset())
            _close(tracked.fd)
        self._files.clear()
        self._current.clear()
        self._offsets.persist()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    # -- waiting -------------------------------------------------------------------------

    def _setup_inotify(self) -> None:
        if not self._want_inotify:
            return
        try:
            self._inotify = ino.Inotify()
        except OSError as exc:
            log.info("logs: inotify unavailable (%s); polling every %.2fs", exc, self._poll_interval_s)
            return
        self._poller.register(self._inotify.fileno(), select.POLLIN)
        self._poller.register(self._stop.fileno(), select.POLLIN)

    def _wait(self, timeout_s: float) -> bool:
        """Sleep until a change, the poll interval or stop; True when files may have come or gone."""
        inotify = self._inotify
        if inotify is None:
            if timeout_s > 0:
                self._stop.wait(timeout_s)
            return False
        self._poller.poll(int(timeout_s * 1000))
        structural = False
        for event in inotify.read_events():
            if event.mask & _STRUCTURAL:
                structural = True
            if event.mask & ino.IN_IGNORED:  # the directory is gone: watch it again once it is back
                for path, wd in list(self._watches.items()):
                    if wd == event.wd:
                        del self._watches[path]
        return structural

    def _update_watches(self, dirs: set[str]) -> None:
        inotify = self._inotify
        if inotify is None:
            return
        for path in list(self._watches):
            if path not in dirs:
                inotify.rm_watch(self._watches.pop(path))
        for path in dirs - set(self._watches):
            try:
                self._watches[path] = inotify.add_watch(path, _DIR_MASK)
            except OSError as exc:
                # ENOSPC: fs.inotify.max_user_watches is exhausted; polling still covers it.
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and path not in self._unwatchable:
                    self._unwatchable.add(path)
                    log.info("logs: cannot watch %s (%s); polling it", path, exc.strerror)

    # -- finding files ---------------------------------------------------------------------

    def _glob(self, source: FileSource) -> dict[str, os.stat_result]:
        """Regular files matched by the source's glob now, path -> stat."""
        pattern = source.glob
        paths = glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
        found: dict[str, os.stat_result] = {}
        known = self._known_paths.get(source.id, set())
        still_known: set[str] = set()
        for path in sorted(paths):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                source.sink.problem(path, f"cannot read {path}: {exc.strerror}")
                continue
            refused = check_log_path(path) if stat.S_ISREG(st.st_mode) else None
            if refused is None and (st.st_dev, st.st_ino) in self._pseudo:
                refused = f"{path} reads like a kernel pseudo-file (size 0, yet data), not a log; not reading it"
            if refused is not None:
                still_known.add(path)
                source.sink.problem(path, refused)
                continue
            if stat.S_ISREG(st.st_mode):
                found[path] = st
                still_known.add(path)
            elif path in known or not glob.has_magic(pattern):
                # A log path that turned into something else is worth a report; a directory
                # that a wide glob happens to match is not.
                still_known.add(path)
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                source.sink.problem(path, f"{path} is {what}; skipping it")
        self._known_paths[source.id] = still_known
        base = _static_dir(pattern)
        if base and os.path.isdir(base) and not os.access(base, os.R_OK | os.X_OK):
            source.sink.problem(base, f"cannot list {base}: permission denied")
        return found

    def _watch_dirs(self, matched: dict[str, dict[str, os.stat_result]]) -> set[str]:
        dirs: set[str] = set()
        for source in self._sources:
            base = _static_dir(source.glob)
            if base and os.path.isdir(base):
                dirs.add(base)
            dirs.update(os.path.dirname(p) or "." for p in matched.get(source.id, {}))
        return dirs

    def _initial_scan(self) -> None:
        self._offsets.watch_sources({s.id for s in self._sources})
        matched = {s.id: self._glob(s) for s in self._sources}
        for source in self._sources:
            now_keys = {(st.st_dev, st.st_ino) for st in matched[source.id].values()}
            replaced: set[str] = set()
            for old in self._offsets.files_of(source.id):
                if (old.dev, old.ino) not in now_keys:
                    replaced.add(old.path)
                    self._resume_rotated(source, old)
            for path, st in _oldest_first(matched[source.id]):
                saved = self._offsets.file(source.id, st.st_dev, st.st_ino)
                if saved is not None:
                    start, skip = (saved.offset, saved.skip) if saved.offset <= st.st_size else (0, False)
                elif path in replaced or source.id in self._offsets.previous_sources or self._read_existing:
                    start, skip = 0, False  # appeared while Sentinel was down: all of it is new
                else:
                    start, skip = st.st_size, False  # first sight: do not replay old history
                self._open(source, path, st, start, skip)
        self._update_watches(self._watch_dirs(matched))
        self._last_rescan = self._clock()

    def _resume_rotated(self, source: FileSource, saved: FileOffset) -> None:
        """Find a file rotated away while stopped (same inode, any name in its old directory)."""
        directory = os.path.dirname(saved.path) or "."
        try:
            entries = list(os.scandir(directory))
        except OSError:
            entries = []
        for entry in entries:
            try:
                if entry.inode() != saved.ino or not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue
            if st.st_dev == saved.dev:
                log.info(
                    "logs: %s was rotated to %s while Sentinel was stopped; reading its rest", saved.path, entry.path
                )
                tracked = self._open(source, entry.path, st, min(saved.offset, st.st_size), saved.skip)
                if tracked is not None:
                    self._retire(tracked)
                    tracked.path = saved.path  # its old name: a restart looks for it in that directory
                return
        log.info(
            "logs: %s was rotated away and is gone; lines after offset %d could not be read", saved.path, saved.offset
        )
        self._offsets.forget_file(source.id, saved.dev, saved.ino)

    def _rescan(self) -> None:
        matched = {s.id: self._glob(s) for s in self._sources}
        for source in self._sources:
            sid, found = source.id, matched[source.id]
            # Files we follow that are no longer at their path. All are taken out first, so
            # that a chain of renames (a.log -> a.log.1 -> a.log.2) resolves whatever the order.
            moved: list[_Tracked] = []
            for (owner, path), tracked in list(self._current.items()):
                if owner != sid:
                    continue
                st = found.get(path)
                if st is not None and (st.st_dev, st.st_ino) == (tracked.dev, tracked.ino) and not _deleted(tracked):
                    continue
                del self._current[(sid, path)]
                moved.append(tracked)
            for tracked in moved:
                self._retire(tracked)
            for path, st in _oldest_first(found):
                if (sid, path) in self._current:
                    continue
                tracked_or_none = self._files.get((sid, st.st_dev, st.st_ino))
                if tracked_or_none is not None:
                    # Renamed to a name the glob also matches: keep following it, no re-read.
                    self._adopt(tracked_or_none, path)
                    continue
                # New: created (or moved in) while we run, so all of it is new.
                saved = self._offsets.file(sid, st.st_dev, st.st_ino)
                start, skip = (saved.offset, saved.skip) if saved and saved.offset <= st.st_size else (0, False)
                self._open(source, path, st, start, skip)
        self._update_watches(self._watch_dirs(matched))
        self._last_rescan = self._clock()

    def _open(self, source: FileSource, path: str, st: os.stat_result, start: int, skip: bool) -> _Tracked | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            source.sink.problem(path, f"cannot open {path}: {exc.strerror}")
            return None
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            # Replaced between stat and open: the next rescan sees the new file.
            _close(fd)
            return None
        source.sink.problem(path, None)
        tracked = _Tracked(
            source, path, fd, fst, start, LineSplitter(self._max_line_bytes, discarding=skip), self._clock()
        )
        self._files[tracked.key] = tracked
        self._current[(source.id, path)] = tracked
        self._offsets.set_file(tracked.offset())
        return tracked

    def _retire(self, tracked: _Tracked) -> None:
        """No longer at its path: read it to its end, close it after `rotate_grace_s` of quiet."""
        if tracked.current:
            tracked.current = False
            tracked.retired_at = self._clock()
        if self._current.get((tracked.source.id, tracked.path)) is tracked:
            del self._current[(tracked.source.id, tracked.path)]

    def _adopt(self, tracked: _Tracked, path: str) -> None:
        """Follow an open file under the name the glob found it at."""
        if self._current.get((tracked.source.id, tracked.path)) is tracked:
            del self._current[(tracked.source.id, tracked.path)]
        tracked.path = path
        tracked.current = True
        self._current[(tracked.source.id, path)] = tracked

    def _close_quiet_rotated(self) -> None:
        now = self._clock()
        grace = self._rotate_grace_s
        for key, tracked in list(self._files.items()):
            if tracked.current or now - max(tracked.last_growth, tracked.retired_at) < grace:
                continue
            carry = tracked.splitter.carry
            if carry:  # its writer has moved on: the unterminated last line is complete
                tracked.source.sink.feed(carry + b"\n")
            _close(tracked.fd)
            del self._files[key]
            self._offsets.forget_file(*key)

    # -- reading -----------------------------------------------------------------------------

    def _read_all(self) -> bool:
        """Read every open file, oldest first; True when some file has more than its budget."""
        more = False
        busy_sources: set[str] = set()
        polling = self._inotify is None
        for tracked in list(self._files.values()):
            sid = tracked.source.id
            if sid in busy_sources:
                continue  # an older file of this source is not finished: keep line order
            if polling and tracked.current and self._moved(tracked):
                self._last_rescan = -1e18  # without inotify, notice rotation within one poll
            if self._read(tracked):
                more = True
                busy_sources.add(sid)
        return more

    def _moved(self, tracked: _Tracked) -> bool:
        try:
            st = os.stat(tracked.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (tracked.dev, tracked.ino)

    def _read(self, tracked: _Tracked) -> bool:
        sink = tracked.source.sink
        try:
            size = os.fstat(tracked.fd).st_size
            if size < tracked.pos:
                log.info("logs: %s was truncated; reading it from the start", tracked.path)
                tracked.pos = 0
                tracked.splitter.reset()
            budget = READ_BUDGET
            while budget > 0:
                data = os.pread(tracked.fd, READ_SIZE, tracked.pos)
                if not data:
                    break
                if size == 0 and tracked.pos == 0 and os.fstat(tracked.fd).st_size == 0:
                    # procfs and the like: size 0, yet data (a regular file that was just
                    # written would report its new size). Every read would look like a
                    # truncation and start over, forever; it is not a log.
                    self._pseudo.add((tracked.dev, tracked.ino))
                    sink.problem(tracked.path, f"{tracked.path} reports size 0 yet holds data: not a log file")
                    self._drop(tracked)
                    return False
                tracked.pos += len(data)
                budget -= len(data)
                tracked.last_growth = self._clock()
                complete, cut = tracked.splitter.feed(data)
                if complete:
                    # Claim the block before matching it: should matching it ever kill the
                    # daemon, the offset saved meanwhile (the collector saves every second)
                    # lies past it, and the next start does not read it again.
                    self._offsets.set_file(tracked.offset())
                    sink.feed(complete, cut)
        except OSError as exc:
            # EIO, or EISDIR if a path turned into a directory under an open fd: drop it; the
            # rescan reopens whatever is at the path now and resumes from the saved offset.
            sink.problem(tracked.path, f"cannot read {tracked.path}: {exc.strerror}")
            self._drop(tracked)
            return False
        self._offsets.set_file(tracked.offset())
        return budget <= 0

    def _drop(self, tracked: _Tracked) -> None:
        self._offsets.set_file(tracked.offset())
        _close(tracked.fd)
        self._files.pop(tracked.key, None)
        if self._current.get((tracked.source.id, tracked.path)) is tracked:
            del self._current[(tracked.source.id, tracked.path)]


def _oldest_first(found: dict[str, os.stat_result]) -> list[tuple[str, os.stat_result]]:
    """Files by modification time, so a rotated file's lines come before its successor's."""
    return sorted(found.items(), key=lambda item: (item[1].st_mtime_ns, item[0]))


def _static_dir(pattern: str) -> str:
    """The longest leading directory of a glob without wildcards ('' if none)."""
    parts = pattern.split(os.sep)
    keep: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        keep.append(part)
    if not keep:
        return "." if not os.path.isabs(pattern) else os.sep
    return os.sep.join(keep) or os.sep


def _deleted(tracked: _Tracked) -> bool:
    try:
        return os.fstat(tracked.fd).st_nlink == 0
    except OSError:
        return True


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
