"""Xid errors: the policy that classifies them, and the kernel log that reports them.

NVIDIA's driver reports GPU faults as numbered "Xid" errors, both as NVML events and
as `NVRM:` lines in the kernel log. This module holds what is shared by both paths
(what an Xid means is `sentinel.collectors.xid_policy`):

- `parse_nvrm_line`: an `NVRM:` kernel line (from /dev/kmsg, journalctl or dmesg) to
  an Xid and a normalised PCI bus id;
- `XidDeduplicator`: one Xid seen by both NVML and the kernel log counts once;
- `KernelLogReader`: a thread that tails /dev/kmsg or `journalctl -k -f` for those lines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_JOURNAL_ARGV",
    "DEFAULT_KMSG_PATH",
    "KernelLogMode",
    "KernelLogReader",
    "KernelXid",
    "XidDeduplicator",
    "normalise_pci_bus_id",
    "parse_nvrm_line",
]

log = logging.getLogger(__name__)

FALLEN_OFF_BUS_XID = 79

DEFAULT_KMSG_PATH = Path("/dev/kmsg")
DEFAULT_JOURNAL_ARGV: tuple[str, ...] = ("journalctl", "-k", "-f", "-o", "cat", "-n", "0")

KernelLogMode = Literal["auto", "kmsg", "journal", "off"]


# -- kernel lines ------------------------------------------------------------------

# `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.`
_XID_LINE = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<pci>[0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+(?:\.[0-7])?)\): "
    r"(?P<xid>\d+)(?:, (?P<detail>.*))?"
)
# `NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.` (older drivers print no Xid line)
_FALLEN_LINE = re.compile(
    r"NVRM: GPU (?:at )?(?:PCI:)?(?P<pci>[0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+(?:\.[0-7])?):"
    r" GPU has fallen off the bus"
)
_PCI = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9A-Fa-f]{1,8}):)?(?P<bus>[0-9A-Fa-f]{1,2}):(?P<dev>[0-9A-Fa-f]{1,2})"
    r"(?:\.(?P<fn>[0-7]))?"
)


def normalise_pci_bus_id(text: str) -> str:
    """One spelling for a PCI address: `00000000:3B:00.0`, `PCI:0000:3b:00` -> `0000:3b:00.0`.

    NVML prints an 8-digit upper-case domain, the kernel a 4-digit lower-case one and
    sometimes no function; matching GPUs across both needs one form (sysfs's).
    """
    m = _PCI.fullmatch(text.strip())
    if m is None:
        return text.strip().lower()
    domain = int(m.group("domain") or "0", 16)
    width = 4 if domain <= 0xFFFF else 8
    return f"{domain:0{width}x}:{int(m.group('bus'), 16):02x}:{int(m.group('dev'), 16):02x}.{m.group('fn') or '0'}"


@dataclass(frozen=True)
class KernelXid:
    """An Xid read from the kernel log."""

    xid: int
    pci_bus_id: str
    message: str


def parse_nvrm_line(line: str) -> KernelXid | None:
    """The Xid in an `NVRM:` kernel line (kmsg record, journal or dmesg form), else None."""
    if "NVRM:" not in line:  # cheap filter: almost every kernel line is something else
        return None
    m = _XID_LINE.search(line)
    if m is not None:
        return KernelXid(int(m.group("xid")), normalise_pci_bus_id(m.group("pci")), (m.group("detail") or "").strip())
    m = _FALLEN_LINE.search(line)
    if m is not None:
        return KernelXid(FALLEN_OFF_BUS_XID, normalise_pci_bus_id(m.group("pci")), "GPU has fallen off the bus.")
    return None


# -- de-duplication ----------------------------------------------------------------


class XidDeduplicator:
    """Counts an Xid once when NVML and the kernel log both report it.

    An event is a duplicate when the *other* source reported the same key (GPU, Xid)
    within `window_s` and that report has not already been matched. Repeats from one
    source are never merged, so an Xid storm is counted in full. Thread-safe.
    """

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[Hashable, deque[tuple[float, str]]] = {}

    def admit(self, key: Hashable, source: str) -> bool:
        """True when this (key, source) report is new and should be counted."""
        now = self._clock()
        with self._lock:
            self._forget_before(now - self._window_s)
            recent = self._recent.setdefault(key, deque())
            for i, (_, seen_source) in enumerate(recent):
                if seen_source != source:
                    del recent[i]  # matched: the same Xid, already counted from the other source
                    return False
            recent.append((now, source))
            return True

    def _forget_before(self, cutoff: float) -> None:
        for key in list(self._recent):
            recent = self._recent[key]
            while recent and recent[0][0] < cutoff:
                recent.popleft()
            if not recent:
                del self._recent[key]


# -- kernel log reader ---------------------------------------------------------------

_READ_SIZE = 8192  # a /dev/kmsg record is at most ~8 KiB; a shorter read fails with EINVAL
_POLL_MS = 500  # bounds how long stop() waits for the thread
_IDLE_S = 0.2  # a regular file or a writer-less FIFO polls readable at EOF: back off
_JOURNAL_RETRY_S = 10.0


class KernelLogReader:
    """Tails the kernel log in a daemon thread and hands every `NVRM:` Xid to `on_xid`.

    `mode` "auto" reads /dev/kmsg when it can be opened, else `journalctl -k -f` when
    journalctl exists, else nothing (one info log). The path and the argv are
    arguments so tests feed a real file, FIFO or subprocess. Reading starts at the
    end: old Xids were handled (or not) before this process started.
    """

    def __init__(
        self,
        mode: KernelLogMode,
        on_xid: Callable[[KernelXid], None],
        *,
        kmsg_path: Path = DEFAULT_KMSG_PATH,
        journal_argv: Sequence[str] = DEFAULT_JOURNAL_ARGV,
    ) -> None:
        self._mode = mode
        self._on_xid = on_xid
        self._kmsg_path = kmsg_path
        self._journal_argv = tuple(journal_argv)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._proc_lock = threading.Lock()
        self.source: str | None = None
        """The source in use once started: "kmsg", "journal" or "off"."""

    def start(self) -> None:
        """Start the reader thread (opening the source happens there, off the event loop)."""
        if self._mode == "off" or self._thread is not None:
            self.source = "off" if self._mode == "off" else self.source
            return
        self._thread = threading.Thread(target=self._run, name="sentinel-kernel-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; returns within about `timeout` seconds."""
        self._stop.set()
        self._terminate_journal()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("kernel log reader did not stop within %.1fs", timeout)

    @property
    def alive(self) -> bool:
        """True while the reader thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- choosing a source ---------------------------------------------------------

    def _run(self) -> None:
        try:
            fd = self._open_kmsg() if self._mode in ("auto", "kmsg") else None
            if fd is not None:
                self.source = "kmsg"
                self._read_kmsg(fd)
            elif self._mode == "journal" or (self._mode == "auto" and shutil.which(self._journal_argv[0])):
                self.source = "journal"
                self._read_journal()
            else:
                self.source = "off"
                if self._mode == "auto":
                    log.info(
                        "kernel log: %s is not readable and %s is not installed; Xids come from NVML events only",
                        self._kmsg_path,
                        self._journal_argv[0],
                    )
        except Exception:  # a reader bug must not pass silently, nor kill the daemon
            log.exception("kernel log reader failed")

    def _open_kmsg(self) -> int | None:
        try:
            fd = os.open(self._kmsg_path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            level = logging.WARNING if self._mode == "kmsg" else logging.DEBUG
            log.log(level, "kernel log: cannot open %s: %s", self._kmsg_path, exc.strerror)
            return None
        with contextlib.suppress(OSError):  # a FIFO cannot seek, and has no backlog anyway
            os.lseek(fd, 0, os.SEEK_END)
        return fd

    # -- /dev/kmsg (or a file / FIFO in its place) -----------------------------------

    def _read_kmsg(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = b""
        try:
            while not self._stop.is_set():
                poller.poll(_POLL_MS)
                chunk = self._read_chunk(fd)
                if chunk is None:
                    continue
                if not chunk:
                    self._stop.wait(_IDLE_S)
                    continue
                pending = self._feed(pending + chunk)
        finally:
            os.close(fd)

    @staticmethod
    def _read_chunk(fd: int) -> bytes | None:
        try:
            return os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # kmsg: records were overwritten before we read them
                return None
            raise

    def _feed(self, data: bytes) -> bytes:
        *lines, rest = data.split(b"\n")
        for raw in lines:
            # kmsg continuation lines (" SUBSYSTEM=pci") start with a space: not messages.
            if raw and not raw.startswith(b" "):
                self._line(raw.decode("utf-8", "replace"))
        return rest

    # -- journalctl ----------------------------------------------------------------

    def _read_journal(self) -> None:
        warned = False
        while not self._stop.is_set():
            rc = self._run_journal_once()
            if self._stop.is_set():
                return
            if not warned:
                log.warning(
                    "kernel log: %s exited (%s); retrying every %.0fs",
                    " ".join(self._journal_argv),
                    rc,
                    _JOURNAL_RETRY_S,
                )
                warned = True
            self._stop.wait(_JOURNAL_RETRY_S)

    def _run_journal_once(self) -> int | str:
        try:
            proc = subprocess.Popen(
                self._journal_argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            return exc.strerror or str(exc)
        with self._proc_lock:
            self._proc = proc
        if self._stop.is_set():  # stop() ran between Popen and here: it could not see proc
            self._terminate_journal()
        assert proc.stdout is not None
        for line in proc.stdout:
            self._line(line.rstrip("\n"))
        return proc.wait()

    def _terminate_journal(self) -> None:
        with self._proc_lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- one line --------------------------------------------------------------------

    def _line(self, line: str) -> None:
        hit = parse_nvrm_line(line)
        if hit is None:
            return
        try:
            self._on_xid(hit)
        except Exception:  # the callback's bug must not stop the reader
            log.exception("kernel log: handling Xid %d failed", hit.xid)
