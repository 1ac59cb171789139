"""What happens to the lines of one source, in its reader thread.

A reader (file tailer, journal, kernel log) hands complete lines as bytes to a
`LineSink`. `SourcePipeline` is the sink the collector uses: it counts lines, checks
the bytes (undecodable ones become U+FFFD, NUL bytes are noted; both counted), runs
the matcher, and hands the matches to a callback that hops onto the event loop.
Problems (a file that cannot be opened, a journalctl that exits) are reported by key
and counted and logged when they start or change, not on every retry.

`ReaderThread` is the lifecycle the readers share; `StopSignal` is how they are
stopped promptly even while blocked in `poll`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sentinel.logs.matcher import LogMatcher, Match
from sentinel.store import now_ms

__all__ = ["LineSink", "ReaderThread", "SourcePipeline", "SourceStats", "StopSignal"]

log = logging.getLogger("sentinel.logs")


class LineSink(Protocol):
    """Where a reader puts what it read."""

    def feed(self, data: bytes, cut: int = 0) -> None:
        """Complete lines, each ending in a newline; `cut` of them were over-long and cut."""

    def problem(self, key: str, message: str | None) -> None:
        """`key` (a path, a command) fails with `message`; None when it works again."""


@dataclass
class SourceStats:
    """Counters of one source, written by its reader thread only."""

    lines: int = 0
    cut: int = 0
    invalid: int = 0
    read_errors: int = 0


Handoff = Callable[["SourcePipeline", list[Match], int], None]


class SourcePipeline:
    """Count, check and match the lines of one (worker, source); see the module doc."""

    def __init__(self, worker: str, source: str, matcher: LogMatcher, handoff: Handoff) -> None:
        self.worker = worker
        self.source = source
        self.stats = SourceStats()
        self._matcher = matcher
        self._handoff = handoff
        self._problems: dict[str, str] = {}
        self._warned: set[str] = set()

    def feed(self, data: bytes, cut: int = 0) -> None:
        if not data:
            return
        stats = self.stats
        stats.lines += data.count(b"\n")
        stats.cut += cut
        # Pure ASCII (almost every log) needs no decoding here: the matcher decodes hit lines only.
        valid = True
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                valid = False
        if not valid or b"\0" in data:
            self._note_invalid(data)
        matches = self._matcher.scan_bytes(data)
        if matches:
            self._handoff(self, matches, now_ms())

    def problem(self, key: str, message: str | None) -> None:
        previous = self._problems.get(key)
        if message is None:
            if previous is not None:
                del self._problems[key]
                log.info("logs: %s: %s is readable again", self.source, key)
            return
        if message != previous:
            self._problems[key] = message
            self.stats.read_errors += 1
            log.warning("logs: %s: %s", self.source, message)

    @property
    def problems(self) -> dict[str, str]:
        """Current problems by key (a copy)."""
        return dict(self._problems)

    def _note_invalid(self, data: bytes) -> None:
        # Rare, so a line-by-line pass is fine. A bad line counts once, whatever is wrong with it.
        bad = 0
        for line in data.split(b"\n"):
            if b"\0" in line:
                bad += 1
                self._warn_once("NUL bytes (binary data?)")
            elif not line.isascii():
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    bad += 1
                    self._warn_once("bytes that are not UTF-8 (replaced by U+FFFD)")
        self.stats.invalid += bad

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("logs: %s: lines with %s; counted in sentinel_log_lines_invalid_total", self.source, what)


class StopSignal:
    """A stop flag that a thread can also wait for in `select.poll` (a pipe turns readable)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        if not self._event.is_set():
            self._event.set()
            # A full pipe or a closed one: either way the flag is set and the thread sees it.
            with contextlib.suppress(OSError):
                os.write(self._w, b"x")

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class ReaderThread:
    """The lifecycle shared by the readers: one daemon thread, a stop signal, a bug slot."""

    thread_name = "sentinel-log-reader"

    def __init__(self) -> None:
        self._stop = StopSignal()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        """Set when the thread died of a bug (the collector then reports itself down)."""

    def start(self) -> None:
        """Start the thread; opening files and commands happens there, off the event loop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
            self._thread.start()

    def signal_stop(self) -> None:
        """Ask the thread to stop (returns at once)."""
        self._stop.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop and join; blocking, so call it from a thread, not the event loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s did not stop within %.1fs", self.thread_name, timeout)
                return  # it still polls the stop pipe: leave the pipe open
        self._stop.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _main(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a bug: report it through `error`, never die silently
            self.error = exc
            log.exception("%s failed", self.thread_name)

    def run(self) -> None:
        """The thread body; returns once the stop signal is set."""
        raise NotImplementedError
