"""Rule evaluation benchmark: 200 alerting rules over ~5,000 series of 15 min at 1 s.

The series are those of one 8-GPU MoE inference host (GPU gauges and counters, Xids,
NVLink, throttle reasons, per-worker vLLM gauges, counters and histograms, log-event
counters, per-expert token counters); the rules are of the shapes real rule files use
(`rate`/`increase` over counters, `by` aggregations, thresholds, `and on(...)`,
`* on(gpu) group_left(name) sentinel_gpu_info` joins, `histogram_quantile`, expert
imbalance ratios). One full evaluation runs every group once through the same
`GroupEvaluator` and PromQL engine the daemon uses; between evaluations one more second
of data is appended (not timed), as a collector would.

Baseline, measured in the same run: the store reads alone — for every rule, selecting
each of its selectors' series and range-reading (or instant-reading) them at the same
time, which is the least any evaluator must do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sentinel.daemon.gctune import tune_for_daemon
from sentinel.promql import Engine, syntax
from sentinel.rules.group import GroupEvaluator
from sentinel.rules.query import engine_query
from sentinel.rules.rulefile import Rule, RuleGroup
from sentinel.store import DEFAULT_LOOKBACK_MS, Labels, Series, Store, labels_from, now_ms

GPUS = [str(i) for i in range(8)]
WORKERS = [f"w{i}" for i in range(4)]
XIDS = ["13", "31", "43", "45", "48", "61", "62", "63", "64", "74", "79", "92", "94", "95"]
THROTTLE = ["gpu_idle", "sw_power_cap", "hw_slowdown", "sync_boost", "sw_thermal", "hw_thermal", "hw_power", "other"]
EVENTS = [f"event_{i}" for i in range(29)] + ["cuda_oom"]
HISTOGRAMS = [
    "vllm:e2e_request_latency_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds",
]
BUCKETS = [f"{b:g}" for b in (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 90, 120)]
LAYERS, EXPERTS = 16, 64
RETENTION_S = 900
SAMPLE_MS = 1000


@dataclass
class Family:
    """Series of one metric and how their values move each second."""

    labels: list[Labels]
    kind: str  # gauge | counter
    base: float
    spread: float
    rate: float = 0.0  # mean counter increase per second
    p_change: float = 1.0  # chance a counter moves in a given second


def families() -> list[Family]:
    out: list[Family] = []

    def add(name: str, label_sets: list[dict[str, str]], kind: str, base: float, spread: float, **kw: float) -> None:
        out.append(Family([labels_from(name, ls) for ls in label_sets], kind, base, spread, **kw))

    per_gpu = [{"gpu": g} for g in GPUS]
    add("sentinel_gpu_up", per_gpu, "gauge", 1, 0)
    add("sentinel_gpu_utilization_ratio", per_gpu, "gauge", 0.7, 0.3)
    add("sentinel_gpu_memory_used_bytes", per_gpu, "gauge", 70e9, 8e9)
    add("sentinel_gpu_memory_total_bytes", per_gpu, "gauge", 80e9, 0)
    add("sentinel_gpu_temperature_celsius", per_gpu, "gauge", 78, 10)
    add("sentinel_gpu_power_watts", per_gpu, "gauge", 600, 100)
    add("sentinel_gpu_power_limit_watts", per_gpu, "gauge", 700, 0)
    add("sentinel_gpu_sm_clock_hertz", per_gpu, "gauge", 1.98e9, 0.1e9)
    add("sentinel_gpu_energy_joules_total", per_gpu, "counter", 0, 0, rate=600)
    add("sentinel_gpu_pcie_replay_total", per_gpu, "counter", 0, 0, rate=1, p_change=0.01)
    info = [
        {"gpu": g, "uuid": f"GPU-{g}", "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": f"0000:{g}0:00.0"} for g in GPUS
    ]
    add("sentinel_gpu_info", info, "gauge", 1, 0)
    add(
        "sentinel_gpu_xid_errors_total",
        [{"gpu": g, "xid": x} for g in GPUS for x in XIDS],
        "counter",
        0,
        0,
        rate=1,
        p_change=0.002,
    )
    add(
        "sentinel_gpu_ecc_errors_total",
        [{"gpu": g, "type": t} for g in GPUS for t in ("corrected", "uncorrected")],
        "counter",
        0,
        0,
        rate=1,
        p_change=0.003,
    )
    add("sentinel_gpu_throttled", [{"gpu": g, "reason": r} for g in GPUS for r in THROTTLE], "gauge", 0, 0.6)
    add("sentinel_gpu_nvlink_up", [{"gpu": g, "link": str(k)} for g in GPUS for k in range(18)], "gauge", 1, 0)
    add(
        "sentinel_gpu_remapped_rows",
        [{"gpu": g, "kind": k} for g in GPUS for k in ("correctable", "uncorrectable", "pending", "failure")],
        "gauge",
        0,
        0,
    )
    procs = [{"gpu": g, "pid": str(1000 + 10 * int(g) + p), "worker": WORKERS[p]} for g in GPUS for p in range(4)]
    add("sentinel_gpu_process_memory_bytes", procs, "gauge", 17e9, 2e9)
    add("sentinel_host_cpu_utilization_ratio", [{}], "gauge", 0.4, 0.2)
    add("sentinel_host_memory_used_bytes", [{}], "gauge", 900e9, 50e9)
    add("sentinel_host_oom_kills_total", [{}], "counter", 0, 0, rate=1, p_change=0.0005)
    per_worker = [{"worker": w} for w in WORKERS]
    add("sentinel_worker_up", per_worker, "gauge", 1, 0)
    add("sentinel_worker_process_rss_bytes", per_worker, "gauge", 40e9, 5e9)
    add("sentinel_worker_process_cpu_seconds_total", per_worker, "counter", 0, 0, rate=3)
    add("sentinel_worker_oom_kills_total", per_worker, "counter", 0, 0, rate=1, p_change=0.0005)
    add(
        "sentinel_log_events_total",
        [{"event": e, "worker": w} for e in EVENTS for w in WORKERS],
        "counter",
        0,
        0,
        rate=1,
        p_change=0.002,
    )
    add("vllm:num_requests_running", per_worker, "gauge", 40, 20)
    add("vllm:num_requests_waiting", per_worker, "gauge", 10, 30)
    add("vllm:gpu_cache_usage_perc", per_worker, "gauge", 0.8, 0.2)
    add("vllm:prompt_tokens_total", per_worker, "counter", 0, 0, rate=20_000)
    add("vllm:generation_tokens_total", per_worker, "counter", 0, 0, rate=5_000)
    add("vllm:request_success_total", per_worker, "counter", 0, 0, rate=20)
    for h in HISTOGRAMS:
        bucket_sets = [{"worker": w, "le": le} for w in WORKERS for le in [*BUCKETS, "+Inf"]]
        add(f"{h}_bucket", bucket_sets, "counter", 0, 0, rate=20)
        add(f"{h}_sum", per_worker, "counter", 0, 0, rate=30)
        add(f"{h}_count", per_worker, "counter", 0, 0, rate=20)
    experts = [
        {"worker": w, "layer": str(layer), "expert": str(e)}
        for w in WORKERS
        for layer in range(LAYERS)
        for e in range(EXPERTS)
    ]
    add("moe_expert_tokens_total", experts, "counter", 0, 0, rate=400)
    return out


class Host:
    """The store plus each series' current value, to append one more second at a time."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.store = Store(retention_ms=RETENTION_S * 1000)
        self.rows: list[tuple[Series, Family, list[float]]] = []
        start = now_ms() - RETENTION_S * SAMPLE_MS
        for fam in families():
            for labels in fam.labels:
                value = fam.base + (self.rng.uniform(-fam.spread, fam.spread) if fam.kind == "gauge" else 0.0)
                self.store.append(labels, start, value)
                series = self.store.get(labels)
                assert series is not None
                # Buckets of one histogram must stay monotonic in `le`: scale by position.
                self.rows.append((series, fam, [value]))
        self.t = start
        for _ in range(RETENTION_S - 1):
            self.tick()

    def tick(self) -> int:
        """Append one more second to every series; returns its timestamp."""
        self.t += SAMPLE_MS
        rnd = self.rng.random
        for series, fam, state in self.rows:
            if fam.kind == "counter":
                if fam.p_change >= 1 or rnd() < fam.p_change:
                    state[0] += fam.rate * (0.5 + rnd())
            elif fam.spread:
                state[0] = fam.base + (rnd() * 2 - 1) * fam.spread
            series.append(self.t, state[0])
        return self.t


