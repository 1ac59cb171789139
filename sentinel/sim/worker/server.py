"""The worker's HTTP API (aiohttp): OpenAI-style completions, vLLM's /health and /metrics, fault knobs.

- `POST /v1/completions` `{"model", "prompt", "max_tokens", "ignore_eos"}` -> `choices[0].text`
  and `usage`; errors in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
- `GET /v1/models` lists the served model.
- `GET /health`: 200 with an empty body while the engine is alive, also while it is
  stalled (as vLLM's does during an NCCL hang); 503 with an empty body once it is dead.
- `GET /metrics`: vLLM's series (see `metrics.py`).
- `POST /admin/fault` with one of
  `{"kind": "skew", "experts": [0, 1], "bias": 10.0}`, `{"kind": "memory_budget", "bytes": N}`
  (`null` removes it), `{"kind": "stall", "seconds": S}`, `{"kind": "crash", "after_seconds": S}`
  (default 0), `{"kind": "clear"}`; `GET /admin/state` shows profile, memory, faults, counters
  and expert load.
- `GET /admin/placement`: the expert placement the worker runs (`placement`, as
  `sentinel.moe.Placement.to_json` writes it, and its `version`) with the measured load
  per device. `POST /admin/placement` `{"placement": {...}, "version": N, "timeout_s": S}`
  applies one live (`control.apply_placement_message`) and answers with the acknowledgement:
  200 `applied`, 409 `refused` (with the reason), 504 `timed_out`; 400 for a body
  that is not a placement. This is the test and demo door; Sentinel's own path is the
  probe's control channel, which calls the same function.

The periodic `Engine 000: Avg prompt throughput: ...` line is logged from here, not from
the engine thread, so that it keeps coming (with 0.0 tokens/s) while the engine is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sentinel.sim.worker.control import MessageError, apply_placement_message, parse_placement_message, placement_ack
from sentinel.sim.worker.engine import Completion, EngineDeadError, RequestError, ServingEngine
from sentinel.sim.worker.formats import stats_line
from sentinel.sim.worker.profile import WorkerProfile
from sentinel.sim.worker.tokenizer import encode

__all__ = ["ENGINE", "PROFILE", "create_app"]

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", ServingEngine)
PROFILE = web.AppKey("profile", WorkerProfile)

_MAX_STALL_S = 3600.0


class _BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _int_field(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{key} must be an integer")
    return value


def _number_field(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadRequest(f"{key} must be a finite number")
    return float(value)


async def completions(request: web.Request) -> web.Response:
    """OpenAI-style text completion, greedy."""
    engine = request.app[ENGINE]
    profile = request.app[PROFILE]
    try:
        body = await _json_body(request)
        model = body.get("model")
        if model is not None and model != profile.model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _BadRequest("prompt must be a string")
        if body.get("stream"):
            raise _BadRequest("stream is not supported by the simulated worker")
        max_tokens = _int_field(body, "max_tokens", 16)
        ignore_eos = bool(body.get("ignore_eos", False))
    except _BadRequest as exc:
        return _error(400, str(exc), "BadRequestError")

    loop = asyncio.get_running_loop()
    future: asyncio.Future[Completion | BaseException] = loop.create_future()

    def done(result: Completion | BaseException) -> None:
        # Called on the engine thread; the loop may already be closing at shutdown.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, future, result)

    try:
        request_id = engine.submit(encode(prompt), max_tokens, done, ignore_eos=ignore_eos)
    except RequestError as exc:
        return _error(400, str(exc), "BadRequestError")
    except EngineDeadError as exc:
        return _error(500, str(exc), "InternalServerError")
    try:
        result = await future
    except asyncio.CancelledError:
        engine.abort(request_id)  # the client went away
        raise
    if isinstance(result, BaseException):
        return _error(500, str(result), "InternalServerError")
    return web.json_response(
        {
            "id": result.request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": profile.model_name,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }
    )


def _resolve(future: asyncio.Future[Completion | BaseException], result: Completion | BaseException) -> None:
    if not future.done():
        future.set_result(result)


async def models(request: web.Request) -> web.Response:
    """The served model, OpenAI's list shape."""
    profile = request.app[PROFILE]
    entry = {
        "id": profile.model_name,
        "object": "model",
        "owned_by": "sentinel",
        "max_model_len": profile.max_model_len,
    }
    return web.json_response({"object": "list", "data": [entry]})


async def health(request: web.Request) -> web.Response:
    """vLLM's /health: 200 while the engine lives (stalled or not), 503 once it is dead."""
    return web.Response(status=200 if request.app[ENGINE].alive else 503)


