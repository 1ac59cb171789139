"""Parsing of NCCL RAS status replies (`STATUS` over NCCL's RAS TCP port).

NCCL (2.24+) answers `STATUS` with a report for people (src/ras/client_support.cc) and,
from 2.28.7, with JSON after `SET FORMAT json`. Both are reduced to one `RasReport`.

The JSON form lists every communicator with each rank's status flags and collective
counts, and the ranks it misses (`unresponsive`, `considered_dead`). The text form
summarises: a table of communicator groups (count, status, errors), then sections
`INCOMPLETE` / `DEAD` / `TIMEOUT` and per-communicator blocks `#g-i (hash) KIND`; rank
collective counts appear only for communicators whose ranks disagree (`MISMATCH`).
Lines the parser does not know are skipped, so a newer NCCL that adds lines still
parses; a reply with none of the landmarks is refused with `RasParseError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMM_STATUSES",
    "ERROR_KINDS",
    "CommReport",
    "RasParseError",
    "RasReport",
    "parse_ras_json",
    "parse_ras_reply",
    "parse_ras_text",
]

COMM_STATUSES = ("INIT", "RUNNING", "FINALIZE", "ABORT")
"""Communicator states in NCCL's order of precedence (a mix reports the last one present)."""

ERROR_KINDS = ("mismatch", "error", "incomplete")
"""NCCL's communicator error flags: ranks disagree / a rank reported an error / data missing."""

# ncclSuccess and ncclInProgress: every other ncclResult_t is an error.
_NOT_ERRORS = (0, 7)


class RasParseError(ValueError):
    """The reply is not a RAS status report this parser recognises."""


@dataclass
class CommReport:
    """One communicator as far as the reply describes it.

    `counts` is a fingerprint of the ranks' collective counts (empty when the reply
    gives none); `pending` says work is outstanding: ranks disagree on the counts, or
    the communicator has an error flag, so frozen counts mean a hang, not idleness.
    """

    comm: str
    status: str | None = None
    errors: set[str] = field(default_factory=set)
    counts: tuple[tuple[str, int, int], ...] = ()
    pending: bool = False


@dataclass
class RasReport:
    """A whole reply: counts by status and error kind, missing/dead ranks, per-communicator data.

    `ranks_dead` counts ranks in JSON replies but job processes in text replies (the
    text report does not break dead processes down by rank); one serving process per
    GPU makes them equal in practice. `timeouts` counts the RAS network's own timeouts
    while it gathered the report (peers that did not answer in time).
    """

    format: str
    communicators: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ranks_missing: int = 0
    ranks_dead: int = 0
    timeouts: int = 0
    comms: dict[str, CommReport] = field(default_factory=dict)


def parse_ras_reply(text: str) -> RasReport:
    """Parse a STATUS reply in whichever format it came."""
    if text.lstrip().startswith("{"):
        return parse_ras_json(text)
    return parse_ras_text(text)


# -- JSON ----------------------------------------------------------------------------


