"""Store benchmark: 2,000 series at 1 Hz over a full 15 min retention.

Prints bytes per sample, append throughput and range-read throughput, each next to a
naive baseline measured in the same run (a dict of Python lists of (ts, value)
tuples, the structure the store's array buffers replace).

`--plateau` (C10) measures the memory a store settles at once retention trims it:
10,000 series at 1 Hz with 2 min retention, trimmed every 15 s as the daemon does,
with today's compaction rule (a quarter of the live window dead) next to the old one
(more than 1,024 dead samples and more than half), both in the same run. `--json`
prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from bisect import bisect_right

from sentinel.store import LabelMatcher, MatchOp, Store, labels_from
from sentinel.store import series as series_module

SERIES = 2_000
RETENTION_S = 900


def fill_store(store: Store, series: int, seconds: int) -> float:
    keys = [labels_from("sentinel_gpu_utilization_ratio", gpu=str(i % 8), worker=f"w{i // 8}") for i in range(series)]
    started = time.perf_counter()
    for t in range(seconds):
        with store.appender("bench", t * 1000) as app:
            for k in keys:
                app.add_labels(k, 0.5)
    return time.perf_counter() - started


def fill_naive(data: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]], series: int, seconds: int) -> float:
    keys = [labels_from("sentinel_gpu_utilization_ratio", gpu=str(i % 8), worker=f"w{i // 8}") for i in range(series)]
    started = time.perf_counter()
    for t in range(seconds):
        for k in keys:
            data.setdefault(k, []).append((t * 1000, 0.5))
    return time.perf_counter() - started


def measure(fill: object, *args: object) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    elapsed = fill(*args)  # type: ignore[operator]
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return float(elapsed), current


def _legacy_should_compact(dead: int, live: int) -> bool:
    """The rule before C10: more than 1,024 dead samples, and more dead than live."""
    return dead > 1024 and dead * 2 > dead + live


def _buffer_bytes(store: Store) -> int:
    """Bytes the sample buffers hold, allocated capacity included (what RSS pays for)."""
    return sum(sys.getsizeof(s._ts) + sys.getsizeof(s._vals) for s in store.select([]))


def plateau(series: int, retention_s: int, seconds: int, legacy: bool) -> dict[str, float]:
    """Peak sample-buffer bytes once trimming has run past retention, and the time trimming took."""
    saved = series_module._should_compact
    if legacy:
        series_module._should_compact = _legacy_should_compact
    try:
        keys = [labels_from("vllm:x", worker=f"w{i // 1000}", series=str(i)) for i in range(series)]
        store = Store(retention_ms=retention_s * 1000)
        trim_s = 0.0
        peak = 0
        held_peak = 0
        for t in range(seconds):
            with store.appender("bench", t * 1000) as app:
                for k in keys:
                    app.add_labels(k, 0.5)
            if t % 15 == 0:
                started = time.perf_counter()
                store.trim(now=t * 1000)
                trim_s += time.perf_counter() - started
                if t > retention_s:
                    peak = max(peak, _buffer_bytes(store))
                    held_peak = max(held_peak, max(len(s.raw()[0]) + s._head for s in store.select([])))
        return {"peak_bytes": peak, "samples_held_peak": held_peak, "trim_seconds": trim_s}
    finally:
        series_module._should_compact = saved


def main_plateau(args: argparse.Namespace) -> None:
    # Past retention + 1,024 s, so the old rule reaches its plateau too.
    retention, seconds = 120, 120 + 1024 + 120
    new = plateau(args.series, retention, seconds, legacy=False)
    old = plateau(args.series, retention, seconds, legacy=True)
    mib = 1024 * 1024
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"plateau: {args.series:,} series at 1 Hz, retention {retention} s, trimmed every 15 s, {seconds} s run")
    for name, r in (("quarter rule (now)", new), ("1,024-sample rule (before)", old)):
        print(
            f"  {name:27s} sample buffers peak {r['peak_bytes'] / mib:7.1f} MiB, at most "
            f"{r['samples_held_peak']:5.0f} samples held per series, trim {r['trim_seconds']:.2f} s"
        )
    trim_ratio = new["trim_seconds"] / max(old["trim_seconds"], 1e-9)
    print(f"  ratio: {old['peak_bytes'] / new['peak_bytes']:.2f}x less memory; trim time {trim_ratio:.2f}x the old")
    if args.json:
        print(json.dumps({"series": args.series, "retention_s": retention, "now": new, "before": old}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=SERIES)
    parser.add_argument("--seconds", type=int, default=RETENTION_S)
    parser.add_argument("--plateau", action="store_true", help="C10: memory once retention trims (10,000 series)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.plateau:
        if args.series == SERIES:
            args.series = 10_000
        main_plateau(args)
        return
    n = args.series * args.seconds

    store = Store(retention_ms=RETENTION_S * 1000)
    t_store, mem_store = measure(fill_store, store, args.series, args.seconds)
    naive: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
    t_naive, mem_naive = measure(fill_naive, naive, args.series, args.seconds)

    matchers = [LabelMatcher("__name__", MatchOp.EQ, "sentinel_gpu_utilization_ratio")]
    end = args.seconds * 1000
    started = time.perf_counter()
    reads = 0
    for _ in range(5):
        reads += sum(len(ts) for _, ts, _ in store.range(matchers, end - 300_000, end))
    t_read = time.perf_counter() - started
    started = time.perf_counter()
    naive_reads = 0
    for _ in range(5):
        for samples in naive.values():
            tss = [s[0] for s in samples]
            lo, hi = bisect_right(tss, end - 300_000), bisect_right(tss, end)
            naive_reads += len(samples[lo:hi])
    t_naive_read = time.perf_counter() - started

    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"samples: {n:,} ({args.series:,} series x {args.seconds} s at 1 Hz)")
    print(
        f"bytes/sample (all heap, tracemalloc): store {mem_store / n:.1f}  naive {mem_naive / n:.1f}  "
        f"ratio {mem_naive / mem_store:.1f}x smaller"
    )
    print(f"bytes/sample (sample buffers only):    store {store.nbytes() / n:.1f}  (target <= 24)")
    print(
        f"append: store {n / t_store:,.0f} samples/s  naive {n / t_naive:,.0f} samples/s  ratio {t_naive / t_store:.2f}"
    )
    print(
        f"range read (5 min windows, all series): store {reads / t_read:,.0f} samples/s  "
        f"naive {naive_reads / t_naive_read:,.0f} samples/s  ratio {t_naive_read / t_read:.2f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "bytes_per_sample": mem_store / n,
                    "naive_bytes_per_sample": mem_naive / n,
                    "append_per_s": n / t_store,
                    "read_per_s": reads / t_read,
                }
            )
        )


if __name__ == "__main__":
    main()
