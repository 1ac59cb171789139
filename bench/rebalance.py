"""Expert rebalancing on the skewed-routing scenario: balancedness and tokens/s before and after.

The test worker's engine (`sentinel.sim.worker.engine.ServingEngine`, what
`python -m sentinel.sim.worker` serves) runs its tiny MoE expert-parallel over 4 virtual
devices, with the skew fault on (experts 0-3, bias 10: the hot-spot of `sentinel demo`).
The real `sentinel.probe` is attached (slot counters, placements served) and reports
over a unix socket to a real `ProbeRegistry`, whose `rebalance_experts` plans from the
measured window, sends the plan, waits for the worker's acknowledgement and verifies it
from measured load, as the daemon does (tests/test_moe_rebalance.py drives the same).
Closed-loop clients (6 in flight, 12-token prompts, 16 tokens each) keep it busy.

Per run, on a fresh engine: a measured window before the rebalance and one after it,
each `--window` seconds; balancedness is the probe's measured one (sum of mean GPU loads
over sum of maxima across reports and layers), tokens/s are generated tokens of the
requests completed in the window. The baseline is the same engine before its rebalance,
in the same run. Reported: each run, and the mean and standard deviation over `--runs`.

The 4 virtual devices share the process's CPU threads: balancing them cannot make the
tokens/s go up here (a grouped matmul over more filled slots costs a little more); what
this shows on CPU is that balancedness is healed and the serving cost of doing it.

    python bench/rebalance.py [--runs 3] [--window 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.collectors.probe_access import ProbeAccess
from sentinel.collectors.probe_placement import measured_balancedness
from sentinel.collectors.probe_reports import ProbeRegistry
from sentinel.remediation.backend import BackendError
from sentinel.remediation.rebalance_params import RebalanceSettings
from sentinel.store import Store
from sentinel.store.events import EventBus

WORKER = "bench"
HOT, BIAS = (0, 1, 2, 3), 10.0
CLIENTS, PROMPT_LEN, MAX_TOKENS = 6, 12, 16
INTERVAL_S = 0.25


class Load:
    """Closed-loop clients on the engine; completion times kept for windowed tokens/s."""

    def __init__(self, engine: Any) -> None:
        import torch

        self.engine = engine
        self.failures: list[BaseException] = []
        self.done_at: list[float] = []
        self._stop = threading.Event()
        self._sem = threading.Semaphore(CLIENTS)
        self._g = torch.Generator().manual_seed(1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            if not self._sem.acquire(timeout=0.2):
                continue
            prompt = torch.randint(33, 127, (PROMPT_LEN,), generator=self._g).tolist()
            self.engine.submit(prompt, MAX_TOKENS, self._done, ignore_eos=True)

    def _done(self, result: Any) -> None:
        if isinstance(result, BaseException):
            self.failures.append(result)
        else:
            self.done_at.append(time.monotonic())
        self._sem.release()

    def tokens_per_s(self, start: float, end: float) -> float:
        return sum(start < t <= end for t in self.done_at) * MAX_TOKENS / (end - start)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def _window(registry: ProbeRegistry, load: Load, seconds: float) -> tuple[float | None, float]:
    start = time.monotonic()
    await asyncio.sleep(seconds)
    end = time.monotonic()
    loads = [m for m in registry.placements.loads_since(WORKER, start) if m.at <= end]
    return measured_balancedness(loads), load.tokens_per_s(start, end)


async def one_run(window_s: float) -> dict[str, Any]:
    import sentinel.probe
    from sentinel.sim.worker.control import serve_placement_through
    from sentinel.sim.worker.engine import ServingEngine
    from sentinel.sim.worker.model import build_model, expert_to_gpu

    engine = ServingEngine(build_model("none"), max_num_seqs=CLIENTS, model_name="m")
    engine.set_skew(HOT, BIAS)
    engine.start()
    tmp = tempfile.TemporaryDirectory(prefix="sentinel-bench-rebalance-")
    socket_path = str(Path(tmp.name) / "probe.sock")
    registry = ProbeRegistry(Store(), EventBus(), access=ProbeAccess.with_tokens({WORKER: None}, tcp=False))
    await registry.start()
    await registry.start_unix_site(socket_path)
    mapping = expert_to_gpu(engine.moe.num_experts)
    probe = sentinel.probe.attach(
        engine.moe.model,
        WORKER,
        f"unix:{socket_path}",
        interval_s=INTERVAL_S,
        expert_to_gpu=[mapping[e] for e in range(engine.moe.num_experts)],
    )
    try:
        if not serve_placement_through(probe, engine):
            raise RuntimeError("the test worker's engine does not serve placements")
        with Load(engine) as load:
            deadline = time.monotonic() + 120
            while len(registry.placements.loads_since(WORKER, 0)) < 8:  # warm-up: a window to plan from
                if time.monotonic() > deadline:
                    raise RuntimeError("the probe did not report within 120 s")
                await asyncio.sleep(0.1)
            bal_before, tps_before = await _window(registry, load, window_s)
            # As tests/test_moe_rebalance.py: virtual devices on one CPU get a loose throughput guard.
            settings = RebalanceSettings(
                window_s=30, apply_timeout_s=30, verify_timeout_s=90, min_reports=6, min_throughput_ratio=0.3
            )
            started = time.monotonic()
            try:
                note = await registry.rebalance_experts(WORKER, settings)
                outcome = "succeeded"
            except BackendError as exc:
                note, outcome = str(exc), "failed"
            rebalance_s = time.monotonic() - started
            bal_after, tps_after = await _window(registry, load, window_s)
        failures = len(load.failures)
    finally:
        await asyncio.to_thread(probe.close)
        await registry.close()
        engine.stop()
        tmp.cleanup()
    return {
        "outcome": outcome,
        "note": note,
        "balancedness_before": bal_before,
        "balancedness_after": bal_after,
        "tokens_per_s_before": tps_before,
        "tokens_per_s_after": tps_after,
        "tokens_per_s_ratio": tps_after / tps_before if tps_before else None,
        "rebalance_s": rebalance_s,
        "failed_requests": failures,
        "placement_version": engine.placement_version,
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh engines, each rebalanced once (default 3)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured before and after (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.runs < 1 or args.window <= 0:
        parser.error("--runs must be at least 1 and --window positive")
    try:
        import torch
    except ImportError:
        sys.exit("bench/rebalance.py needs torch: `make .venv/.sim-installed`")
    torch.set_num_threads(1)
    print(
        f"expert rebalancing, skew {list(HOT)} bias {BIAS:g}, {CLIENTS} clients x {MAX_TOKENS} tokens, "
        f"{args.runs} runs, {args.window:g} s windows; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        run = asyncio.run(one_run(args.window))
        runs.append(run)
        print(
            f"run {i + 1}: {run['outcome']:9} balancedness {run['balancedness_before']:.3f} -> "
            f"{run['balancedness_after']:.3f}  tokens/s {run['tokens_per_s_before']:.0f} -> "
            f"{run['tokens_per_s_after']:.0f} ({run['tokens_per_s_ratio']:.2f}x)  "
            f"rebalance {run['rebalance_s']:.1f} s, failed requests {run['failed_requests']}"
        )
    summary: dict[str, Any] = {"bench": "rebalance", "runs": runs, "load_average": os.getloadavg()[0]}
    for key in ("balancedness_before", "balancedness_after", "tokens_per_s_before", "tokens_per_s_after"):
        values = [r[key] for r in runs if r[key] is not None]
        mean, sd = _mean_sd(values)
        summary[key] = {"mean": mean, "sd": sd}
    ratios = [r["tokens_per_s_ratio"] for r in runs if r["tokens_per_s_ratio"] is not None]
    summary["tokens_per_s_ratio"] = dict(zip(("mean", "sd"), _mean_sd(ratios), strict=True))
    summary["succeeded"] = sum(r["outcome"] == "succeeded" for r in runs)
    b0, b1 = summary["balancedness_before"], summary["balancedness_after"]
    t0, t1 = summary["tokens_per_s_before"], summary["tokens_per_s_after"]
    print(
        f"mean +- sd over {len(runs)} runs: balancedness {b0['mean']:.3f} +- {b0['sd']:.3f} -> "
        f"{b1['mean']:.3f} +- {b1['sd']:.3f}; tokens/s {t0['mean']:.0f} +- {t0['sd']:.0f} -> "
        f"{t1['mean']:.0f} +- {t1['sd']:.0f} (ratio {summary['tokens_per_s_ratio']['mean']:.2f} "
        f"+- {summary['tokens_per_s_ratio']['sd']:.2f}); {summary['succeeded']}/{len(runs)} rebalances succeeded"
    )
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
