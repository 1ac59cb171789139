"""Detection and recovery on a real vLLM, and healing efficacy against what users run today.

Three supervisors face the same real-engine faults (sentinel.demo.vllm's: the model worker
stopped under load and while idle, the model worker killed, KV-cache pressure), one after
another in one run, on the same machine:

- **sentinel**: Sentinel with the default rules (`for:` divided by 6 as in the demo), the
  canary when idle, the process backend and the launch ladder full -> reduced -> int8;
- **restart-on-exit**: what systemd's `Restart=always` (RestartSec=100ms) does: start the
  engine again whenever its process exits, nothing else. (`Restart=on-failure` would do
  less: vLLM's API server exits with status 0 when its engine core dies.)
- **liveness-probe**: a Kubernetes liveness probe on `/health` with the defaults
  (periodSeconds 10, timeoutSeconds 1, failureThreshold 3), plus restart on exit
  (restartPolicy Always); probes are not counted before the first success after a start,
  as a startupProbe would arrange.

For each: healed or not, seconds from the fault until a real completion is served again
(for KV pressure: until the preemption counter stands still under the same load), and
restarts spent. A baseline gets `--window` seconds; a fault it has not healed by then is
reported as "not healed", not as a large number (the bench then un-stops the worker or
lifts the load itself, so the next fault starts from a serving engine). Sentinel's times
are split into detection (fault -> alert firing), decision (alert -> action started) and
action plus engine start-up (action started -> serving again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sentinel.demo.common import Timeline  # noqa: E402
from sentinel.demo.vllm import (  # noqa: E402
    BASE_LOAD,
    FAULTS,
    FULL_SEQS,
    KV_BLOCKS,
    PRESSURE_LOAD,
    START_TIMEOUT_S,
    VllmHarness,
)
from sentinel.sim.load import LoadGenerator  # noqa: E402
from sentinel.sim.vllm_env import VllmEnv, VllmEnvMissing, find_vllm_env  # noqa: E402

SCENARIOS = [f.name for f in FAULTS]


@dataclass
class Outcome:
    supervisor: str
    fault: str
    healed: bool
    seconds_to_serving: float | None
    restarts: int
    detection_s: float | None = None
    decision_s: float | None = None
    action_and_startup_s: float | None = None
    note: str = ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Baseline:
    """A supervisor of one vLLM process: restart on exit, optionally a liveness probe."""

    def __init__(self, env: VllmEnv, kind: str, tmp: Path) -> None:
        self.env = env
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._probe_armed = False

    def spawn(self) -> None:
        environ = {
            **os.environ,
            **self.env.serve_env(),
            "MAX_NUM_SEQS": str(FULL_SEQS),
            "VLLM_EXTRA_ARGS": f"--num-gpu-blocks-override {KV_BLOCKS}",
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.env.serve_argv(self.port),
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._probe_armed = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    async def __aenter__(self) -> Baseline:
        self.spawn()
        self.http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._supervise())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.http.close()
        self.kill()

    async def _healthy(self, timeout: float) -> bool:
        try:
            async with self.http.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _supervise(self) -> None:
        failures, next_probe = 0, time.monotonic() + 10
        while True:
            await asyncio.sleep(0.1)
            assert self.proc is not None
            if self.proc.poll() is not None:  # Restart=always / restartPolicy: Always
                self.kill()
                self.restarts += 1
                self.spawn()
                failures, next_probe = 0, time.monotonic() + 10
                continue
            if self.kind != "liveness-probe" or time.monotonic() < next_probe:
                continue
            next_probe = time.monotonic() + 10
            if await self._healthy(1.0):
                self._probe_armed, failures = True, 0
            elif self._probe_armed:
                failures += 1
                if failures >= 3:
                    self.kill()
                    self.restarts += 1
                    self.spawn()
                    failures = 0


async def complete(http: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    try:
        async with http.post(
            url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=aiohttp.ClientTimeout(timeout)
        ) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float | None:
    try:
        async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(5)) as r:
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{")]
    return sum(values) if values else None


def worker_pid(api_pid: int) -> int:
    for child in psutil.Process(api_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() == "VLLM::Worker":
                return child.pid
    raise RuntimeError("no VLLM::Worker process")


async def wait_serving(http: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await complete(http, url, 10):
            return True
        await asyncio.sleep(1)
    return False


async def baseline_fault(b: Baseline, fault: str, window: float) -> Outcome:
    """Inject `fault` under baseline `b`; watch `window` seconds (engine death: until served)."""
    http = b.http
    if not await wait_serving(http, b.url, START_TIMEOUT_S):
        raise RuntimeError(f"{b.kind}: vLLM not serving before {fault}")
    load: LoadGenerator | None = None
    if fault in ("stall-load", "engine-death"):
        load = LoadGenerator(b.url, timeout=120, **BASE_LOAD)
    elif fault == "kv-pressure":
        load = LoadGenerator(b.url, timeout=120, seed=3, **PRESSURE_LOAD)
    if load is not None:
        load.start()
        await asyncio.sleep(3)
    restarts0 = b.restarts
    assert b.proc is not None
    pid = worker_pid(b.proc.pid)
    t0 = time.monotonic()
    outcome = Outcome(b.kind, fault, False, None, 0)
    try:
        if fault == "kv-pressure":
            # Healed means the preemptions stop under the same load; no baseline touches the batch.
            await asyncio.sleep(30)  # let the pressure build
            first = await metric(http, b.url, "vllm:num_preemptions_total") or 0.0
            await asyncio.sleep(max(window - 30, 30))
            last = await metric(http, b.url, "vllm:num_preemptions_total") or 0.0
            rate = (last - first) / max(window - 30, 30)
            outcome.healed = last == first
            outcome.note = f"{rate:.2f} preemptions/s at the end of the window"
        else:
            os.kill(pid, signal.SIGKILL if fault == "engine-death" else signal.SIGSTOP)
            limit = START_TIMEOUT_S if fault == "engine-death" else window
            await asyncio.sleep(2)
            while time.monotonic() - t0 < limit:
                if await complete(http, b.url, 5):
                    outcome.healed, outcome.seconds_to_serving = True, round(time.monotonic() - t0, 1)
                    break
                await asyncio.sleep(1)
            if not outcome.healed:
                outcome.note = f"not healed within {limit:.0f}s (/health stays 200)"
                if fault != "engine-death":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)  # the bench lifts the fault for the next one
    finally:
        if load is not None:
            await load.stop()
    outcome.restarts = b.restarts - restarts0
    return outcome


async def sentinel_arm(env: VllmEnv) -> list[Outcome]:
    outcomes: list[Outcome] = []
    timeline = Timeline(time.monotonic(), sys.stderr, quiet=False)
    async with VllmHarness(env, timeline) as h:
        for fault in FAULTS:
            result = await h.play(fault)
            p = h.phases[fault.name]
            # Actions carried out (succeeded or failed); requests skipped in flight or cooling down did nothing.
            restarts = sum(
                1
                for a in h.actions
                if a["started"] - h._wall0() >= (p.injected or 0) and a["outcome"] in ("succeeded", "failed")
            )
            healed = result.recovered_at is not None and (fault.name != "kv-pressure" or p.preemptions_after == 0)

            def span(a: float | None, b: float | None) -> float | None:
                return round(b - a, 1) if a is not None and b is not None else None

            outcomes.append(
                Outcome(
                    "sentinel",
                    fault.name,
                    healed,
                    span(p.injected, p.serving),
                    restarts,
                    detection_s=span(p.injected, p.detected),
                    decision_s=span(p.detected, p.action_started),
                    action_and_startup_s=span(p.action_started, p.serving),
                    note=result.note,
                )
            )
            await h.stop_loads()
    return outcomes


async def run(env: VllmEnv, window: float, arms: list[str]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    if "sentinel" in arms:
        outcomes += await sentinel_arm(env)
    with tempfile.TemporaryDirectory(prefix="sentinel-vllm-baseline-") as tmp:
        for kind in ("restart-on-exit", "liveness-probe"):
            if kind not in arms:
                continue
            async with Baseline(env, kind, Path(tmp)) as b:
                for fault in SCENARIOS:
                    outcome = await baseline_fault(b, fault, window)
                    print(f"{kind:16} {fault:13} {'healed' if outcome.healed else 'NOT healed'}", flush=True)
                    outcomes.append(outcome)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    head = ("supervisor", "fault", "healed", "to serving", "restarts", "detect", "decide", "act+start", "note")
    rows = [head]
    for o in outcomes:

        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}s"

        rows.append(
            (
                o.supervisor,
                o.fault,
                "yes" if o.healed else "NO",
                s(o.seconds_to_serving) if o.healed else "never",
                str(o.restarts),
                s(o.detection_s),
                s(o.decision_s),
                s(o.action_and_startup_s),
                o.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=90.0, help="seconds a baseline gets to heal a stall")
    parser.add_argument("--arms", default="sentinel,restart-on-exit,liveness-probe")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        env = find_vllm_env()
    except VllmEnvMissing as exc:
        raise SystemExit(f"bench/vllm_recovery.py: {exc}") from None
    outcomes = asyncio.run(run(env, args.window, args.arms.split(",")))
    print(table(outcomes))
    healed = {arm: sum(o.healed for o in outcomes if o.supervisor == arm) for arm in args.arms.split(",")}
    print("healed: " + ", ".join(f"{arm} {n}/{len(SCENARIOS)}" for arm, n in healed.items()))
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "vllm_recovery",
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "vllm": env.vllm_version,
                    "window_s": args.window,
                    "healed": healed,
                    "outcomes": [asdict(o) for o in outcomes],
                }
            )
        )


if __name__ == "__main__":
    main()