def alert_rules() -> Iterator[tuple[str, str, str]]:
    """(name, expr, for) of 200 alerting rules."""
    info = "* on(gpu) group_left(name) sentinel_gpu_info"
    for x in XIDS:
        yield f"GpuXid{x}", f'increase(sentinel_gpu_xid_errors_total{{xid="{x}"}}[5m]) > 0', "0s"
        yield (
            f"GpuXid{x}Repeated",
            f'sum by (gpu) (increase(sentinel_gpu_xid_errors_total{{xid="{x}"}}[10m])) > 2',
            "1m",
        )
    for e in EVENTS:
        yield f"Log_{e}", f'increase(sentinel_log_events_total{{event="{e}"}}[1m]) > 0', "0s"
        yield f"Log_{e}Rate", f'sum by (worker) (rate(sentinel_log_events_total{{event="{e}"}}[5m])) > 0.5', "2m"
    for r in THROTTLE:
        yield f"GpuThrottled_{r}", f'(avg_over_time(sentinel_gpu_throttled{{reason="{r}"}}[5m]) > 0.5) {info}', "5m"
    for sev, k in (("Warning", 1.0), ("Critical", 1.1)):
        gpu_rules = [
            ("GpuHot", f"(sentinel_gpu_temperature_celsius > {85 * k:g}) {info}", "1m"),
            ("GpuHotSustained", f"avg_over_time(sentinel_gpu_temperature_celsius[5m]) > {80 * k:g}", "5m"),
            ("GpuMemoryFull", f"sentinel_gpu_memory_used_bytes / sentinel_gpu_memory_total_bytes > {0.9 * k:g}", "5m"),
            (
                "GpuIdleWithMemory",
                f"avg_over_time(sentinel_gpu_utilization_ratio[5m]) < {0.05 / k:g} "
                "and on(gpu) sentinel_gpu_memory_used_bytes > 1e9",
                "10m",
            ),
            (
                "GpuPowerAtLimit",
                f"max_over_time(sentinel_gpu_power_watts[5m]) > on(gpu) sentinel_gpu_power_limit_watts * {0.98 * k:g}",
                "5m",
            ),
            ("GpuDown", f"(sentinel_gpu_up == 0) {info}", "0s"),
            ("GpusMissing", f"count(sentinel_gpu_up == 1) < {8 - int(k * 2 - 1)}", "1m"),
            ("GpuPcieReplays", f"rate(sentinel_gpu_pcie_replay_total[5m]) > {0.1 * k:g}", "5m"),
            (
                "GpuEccUncorrected",
                f'increase(sentinel_gpu_ecc_errors_total{{type="uncorrected"}}[15m]) > {k - 1:g}',
                "0s",
            ),
            (
                "GpuEccCorrectedRate",
                f'rate(sentinel_gpu_ecc_errors_total{{type="corrected"}}[10m]) > {0.01 * k:g}',
                "10m",
            ),
            ("GpuThrottledAny", f'sum by (gpu) (sentinel_gpu_throttled{{reason!="gpu_idle"}}) > {2 * k:g}', "5m"),
            ("NvlinkDown", f"(sentinel_gpu_nvlink_up == 0) {info}", "1m"),
            ("NvlinkDegraded", f"count by (gpu) (sentinel_gpu_nvlink_up == 0) > {2 * k:g}", "1m"),
            ("GpuHeatingUp", f"deriv(sentinel_gpu_temperature_celsius[10m]) > {0.05 * k:g}", "10m"),
            (
                "GpuMemoryFillsInAnHour",
                f"predict_linear(sentinel_gpu_memory_used_bytes[15m], {3600 * k:g})"
                " > on(gpu) sentinel_gpu_memory_total_bytes",
                "15m",
            ),
            ("GpuClockUnstable", f"changes(sentinel_gpu_sm_clock_hertz[5m]) > {250 * k:g}", "5m"),
            ("GpuRowRemapFailure", f'sentinel_gpu_remapped_rows{{kind="failure"}} > {k - 1:g}', "0s"),
            ("GpuPowerDraw", f"rate(sentinel_gpu_energy_joules_total[1m]) > {650 * k:g}", "5m"),
            ("GpuSaturated", f"quantile_over_time(0.9, sentinel_gpu_utilization_ratio[10m]) > {0.95 * k:g}", "10m"),
            ("WorkerDown", f"sentinel_worker_up == {1 - k:g}" if k > 1 else "sentinel_worker_up == 0", "1m"),
            ("WorkerOom", f"increase(sentinel_worker_oom_kills_total[5m]) > {k - 1:g}", "0s"),
            ("WorkerGpuMemory", f"sum by (worker) (sentinel_gpu_process_memory_bytes) > {140e9 * k:g}", "5m"),
            ("QueueBacklog", f"vllm:num_requests_waiting > {50 * k:g}", "2m"),
            ("KvCacheFull", f"vllm:gpu_cache_usage_perc > {0.97 * k:g}", "5m"),
            (
                "NoTokensWhileBusy",
                f"rate(vllm:generation_tokens_total[1m]) < {1 / k:g} and vllm:num_requests_running > 0",
                "2m",
            ),
            (
                "TtftSlow",
                "histogram_quantile(0.95, sum by (worker, le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))"
                f" > {2 * k:g}",
                "5m",
            ),
            ("HostMemoryHigh", f"sentinel_host_memory_used_bytes > {950e9 * k:g}", "5m"),
            ("HostCpuBusy", f"avg_over_time(sentinel_host_cpu_utilization_ratio[5m]) > {0.9 * k:g}", "10m"),
            (
                "ExpertImbalance",
                "max by (worker, layer) (rate(moe_expert_tokens_total[5m])) / on(worker, layer) "
                f"avg by (worker, layer) (rate(moe_expert_tokens_total[5m])) > {1.4 * k:g}",
                "5m",
            ),
            ("ExpertsStarved", f"count by (worker, layer) (rate(moe_expert_tokens_total[5m]) < 1) > {4 * k:g}", "10m"),
        ]
        for name, expr, for_ in gpu_rules:
            yield f"{name}{sev}", expr, for_
    for w in WORKERS:
        for q in ("0.95", "0.99"):
            yield (
                f"E2eLatency{w}p{q[2:]}",
                f"histogram_quantile({q}, sum by (le) "
                f'(rate(vllm:e2e_request_latency_seconds_bucket{{worker="{w}"}}[5m]))) > 30',
                "5m",
            )
    for w in WORKERS:
        yield f"ExpertsIdle{w}", f'sum(rate(moe_expert_tokens_total{{worker="{w}"}}[1m])) == 0', "2m"
        yield (
            f"TpotSlow{w}",
            "histogram_quantile(0.99, sum by (le) "
            f'(rate(vllm:time_per_output_token_seconds_bucket{{worker="{w}"}}[5m]))) > 0.2',
            "5m",
        )
        yield f"FewRequests{w}", f'rate(vllm:request_success_total{{worker="{w}"}}[5m]) < 1', "5m"
        yield f"WorkerRss{w}", f'sentinel_worker_process_rss_bytes{{worker="{w}"}} > 60e9', "5m"
    for h in HISTOGRAMS:
        for q, limit in (("0.5", 1), ("0.9", 5)):
            yield (
                f"{h.split(':')[1]}_p{q[2:]}",
                f"histogram_quantile({q}, sum by (worker, le) (rate({h}_bucket[5m]))) > {limit}",
                "5m",
            )
    for x in XIDS[:12]:
        yield f"GpuXid{x}Model", f'(increase(sentinel_gpu_xid_errors_total{{xid="{x}"}}[15m]) > 0) {info}', "0s"
    yield "GpuMetricsAbsent", "absent(sentinel_gpu_up)", "1m"
    yield "GpuInfoAbsent", "absent_over_time(sentinel_gpu_info[5m])", "1m"


