"""The host's kernel log, read once: /dev/kmsg, or `journalctl --dmesg --follow` where kmsg is closed.

Kernel lines (an Xid, a GPU fallen off the bus, the OOM killer) belong to no worker and
interest two collectors: the log collector counts and publishes them as log events,
the NVML collector takes the Xids to count them once against NVML's own Xid events.
So there is one reader: `KernelLog` owns a `KernelLogReader` thread, runs the pattern
catalogue over what it reads (one parser for Xids and everything else) and hands the
matches to every subscriber, in the reader thread. It starts with its first user and
stops with its last.

Where it reads from is `KernelSourceSpec`: `mode` as the config's `kernel_log` ("auto"
tries the path, then the command), and the path and command themselves, so that tests
feed a real file, FIFO or subprocess. Reading starts at the end: kmsg numbers records
per boot and the ring buffer is small, so there is no durable position to resume from;
old Xids were handled (or not) before this process started.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import LogMatcher, Match
from sentinel.logs.pipeline import LineSink, ReaderThread, SourcePipeline
from sentinel.logs.process import ProcessFollower

__all__ = [
    "DEFAULT_KERNEL_ARGV",
    "DEFAULT_KMSG_PATH",
    "KERNEL_SOURCE",
    "KernelLog",
    "KernelLogMode",
    "KernelLogReader",
    "KernelSourceSpec",
    "strip_kmsg",
]

log = logging.getLogger(__name__)

KernelLogMode = Literal["auto", "kmsg", "journal", "off"]
KERNEL_SOURCE = "kernel"
DEFAULT_KMSG_PATH = Path("/dev/kmsg")
DEFAULT_KERNEL_ARGV: tuple[str, ...] = (
    "journalctl",
    "--dmesg",
    "--follow",
    "--output=cat",
    "--lines=0",
    "--no-pager",
)

_READ_SIZE = 16 * 1024  # above kmsg's record limit (a shorter read of a record fails with EINVAL)
_POLL_MS = 500
_IDLE_S = 0.02  # a regular file or a writer-less FIFO is always "readable" at its end: back off
_RETRY_S = 30.0  # while no source works: /dev/kmsg may become readable, journalctl installed
_KMSG_PREFIX = re.compile(rb"\d+,\d+,\d+,[^;]*;")


@dataclass(frozen=True)
class KernelSourceSpec:
    """Where the kernel log comes from: `path` (kmsg format) and/or `argv` (one message a line)."""

    path: Path | None = DEFAULT_KMSG_PATH
    argv: tuple[str, ...] | None = DEFAULT_KERNEL_ARGV
    mode: KernelLogMode = "auto"
    """"auto": the path, else the command; "kmsg": the path only; "journal": the command only; "off"."""
    from_start: bool = False
    """Read `path` from its beginning instead of its end (a file standing in for kmsg in tests)."""


def strip_kmsg(block: bytes) -> bytes:
    """Messages of kmsg records: `6,1234,5678,-;NVRM: ...` -> `NVRM: ...`.

    Continuation lines (` SUBSYSTEM=pci`, ` DEVICE=+pci:...`) are metadata and dropped;
    a line without the record prefix (a plain dmesg text) passes unchanged.
    """
    out: list[bytes] = []
    for line in block.split(b"\n")[:-1]:
        if line.startswith(b" "):
            continue
        m = _KMSG_PREFIX.match(line)
        out.append(line[m.end() :] if m else line)
        out.append(b"\n")
    return b"".join(out)


class KernelLogReader(ReaderThread):
    """A thread reading the kernel log into a `LineSink`."""

    thread_name = "sentinel-kernel-log"

    def __init__(self, spec: KernelSourceSpec, sink: LineSink, *, max_line_bytes: int) -> None:
        super().__init__()
        self._spec = spec
        self._sink = sink
        self._splitter = LineSplitter(max_line_bytes)
        self.source: str | None = None
        """Once started: "kmsg" (the path), "journal" (the command) or "off" (none works yet)."""

    def run(self) -> None:
        while not self._stop.is_set():
            if self._read_one_source():
                return
            self._stop.wait(_RETRY_S)

    def _read_one_source(self) -> bool:
        """Read from the first source that works until stopped; False when none works."""
        spec = self._spec
        reason = "no path given"
        if spec.path is not None and spec.mode in ("auto", "kmsg"):
            try:
                fd = os.open(spec.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                reason = f"cannot open {spec.path}: {exc.strerror}"
            else:
                self.source = "kmsg"
                self._sink.problem(KERNEL_SOURCE, None)
                self._read_fd(fd)
                return True
        if spec.argv and spec.mode in ("auto", "journal"):
            self.source = "journal"
            argv = spec.argv
            ProcessFollower(" ".join(argv), lambda: argv, self._on_text, self._sink, self._stop).run()
            return True
        # Reported before it is published: whoever sees "off" also sees why (and the count).
        self._sink.problem(KERNEL_SOURCE, f"no kernel log ({reason}); retrying every {_RETRY_S:.0f}s")
        self.source = "off"
        return False

    def _read_fd(self, fd: int) -> None:
        try:
            if not self._spec.from_start:
                with contextlib.suppress(OSError):  # a FIFO has no position and no backlog
                    os.lseek(fd, 0, os.SEEK_END)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._stop.fileno(), select.POLLIN)
            while not self._stop.is_set():
                poller.poll(_POLL_MS)
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        # kmsg: records were overwritten before we read them; reading goes on.
                        self._sink.problem("kmsg", "kernel log records were overwritten before they could be read")
                    else:
                        self._sink.problem(str(self._spec.path), f"cannot read {self._spec.path}: {exc.strerror}")
                        self._stop.wait(1.0)
                    continue
                if not data:
                    self._stop.wait(_IDLE_S)
                    continue
                complete, cut = self._splitter.feed(data)
                if complete:
                    self._sink.feed(strip_kmsg(complete), cut)
        finally:
            os.close(fd)

    def _on_text(self, data: bytes) -> None:
        complete, cut = self._splitter.feed(data)
        if complete:
            self._sink.feed(complete, cut)


Subscriber = Callable[[list[Match], int], None]
"""Called in the reader thread with the matches of one block and their timestamp (ms)."""


class KernelLog:
    """The one reader of the kernel log and its subscribers; see the module doc. Thread-safe."""

    def __init__(self, spec: KernelSourceSpec, matcher: LogMatcher, *, max_line_bytes: int = 1024 * 1024) -> None:
        self.spec = spec
        self.matcher = matcher
        self._max_line_bytes = max_line_bytes
        self.pipeline = SourcePipeline("", KERNEL_SOURCE, matcher, self._fan_out)
        self._lock = threading.Lock()
        self._subscribers: list[tuple[Subscriber, bool]] = []
        self._users = 0
        self._reader: KernelLogReader | None = None

    # -- subscribers -------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber, *, owns_xids: bool = False) -> None:
        """Receive every block's matches. `owns_xids`: this subscriber counts and publishes Xids."""
        with self._lock:
            self._subscribers.append((subscriber, owns_xids))

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = [(s, o) for s, o in self._subscribers if s is not subscriber]

    @property
    def xids_owned(self) -> bool:
        """True when a subscriber (the NVML collector) publishes the Xids; others only count them."""
        with self._lock:
            return any(owns for _, owns in self._subscribers)

    def _fan_out(self, _pipeline: SourcePipeline, matches: list[Match], ts: int) -> None:
        with self._lock:
            subscribers = [s for s, _ in self._subscribers]
        for subscriber in subscribers:
            try:
                subscriber(matches, ts)
            except Exception:  # one subscriber's bug must not stop the reader or the others
                log.exception("kernel log: a subscriber failed")

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start reading with the first user (a no-op for later ones, and in mode "off")."""
        with self._lock:
            self._users += 1
            if self._reader is not None or self.spec.mode == "off":
                return
            self._reader = KernelLogReader(self.spec, self.pipeline, max_line_bytes=self._max_line_bytes)
            reader = self._reader
        reader.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop reading when the last user stops; blocking, so call it from a thread."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self._reader is None:
                return
            reader, self._reader = self._reader, None
        reader.stop(timeout)

    @property
    def reader(self) -> KernelLogReader | None:
        """The running reader thread, if any."""
        return self._reader

    @property
    def source(self) -> str | None:
        """ "kmsg", "journal" or "off" once the reader chose; "off" in mode "off"."""
        if self.spec.mode == "off":
            return "off"
        reader = self._reader
        return reader.source if reader is not None else None

    @property
    def alive(self) -> bool:
        reader = self._reader
        return reader is not None and reader.alive
