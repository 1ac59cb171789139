"""Log ingest benchmark: matching throughput next to grep, and line-to-event latency.

1. Generates a log of 1M lines (NCCL INFO heavy, with vLLM stats and HTTP access
   lines, and about 0.1 % WARN / collective timeout / OOM lines) in a temp directory.
2. Runs the collector's hot path (read in chunks, split lines, decode, count, match:
   `SourcePipeline.feed`) over it on one core, best of three, and `grep -cE` with the
   catalogue's own regexes (translated to POSIX ERE) over the same file in the same
   run; prints lines/s of both and their ratio.
3. Starts a real `LogCollector` on a file, writes a few hundred event lines with small
   gaps, and prints the line-to-event latency (write() to the subscriber on the event
   bus) as p50/p99, with inotify and with the polling fallback.

    python bench/log_ingest.py [--lines 1000000] [--latency-lines 300] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sentinel.config.models import LogCollectorConfig, LogSource, WorkerConfig
from sentinel.logs import Catalogue, LogCollector, Matcher
from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import Match
from sentinel.logs.pipeline import SourcePipeline
from sentinel.store import Store
from sentinel.store.events import Event, EventBus

CHUNK = 256 * 1024  # the tailer's read size

INFO = [
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO Channel {c:02d}/0 : {d}[{d}] -> {n}[{n}] via P2P/IPC/read",
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO NET/IB : Using [0]mlx5_{d}:1/IB ; OOB eth0:10.0.0.{h}<0>",
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO comm 0x55{c:02d}a1 rank {d} nranks 8 cudaDev {d} busId 3b000 - "
    "Init COMPLETE",
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO Connected all rings, use ring PXN 0 GDR 1",
    "INFO 05-05 06:16:{c:02d} [loggers.py:123] Engine 000: Avg prompt throughput: 12.3 tokens/s, Avg generation "
    "throughput: 45.6 tokens/s, Running: 3 reqs, Waiting: 0 reqs, GPU KV cache usage: 7.1%, "
    "Prefix cache hit rate: 0.0%",
    'INFO:     127.0.0.1:5{c:04d} - "POST /v1/chat/completions HTTP/1.1" 200 OK',
]
RARE = [
    "[2026-05-05 06:16:47] node-{h:02d}:189884:189884 [{d}] transport/net_ib.cc:1297 NCCL WARN NET/IB : Got "
    "completion from peer 10.0.0.2<5012> with status=12(transport retry counter exceeded) opcode=0 len=0",
    "[rank{d}]:[E202 12:25:57.436 ProcessGroupNCCL.cpp:697] [PG ID 0 PG GUID 0(default_pg) Rank {d}] Watchdog caught "
    "collective operation timeout: WorkNCCL(SeqNum={c}, OpType=ALLREDUCE, NumelIn=1024, NumelOut=1024, "
    "Timeout(ms)=600000) ran for 600081 milliseconds before timing out.",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU {d} has a total capacity of "
    "79.19 GiB of which 5.06 MiB is free.",
]


def generate(path: Path, lines: int, event_ratio: float = 0.001, seed: int = 7) -> None:
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        batch = []
        for i in range(lines):
            template = rnd.choice(RARE) if rnd.random() < event_ratio else rnd.choice(INFO)
            d = rnd.randrange(8)
            batch.append(template.format(h=rnd.randrange(1, 16), d=d, n=(d + 1) % 8, c=i % 64))
            if len(batch) == 10_000:
                f.write("\n".join(batch) + "\n")
                batch = []
        if batch:
            f.write("\n".join(batch) + "\n")


# -- throughput ---------------------------------------------------------------------------


def pin_to_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def sentinel_pass(path: Path, matcher: Matcher) -> tuple[float, int, int]:
    """The collector's per-chunk work over the whole file: (seconds, lines, events)."""
    events = 0

    def handoff(_: SourcePipeline, matches: list[Match], __: int) -> None:
        nonlocal events
        events += len(matches)

    pipeline = SourcePipeline("bench", str(path), matcher, handoff)
    splitter = LineSplitter(1024 * 1024)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(CHUNK):
            block, cut = splitter.feed(data)
            pipeline.feed(block, cut)
    return time.perf_counter() - started, pipeline.stats.lines, events


def matched_lines(path: Path, matcher: Matcher) -> int:
    return len({m.line_index for m in matcher.scan_bytes(path.read_bytes(), line_numbers=True)})


