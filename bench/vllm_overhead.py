"""Cost to the engine: a real vLLM's generated tokens/s with Sentinel watching it vs without.

One vLLM (CPU build, from `make vllm-env`) serves the tiny Qwen3-MoE under a fixed
closed-loop load (4 clients, 32-character prompts, 64 tokens each). Windows of
`--seconds` alternate, `--reps` times: A (nothing watching), B (`sentinel run` in its own
process, as in production: 1 s endpoint scrape of /health and /metrics, the worker's log
file followed, the default rules, the canary in `always` mode every 5 s, remediation
observing), and A again. B/A is the cost; the second A over the first (A/A) is the noise
the machine itself makes, measured in the same run. Target: B/A >= 0.99.

Sentinel is started before each B window and stopped after it, so its start-up is not
counted, and so A windows see no Sentinel at all. Prints a table and, with `--json`, one
JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sentinel.sim.load import LoadGenerator  # noqa: E402
from sentinel.sim.vllm_env import VllmEnv, VllmEnvMissing, find_vllm_env  # noqa: E402

LOAD = {"concurrency": 4, "prompt_len": 32, "max_tokens": 64}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_serving(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.post(
                    url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=aiohttp.ClientTimeout(30)
                ) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(1)
    raise SystemExit(f"vLLM did not serve within {timeout:.0f}s")


async def wait_sentinel(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(5)) as r:
                    if r.status == 200 and 'sentinel_canary_requests_total{outcome="ok"' in await r.text():
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("Sentinel did not start scraping the worker")


async def window(url: str, seconds: float) -> float:
    """Generated tokens per second of the fixed load over one window (after a 3 s warm-up)."""
    load = LoadGenerator(url, seed=1, timeout=120, **LOAD)
    load.start()
    await asyncio.sleep(3)
    start_tokens, t0 = load.stats.completion_tokens, time.monotonic()
    await asyncio.sleep(seconds)
    tokens, t1 = load.stats.completion_tokens, time.monotonic()
    await load.stop()
    return (tokens - start_tokens) / (t1 - t0)


def sentinel_config(tmp: Path, worker_url: str, log_file: Path, port: int) -> Path:
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp / "state"),
        "log": {"level": "warning"},
        "collectors": {"nvml": {"enabled": False}, "endpoint": {"interval": "1s"}},
        "workers": [
            {
                "name": "vllm",
                "endpoint": worker_url,
                "engine": "vllm",
                "logs": [{"path": str(log_file)}],
                "canary": {"mode": "always", "interval": "5s", "deadline": "5s"},
            }
        ],
        "rules": {"files": [str(REPO / "rules" / "*.yml")]},
        "remediation": {"mode": "observe"},
    }
    path = tmp / "sentinel.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spawn_engine(env: VllmEnv, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    """vLLM in a session of its own (so its engine processes are stopped with it)."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            env.serve_argv(port),
            env={**os.environ, **env.serve_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def spawn_sentinel(config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """`sentinel run` in its own process, as in production."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sentinel.cli.main", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
        )


async def run(env: VllmEnv, reps: int, seconds: float) -> dict[str, Any]:
    port, sport = free_port(), free_port()
    url, surl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sport}"
    with tempfile.TemporaryDirectory(prefix="sentinel-vllm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log_file = tmp / "vllm.log"
        engine = spawn_engine(env, port, log_file)
        try:
            await wait_serving(url, 900)
            config = sentinel_config(tmp, url, log_file, sport)
            a1, b, a2 = [], [], []
            for rep in range(reps):
                a1.append(await window(url, seconds))
                sentinel = spawn_sentinel(config, tmp / "sentinel.log")
                try:
                    await wait_sentinel(surl)
                    b.append(await window(url, seconds))
                finally:
                    sentinel.terminate()
                    sentinel.wait(30)
                a2.append(await window(url, seconds))
                print(f"rep {rep + 1}: A {a1[-1]:.1f}  B {b[-1]:.1f}  A {a2[-1]:.1f} tokens/s", flush=True)
        finally:
            os.killpg(engine.pid, signal.SIGTERM)
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(engine.pid, signal.SIGKILL)
                engine.wait(10)
    baseline = [(x + y) / 2 for x, y in zip(a1, a2, strict=True)]
    ratios = [bb / base for bb, base in zip(b, baseline, strict=True)]
    noise = [y / x for x, y in zip(a1, a2, strict=True)]
    return {
        "bench": "vllm_overhead",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "vllm": env.vllm_version,
        "reps": reps,
        "window_s": seconds,
        "tokens_per_s_without": statistics.mean(baseline),
        "tokens_per_s_with": statistics.mean(b),
        "ratio_with_over_without": statistics.mean(ratios),
        "ratio_min": min(ratios),
        "aa_ratio": statistics.mean(noise),
        "aa_spread": max(abs(1 - n) for n in noise),
        "target": 0.99,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        env = find_vllm_env()
    except VllmEnvMissing as exc:
        raise SystemExit(f"bench/vllm_overhead.py: {exc}") from None
    result = asyncio.run(run(env, args.reps, args.seconds))
    print(
        f"tokens/s without Sentinel {result['tokens_per_s_without']:.1f}, with {result['tokens_per_s_with']:.1f}: "
        f"ratio {result['ratio_with_over_without']:.3f} (min {result['ratio_min']:.3f}, target >= 0.99); "
        f"A/A {result['aa_ratio']:.3f} (spread {result['aa_spread']:.3f})"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
