"""Store benchmark: 2,000 series at 1 Hz over a full 15 min retention.

Prints bytes per sample, append throughput and range-read throughput, each next to a
naive baseline measured in the same run (a dict of Python lists of (ts, value)
tuples, the structure the store's array buffers replace).
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
import tracemalloc
from bisect import bisect_right

from sentinel.store import LabelMatcher, MatchOp, Store, labels_from

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=SERIES)
    parser.add_argument("--seconds", type=int, default=RETENTION_S)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
