"""A light stand-in for a vLLM worker: the same HTTP, no model (fleet demo and tests).

`python -m sentinel.sim.lite --port PORT` serves what Sentinel reads from a vLLM server,
with vLLM's names and semantics, without torch: several of these fit on a 2-core
machine next to several Sentinels, where the tiny MoE worker (`sentinel.sim.worker`)
would not.

- `POST /v1/completions` `{"prompt", "max_tokens"}`: generates `max_tokens` tokens at
  `TOKENS_PER_S` per sequence, at most `MAX_NUM_SEQS` sequences at once (the others
  wait), and answers in OpenAI's shape.
- `GET /health`: 200 while the engine lives, also while it is stalled (as vLLM's does
  during an NCCL hang); 503 once it died.
- `GET /metrics`: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:generation_tokens_total`, `vllm:prompt_tokens_total`, `vllm:request_success_total`,
  `vllm:kv_cache_usage_perc` and the `vllm:iteration_tokens_total` histogram (one
  observation per engine step: its `_count` is the step heartbeat).
- `POST /admin/fault` with `{"kind": "stall", "seconds": S}` (no token, no step, requests
  hang), `{"kind": "die"}` (logs vLLM's `EngineCore encountered a fatal error.`, fails
  every request, /health 503; the process stays, as vLLM's API server does),
  `{"kind": "exit", "code": N}` (the process exits now) or `{"kind": "clear"}`.

It logs in vLLM's format on stderr (the process backend appends it to the worker's log
file, where Sentinel's log collector reads it), with the periodic `Engine 000: Avg
prompt throughput ...` line every `VLLM_LOG_STATS_INTERVAL` seconds (default 10).
SIGTERM ends it at once; a stop really ends the process and a start really starts one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from sentinel.sim.worker.formats import VllmFormatter, stats_line

__all__ = ["LiteEngine", "create_app", "main"]

log = logging.getLogger("vllm.v1.engine.core")
MODEL = "sentinel-lite"
_MAX_TOKENS = 4096


class EngineDead(Exception):
    pass


class LiteEngine:
    """Sequences sharing `max_num_seqs` slots, each producing tokens at `tokens_per_s`."""

    def __init__(self, max_num_seqs: int, tokens_per_s: float) -> None:
        self.max_num_seqs = max_num_seqs
        self.step_s = 1.0 / tokens_per_s
        self._slots = asyncio.Semaphore(max_num_seqs)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stall_task: asyncio.Task[None] | None = None
        self.dead = False
        self.running = 0
        self.waiting = 0
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.successes = 0
        self.steps = 0

    async def complete(self, prompt_tokens: int, max_tokens: int) -> int:
        if self.dead:
            raise EngineDead("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            self.prompt_tokens += prompt_tokens
            for _ in range(max_tokens):
                await self._flowing.wait()
                if self.dead:
                    raise EngineDead("EngineCore encountered an issue. See stack trace (above) for the root cause.")
                await asyncio.sleep(self.step_s)
                self.generation_tokens += 1
                self.steps += 1
            self.successes += 1
            return max_tokens
        finally:
            self.running -= 1
            self._slots.release()

    def stall(self, seconds: float) -> None:
        self._flowing.clear()
        if self._stall_task is not None:
            self._stall_task.cancel()
        self._stall_task = asyncio.get_running_loop().create_task(self._unstall_after(seconds))

    async def _unstall_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._flowing.set()

    def die(self) -> None:
        self.dead = True
        self._flowing.set()  # hung requests wake up and fail
        log.error("EngineCore encountered a fatal error.")

    def clear(self) -> None:
        if self._stall_task is not None:
            self._stall_task.cancel()
            self._stall_task = None
        self._flowing.set()

    def metrics(self) -> str:
        labels = f'{{engine="0",model_name="{MODEL}"}}'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {self.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} {self.waiting}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} {self.running / self.max_num_seqs:.4f}",
            "# TYPE vllm:generation_tokens counter",
            f"vllm:generation_tokens_total{labels} {self.generation_tokens}",
            "# TYPE vllm:prompt_tokens counter",
            f"vllm:prompt_tokens_total{labels} {self.prompt_tokens}",
            "# TYPE vllm:request_success counter",
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}} {self.successes}',
            "# TYPE vllm:iteration_tokens_total histogram",
            f'vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} {self.steps}',
            f"vllm:iteration_tokens_total_count{labels} {self.steps}",
            f"vllm:iteration_tokens_total_sum{labels} {self.generation_tokens}",
        ]
        return "\n".join(lines) + "\n"


ENGINE = web.AppKey("engine", LiteEngine)


async def completions(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
        prompt = str(body.get("prompt", ""))
        max_tokens = int(body.get("max_tokens", 16))
    except (ValueError, TypeError, AttributeError):
        return _error(400, "the body must be a JSON object with prompt and max_tokens", "BadRequestError")
    if not 1 <= max_tokens <= _MAX_TOKENS:
        return _error(400, f"max_tokens must be in [1, {_MAX_TOKENS}]", "BadRequestError")
    prompt_tokens = max(1, len(prompt.split()))
    try:
        produced = await engine.complete(prompt_tokens, max_tokens)
    except EngineDead as exc:
        return _error(500, str(exc), "InternalServerError")
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": produced, "total_tokens": prompt_tokens + produced}
    choice = {"index": 0, "text": " tok" * produced, "finish_reason": "length", "logprobs": None}
    reply = {"id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "model": MODEL}
    return web.json_response({**reply, "choices": [choice], "usage": usage})


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[ENGINE].dead else 200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[ENGINE].metrics(), content_type="text/plain")


async def admin_fault(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
        kind = body.get("kind")
    except (ValueError, AttributeError):
        return _error(400, "the body must be a JSON object with a kind", "BadRequestError")
    if kind == "stall":
        engine.stall(float(body.get("seconds", 300)))
    elif kind == "die":
        engine.die()
    elif kind == "exit":
        code = int(body.get("code", 1))
        log.error("worker exiting with status %d on request", code)
        asyncio.get_running_loop().call_soon(os._exit, code)
    elif kind == "clear":
        engine.clear()
    else:
        return _error(400, "kind must be one of stall, die, exit, clear", "BadRequestError")
    log.warning("fault injected: %s", body)
    return web.json_response({"ok": True})


async def _stats_logger(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    interval = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
    stats = logging.getLogger("vllm.v1.metrics.loggers")

    async def run() -> None:
        last_tokens, last_prompt = engine.generation_tokens, engine.prompt_tokens
        while True:
            await asyncio.sleep(interval)
            tokens, prompt = engine.generation_tokens, engine.prompt_tokens
            stats.info(
                stats_line(
                    prompt_throughput=(prompt - last_prompt) / interval,
                    generation_throughput=(tokens - last_tokens) / interval,
                    running=engine.running,
                    waiting=engine.waiting,
                    kv_cache_usage=engine.running / engine.max_num_seqs,
                )
            )
            last_tokens, last_prompt = tokens, prompt

    task = asyncio.get_running_loop().create_task(run())
    yield
    task.cancel()


def create_app(engine: LiteEngine) -> web.Application:
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/fault", admin_fault)
    app.cleanup_ctx.append(_stats_logger)
    return app


async def serve(port: int, engine: LiteEngine) -> None:
    runner = web.AppRunner(create_app(engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    profile = os.environ.get("SENTINEL_PROFILE", "default")
    logging.getLogger("vllm.entrypoints.openai.api_server").info(
        "Starting vLLM API server on http://127.0.0.1:%d (profile %s, max_num_seqs %d)",
        port,
        profile,
        engine.max_num_seqs,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentinel.sim.lite", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VllmFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        max_num_seqs = int(os.environ.get("MAX_NUM_SEQS", "8"))
        tokens_per_s = float(os.environ.get("TOKENS_PER_S", "40"))
    except ValueError as exc:
        print(f"sentinel.sim.lite: MAX_NUM_SEQS and TOKENS_PER_S must be numbers: {exc}", file=sys.stderr)
        return 2
    if max_num_seqs < 1 or tokens_per_s <= 0:
        print("sentinel.sim.lite: MAX_NUM_SEQS must be >= 1 and TOKENS_PER_S > 0", file=sys.stderr)
        return 2

    async def run() -> None:
        await serve(args.port, LiteEngine(max_num_seqs, tokens_per_s))

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"sentinel.sim.lite: cannot listen on port {args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
