"""Event-to-alert latency: from an Event on the bus to the firing transition at a subscriber.

A running RuleManager evaluates `increase(sentinel_log_events_total{event="cuda_oom"}[1m]) > 0`
(`for: 0s`, group interval 1 s) next to a background group of GPU rules. For each event
the counter of a new worker label is bumped in the store (after its zero, as the log
collector seeds it) and an Event naming `sentinel_log_events_total` is published; the
time to the firing transition reaching a subscriber is recorded. Each event has its own
label, so each one fires anew.

Baseline, measured in the same run: the same rule and the same store writes with an
Event that names no metric, so only the group's 1 s interval tick finds the new count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from sentinel.config.models import RulesConfig
from sentinel.promql import Engine
from sentinel.rules.manager import AlertEvent, RuleManager
from sentinel.rules.query import engine_query
from sentinel.rules.rulefile import load_rule_files
from sentinel.rules.state import AlertState
from sentinel.store import Store, now_ms
from sentinel.store.events import Event, EventBus

COUNTER = "sentinel_log_events_total"

RULES = """\
groups:
  - name: log-events
    interval: 1s
    rules:
      - alert: CudaOom
        expr: increase(sentinel_log_events_total{event="cuda_oom"}[1m]) > 0
        labels: {severity: critical}
        annotations:
          summary: "CUDA OOM in {{ $labels.worker }}"
  - name: gpu
    interval: 1s
    rules:
"""
BACKGROUND = [
    "sentinel_gpu_temperature_celsius > {t}",
    "avg_over_time(sentinel_gpu_utilization_ratio[5m]) < 0.0{t}",
    "sentinel_gpu_memory_used_bytes / sentinel_gpu_memory_total_bytes > 0.{t}",
    "(sentinel_gpu_temperature_celsius > {t}) * on(gpu) group_left(name) sentinel_gpu_info",
    "max_over_time(sentinel_gpu_power_watts[5m]) > {t}0",
]


def rules_file(directory: Path) -> Path:
    text = RULES
    for i in range(20):
        expr = BACKGROUND[i % len(BACKGROUND)].format(t=80 + i)
        text += f"      - alert: Background{i}\n        expr: {expr}\n        for: 1m\n"
    path = directory / "bench.rules.yml"
    path.write_text(text)
    return path


def fill_background(store: Store, seconds: int = 300) -> None:
    rng = random.Random(1)
    start = now_ms() - seconds * 1000
    for g in range(8):
        gpu = {"gpu": str(g)}
        store.add("sentinel_gpu_info", 1, {**gpu, "name": "NVIDIA H100 80GB HBM3"}, start)
        for s in range(seconds):
            ts = start + s * 1000
            store.add("sentinel_gpu_temperature_celsius", 70 + rng.random() * 20, gpu, ts)
            store.add("sentinel_gpu_utilization_ratio", rng.random(), gpu, ts)
            store.add("sentinel_gpu_memory_used_bytes", 70e9 + rng.random() * 9e9, gpu, ts)
            store.add("sentinel_gpu_memory_total_bytes", 80e9, gpu, ts)
            store.add("sentinel_gpu_power_watts", 500 + rng.random() * 200, gpu, ts)


class Recorder:
    """The subscriber: when each worker's CudaOom alert reached it as firing."""

    def __init__(self) -> None:
        self.fired_at: dict[str, float] = {}
        self.arrived = asyncio.Event()

    def __call__(self, event: AlertEvent) -> None:
        if event.transition.current is AlertState.FIRING and event.rule.name == "CudaOom":
            self.fired_at[event.alert.labels["worker"]] = time.perf_counter()
            self.arrived.set()


def bump(store: Store, worker: str) -> None:
    """What the log collector does on a match: the counter of (worker, event) goes 0 -> 1."""
    labels = {"event": "cuda_oom", "worker": worker, "source": "file"}
    now = now_ms()
    store.add(COUNTER, 0, labels, now - 1000)  # seeded at zero a second ago
    store.add(COUNTER, 1, labels, now)


async def run(mode: str, events: int, seed: int) -> list[float]:
    """Latencies (s) of `events` events; mode "event" names the counter, "interval" does not."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store, bus = Store(), EventBus()
        bus.bind_loop(asyncio.get_running_loop())
        fill_background(store)
        groups = load_rule_files([str(rules_file(Path(tmp)))])
        config = RulesConfig(interval=1.0, event_min_interval=0.1)
        manager = RuleManager(store, bus, engine_query(Engine(store)), config, Path(tmp), "http://bench/")
        recorder = Recorder()
        manager.subscribe(recorder)
        await manager.apply(groups)
        await asyncio.sleep(1.2)  # past the first evaluations
        metrics = (COUNTER,) if mode == "event" else ()
        published: dict[str, float] = {}
        try:
            for i in range(events):
                worker = f"{mode}-{i}"
                # Past event_min_interval, at a random phase of the 1 s tick.
                await asyncio.sleep(0.11 + rng.random() * 0.05)
                recorder.arrived.clear()
                published[worker] = time.perf_counter()
                bump(store, worker)
                bus.publish(Event("cuda_oom", "log", {"worker": worker}, metrics=metrics))
                if mode == "event":
                    await asyncio.wait_for(recorder.arrived.wait(), 5.0)
            await asyncio.sleep(1.5)  # longer than one interval: every tick-found count has fired
        finally:
            await manager.close()
    missing = [w for w in published if w not in recorder.fired_at]
    if missing:
        raise SystemExit(f"{mode}: {len(missing)} events never fired: {missing[:5]}")
    return [recorder.fired_at[w] - t for w, t in published.items()]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def show(name: str, latencies: list[float]) -> None:
    ms = [v * 1000 for v in latencies]
    print(
        f"{name:<22}: p50 {statistics.median(ms):7.1f} ms   p99 {pct(ms, 0.99):7.1f} ms   "
        f"max {max(ms):7.1f} ms   ({len(ms)} events)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--baseline-events", type=int, default=60)
    args = parser.parse_args()
    event = await run("event", args.events, 1)
    interval = await run("interval", args.baseline_events, 2)
    cpu = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print('rule: increase(sentinel_log_events_total{event="cuda_oom"}[1m]) > 0, for 0s, group interval 1 s')
    show("event-triggered", event)
    show("interval tick only", interval)
    print(f"ratio p50 interval/event: {statistics.median(interval) / statistics.median(event):.0f}x")
    p99 = pct(event, 0.99) * 1000
    print(f"target p99 <= 50 ms    : {'met' if p99 <= 50 else 'NOT met'} (p99 {p99:.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