ANNOTATIONS = {
    "summary": "{{ $labels.alertname }} on {{ $labels.gpu }}{{ $labels.worker }}",
    "description": "value {{ $value | humanize }}",
}


def rule_groups(group_size: int) -> list[RuleGroup]:
    rules = list(alert_rules())
    groups = []
    for gi in range(0, len(rules), group_size):
        chunk = rules[gi : gi + group_size]
        name = f"bench-{gi // group_size}"
        built = tuple(
            Rule(
                "alert",
                n,
                expr,
                "bench.rules.yml",
                name,
                i,
                0,
                for_ms=0 if f == "0s" else int(f[:-1]) * (60_000 if f.endswith("m") else 1000),
                labels={"severity": "critical" if n.endswith("Critical") else "warning"},
                annotations=dict(ANNOTATIONS),
            )
            for i, (n, expr, f) in enumerate(chunk)
        )
        groups.append(RuleGroup(name, "bench.rules.yml", 1000, 0, 0, {}, built))
    return groups


def reads(node: syntax.Node) -> Iterator[tuple[syntax.Selector, int | None]]:
    """Every selector of an expression with its range (None for an instant read)."""
    if isinstance(node, syntax.MatrixSel):
        yield node.selector, node.range_ms
        return
    if isinstance(node, syntax.Selector):
        yield node, None
        return
    for child in syntax.children(node):
        yield from reads(child)


