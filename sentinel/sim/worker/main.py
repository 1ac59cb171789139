"""`python -m sentinel.sim.worker`: read the profile, build the model, serve until stopped or dead.

Exit status: 0 after SIGTERM/SIGINT, 1 when the engine died (CUDA OOM under the memory
budget, the crash fault, an internal error), 2 for an invalid profile.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from sentinel.sim.worker.profile import ProfileError, WorkerProfile

__all__ = ["attach_probe", "main", "serve"]

log = logging.getLogger("sentinel.sim.worker")

PROBE_MODULE = "sentinel.probe"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sentinel.sim.worker",
        description="A tiny random-weight Qwen3-MoE behind a vLLM-like HTTP API, with fault knobs.",
    )
    parser.add_argument("--host", help="address to listen on (default $HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default $PORT or 8000)")
    parser.add_argument(
        "--profile-env",
        type=Path,
        help="an EnvironmentFile= style file (MAX_NUM_SEQS=..., QUANTIZATION=...) laid over the environment",
    )
    return parser.parse_args(argv)


def _setup_logging() -> None:
    from sentinel.sim.worker.formats import VllmFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VllmFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns the process exit status."""
    args = _parse_args(argv)
    env = dict(os.environ)
    if args.profile_env is not None:
        from sentinel.remediation.backends.envfile import read_env_file

        values = read_env_file(args.profile_env)
        if values is None:
            print(f"error: --profile-env {args.profile_env}: no such file", file=sys.stderr)
            return 2
        env.update(values)  # as systemd does: the file's assignments override the inherited environment
    if args.port is not None:
        env["PORT"] = str(args.port)
    if args.host is not None:
        env["HOST"] = args.host
    try:
        profile = WorkerProfile.from_env(env)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return asyncio.run(serve(profile))
    except KeyboardInterrupt:
        return 0


def attach_probe(model: object, profile: WorkerProfile, expert_gpus: list[int]) -> object | None:
    """Attach Sentinel's in-worker probe when `SENTINEL_PROBE_URL` is set; None otherwise.

    `sentinel.probe.attach(model, worker=..., sentinel=URL, expert_to_gpu=...)` hooks the
    same routers the EPLB counters hook (the skew fault shows in both) and reports to the
    daemon; the engine reads `probe.batch_limit` before every step and runs every step
    inside `probe.oom_guard()`. `expert_gpus` is the GPU of each expert, the same for
    every layer. The import is lazy: without the module the worker logs a warning and
    runs unprobed.
    """
    if profile.probe_url is None:
        return None
    try:
        module = importlib.import_module(PROBE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != PROBE_MODULE:
            raise
        log.warning("SENTINEL_PROBE_URL is set but %s is not installed: running without the probe", PROBE_MODULE)
        return None
    handle: object = module.attach(model, worker=profile.worker, sentinel=profile.probe_url, expert_to_gpu=expert_gpus)
    log.info("Sentinel probe attached for worker %s, reporting to %s", profile.worker, profile.probe_url)
    return handle


async def serve(profile: WorkerProfile) -> int:
    """Build the model, start the engine and the HTTP server; return the exit status."""
    # torch and transformers load here, after the profile is known to be valid.
    import prometheus_client
    import torch
    from aiohttp import web

    from sentinel.sim.worker.engine import ProbeHandle, ServingEngine
    from sentinel.sim.worker.metrics import EngineMetrics
    from sentinel.sim.worker.model import build_model, expert_to_gpu
    from sentinel.sim.worker.server import create_app

    # The model is tiny: one thread is fastest, and intra-op threads on a shared host only contend.
    torch.set_num_threads(1)
    # vLLM's /metrics has no `_created` series.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

    log.info("Sentinel simulated worker (vLLM-compatible API), profile %r", profile.name)
    log.info(
        "non-default args: {'model': %r, 'max_num_seqs': %d, 'quantization': %r, 'max_model_len': %d}",
        profile.model_name,
        profile.max_num_seqs,
        None if profile.quantization == "none" else profile.quantization,
        profile.max_model_len,
    )
    log.info("Resolved architecture: Qwen3MoeForCausalLM")
    log.info("Using max model len %d", profile.max_model_len)
    started = time.monotonic()
    moe = build_model(
        profile.quantization,
        seed=profile.seed,
        max_model_len=profile.max_model_len,
        redundant_experts=profile.redundant_experts,
    )
    log.info(
        "Model loading took %.4f GiB and %.6f seconds",
        moe.weights_bytes / 2**30,
        time.monotonic() - started,
    )
    precision = "fp32" if moe.quantization == "none" else f"int8 experts, {moe.linear_int8} int8 linear layers"
    log.info(
        "Weights: %d bytes (%s; %d bytes in fp32), %d bytes per token of KV cache and activations",
        moe.weights_bytes,
        precision,
        moe.weights_bytes_fp32,
        moe.per_token_bytes,
    )
    if profile.skew_experts:
        try:
            moe.set_skew(profile.skew_experts, profile.skew_bias)
        except ValueError as exc:
            log.error("SKEW_EXPERTS: %s", exc)
            return 2
    expert_map = expert_to_gpu(moe.num_experts)
    expert_gpus = [expert_map[e] for e in range(moe.num_experts)]
    probe = cast("ProbeHandle | None", attach_probe(moe.model, profile, expert_gpus))

    loop = asyncio.get_running_loop()
    dead = asyncio.Event()
    stop = asyncio.Event()

    def on_dead(reason: str) -> None:
        loop.call_soon_threadsafe(dead.set)

    engine = ServingEngine(
        moe,
        max_num_seqs=profile.max_num_seqs,
        model_name=profile.model_name,
        max_model_len=profile.max_model_len,
        memory_budget_bytes=profile.memory_budget_bytes,
        metrics=EngineMetrics(profile.model_name),
        probe=probe,
        eplb_interval=profile.log_stats_interval,
        on_dead=on_dead,
    )
    if profile.skew_experts:
        engine.set_skew(profile.skew_experts, profile.skew_bias)
    if probe is not None:
        from sentinel.sim.worker.control import serve_placement_through

        # Sentinel's live rebalance_experts: placements arrive in the probe's replies.
        serve_placement_through(probe, engine)
    kv_tokens = profile.max_num_seqs * profile.max_model_len
    log.info("GPU KV cache size: %s tokens", f"{kv_tokens:,}")
    log.info(
        "Maximum concurrency for %s tokens per request: %.2fx",
        f"{profile.max_model_len:,}",
        kv_tokens / profile.max_model_len,
    )
    if profile.memory_budget_bytes is not None:
        log.info("Simulated GPU memory budget: %d bytes", profile.memory_budget_bytes)
    engine.start()

    runner = web.AppRunner(create_app(engine, profile), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, profile.host, profile.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    log.info("Starting vLLM API server 0 on http://%s:%d", host, port)
    print(f"INFO:     Started server process [{os.getpid()}]", file=sys.stderr, flush=True)
    print("INFO:     Application startup complete.", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.create_task(dead.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if dead.is_set():
        # Let the failed requests' 500s and a prober's 503 go out, then go down as vLLM does.
        await asyncio.sleep(0.5)
        log.info("Shutting down: the engine core is dead")
    await asyncio.to_thread(engine.stop)
    await runner.cleanup()
    close = getattr(probe, "close", None)
    if callable(close):
        close()
    return 1 if dead.is_set() else 0