def parse_ras_json(text: str) -> RasReport:
    """Parse the reply to `SET FORMAT json` + `STATUS` (NCCL 2.28.7+)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RasParseError(f"invalid JSON status: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("communicators"), list):
        raise RasParseError("JSON status without a communicators list")
    report = RasReport("json", dict.fromkeys(COMM_STATUSES, 0), dict.fromkeys(ERROR_KINDS, 0))
    for entry in data["communicators"]:
        if isinstance(entry, dict):
            _fold_json_comm(report, entry)
    ras = data.get("ras")
    report.timeouts = _int(ras.get("timeouts_count")) if isinstance(ras, dict) else 0
    return report


def _fold_json_comm(report: RasReport, entry: Mapping[str, Any]) -> None:
    ranks = [r for r in _list(entry.get("ranks")) if isinstance(r, dict)]
    missing = [r for r in _list(entry.get("missing_ranks")) if isinstance(r, dict)]
    statuses = {_rank_status(_dict(r.get("status"))) for r in ranks}
    errors: set[str] = set()
    per_op: dict[str, list[int]] = {}
    for rank in ranks:
        status = _dict(rank.get("status"))
        if _int(status.get("init_state")) not in _NOT_ERRORS or _int(status.get("async_error")) not in _NOT_ERRORS:
            errors.add("error")
        for op, count in _dict(rank.get("collective_counts")).items():
            per_op.setdefault(str(op), []).append(_int(count))
    counts_differ = any(len(set(values)) > 1 for values in per_op.values())
    if len(statuses) > 1 or counts_differ:
        errors.add("mismatch")
    for rank in missing:
        status = _dict(rank.get("status"))
        if status.get("unresponsive") is True:
            errors.add("incomplete")
            report.ranks_missing += 1
        else:
            errors.add("mismatch")  # it answered, but not as a member of this communicator
        if status.get("considered_dead") is True:
            report.ranks_dead += 1
    comm_status = _highest(statuses)
    if comm_status is not None:
        report.communicators[comm_status] = report.communicators.get(comm_status, 0) + 1
    for kind in errors:
        report.errors[kind] += 1
    comm = _norm_hash(entry.get("hash"))
    # Totals per operation grow with every launched collective on any rank.
    counts = tuple(sorted((op, sum(values), len(values)) for op, values in per_op.items()))
    _merge(report, CommReport(comm, comm_status, errors, counts, counts_differ or bool(errors)))


def _rank_status(status: Mapping[str, Any]) -> str:
    # The same precedence as NCCL's own text report.
    if status.get("abort_flag") is True:
        return "ABORT"
    if status.get("finalize_called") is True or status.get("destroy_flag") is True:
        return "FINALIZE"
    return "RUNNING" if _int(status.get("init_state")) == 0 else "INIT"


# -- text ----------------------------------------------------------------------------

_TABLE_HEADER = re.compile(r"^\s*Group\s+Comms\s+Nodes\b.*\bStatus\s+Errors\s*$")
_TABLE_ROW = re.compile(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+(?:-\d+)?\s+\d+\s+\d+\s+([A-Z]+)\s+([A-Z,]+)\s*$")
_COMM_BLOCK = re.compile(r"^#\d+-\d+ \((?:0x)?([0-9a-fA-F]+)\) ([A-Z]+)\s*$")
_MISSING_RANKS = re.compile(r"Missing communicator data from (\d+) ranks?\b")
_DEAD = re.compile(r"^\s*(\d+) job process(?:es)? (?:is|are) considered dead")
_TIMEOUTS = re.compile(r"Encountered (\d+) communication timeouts?")
_OP_HEADER = re.compile(r"Communicator ranks have different (\S+) operation counts")
_MANY_AT = re.compile(r"^\s*(\d+) ranks have launched up to operation (\d+)")
_MANY_NONE = re.compile(r"^\s*(\d+) ranks have not launched any operations")
_ONE_AT = re.compile(r"^\s*Rank \d+ has launched up to operation (\d+)")
_ONE_NONE = re.compile(r"^\s*Rank \d+ has not launched any operations")
# "Gathering data about the NCCL communicators" is how earlier RAS versions announced the table.
_LANDMARKS = ("Communicators...", "No communicator data collected", "Gathering data about the NCCL communicators")


def parse_ras_text(text: str) -> RasReport:
    """Parse the plain-text STATUS reply (every NCCL with RAS)."""
    lines = text.splitlines()
    has_table = any(_TABLE_HEADER.match(line) for line in lines)
    if not has_table and not any(mark in text for mark in _LANDMARKS):
        raise RasParseError(f"not a RAS status report: {text.strip()[:120]!r}")
    report = RasReport("text", dict.fromkeys(COMM_STATUSES, 0), dict.fromkeys(ERROR_KINDS, 0))
    _table(report, lines)
    _sections(report, lines)
    return report


def _table(report: RasReport, lines: Iterable[str]) -> None:
    in_table = False
    for line in lines:
        if _TABLE_HEADER.match(line):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.strip():
            break
        row = _TABLE_ROW.match(line)
        if row is None:
            continue  # the second header line ("#  in group ...")
        comms, status = int(row.group(1)), row.group(2)
        report.communicators[status] = report.communicators.get(status, 0) + comms
        for kind in row.group(3).lower().split(","):
            if kind in report.errors:
                report.errors[kind] += comms


def _sections(report: RasReport, lines: Iterable[str]) -> None:
    section = ""
    comm: CommReport | None = None
    op: str | None = None
    counts: list[tuple[str, int, int]] = []
    for line in lines:
        block = _COMM_BLOCK.match(line)
        if block is not None or (line and not line[0].isspace()):
            _close_block(report, comm, counts)
            comm, op, counts = None, None, []
            if block is not None:
                comm = report.comms.get(_norm_hash(block.group(1))) or CommReport(_norm_hash(block.group(1)))
                section = block.group(2)
                comm.errors.add(section.lower())
                comm.pending = True  # listed here only because something is wrong with it
            else:
                section = line.strip()
            continue
        if comm is None:
            if section == "DEAD" and (m := _DEAD.match(line)):
                report.ranks_dead += int(m.group(1))
            elif section == "TIMEOUT" and (m := _TIMEOUTS.search(line)):
                report.timeouts += int(m.group(1))
            continue
        if section == "INCOMPLETE" and (m := _MISSING_RANKS.search(line)):
            report.ranks_missing += int(m.group(1))
        elif section == "MISMATCH":
            if m := _OP_HEADER.search(line):
                op = m.group(1)
            elif op is not None:
                counts.extend(_count_line(op, line))
    _close_block(report, comm, counts)


def _count_line(op: str, line: str) -> list[tuple[str, int, int]]:
    if m := _MANY_AT.match(line):
        return [(op, int(m.group(2)), int(m.group(1)))]
    if m := _MANY_NONE.match(line):
        return [(op, 0, int(m.group(1)))]
    if m := _ONE_AT.match(line):
        return [(op, int(m.group(1)), 1)]
    if _ONE_NONE.match(line):
        return [(op, 0, 1)]
    return []  # "Rank N -- GPU ..." lines name the ranks of a group already counted


def _close_block(report: RasReport, comm: CommReport | None, counts: list[tuple[str, int, int]]) -> None:
    if comm is None:
        return
    if counts:
        comm.counts = tuple(sorted(set(comm.counts) | set(counts)))
    report.comms[comm.comm] = comm


# -- helpers -------------------------------------------------------------------------


def _merge(report: RasReport, comm: CommReport) -> None:
    # One communicator can appear more than once (ranks reported from several views).
    known = report.comms.get(comm.comm)
    if known is None:
        report.comms[comm.comm] = comm
        return
    known.errors |= comm.errors
    known.pending = known.pending or comm.pending
    known.status = _highest({s for s in (known.status, comm.status) if s is not None})
    known.counts = tuple(sorted(known.counts + comm.counts))


def _highest(statuses: set[str]) -> str | None:
    for status in reversed(COMM_STATUSES):
        if status in statuses:
            return status
    return None


def _norm_hash(value: object) -> str:
    text = str(value).strip().lower().removeprefix("0x")
    try:
        return f"{int(text, 16):016x}"
    except ValueError:
        return text[:64] or "unknown"


def _int(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) < 2**63:
        return int(value)
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return 0
    return 0


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
