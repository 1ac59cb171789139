"""`sentinel demo`: the whole detect-and-heal loop on one machine, in under 3 minutes.

A simulated 8-GPU host, a real tiny MoE worker (sentinel.sim.worker) run by the process
backend under load, Sentinel with the default rules and `remediation.mode: act`, and a
local webhook sink. Faults are injected one after another; for each the demo records
when it was injected, when an alert fired, which action Sentinel took, and when the
worker was healthy again (the action verified: endpoint up, tokens flowing).

So that it fits in 3 minutes, the `for:` durations of the default rules are divided by
`FOR_COMPRESSION` (a copy of the rules is used; the shipped files are untouched). Rule
expressions, thresholds and the remediation policy are the real ones.

The worker runs Sentinel's in-worker probe, reporting over the unix socket with its
token, as docs/operations.md recommends. So the hot-spot is healed live: the default
rule asks for `rebalance_experts`, Sentinel plans a new expert placement from the
probe's counts, the worker swaps it in between two steps, and the balancedness the
probe measures afterwards must be back above the rule's threshold. The OOM fault kills
the engine, so its `reduce_batch` cannot take the live batch-limit path: Sentinel
restarts the worker with the reduced profile instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from sentinel.config.models import Config, parse_config
from sentinel.daemon.core import Daemon
from sentinel.daemon.logsetup import setup_logging
from sentinel.demo.common import (
    FOR_COMPRESSION,
    Fault,
    FaultResult,
    Timeline,
    compress_rules,
    free_port,
    record_new_actions,
    repo_rules,
    results_table,
)
from sentinel.notify.testing import RecordingReceiver
from sentinel.runtime.timeouts import wait_for
from sentinel.sim.load import LoadGenerator
from sentinel.sim.nvml import SimulatedNvml, load_scenario

__all__ = ["FAULTS", "FaultResult", "main", "run_demo"]

log = logging.getLogger(__name__)

WORKER = "qwen3"
# The memory budget of the simulated GPU: 16 sequences at full batch do not fit, 4 do,
# and the int8 profile fits 16 (measured with the load below).
MEMORY_BUDGET_BYTES = 2_300_000
BASE_LOAD = 4  # clients before the OOM fault: fits the full profile
SPIKE_LOAD = 12  # extra clients of the OOM fault: a traffic spike
LOST_GPU = 6  # not one of the worker's GPUs: the alert goes to a human
# The OOM fault needs a GPU too small for 16 sequences; a rebalance needs room for the
# redundant experts (vLLM reserves their memory at launch) and for staging the copies.
# The hot-spot fault runs with this budget: the expert copies' 1.2 MB fit beside the
# weights and a reduced batch, and the worker still refuses anything larger.
HOTSPOT_MEMORY_BUDGET_BYTES = 4_000_000


FAULTS: tuple[Fault, ...] = (
    Fault("gpu-lost", f"GPU {LOST_GPU} falls off the bus (Xid 79)", ("GPUFallenOffBus", "GPULost"), False, 30),
    Fault("oom", "traffic spike: CUDA OOM at full batch", ("CudaOOM", "CudaOOMAfterReduction"), True, 75),
    Fault("hotspot", "expert hot-spot: routing skewed to 4 experts", ("MoEExpertImbalance",), True, 75),
    Fault("stall", "engine stalls while /health stays 200", ("EngineStalled",), True, 90),
    Fault("crash", "NCCL collective timeout, engine dies", ("NCCLCollectiveTimeout", "EngineDead"), True, 75),
)


def _config(tmp: Path, rule_files: list[str], daemon_port: int, worker_port: int, sink_url: str) -> Config:
    log_file = tmp / "logs" / f"{WORKER}.log"
    state = tmp / "state"
    probe_socket = tmp / "probe.sock"
    token_file = tmp / "probe-token"
    token_file.write_text(secrets.token_hex(16))
    os.chmod(token_file, 0o600)
    data = {
        "listen": f"127.0.0.1:{daemon_port}",
        "state_dir": str(state),
        "log": {"level": "warning"},
        "collectors": {"nvml": {"kernel_log": "off"}},
        "probe": {"socket": str(probe_socket), "socket_mode": "0600"},
        "workers": [
            {
                "name": WORKER,
                "gpus": [0, 1, 2, 3],
                "endpoint": f"http://127.0.0.1:{worker_port}",
                "engine": "vllm",
                "process": {"pid_file": str(state / "workers" / f"{WORKER}.pid")},
                "probe": True,
                "probe_token_file": str(token_file),
                "logs": [{"path": str(log_file)}],
                "backend": {
                    "type": "process",
                    "argv": [sys.executable, "-m", "sentinel.sim.worker", "--port", str(worker_port)],
                    # The in-worker probe reports over the socket, with the worker's token.
                    "env": {
                        "MEMORY_BUDGET_BYTES": str(MEMORY_BUDGET_BYTES),
                        "SENTINEL_WORKER": WORKER,
                        "VLLM_LOG_STATS_INTERVAL": "2",
                        "SENTINEL_PROBE_URL": f"unix:{probe_socket}",
                        "SENTINEL_PROBE_TOKEN_FILE": str(token_file),
                    },
                    "log_file": str(log_file),
                    "stop_timeout": "5s",
                },
                "profiles": [
                    {"name": "full", "env": {"MAX_NUM_SEQS": "16"}, "batch_limit": 16},
                    {"name": "reduced", "env": {"MAX_NUM_SEQS": "4"}, "batch_limit": 4},
                    {"name": "int8", "env": {"MAX_NUM_SEQS": "16", "QUANTIZATION": "int8"}, "quantized": True},
                ],
            }
        ],
        "rules": {"files": rule_files, "interval": "1s"},
        "remediation": {
            "mode": "act",
            "cooldown": "20s",
            "budget": {"count": 5, "window": "10m"},
            "verify_timeout": "60s",
            "verify_interval": "500ms",
            "stable_for": "30m",
            "routes": [
                {
                    "match": {"alertname": "MoEExpertImbalance"},
                    "action": "rebalance_experts",
                    # Plan on the routing of the (compressed) `for:` window. The virtual
                    # devices share one CPU, so balancing them cannot raise tokens/s here,
                    # and a grouped matmul over more filled slots costs more (measured
                    # 0.5-0.8x of the skewed rate): the guard only catches a collapse.
                    "params": {"window": f"{120 // FOR_COMPRESSION}s", "min_throughput_ratio": "0.3"},
                }
            ],
        },
        "notify": {"webhook": [{"name": "demo-sink", "url": sink_url}]},
    }
    return parse_config(yaml.safe_dump(data), "<demo>")


class Demo:
    def __init__(self, faults: Sequence[Fault], out: TextIO, quiet: bool) -> None:
        self.faults = faults
        self.timeline = Timeline(time.monotonic(), out, quiet)
        self.results: list[FaultResult] = []
        self.actions: list[dict[str, Any]] = []  # every journaled action, for the JSON and tests
        self.rebalance: dict[str, float | None] = {}  # balancedness around the hot-spot's rebalance
        self._seen_actions: set[int] = set()

    async def run(self) -> list[FaultResult]:
        with tempfile.TemporaryDirectory(prefix="sentinel-demo-") as tmp_name:
            tmp = Path(tmp_name)
            (tmp / "logs").mkdir()
            async with RecordingReceiver() as sink:
                return await self._run(tmp, sink)

    async def _run(self, tmp: Path, sink: RecordingReceiver) -> list[FaultResult]:
        tl = self.timeline
        worker_port, daemon_port = free_port(), free_port()
        rules = compress_rules(repo_rules(), tmp / "rules", FOR_COMPRESSION)
        config = _config(tmp, rules, daemon_port, worker_port, sink.url)
        self.nvml = SimulatedNvml(load_scenario("healthy-8gpu"))
        self.daemon = Daemon(config, nvml=self.nvml)
        self.worker_url = f"http://127.0.0.1:{worker_port}"
        tl.say(
            f"Sentinel on :{daemon_port}, simulated 8-GPU host, worker {WORKER} on :{worker_port} "
            f"(process backend, profiles full -> reduced -> int8)"
        )
        daemon_task = asyncio.create_task(self.daemon.run())
        loads: list[LoadGenerator] = []
        try:
            async with aiohttp.ClientSession() as http:
                self.http = http
                await self._wait_rules_ready()
                assert self.daemon.rules is not None
                self.daemon.rules.subscribe(tl.on_alert)
                if not await self._wait_healthy(120):
                    raise RuntimeError("the worker never became healthy")
                tl.say(f"worker {WORKER} healthy; starting load ({BASE_LOAD} clients)")
                loads.append(LoadGenerator(self.worker_url, concurrency=BASE_LOAD, prompt_len=16, max_tokens=48))
                loads[-1].start()
                await asyncio.sleep(3)
                for fault in self.faults:
                    self.results.append(await self._play(fault, loads))
        finally:
            for load in loads:
                with contextlib.suppress(Exception):
                    await load.stop()
            self.daemon.request_stop()
            with contextlib.suppress(Exception):
                await wait_for(daemon_task, 10)
            self.nvml.close()
        delivered = len(sink.accepted())
        tl.say(f"done: {delivered} notification(s) delivered to the webhook sink")
        return self.results

    async def _wait_rules_ready(self) -> None:
        deadline = time.monotonic() + 30
        while self.daemon.rules is None or not self.daemon.rules.groups:
            if time.monotonic() > deadline:
                raise RuntimeError("Sentinel did not start its rules")
            await asyncio.sleep(0.1)

    async def _healthy(self) -> bool:
        try:
            async with self.http.get(self.worker_url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._healthy():
                return True
            await asyncio.sleep(0.5)
        return False

    async def _admin(self, body: dict[str, Any]) -> None:
        # The worker may be between a restart and its first request (torch is slow to
        # import on a busy machine): wait for it rather than fail the demo.
        for attempt in range(3):
            try:
                async with self.http.post(self.worker_url + "/admin/fault", json=body) as r:
                    r.raise_for_status()
                    return
            except aiohttp.ClientError:
                if attempt == 2:
                    raise
                await self._wait_healthy(60)

    async def _inject(self, fault: Fault, loads: list[LoadGenerator]) -> None:
        if fault.name == "gpu-lost":
            self.nvml.inject_xid(LOST_GPU, 79)
            self.nvml.lose_gpu(LOST_GPU)
        elif fault.name == "oom":
            loads.append(LoadGenerator(self.worker_url, concurrency=SPIKE_LOAD, prompt_len=16, max_tokens=48, seed=1))
            loads[-1].start()
        elif fault.name == "hotspot":
            await self._admin({"kind": "memory_budget", "bytes": HOTSPOT_MEMORY_BUDGET_BYTES})
            self.timeline.say(
                f"(simulated GPU memory {HOTSPOT_MEMORY_BUDGET_BYTES / 1e6:.1f} MB: room for redundant experts)"
            )
            await self._admin({"kind": "skew", "experts": [0, 1, 2, 3], "bias": 10.0})
        elif fault.name == "stall":
            await self._admin({"kind": "stall", "seconds": 300})
        elif fault.name == "crash":
            await self._admin({"kind": "crash", "after_seconds": 1})

    async def _play(self, fault: Fault, loads: list[LoadGenerator]) -> FaultResult:
        tl = self.timeline
        result = FaultResult(fault.name)
        print_header = f"fault: {fault.description}"
        if not await self._wait_healthy(90):
            tl.say(f"worker {WORKER} is not healthy before the fault; injecting anyway")
        tl.say(print_header)
        injected = tl.now()  # unrounded: an alert can fire within the same millisecond
        result.injected_at = round(injected, 2)
        await self._inject(fault, loads)
        deadline = time.monotonic() + fault.timeout_s
        while time.monotonic() < deadline:
            if result.detected_at is None:
                hit = next(((t, name) for t, name, _ in tl.firing if t >= injected and name in fault.alerts), None)
                if hit is not None:
                    result.detected_at, result.alert = round(hit[0], 2), hit[1]
            action = await self._new_action(injected)
            if action is not None and (result.action is None or action.get("outcome") == "succeeded"):
                result.action = action["action"]
            if action is not None and action.get("outcome") == "succeeded" and result.recovered_at is None:
                result.recovered_at = round(action["finished"] - self._wall0(), 2)
            done = result.detected_at is not None and (not fault.expects_action or result.recovered_at is not None)
            if done:
                break
            await asyncio.sleep(0.25)
        if fault.name == "gpu-lost" and result.detected_at is not None:
            result.action, result.note = "notify_only", "hardware: a human drains the host"
        if fault.name == "hotspot":
            self.rebalance = self._rebalance_figures()
            if result.recovered_at is not None:
                b = self.rebalance
                result.note = f"balancedness {_fmt(b.get('before'))} -> {_fmt(b.get('after'))} measured"
            # The skew is the traffic's, not the worker's: it ends with the fault (a restarted
            # worker would otherwise start skewed on its default placement).
            await self._admin({"kind": "clear"})
        if result.detected_at is None:
            result.note = "not detected within the time limit"
        elif fault.expects_action and result.recovered_at is None:
            result.note = "no verified recovery within the time limit"
        await asyncio.sleep(2)
        return result

    def _rebalance_figures(self) -> dict[str, float | None]:
        """The last rebalance's balancedness: before and after (measured), predicted."""
        from sentinel.store import LabelMatcher, MatchOp

        matchers = [LabelMatcher("__name__", MatchOp.EQ, "sentinel_moe_rebalance_balancedness")]
        samples = self.daemon.store.instant(matchers, int(time.time() * 1000))
        out: dict[str, float | None] = {}
        for sample in samples:
            labels = dict(sample.labels)
            if labels.get("worker") == WORKER:
                out[labels["stage"]] = None if math.isnan(sample.value) else round(sample.value, 3)
        return out

    def _wall0(self) -> float:
        # Journal times are wall-clock; convert to seconds since the demo started.
        return time.time() - self.timeline.now()

    async def _new_action(self, since: float) -> dict[str, Any] | None:
        return await record_new_actions(
            self.daemon.healing.remediator,
            WORKER,
            self._wall0() + since,
            self._seen_actions,
            self.actions,
            self.timeline,
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def run_demo(faults: Sequence[Fault], out: TextIO, json_out: bool) -> Demo:
    demo = Demo(faults, out, quiet=json_out)
    if not json_out:
        print("Sentinel demo: inject faults into a simulated GPU host and a real tiny MoE worker,", file=out)
        print(
            f"and watch Sentinel detect and heal them (rule `for:` durations divided by {FOR_COMPRESSION}).",
            file=out,
            flush=True,
        )
    await demo.run()
    return demo


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--engine", choices=("builtin", "vllm"), default="builtin")
    chosen, rest = engine.parse_known_args(args_in)
    if chosen.engine == "vllm":  # a real vLLM (make vllm-env) instead of the built-in worker
        from sentinel.demo.vllm import main as vllm_main

        return vllm_main(rest, out)
    parser = argparse.ArgumentParser(prog="sentinel demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engine", choices=("builtin", "vllm"), default="builtin", help="vllm: a real vLLM from `make vllm-env`"
    )
    parser.add_argument(
        "--scenario",
        default="all",
        choices=["all", *(f.name for f in FAULTS)],
        help="one fault, or all of them in turn (default)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")
    parser.add_argument("--verbose", action="store_true", help="show Sentinel's own log")
    args = parser.parse_args(args_in)
    setup_logging("text", "info" if args.verbose else "error")
    faults = [f for f in FAULTS if args.scenario in ("all", f.name)]
    started = time.monotonic()
    demo = asyncio.run(run_demo(faults, out, args.json))
    results = demo.results
    if args.json:
        faults_json = [{k: v for k, v in asdict(r).items() if k != "note"} for r in results]
        actions_json = [
            {k: row.get(k) for k in ("action", "outcome", "alertname", "profile_before", "profile_after")}
            for row in demo.actions
        ]
        print(json.dumps({"faults": faults_json, "actions": actions_json, "rebalance": demo.rebalance}), file=out)
    else:
        print(f"\n{results_table(results)}\n\nfinished in {time.monotonic() - started:.0f}s", file=out)
    missed = [r for r in results if r.detected_at is None]
    return 1 if missed else 0