def to_ere(regex: str) -> str:
    """Python `re` -> POSIX ERE for GNU grep: groups plain, lazy quantifiers greedy, lookaheads dropped."""
    out: list[str] = []
    i, n, in_class = 0, len(regex), False
    while i < n:
        c = regex[i]
        if c == "\\" and i + 1 < n:
            e = regex[i + 1]
            table = (
                {"d": "0-9", "w": "[:alnum:]_", "s": "[:space:]"}
                if in_class
                else {
                    "d": "[0-9]",
                    "w": "[[:alnum:]_]",
                    "s": "[[:space:]]",
                    "S": "[^[:space:]]",
                }
            )
            out.append(table.get(e, "\\" + e))
            i += 2
            continue
        if in_class:
            in_class = c != "]" or regex[i - 1] == "["
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
        elif regex.startswith("(?P<", i):
            out.append("(")
            i = regex.index(">", i) + 1
            continue
        elif regex.startswith("(?:", i):
            out.append("(")
            i += 3
            continue
        elif regex.startswith("(?!", i):  # a negative lookahead only removes repeats: drop it
            depth, j = 0, i
            while True:
                depth += {"(": 1, ")": -1}.get(regex[j], 0)
                j += 1
                if depth == 0:
                    break
            i = j
            continue
        elif c == "?" and out and out[-1] in ("*", "+", "?", "}"):
            pass  # lazy -> greedy: the same lines match
        else:
            out.append(c)
        i += 1
    return "".join(out)


def grep_pass(path: Path, catalogue: Catalogue) -> tuple[float, int]:
    args = ["grep", "-c", "-E"]
    for pattern in catalogue.patterns:
        args += ["-e", to_ere(pattern.regex.pattern)]
    env = {**os.environ, "LC_ALL": "C"}
    started = time.perf_counter()
    result = subprocess.run([*args, str(path)], capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise RuntimeError(f"grep failed: {result.stderr.strip()}")
    return elapsed, int(result.stdout.strip() or 0)


# -- latency -------------------------------------------------------------------------------


async def latency(tmp: Path, count: int, gap_s: float, *, inotify: bool) -> list[float]:
    log = tmp / f"latency-{'inotify' if inotify else 'poll'}.log"
    log.write_text("")
    store, bus = Store(), EventBus()
    bus.bind_loop(asyncio.get_running_loop())
    arrivals: list[float] = []
    arrived = asyncio.Event()

    def on_event(event: Event) -> None:
        if event.kind == "cuda_oom":
            arrivals.append(time.perf_counter())
            arrived.set()

    bus.subscribe(on_event)
    worker = WorkerConfig(name="bench", logs=(LogSource(path=str(log)),))
    # No flood limit here: every line must become an event to be timed.
    collector = LogCollector(
        LogCollectorConfig(), [worker], store, bus, tmp / f"state-{inotify}", inotify=inotify, max_events_per_s=10**9
    )
    await collector.start()
    await asyncio.sleep(0.3)
    out: list[float] = []
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(count):
            arrived.clear()
            written = time.perf_counter()
            os.write(fd, f"RuntimeError: CUDA error: out of memory (bench line {i})\n".encode())
            await asyncio.wait_for(arrived.wait(), 5.0)
            out.append(arrivals[-1] - written)
            await asyncio.sleep(gap_s)
    finally:
        os.close(fd)
        await collector.close()
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--latency-lines", type=int, default=300)
    parser.add_argument("--poll-lines", type=int, default=40, help="lines timed with the polling fallback")
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    try:
        path = tmp / "worker.log"
        generate(path, args.lines)
        size = path.stat().st_size
        print(f"log: {args.lines:,} lines, {size / 1e6:.1f} MB (NCCL INFO heavy, ~0.1% event lines)")

        catalogue = Catalogue.load()
        matcher = Matcher(catalogue)
        pinned = pin_to_one_core()
        runs = [sentinel_pass(path, matcher) for _ in range(args.repeat)]
        best, lines, events = min(runs)
        ours = lines / best
        print(
            f"sentinel (read+split+decode+match, {pinned}): {ours / 1e6:.2f} M lines/s "
            f"({best:.3f} s best of {args.repeat}), {events} events on {matched_lines(path, matcher)} lines"
        )
        if shutil.which("grep"):
            grep_runs = [grep_pass(path, catalogue) for _ in range(args.repeat)]
            g_best, g_count = min(grep_runs)
            theirs = lines / g_best
            print(
                f"grep -cE, same {len(catalogue.patterns)} patterns, LC_ALL=C: {theirs / 1e6:.2f} M lines/s "
                f"({g_best:.3f} s best of {args.repeat}), {g_count} matching lines"
            )
            print(f"ratio sentinel / grep: {ours / theirs:.2f}")
        else:
            print("grep not found: no baseline")

        for inotify in (True, False):
            count = args.latency_lines if inotify else args.poll_lines
            samples = asyncio.run(latency(tmp, count, args.gap_ms / 1000, inotify=inotify))
            mode = "inotify" if inotify else f"polling every {LogCollectorConfig().poll_interval:g}s"
            print(
                f"line-to-event latency, {mode}: p50 {statistics.median(samples) * 1000:.2f} ms, "
                f"p99 {percentile(samples, 0.99) * 1000:.2f} ms, max {max(samples) * 1000:.2f} ms "
                f"over {len(samples)} lines {args.gap_ms:g} ms apart"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
