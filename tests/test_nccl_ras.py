"""NCCL RAS collector against a stub RAS service (asyncio.start_server on port 0).

The stub speaks the client protocol of NCCL's src/ras/client_support.cc: `CLIENT
PROTOCOL n` -> `SERVER PROTOCOL 2`, `TIMEOUT n` -> `OK`, `SET FORMAT json` -> `OK` (or
`ERROR: Unknown command ...` as NCCL before 2.28.7 says), `STATUS` -> the report, then
the connection closes. Replies are written in NCCL's own layout (text and JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.collectors.base import CollectorRunner
from sentinel.collectors.nccl_ras import NcclRasCollector, nccl_ras_collectors, parse_ras_address
from sentinel.collectors.nccl_ras_report import RasParseError, parse_ras_reply, parse_ras_text
from sentinel.config.models import NcclRasCollectorConfig, WorkerConfig
from sentinel.store import Store

COMM = "5a0d3c9e81f2b4c7"

HEADER = """NCCL version 2.27.3+cuda12.9 compiled with CUDA 12.9
CUDA runtime version 12090, driver version 12090

Job summary
===========

  Nodes  Processes         GPUs  Processes     GPUs
(total)   per node  per process    (total)  (total)
      1          8            1          8        8

Communicators... (0.002s)
=============

Group     Comms     Nodes     Ranks     Ranks     Ranks    Status  Errors
    #  in group  per comm  per node  per comm  in group
"""

HEALTHY_TEXT = (
    HEADER
    + """    0         1         1         8         8         8   RUNNING      OK
    1         8         1         1         1         8   RUNNING      OK

Errors
======

Warnings
========

"""
)

DEAD_RANK_TEXT = (
    HEADER
    + """    0         1         1       7-8         8         7   RUNNING  INCOMPLETE

Errors
======

DEAD
  1 job process is considered dead (unreachable via the RAS network)
  Process 4242 on node 10.0.0.5 managing GPU 5

#0-0 (5a0d3c9e81f2b4c7) INCOMPLETE
  Missing communicator data from 1 rank
  Rank 5 -- GPU 5 managed by process 4242 on node 10.0.0.5

Warnings
========

TIMEOUT
  Encountered 2 communication timeouts while gathering communicator data

"""
)

MISSING_RANK_TEXT = (
    HEADER
    + """    0         1         1       6-8         8         6   RUNNING  INCOMPLETE

Errors
======

INCOMPLETE
  Missing communicator data from 2 job processes
  Process 4242 on node 10.0.0.5 managing GPU 5
  Process 4243 on node 10.0.0.5 managing GPU 6

#0-0 (5a0d3c9e81f2b4c7) INCOMPLETE
  Missing communicator data from 2 ranks
  Rank 5 -- GPU 5 managed by process 4242 on node 10.0.0.5
  Rank 6 -- GPU 6 managed by process 4243 on node 10.0.0.5

Warnings
========

"""
)


def stuck_text(ahead: int, behind: int) -> str:
    """Seven ranks launched AllReduce up to `ahead`; rank 3 is at `behind`."""
    return (
        HEADER
        + f"""    0         1         1         8         8         8   RUNNING  MISMATCH

Errors
======

Warnings
========

#0-0 ({COMM}) MISMATCH
  Communicator ranks have different AllReduce operation counts
  7 ranks have launched up to operation {ahead}
  Rank 3 has launched up to operation {behind} -- GPU 3 managed by process 4240 on node 10.0.0.5