async def metrics(request: web.Request) -> web.Response:
    """vLLM-named series in the Prometheus text format."""
    body = generate_latest(request.app[ENGINE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def admin_state(request: web.Request) -> web.Response:
    """Profile, memory, faults, counters and expert load, as JSON."""
    profile = request.app[PROFILE]
    state = request.app[ENGINE].state()
    state["profile"] = {"name": profile.name, "worker": profile.worker, "max_num_seqs": profile.max_num_seqs}
    return web.json_response(state)


async def admin_fault(request: web.Request) -> web.Response:
    """Turn on one fault, or clear them all."""
    engine = request.app[ENGINE]
    try:
        body = await _json_body(request)
        kind = body.get("kind")
        if kind == "skew":
            experts = body.get("experts")
            if not isinstance(experts, list) or not experts or not all(type(e) is int for e in experts):
                raise _BadRequest("experts must be a non-empty list of expert indices")
            bias = _number_field(body, "bias", 10.0)
            try:
                engine.set_skew(tuple(experts), bias)
            except ValueError as exc:
                raise _BadRequest(str(exc)) from exc
        elif kind == "memory_budget":
            budget = body.get("bytes")
            if budget is not None and (type(budget) is not int or budget <= 0):
                raise _BadRequest("bytes must be a positive integer, or null to remove the budget")
            engine.set_memory_budget(budget)
        elif kind == "stall":
            seconds = _number_field(body, "seconds")
            if not 0 < seconds <= _MAX_STALL_S:
                raise _BadRequest(f"seconds must be in (0, {_MAX_STALL_S:g}]")
            engine.stall(seconds)
        elif kind == "crash":
            after = _number_field(body, "after_seconds", 0.0)
            if not 0 <= after <= _MAX_STALL_S:
                raise _BadRequest(f"after_seconds must be in [0, {_MAX_STALL_S:g}]")
            engine.crash(after)
        elif kind == "clear":
            engine.clear_faults()
        else:
            raise _BadRequest("kind must be one of skew, memory_budget, stall, crash, clear")
    except _BadRequest as exc:
        return _error(400, str(exc), "BadRequestError")
    log.warning("fault injected: %s", body)
    return web.json_response({"ok": True, "faults": engine.state()["faults"]})


_PLACEMENT_STATUS = {"applied": 200, "refused": 409, "timed_out": 504}


async def admin_placement(request: web.Request) -> web.Response:
    """The running expert placement, its version and the measured load per device."""
    engine = request.app[ENGINE]
    return web.json_response(
        {
            **placement_ack(engine),
            "placement": engine.ep.placement.to_json(),
            "gpu_tokens": engine.ep.device_tokens(),
            "replica_bytes": engine.ep.replica_bytes,
            "expert_bytes": engine.ep.expert_bytes,
        }
    )


async def admin_apply_placement(request: web.Request) -> web.Response:
    """Apply an expert placement live; the answer is the worker's acknowledgement."""
    engine = request.app[ENGINE]
    try:
        body = await _json_body(request)
        parse_placement_message(body)  # a bad body is a 400 here, before any thread
    except (_BadRequest, MessageError) as exc:
        return _error(400, str(exc), "BadRequestError")
    # Staging copies weights and the wait blocks: both stay off the event loop.
    ack = await asyncio.to_thread(apply_placement_message, engine, body)
    return web.json_response(ack, status=_PLACEMENT_STATUS.get(str(ack["status"]), 500))


async def _stats_logger(app: web.Application) -> AsyncIterator[None]:
    async def run() -> None:
        engine = app[ENGINE]
        interval = app[PROFILE].log_stats_interval
        last = engine.stats()
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                now = engine.stats()
                t = time.monotonic()
                elapsed = max(t - last_t, 1e-9)
                prompt_tps = (now.prompt_tokens - last.prompt_tokens) / elapsed
                gen_tps = (now.generation_tokens - last.generation_tokens) / elapsed
                preempted = now.preemptions - last.preemptions
                last, last_t = now, t
                # vLLM logs an idle interval at debug level only.
                idle = not (now.running or now.waiting or prompt_tps or gen_tps)
                if now.alive and not idle:
                    log.info(
                        "%s",
                        stats_line(
                            prompt_throughput=prompt_tps,
                            generation_throughput=gen_tps,
                            running=now.running,
                            waiting=now.waiting,
                            kv_cache_usage=now.kv_cache_usage,
                            preemptions=preempted,
                        ),
                    )
            except Exception:
                log.exception("stats logger tick failed")

    task = asyncio.create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(engine: ServingEngine, profile: WorkerProfile) -> web.Application:
    """The aiohttp application around a started (or about to start) engine."""
    app = web.Application()
    app[ENGINE] = engine
    app[PROFILE] = profile
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/state", admin_state)
    app.router.add_post("/admin/fault", admin_fault)
    app.router.add_get("/admin/placement", admin_placement)
    app.router.add_post("/admin/placement", admin_apply_placement)
    app.cleanup_ctx.append(_stats_logger)
    return app
