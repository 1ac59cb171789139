"""Xid errors: the kernel log's Xids as NVML sees them.

NVIDIA's driver reports GPU faults as numbered "Xid" errors, both as NVML events and
as `NVRM:` lines in the kernel log. This module holds what is shared by both paths
(what an Xid means is `sentinel.collectors.xid_policy`, re-exported here):

- `kernel_xids`: the Xids among the kernel log's catalogue matches. The kernel log is
  read once, by `sentinel.logs.kernel.KernelLog`, and parsed once, by the catalogue's
  `xid` and `gpu_fallen_off_bus` entries; the NVML collector subscribes to it.
  `parse_nvrm_line` runs the same entries over one line;
- `XidDeduplicator`: one Xid seen by both NVML and the kernel log counts once.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from sentinel.collectors.xid_policy import XID_CLASSES, XidInfo, XidPolicy, XidPolicyError
from sentinel.logs.kernel import DEFAULT_KERNEL_ARGV, DEFAULT_KMSG_PATH, KernelLogMode
from sentinel.logs.matcher import LogMatcher, Match
from sentinel.logs.patterns import Catalogue, normalise_pci_bus_id

__all__ = [
    "DEFAULT_JOURNAL_ARGV",
    "DEFAULT_KMSG_PATH",
    "XID_CLASSES",
    "KernelLogMode",
    "KernelXid",
    "XidDeduplicator",
    "XidInfo",
    "XidPolicy",
    "XidPolicyError",
    "kernel_xids",
    "normalise_pci_bus_id",
    "parse_nvrm_line",
]

FALLEN_OFF_BUS_XID = 79

DEFAULT_JOURNAL_ARGV = DEFAULT_KERNEL_ARGV


# -- kernel lines ------------------------------------------------------------------


@dataclass(frozen=True)
class KernelXid:
    """An Xid read from the kernel log."""

    xid: int
    pci_bus_id: str
    message: str


def kernel_xids(matches: Sequence[Match]) -> list[KernelXid]:
    """The Xids among catalogue matches, one per kernel line.

    An `NVRM: Xid (...): N` line gives Xid N (its `gpu_fallen_off_bus` match, for Xid 79,
    is the same fault); a fallen-off-the-bus line without an Xid number (older drivers,
    or the newer three-line message) gives Xid 79, with the GPU's address when it names one.
    """
    out: list[KernelXid] = []
    previous: Match | None = None
    for m in matches:
        if m.event == "xid" and m.value is not None:
            pci = m.labels.get("pci_bus_id", "")
            out.append(KernelXid(int(m.value), pci, _detail(m.line, int(m.value))))
        elif m.event == "gpu_fallen_off_bus" and not (
            previous is not None and previous.event == "xid" and previous.line == m.line
        ):
            out.append(KernelXid(FALLEN_OFF_BUS_XID, m.labels.get("pci_bus_id", ""), "GPU has fallen off the bus."))
        previous = m
    return out


def _detail(line: str, xid: int) -> str:
    """What the driver wrote after the Xid number: `pid=1234, name=python3, GPU has fallen off the bus.`"""
    _, sep, rest = line.partition(f"): {xid}")
    return rest.lstrip(", ").strip() if sep else ""


@functools.cache
def _builtin_matcher() -> LogMatcher:
    return LogMatcher(Catalogue.load())


def parse_nvrm_line(line: str) -> KernelXid | None:
    """The Xid in one kernel line (kmsg record, journal or dmesg form), else None."""
    if "NVRM" not in line:  # cheap filter: almost every kernel line is something else
        return None
    found = kernel_xids(_builtin_matcher().match_line(line))
    return found[0] if found else None


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