"""
    )


def json_report(
    counts: list[int],
    *,
    missing: list[tuple[int, bool, bool]] = (),  # type: ignore[assignment]
    async_error: int = 0,
    timeouts: int = 0,
) -> str:
    """NCCL's JSON layout: one communicator with a rank per count, plus missing ranks."""
    ranks = [
        {
            "rank": i,
            "host": "10.0.0.5",
            "pid": 4200 + i,
            "cuda_dev": i,
            "nvml_dev": i,
            "status": {
                "init_state": 0,
                "async_error": async_error if i == 0 else 0,
                "finalize_called": False,
                "destroy_flag": False,
                "abort_flag": False,
            },
            "collective_counts": {"Broadcast": 0, "Reduce": 0, "AllGather": 2, "ReduceScatter": 0, "AllReduce": c},
        }
        for i, c in enumerate(counts)
    ]
    missing_ranks = [
        {
            "rank": r,
            "host": "10.0.0.6",
            "pid": -1,
            "cuda_dev": r,
            "nvml_dev": r,
            "status": {"unresponsive": unresponsive, "considered_dead": dead},
        }
        for r, unresponsive, dead in missing
    ]
    doc = {
        "nccl_version": "2.28.7",
        "cuda_runtime_version": 12090,
        "cuda_driver_version": 12090,
        "timestamp": "2026-05-05 06:16:47",
        "communicators_count": 1,
        "communicators": [
            {
                "hash": "0x" + COMM.lstrip("0"),
                "secondary_hash": "0x1:0x2",
                "size": len(counts) + len(missing_ranks),
                "ranks_count": len(counts),
                "missing_ranks_count": len(missing_ranks),
                "ranks": ranks,
                "missing_ranks": missing_ranks,
            }
        ],
        "ras": {"collection_time_sec": 0.004, "timeouts_count": timeouts},
    }
    return json.dumps(doc, indent=2) + "\n"


# -- the stub service ---------------------------------------------------------------------


