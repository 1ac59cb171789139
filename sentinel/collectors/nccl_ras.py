"""NCCL RAS: the communicators' own view of a multi-GPU worker, over NCCL's RAS port.

NCCL 2.24+ runs a RAS service in every process of a job (on by default; port 28028,
`NCCL_RAS_ADDR`). A client connects, says `CLIENT PROTOCOL 2` (answer `SERVER PROTOCOL
n`), may set `TIMEOUT <s>` and `SET FORMAT json` (2.28.7+; older versions answer
`ERROR: ...` and the text report is used), then sends `STATUS`; NCCL gathers the state
of every communicator across the job, writes the report and closes the connection.

One `NcclRasCollector` per worker with `nccl_ras: HOST[:PORT]` (name `nccl_ras:<worker>`).
A closed or silent RAS port is the worker's state, not a collector failure: the pass
succeeds with `sentinel_nccl_ras_up 0` and one warning per change of state.

`sentinel_nccl_ras_collectives_progressing{comm}` compares each communicator's
collective counts with the previous poll: 0 when they have not moved while work is
pending (ranks disagree on the counts, or the communicator has an error flag) — NCCL's
own description of a hang. Idle communicators (consistent, frozen counts) read 1. A
communicator is reported from its second sighting on; text replies only describe the
communicators whose ranks disagree, so only those get the series there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from sentinel.collectors.nccl_ras_report import (
    COMM_STATUSES,
    ERROR_KINDS,
    CommReport,
    RasParseError,
    RasReport,
    parse_ras_reply,
)
from sentinel.config.models import DEFAULT_RAS_PORT, NcclRasCollectorConfig, WorkerConfig, parse_ras_address
from sentinel.runtime.timeouts import wait_for
from sentinel.store import Appender, Store

__all__ = [
    "DEFAULT_RAS_PORT",
    "RAS_CLIENT_PROTOCOL",
    "CollectiveProgress",
    "NcclRasCollector",
    "RasProtocolError",
    "declare_nccl_ras_metrics",
    "nccl_ras_collectors",
    "parse_ras_address",
]

log = logging.getLogger(__name__)

RAS_CLIENT_PROTOCOL = 2
_MAX_REPLY_BYTES = 16 * 1024 * 1024  # JSON for thousands of ranks; far above any real reply
_MAX_LINE_BYTES = 64 * 1024
_PASS_MARGIN_S = 0.5


class RasProtocolError(Exception):
    """The peer does not speak the RAS client protocol as expected."""


def declare_nccl_ras_metrics(store: Store) -> None:
    """Exposition metadata of every series this collector writes."""
    meta = (
        ("sentinel_nccl_ras_up", "gauge", "1 when the worker's NCCL RAS service answered with a status report."),
        ("sentinel_nccl_ras_communicators", "gauge", "NCCL communicators of the job, by status."),
        ("sentinel_nccl_ras_ranks_missing", "gauge", "Communicator ranks whose data the RAS service could not gather."),
        ("sentinel_nccl_ras_ranks_dead", "gauge", "Ranks (processes, in text replies) NCCL RAS considers dead."),
        (
            "sentinel_nccl_ras_ranks_timeout",
            "gauge",
            "Communication timeouts NCCL RAS hit while gathering the last status (peers that did not answer).",
        ),
        ("sentinel_nccl_ras_errors", "gauge", "NCCL communicators with an error flag, by kind."),
        (
            "sentinel_nccl_ras_collectives_progressing",
            "gauge",
            "0 when a communicator's collective counts did not move since the last poll while work was pending.",
        ),
    )
    for name, type_, help_ in meta:
        store.set_meta(name, type_, help_)


class CollectiveProgress:
    """Per-communicator verdicts from successive reports (see the module docstring)."""

    def __init__(self) -> None:
        self._previous: dict[str, tuple[tuple[str, int, int], ...]] = {}

    def observe(self, comms: dict[str, CommReport]) -> dict[str, bool]:
        """comm -> progressing, for communicators with counts now and at the previous poll."""
        verdicts: dict[str, bool] = {}
        current: dict[str, tuple[tuple[str, int, int], ...]] = {}
        for comm, report in comms.items():
            if not report.counts:
                continue
            current[comm] = report.counts
            before = self._previous.get(comm)
            if before is not None:
                verdicts[comm] = report.counts != before or not report.pending
        self._previous = current
        return verdicts


class NcclRasCollector:
    """Polls one worker's NCCL RAS service for communicator health."""

    def __init__(self, worker: WorkerConfig, config: NcclRasCollectorConfig, store: Store) -> None:
        if worker.nccl_ras is None:
            raise ValueError(f"worker {worker.name!r} has no nccl_ras address")
        self.worker = worker.name
        self.name = f"nccl_ras:{worker.name}"
        self.interval_s = config.interval
        self.timeout_s = config.timeout + _PASS_MARGIN_S
        self.host, self.port = parse_ras_address(worker.nccl_ras)
        self._timeout = config.timeout
        self._target = {"worker": worker.name}
        self._json: bool | None = None  # None: not tried on this NCCL yet
        self._progress = CollectiveProgress()
        self._state: str | None = None
        self._problems: tuple[bool, bool, bool] = (False, False, False)
        declare_nccl_ras_metrics(store)

    @property
    def state(self) -> str | None:
        """ "ok", or why the last poll got no report ("unreachable", "timeout", "protocol",
        "unrecognised"); None before the first poll."""
        return self._state

    async def start(self) -> None:
        """Nothing to start: each poll opens its own connection (NCCL closes it after STATUS)."""

    async def close(self) -> None:
        """Nothing to release between polls."""

    async def collect(self, out: Appender) -> None:
        """One STATUS query; an unreachable or confused RAS service reads `up 0`."""
        target = self._target
        try:
            text, as_json = await wait_for(self.query(), self._timeout)
            report = parse_ras_reply(text)
        except Exception as exc:
            reason, detail = self._classify(exc)
            out.add("sentinel_nccl_ras_up", 0.0, target)
            self._note_state(reason, detail)
            return
        self._note_state("ok", "")
        out.add("sentinel_nccl_ras_up", 1.0, target)
        stuck = self._write(out, report)
        self._note_problems(report, stuck)
        if as_json and report.format != "json":
            self._json = False  # asked for JSON, got text: do not ask again

    async def query(self) -> tuple[str, bool]:
        """Run the protocol once; returns (reply text, whether JSON was granted)."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=_MAX_LINE_BYTES)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        try:
            greeting = await self._command(reader, writer, f"CLIENT PROTOCOL {RAS_CLIENT_PROTOCOL}")
            if not greeting.upper().startswith("SERVER PROTOCOL"):
                raise RasProtocolError(f"not an NCCL RAS service (greeting {greeting[:80]!r})")
            # Let NCCL give up on silent peers before we give up on NCCL, so a dead peer
            # shows up in the report instead of as our own timeout. (Integer: older
            # NCCL parses it with strtol.)
            await self._command(reader, writer, f"TIMEOUT {max(1, int(self._timeout / 2))}")
            as_json = False
            if self._json is not False:
                as_json = (await self._command(reader, writer, "SET FORMAT json")).upper() == "OK"
                self._json = as_json
            writer.write(b"STATUS\n")
            await writer.drain()
            return await _read_to_eof(reader), as_json
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: str) -> str:
        writer.write(command.encode("ascii") + b"\n")
        await writer.drain()
        try:
            line = await reader.readline()
        except ValueError:  # asyncio's LimitOverrunError: no newline within the limit
            raise RasProtocolError(f"answer to {command.split()[0]} is not a line") from None
        if not line:
            raise RasProtocolError(f"connection closed after {command.split()[0]}")
        return line.decode("utf-8", "replace").strip()

    def _classify(self, exc: Exception) -> tuple[str, str]:
        # TimeoutError first: on 3.11+ it is also an OSError.
        if isinstance(exc, asyncio.TimeoutError):
            self._json = None
            return "timeout", f"no complete status from {self.host}:{self.port} within {self._timeout:g}s"
        if isinstance(exc, OSError):
            self._json = None  # a restarted job may run another NCCL version
            return "unreachable", str(exc)
        if isinstance(exc, RasProtocolError):
            return "protocol", str(exc)
        if isinstance(exc, RasParseError):
            if self._json:
                self._json = False  # a broken JSON writer: the text report may still work
            return "unrecognised", str(exc)
        raise exc

    def _write(self, out: Appender, report: RasReport) -> int:
        """Write the report's series; returns how many communicators are not progressing."""
        target = self._target
        for status in sorted(set(COMM_STATUSES) | set(report.communicators)):
            out.add(
                "sentinel_nccl_ras_communicators", float(report.communicators.get(status, 0)), target, status=status
            )
        for kind in ERROR_KINDS:
            out.add("sentinel_nccl_ras_errors", float(report.errors.get(kind, 0)), target, kind=kind)
        out.add("sentinel_nccl_ras_ranks_missing", float(report.ranks_missing), target)
        out.add("sentinel_nccl_ras_ranks_dead", float(report.ranks_dead), target)
        out.add("sentinel_nccl_ras_ranks_timeout", float(report.timeouts), target)
        stuck = 0
        for comm, progressing in self._progress.observe(report.comms).items():
            out.add("sentinel_nccl_ras_collectives_progressing", 1.0 if progressing else 0.0, target, comm=comm)
            stuck += not progressing
        return stuck

    def _note_state(self, state: str, detail: str) -> None:
        previous, self._state = self._state, state
        if state == previous:
            return
        if state == "ok":
            if previous is not None:
                log.info("worker %s: NCCL RAS at %s:%d answers again", self.worker, self.host, self.port)
            return
        log.warning(
            "worker %s: NCCL RAS at %s:%d unavailable (%s): %s", self.worker, self.host, self.port, state, detail
        )

    def _note_problems(self, report: RasReport, stuck: int) -> None:
        problems = (report.ranks_dead > 0, report.ranks_missing > 0, stuck > 0)
        previous, self._problems = self._problems, problems
        if problems == previous:
            return
        if any(problems):
            log.warning(
                "worker %s: NCCL RAS reports %d dead and %d missing ranks; %d communicators not progressing",
                self.worker,
                report.ranks_dead,
                report.ranks_missing,
                stuck,
            )
        else:
            log.info("worker %s: NCCL RAS reports every communicator healthy again", self.worker)


def nccl_ras_collectors(
    workers: Iterable[WorkerConfig], config: NcclRasCollectorConfig, store: Store
) -> list[NcclRasCollector]:
    """One collector per worker that names an `nccl_ras` address."""
    return [NcclRasCollector(w, config, store) for w in workers if w.nccl_ras is not None]


async def _read_to_eof(reader: asyncio.StreamReader) -> str:
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(64 * 1024):
        size += len(chunk)
        if size > _MAX_REPLY_BYTES:
            raise RasProtocolError(f"status reply larger than {_MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)
    # RAS output is ASCII; replace anything else rather than fail on one odd byte.
    return b"".join(chunks).decode("utf-8", "replace")
