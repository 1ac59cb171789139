"""Log ingest benchmark: matching throughput next to grep, `logs scan`, and line-to-event latency.

1. Generates three logs of `--lines` lines in a temp directory: the benchmark's log
   (NCCL INFO heavy, with vLLM stats and HTTP access lines, about 0.1 % event lines),
   a fault-dense one (one event line in five) and an NCCL-INFO-only one (NCCL_DEBUG=INFO).
2. On each, runs the collector's hot path (read in chunks, split lines, count, check,
   match: `SourcePipeline.feed`) on one core, best of `--repeat`, and in the same run
   `grep -cE` with the catalogue's own regexes (translated to POSIX ERE) and `grep -cF`
   with its keywords (grep's least work). Both are timed in CPU seconds (this process's,
   the child's), which a busy shared machine disturbs less than wall time; wall time is
   printed too. Prints lines/s and the ratios.
3. `sentinel logs scan --json` over the fault-dense log, output included (to a file),
   in-process and as a command (start-up included).
4. Starts a real `LogCollector` on a file, writes event lines with small gaps, and
   prints the line-to-event latency (write() to the subscriber on the event bus) as
   p50/p99, with inotify and with the polling fallback.

    python bench/log_ingest.py [--lines 1000000] [--repeat 3] [--latency-lines 300] [--json]

With `--json` the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sentinel.config.models import LogCollectorConfig, LogSource, WorkerConfig
from sentinel.logs import Catalogue, LogCollector, LogMatcher
from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import Match
from sentinel.logs.pipeline import SourcePipeline
from sentinel.logs.scan import main as scan_main
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


NCCL_INFO = [line for line in INFO if " NCCL INFO " in line] + [
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO Channel {c:02d}/1 : {d}[{d}] -> {n}[{n}] [send] via NET/IB/{d}/GDRDMA",
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO {c} coll channels, 0 nvls channels, {c} p2p channels, 2 p2p channels "
    "per peer",
    "node-{h:02d}:189884:189901 [{d}] NCCL INFO misc/socket.cc:{c} -> 6",
]


def generate(
    path: Path, lines: int, event_ratio: float = 0.001, seed: int = 7, ordinary: list[str] | None = None
) -> None:
    rnd = random.Random(seed)
    ordinary = ordinary or INFO
    with open(path, "w", encoding="utf-8") as f:
        batch = []
        for i in range(lines):
            template = rnd.choice(RARE) if rnd.random() < event_ratio else rnd.choice(ordinary)
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


def sentinel_pass(path: Path, matcher: LogMatcher) -> tuple[float, int, int]:
    """The collector's per-chunk work over the whole file: (seconds, lines, events)."""
    events = 0

    def handoff(_: SourcePipeline, matches: list[Match], __: int) -> None:
        nonlocal events
        events += len(matches)

    pipeline = SourcePipeline("bench", str(path), matcher, handoff)
    splitter = LineSplitter(1024 * 1024)
    started = time.process_time()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(CHUNK):
            block, cut = splitter.feed(data)
            pipeline.feed(block, cut)
    return time.process_time() - started, pipeline.stats.lines, events


def matched_lines(path: Path, matcher: LogMatcher) -> int:
    return len({m.line_index for m in matcher.scan_bytes(path.read_bytes(), line_numbers=True)})


_CLASS_ESCAPES = {"d": "0-9", "w": "[:alnum:]_", "s": "[:space:]"}
_ESCAPES = {"d": "[0-9]", "w": "[[:alnum:]_]", "s": "[[:space:]]", "S": "[^[:space:]]", "W": "[^[:alnum:]_]", "z": "$"}