@dataclass
class StubRas:
    """A RAS service; `text`/`json` are the next replies, `commands` what clients sent."""

    text: str = HEALTHY_TEXT
    json: str | None = None  # None: an NCCL without JSON output
    greeting: bytes = b"SERVER PROTOCOL 2\n"
    silent: bool = False
    commands: list[str] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        as_json = False
        try:
            while line := await reader.readline():
                command = line.decode().strip()
                self.commands.append(command)
                if self.silent:
                    await asyncio.Event().wait()
                upper = command.upper()
                if upper.startswith("CLIENT PROTOCOL"):
                    writer.write(self.greeting)
                elif upper.startswith("TIMEOUT "):
                    writer.write(b"OK\n")
                elif upper == "SET FORMAT JSON":
                    as_json = self.json is not None
                    writer.write(b"OK\n" if as_json else b"ERROR: Unknown command " + line.strip() + b"\n")
                elif upper in ("STATUS", "VERBOSE STATUS"):
                    writer.write((self.json if as_json and self.json else self.text).encode())
                    await writer.drain()
                    break  # NCCL closes the connection once the report is sent
                else:
                    writer.write(b"ERROR: Unknown command " + line.strip() + b"\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def ras() -> AsyncIterator[tuple[StubRas, int]]:
    stub = StubRas()
    server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
    yield stub, server.sockets[0].getsockname()[1]
    server.close()


def make(port: int, store: Store, timeout: float = 2.0) -> tuple[NcclRasCollector, CollectorRunner]:
    worker = WorkerConfig(name="w0", nccl_ras=f"127.0.0.1:{port}")
    collector = NcclRasCollector(worker, NcclRasCollectorConfig(interval=1, timeout=timeout), store)
    return collector, CollectorRunner(collector, store)


def value(store: Store, name: str, **labels: str) -> float | None:
    hits = [s for s in store.latest(name) if all(dict(s.labels).get(k) == v for k, v in labels.items())]
    assert len(hits) <= 1, hits
    return hits[0].value if hits else None


# -- healthy ------------------------------------------------------------------------------


async def test_healthy_text_report_counts_running_communicators(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    assert runner.health.up
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_communicators", worker="w0", status="RUNNING") == 9.0
    assert value(store, "sentinel_nccl_ras_communicators", worker="w0", status="ABORT") == 0.0
    for kind in ("mismatch", "error", "incomplete"):
        assert value(store, "sentinel_nccl_ras_errors", worker="w0", kind=kind) == 0.0
    assert value(store, "sentinel_nccl_ras_ranks_dead", worker="w0") == 0.0
    assert value(store, "sentinel_nccl_ras_ranks_missing", worker="w0") == 0.0
    assert value(store, "sentinel_nccl_ras_ranks_timeout", worker="w0") == 0.0
    assert stub.commands[:2] == ["CLIENT PROTOCOL 2", "TIMEOUT 1"]
    assert stub.commands[-1] == "STATUS"


async def test_json_is_used_where_the_server_offers_it(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.json = json_report([100] * 8)
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    assert "SET FORMAT json" in stub.commands
    assert value(store, "sentinel_nccl_ras_communicators", worker="w0", status="RUNNING") == 1.0
    assert value(store, "sentinel_nccl_ras_collectives_progressing", worker="w0", comm=COMM) is None  # no baseline

    stub.json = json_report([120] * 8)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_collectives_progressing", worker="w0", comm=COMM) == 1.0


async def test_idle_communicator_with_consistent_frozen_counts_is_progressing(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.json = json_report([100] * 8)
    store = Store()
    _, runner = make(port, store)
    for _ in range(3):
        await runner.tick()
    assert value(store, "sentinel_nccl_ras_collectives_progressing", worker="w0", comm=COMM) == 1.0


async def test_old_nccl_without_json_gets_the_text_report_and_is_not_asked_again(
    ras: tuple[StubRas, int],
) -> None:
    stub, port = ras
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    await runner.tick()
    assert stub.commands.count("SET FORMAT json") == 1
    assert stub.connections == 2
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 1.0


# -- faults -------------------------------------------------------------------------------


async def test_dead_rank_text_report(ras: tuple[StubRas, int], caplog: pytest.LogCaptureFixture) -> None:
    stub, port = ras
    stub.text = DEAD_RANK_TEXT
    store = Store()
    _, runner = make(port, store)
    with caplog.at_level(logging.WARNING, logger="sentinel.collectors.nccl_ras"):
        await runner.tick()
        await runner.tick()
    assert value(store, "sentinel_nccl_ras_ranks_dead", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_ranks_missing", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_ranks_timeout", worker="w0") == 2.0
    assert value(store, "sentinel_nccl_ras_errors", worker="w0", kind="incomplete") == 1.0
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 1.0
    assert len(caplog.records) == 1 and "1 dead" in caplog.records[0].getMessage()


async def test_dead_rank_json_report(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.json = json_report([50] * 7, missing=[(7, True, True)], timeouts=1)
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_ranks_dead", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_ranks_missing", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_ranks_timeout", worker="w0") == 1.0
    assert value(store, "sentinel_nccl_ras_errors", worker="w0", kind="incomplete") == 1.0


async def test_missing_rank_reports(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.text = MISSING_RANK_TEXT
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_ranks_missing", worker="w0") == 2.0
    assert value(store, "sentinel_nccl_ras_ranks_dead", worker="w0") == 0.0

    stub.json = json_report([50] * 6, missing=[(6, True, False), (7, False, False)])
    await NcclRasCollector(
        WorkerConfig(name="w1", nccl_ras=f"127.0.0.1:{port}"), NcclRasCollectorConfig(), store
    ).collect(app := store.appender("t"))
    app.commit()
    assert value(store, "sentinel_nccl_ras_ranks_missing", worker="w1") == 1.0
    # Rank 7 answered but not as a member: NCCL calls that a mismatch.
    assert value(store, "sentinel_nccl_ras_errors", worker="w1", kind="mismatch") == 1.0


async def test_async_error_on_a_rank_is_an_error(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.json = json_report([9] * 4, async_error=6)  # ncclRemoteError
    store = Store()
    _, runner = make(port, store)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_errors", worker="w0", kind="error") == 1.0


@pytest.mark.parametrize("form", ["text", "json"])
async def test_stuck_collective_counts_read_not_progressing_until_they_move(
    ras: tuple[StubRas, int], form: str, caplog: pytest.LogCaptureFixture
) -> None:
    stub, port = ras

    def reply(ahead: int, behind: int) -> None:
        if form == "text":
            stub.text = stuck_text(ahead, behind)
        else:
            stub.json = json_report([ahead] * 3 + [behind] + [ahead] * 4)

    store = Store()
    _, runner = make(port, store)
    reply(1500, 1499)
    with caplog.at_level(logging.WARNING, logger="sentinel.collectors.nccl_ras"):
        for _ in range(3):  # seven ranks wait in AllReduce #1500 for rank 3, which never comes
            await runner.tick()
    assert value(store, "sentinel_nccl_ras_collectives_progressing", worker="w0", comm=COMM) == 0.0
    assert value(store, "sentinel_nccl_ras_errors", worker="w0", kind="mismatch") == 1.0
    assert len(caplog.records) == 1 and "1 communicators not progressing" in caplog.records[0].getMessage()

    reply(1620, 1619)  # mismatched again, but moving: a busy job caught mid-collective
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_collectives_progressing", worker="w0", comm=COMM) == 1.0


# -- unreachable and confused services --------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_closed_ras_port_reads_up_zero_and_warns_exactly_once(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    _, runner = make(_closed_port(), store)
    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            await runner.tick()
    assert runner.health.up, "a closed RAS port is the worker's state, not a Sentinel failure"
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 0.0
    assert store.latest("sentinel_nccl_ras_communicators") == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()


async def test_ras_port_that_accepts_and_never_answers_is_bounded(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.silent = True
    store = Store()
    _, runner = make(port, store, timeout=0.3)
    started = time.perf_counter()
    await runner.tick()
    assert time.perf_counter() - started < 1.0
    assert runner.health.up
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 0.0


async def test_service_that_is_not_nccl_ras_is_a_protocol_problem(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.greeting = b"HTTP/1.1 400 Bad Request\r\n"
    store = Store()
    collector, runner = make(port, store)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 0.0
    assert collector.state == "protocol"


async def test_unrecognised_reply_reads_up_zero(ras: tuple[StubRas, int]) -> None:
    stub, port = ras
    stub.text = "hello there\n"
    store = Store()
    collector, runner = make(port, store)
    await runner.tick()
    assert value(store, "sentinel_nccl_ras_up", worker="w0") == 0.0
    assert collector.state == "unrecognised"


# -- parsing ------------------------------------------------------------------------------


def test_no_communicators_yet_is_a_valid_report() -> None:
    report = parse_ras_text(HEADER.split("Group")[0] + "No communicator data collected!\n")
    assert sum(report.communicators.values()) == 0


def test_text_report_keeps_per_communicator_counts_from_mismatch_blocks() -> None:
    report = parse_ras_text(stuck_text(10, 9))
    assert report.comms[COMM].counts == (("AllReduce", 9, 1), ("AllReduce", 10, 7))
    assert report.comms[COMM].pending


def test_one_collector_per_worker_with_a_ras_address() -> None:
    workers = [WorkerConfig(name="a", nccl_ras="localhost"), WorkerConfig(name="b")]
    built = nccl_ras_collectors(workers, NcclRasCollectorConfig(), Store())
    assert [(c.name, c.host, c.port) for c in built] == [("nccl_ras:a", "localhost", 28028)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", ("localhost", 28028)),
        ("127.0.0.1:29000", ("127.0.0.1", 29000)),
        ("[::1]:28028", ("::1", 28028)),
        (":28029", ("localhost", 28029)),
    ],
)
def test_ras_address_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_ras_address(text) == expected


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.lists(st.sampled_from([*HEALTHY_TEXT.splitlines(), *stuck_text(5, 4).splitlines(), "{", "}"])).map(
            "\n".join
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        ).map(lambda doc: json.dumps({"communicators": [doc], "ras": doc})),
    )
)
def test_arbitrary_replies_raise_nothing_but_ras_parse_error(text: str) -> None:
    with contextlib.suppress(RasParseError):
        parse_ras_reply(text)
