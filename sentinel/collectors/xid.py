"""Xid errors: the policy that classifies them, and the kernel log's Xids as NVML sees them.

NVIDIA's driver reports GPU faults as numbered "Xid" errors, both as NVML events and
as `NVRM:` lines in the kernel log. This module holds what is shared by both paths:

- `XidPolicy`: what an Xid means (hardware / application / informational) and the
  suggested action, loaded from `sentinel/data/xid_policy.yaml` plus the operator's
  per-Xid overrides;
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
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sentinel.config.models import XidOverride
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

XID_CLASSES = ("hardware", "application", "informational", "unknown")
"""Every class an Xid can have; "unknown" is only for Xids missing from the policy."""

FALLEN_OFF_BUS_XID = 79

DEFAULT_JOURNAL_ARGV = DEFAULT_KERNEL_ARGV


# -- policy ------------------------------------------------------------------------


class XidPolicyError(ValueError):
    """The policy file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class XidInfo:
    """What one Xid means and what to do about it."""

    xid: int
    xid_class: str
    action: str
    description: str


class XidPolicy:
    """Xid number -> `XidInfo`; Xids missing from the policy are classed "unknown"."""

    def __init__(self, entries: Mapping[int, XidInfo]) -> None:
        self._entries = dict(entries)

    @classmethod
    def load(cls, overrides: Mapping[int, XidOverride] | None = None, path: Path | None = None) -> XidPolicy:
        """The shipped policy (or the file at `path`) with the operator's overrides applied."""
        if path is None:
            text = resources.files("sentinel").joinpath("data/xid_policy.yaml").read_text(encoding="utf-8")
            source = "sentinel/data/xid_policy.yaml"
        else:
            text = path.read_text(encoding="utf-8")
            source = str(path)
        entries = _parse_policy(yaml.safe_load(text), source)
        for xid, override in (overrides or {}).items():
            entries[xid] = _apply_override(entries.get(xid) or _unknown(xid), override)
        return cls(entries)

    def classify(self, xid: int) -> XidInfo:
        """The policy entry for `xid`, or an "unknown" entry."""
        return self._entries.get(xid) or _unknown(xid)

    def __contains__(self, xid: object) -> bool:
        return xid in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _unknown(xid: int) -> XidInfo:
    return XidInfo(xid, "unknown", "none", f"Xid {xid} is not in Sentinel's policy; see NVIDIA's Xid catalogue.")


def _apply_override(base: XidInfo, override: XidOverride) -> XidInfo:
    return replace(
        base,
        xid_class=override.xid_class or base.xid_class,
        action=override.action or base.action,
        description=override.description or base.description,
    )


def _parse_policy(data: Any, source: str) -> dict[int, XidInfo]:
    if not isinstance(data, dict) or not isinstance(data.get("xids"), dict):
        raise XidPolicyError(f"{source}: xids: expected a mapping of Xid number to entry")
    entries: dict[int, XidInfo] = {}
    for key, entry in data["xids"].items():
        where = f"{source}: xids.{key}"
        if not isinstance(key, int) or isinstance(key, bool) or key <= 0:
            raise XidPolicyError(f"{where}: an Xid is a positive integer")
        if not isinstance(entry, dict):
            raise XidPolicyError(f"{where}: expected a mapping with class, action and description")
        unknown = set(entry) - {"class", "action", "description"}
        if unknown:
            raise XidPolicyError(f"{where}.{sorted(unknown)[0]}: unknown key")
        entries[key] = XidInfo(
            key,
            _policy_str(entry, "class", where, choices=XID_CLASSES[:-1]),
            _policy_str(entry, "action", where),
            _policy_str(entry, "description", where),
        )
    return entries


def _policy_str(entry: Mapping[str, Any], key: str, where: str, choices: Sequence[str] = ()) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise XidPolicyError(f"{where}.{key}: expected a non-empty string")
    if choices and value not in choices:
        raise XidPolicyError(f"{where}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


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