def to_ere(regex: str) -> str:
    """RE2 syntax -> POSIX ERE for GNU grep (LC_ALL=C, bytes): the same lines match.

    Groups become plain groups, lazy quantifiers greedy (the same lines match), `\\x{FFFD}`
    its UTF-8 bytes, character classes are rebuilt in ERE's order (`]` first, `-` last).
    """
    out: list[str] = []
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "[":
            i = _class_to_ere(regex, i, out)
            continue
        if c == "\\" and i + 1 < n:
            e = regex[i + 1]
            if regex.startswith("x{", i + 1):
                close = regex.index("}", i)
                out.append("(" + chr(int(regex[i + 3 : close], 16)) + ")")
                i = close + 1
                continue
            if e == "x":
                out.append(chr(int(regex[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES.get(e, "[|]" if e == "|" else "\\" + e))
            i += 2
            continue
        if regex.startswith("(?P<", i):
            out.append("(")
            i = regex.index(">", i) + 1
            continue
        if regex.startswith("(?:", i):
            out.append("(")
            i += 3
            continue
        if c == "?" and out and out[-1] and out[-1][-1] in "*+?}" and (i == 0 or regex[i - 1] != "\\"):
            i += 1  # lazy -> greedy: the same lines match
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _class_to_ere(regex: str, i: int, out: list[str]) -> int:
    """Translate the class starting at `regex[i]`; append it to `out`; return the index after it."""
    j = i + 1
    negate = regex.startswith("^", j)
    if negate:
        j += 1
    members: list[str] = []
    close_bracket = dash = False
    while j < len(regex) and (regex[j] != "]" or (not members and not close_bracket and regex[j - 1] == "[")):
        c = regex[j]
        if c == "\\" and j + 1 < len(regex):
            e = regex[j + 1]
            j += 2
            if e == "]":
                close_bracket = True
            elif e == "-":
                dash = True
            elif e == "n":
                pass  # grep sees one line at a time: no newline to exclude
            else:
                members.append(_CLASS_ESCAPES.get(e, e))
            continue
        if c == "-" and (j + 1 < len(regex) and regex[j + 1] == "]"):
            dash = True
        else:
            members.append(c)
        j += 1
    body = ("]" if close_bracket else "") + "".join(members) + ("-" if dash else "")
    out.append("[" + ("^" if negate else "") + (body or "\\n") + "]")
    return j + 1


def grep_args(catalogue: Catalogue, fixed: bool) -> list[str]:
    if fixed:
        keywords = sorted({k for p in catalogue.patterns for k in p.keywords})
        return ["grep", "-c", "-F", *[a for k in keywords for a in ("-e", k)]]
    args = ["grep", "-c", "-E"]
    for pattern in catalogue.patterns:
        args += ["-e", to_ere(pattern.regex.pattern)]
    return args


def grep_pass(path: Path, args: list[str]) -> tuple[float, float, int]:
    """(child CPU seconds, wall seconds, matching lines) of one grep run."""
    env = {**os.environ, "LC_ALL": "C"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([*[os.fsencode(a) for a in args], str(path)], capture_output=True, env=env, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"grep failed: {result.stderr.decode(errors='replace').strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, int(result.stdout.strip() or 0)


def scan_in_process(path: Path, out_path: Path) -> tuple[float, float]:
    """(CPU, wall) seconds of `sentinel logs scan --json PATH`, its output written to a file."""
    with open(out_path, "w", encoding="utf-8", buffering=1 << 20) as out, contextlib.redirect_stdout(out):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        status = scan_main(["--json", str(path)])
        out.flush()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if status != 0:
        raise RuntimeError(f"logs scan exited with {status}")
    return cpu, wall


def scan_command(path: Path, out_path: Path) -> tuple[float, float]:
    """(child CPU, wall) seconds of `python -m sentinel.logs.scan --json PATH > file`, start-up included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(out_path, "wb") as out:
        subprocess.run([sys.executable, "-m", "sentinel.logs.scan", "--json", str(path)], stdout=out, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


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


LOGS = {
    "benchmark": ("NCCL INFO heavy, ~0.1% event lines", 0.001, None),
    "fault-dense": ("one event line in five", 0.2, None),
    "nccl-info": ("NCCL_DEBUG=INFO: NCCL INFO lines, ~0.1% event lines", 0.001, NCCL_INFO),
}


def throughput(path: Path, matcher: LogMatcher, catalogue: Catalogue, repeat: int) -> dict[str, Any]:
    """Sentinel's hot path and both greps over one log, best of `repeat` (CPU time)."""
    runs = [sentinel_pass(path, matcher) for _ in range(repeat)]
    best, lines, events = min(runs)
    result: dict[str, Any] = {"lines": lines, "events": events, "lines_per_s": lines / best, "cpu_s": best}
    if shutil.which("grep"):
        for key, fixed in (("grep", False), ("grep_F", True)):
            args = grep_args(catalogue, fixed)
            grep_runs = [grep_pass(path, args) for _ in range(repeat)]
            cpu, wall, count = min(grep_runs)
            result[f"{key}_lines_per_s"] = lines / cpu if cpu else float("inf")
            result[f"{key}_wall_lines_per_s"] = lines / wall
            result[f"{key}_matching_lines"] = count
        result["ratio_vs_grep"] = result["lines_per_s"] / result["grep_lines_per_s"]
        result["ratio_vs_grep_F"] = result["lines_per_s"] / result["grep_F_lines_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--latency-lines", type=int, default=300)
    parser.add_argument("--poll-lines", type=int, default=40, help="lines timed with the polling fallback")
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", choices=("auto", "hyperscan", "re2"), default="auto", help="keyword prefilter")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    args = parser.parse_args()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"machine: {machine}; load average {os.getloadavg()[0]:.1f}")
    report: dict[str, Any] = {"machine": machine, "load_average": os.getloadavg()[0], "logs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    try:
        catalogue = Catalogue.load()
        matcher = LogMatcher(catalogue, engine=args.engine)
        report["engine"] = matcher.engine
        pinned = pin_to_one_core()
        print(f"prefilter: {matcher.engine}; {pinned}; times are CPU seconds, best of {args.repeat}")
        for name, (what, ratio, ordinary) in LOGS.items():
            path = tmp / f"{name}.log"
            generate(path, args.lines, event_ratio=ratio, ordinary=ordinary)
            r = throughput(path, matcher, catalogue, args.repeat)
            r["mb"] = path.stat().st_size / 1e6
            report["logs"][name] = r
            line = (
                f"{name} ({what}; {r['mb']:.0f} MB): sentinel {r['lines_per_s'] / 1e6:.2f} M lines/s, "
                f"{r['events']} events"
            )
            if "grep_lines_per_s" in r:
                line += (
                    f"; grep -cE {r['grep_lines_per_s'] / 1e6:.2f} M lines/s (ratio {r['ratio_vs_grep']:.2f}), "
                    f"grep -cF keywords {r['grep_F_lines_per_s'] / 1e6:.2f} M lines/s "
                    f"(ratio {r['ratio_vs_grep_F']:.2f})"
                )
            print(line)
        dense = tmp / "fault-dense.log"
        scans = [scan_in_process(dense, tmp / "scan.jsonl") for _ in range(args.repeat)]
        cpu, wall = min(scans)
        with open(tmp / "scan.jsonl", encoding="utf-8") as f:
            n_events = sum(1 for _ in f)
        command_cpu, command_wall = scan_command(dense, tmp / "scan-cmd.jsonl")
        report["scan_json_lines_per_s"] = args.lines / cpu
        report["scan_json_wall_lines_per_s"] = args.lines / wall
        report["scan_json_command_lines_per_s"] = args.lines / command_cpu
        report["scan_json_events"] = n_events
        print(
            f"logs scan --json, fault-dense, output to a file: {args.lines / cpu / 1e6:.2f} M lines/s "
            f"({n_events} events); as a command, start-up included: {args.lines / command_cpu / 1e6:.2f} M lines/s "
            f"({command_wall:.2f} s wall)"
        )

        for inotify in (True, False):
            count = args.latency_lines if inotify else args.poll_lines
            if count <= 0:
                continue
            samples = asyncio.run(latency(tmp, count, args.gap_ms / 1000, inotify=inotify))
            mode = "inotify" if inotify else f"polling every {LogCollectorConfig().poll_interval:g}s"
            key = "latency_inotify" if inotify else "latency_poll"
            report[f"{key}_p50_ms"] = statistics.median(samples) * 1000
            report[f"{key}_p99_ms"] = percentile(samples, 0.99) * 1000
            print(
                f"line-to-event latency, {mode}: p50 {statistics.median(samples) * 1000:.2f} ms, "
                f"p99 {percentile(samples, 0.99) * 1000:.2f} ms, max {max(samples) * 1000:.2f} ms "
                f"over {len(samples)} lines {args.gap_ms:g} ms apart"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bench = report["logs"]["benchmark"]
    report.update(
        lines_per_s=bench["lines_per_s"],
        grep_lines_per_s=bench.get("grep_lines_per_s"),
        ratio_vs_grep=bench.get("ratio_vs_grep"),
    )
    if args.json:
        print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
