"""The host's kernel log: /dev/kmsg, or `journalctl --dmesg --follow` where kmsg is closed.

Kernel lines (Xid, a GPU fallen off the bus, the OOM killer) belong to no worker. The
path and the command are part of `KernelSourceSpec` so that tests feed a real file or
FIFO in kmsg's format. Reading starts at the end: kmsg numbers records per boot and
the ring buffer is small, so there is no durable position to resume from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
from dataclasses import dataclass
from pathlib import Path

from sentinel.logs.lines import LineSplitter
from sentinel.logs.pipeline import LineSink, ReaderThread
from sentinel.logs.process import ProcessFollower

__all__ = ["DEFAULT_KERNEL_ARGV", "KernelReader", "KernelSourceSpec", "strip_kmsg"]

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
_RETRY_S = 30.0
_KMSG_PREFIX = re.compile(rb"\d+,\d+,\d+,[^;]*;")


@dataclass(frozen=True)
class KernelSourceSpec:
    """Where the kernel log comes from: `path` first (kmsg format), else `argv` (one message a line)."""

    path: Path | None = Path("/dev/kmsg")
    argv: tuple[str, ...] | None = DEFAULT_KERNEL_ARGV
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


class KernelReader(ReaderThread):
    """A thread reading the kernel log into a `LineSink`."""

    thread_name = "sentinel-kernel-log"

    def __init__(self, spec: KernelSourceSpec, sink: LineSink, *, max_line_bytes: int) -> None:
        super().__init__()
        self._spec = spec
        self._sink = sink
        self._splitter = LineSplitter(max_line_bytes)
        self.mode: str | None = None
        """Once started: "kmsg" (the path), "command" (the argv) or "off"."""

    def run(self) -> None:
        # Retry while neither source works: /dev/kmsg may become readable, journalctl installed.
        while not self._stop.is_set():
            if self._read_one_source():
                return
            self._stop.wait(_RETRY_S)

    def _read_one_source(self) -> bool:
        """Read from the first source that works until stopped; False when none works."""
        spec = self._spec
        reason = "no path given"
        if spec.path is not None:
            try:
                fd = os.open(spec.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                reason = f"cannot open {spec.path}: {exc.strerror}"
            else:
                self.mode = "kmsg"
                self._sink.problem("kernel", None)
                self._read_fd(fd)
                return True
        if spec.argv:
            self.mode = "command"
            argv = spec.argv
            ProcessFollower(" ".join(argv), lambda: argv, self._on_text, self._sink, self._stop).run()
            return True
        self.mode = "off"
        self._sink.problem("kernel", f"no kernel log: {reason}")
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