def baseline_pass(store: Store, plans: list[list[tuple[syntax.Selector, int | None]]], t: int) -> int:
    """The store work of one evaluation without any PromQL: select, then read at t."""
    touched = 0
    for plan in plans:
        for sel, range_ms in plan:
            for group in sel.alternatives:
                for series in store.select(group):
                    if range_ms is None:
                        series.latest_at(t, DEFAULT_LOOKBACK_MS)
                    else:
                        series.range(t - range_ms, t)
                    touched += 1
    return touched


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    started = time.perf_counter()
    host = Host(args.seed)
    fill_s = time.perf_counter() - started
    groups = rule_groups(args.group_size)
    query = engine_query(Engine(host.store))
    evaluators = [GroupEvaluator(g, host.store, query, interval_ms=1000) for g in groups]
    rules = [r for g in groups for r in g.rules]
    plans = [list(reads(syntax.parse(r.expr))) for r in rules]

    # One warm-up of each (parse caches, template caches, first alert states).
    ts = host.tick()
    for ev in evaluators:
        ev.evaluate(ts)
    baseline_pass(host.store, plans, ts)

    full: list[float] = []
    full_cpu: list[float] = []
    base: list[float] = []
    tune_for_daemon()  # the daemon's own GC settings, applied once it has started
    for _ in range(args.evaluations):
        ts = host.tick()
        t0, c0 = time.perf_counter(), time.thread_time()
        for ev in evaluators:
            ev.evaluate(ts)
        full.append(time.perf_counter() - t0)
        full_cpu.append(time.thread_time() - c0)
        t0 = time.perf_counter()
        touched = baseline_pass(host.store, plans, ts)
        base.append(time.perf_counter() - t0)

    slowest = sorted(
        ((h.evaluation_time_s, r.name) for ev in evaluators for r, h in zip(ev.group.rules, ev.health, strict=True)),
        reverse=True,
    )[:5]
    errors = [
        (r.name, h.last_error)
        for ev in evaluators
        for r, h in zip(ev.group.rules, ev.health, strict=True)
        if h.health != "ok"
    ]
    active = sum(len(ev.active_alerts()) for ev in evaluators)

    cpu = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(
        f"data: {len(host.rows):,} series x {RETENTION_S} s at 1 Hz = {host.store.sample_count():,} samples "
        f"(filled in {fill_s:.1f} s)"
    )
    print(
        f"rules: {len(rules)} alerting rules in {len(groups)} groups; {active} alerts active; {len(errors)} rule errors"
    )
    for name, err in errors[:5]:
        print(f"  error: {name}: {err}")
    med, p90 = statistics.median(full) * 1000, pct(full, 0.9) * 1000
    bmed, bp90 = statistics.median(base) * 1000, pct(base, 0.9) * 1000
    cmed = statistics.median(full_cpu) * 1000
    print(f"full evaluation      : median {med:8.1f} ms   p90 {p90:8.1f} ms   ({args.evaluations} evaluations)")
    print(f"full evaluation, CPU : median {cmed:8.1f} ms   (thread CPU time: less disturbed by a busy machine)")
    print(f"baseline (store reads): median {bmed:8.1f} ms   p90 {bp90:8.1f} ms   ({touched:,} series reads each)")
    print(f"ratio full/baseline  : {med / bmed:.1f}x (median)")
    print(f"target <= 10 ms      : {'met' if med <= 10 else 'NOT met'} (median {med:.1f} ms, issue 16)")
    print("slowest rules (last evaluation): " + ", ".join(f"{n} {s * 1000:.1f} ms" for s, n in slowest))
    times = [(r, h.evaluation_time_s) for ev in evaluators for r, h in zip(ev.group.rules, ev.health, strict=True)]
    experts = [t for r, t in times if "moe_expert_tokens_total" in r.expr]
    others = [t for r, t in times if "moe_expert_tokens_total" not in r.expr]
    print(
        f"last evaluation by rule kind: {len(experts)} rules over the {LAYERS * EXPERTS * len(WORKERS):,} "
        f"expert series {sum(experts) * 1000:.1f} ms, the other {len(others)} rules {sum(others) * 1000:.1f} ms"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "median_ms": round(med, 2),
                    "p90_ms": round(p90, 2),
                    "cpu_median_ms": round(cmed, 2),
                    "baseline_median_ms": round(bmed, 2),
                    "baseline_p90_ms": round(bp90, 2),
                    "ratio_vs_baseline": round(med / bmed, 3),
                    "evaluations": args.evaluations,
                    "rules": len(rules),
                    "series": len(host.rows),
                    "alerts_active": active,
                    "rule_errors": len(errors),
                }
            )
        )


if __name__ == "__main__":
    main()
