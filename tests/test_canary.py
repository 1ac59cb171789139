"""The active canary against a real aiohttp server on port 0 playing a wedged or healthy engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sentinel.collectors.base import CollectorRunner
from sentinel.collectors.canary_config import CANARY_PRESETS, CanaryConfig
from sentinel.collectors.endpoint import EndpointCollector
from sentinel.collectors.engine_progress import ProgressTracker
from sentinel.collectors.http import SharedHttpSession
from sentinel.config.models import ConfigError, EndpointCollectorConfig, WorkerConfig, parse_config
from sentinel.store import Store

MODEL = 'model_name="tiny",engine="0"'


@dataclass
class Engine:
    """A served endpoint whose completions can hang (a stopped model worker) or fail."""

    running: float = 0.0
    tokens: float = 100.0
    wedged: bool = False
    status: int = 200
    completions: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def body(self) -> bytes:
        return (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{MODEL}}} {self.running}\n"
            f"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{{{MODEL}}} {self.tokens}\n"
        ).encode()


ENGINE = web.AppKey("engine", Engine)


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ENGINE].body(), content_type="text/plain")


async def _complete(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.paths.append(request.path)
    engine.completions.append(await request.json())
    engine.in_flight += 1
    engine.max_in_flight = max(engine.max_in_flight, engine.in_flight)
    try:
        if engine.wedged:
            await asyncio.Event().wait()
        if engine.status != 200:
            return web.Response(status=engine.status)
        engine.tokens += 1  # the canary's own token moves the counter, as in vLLM
        return web.json_response({"choices": [{"text": "x"}]})
    finally:
        engine.in_flight -= 1


@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, str]]:
    state = Engine()
    app = web.Application()
    app[ENGINE] = state
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/completions", _complete)
    app.router.add_post("/generate", _complete)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield state, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[SharedHttpSession]:
    owner = SharedHttpSession()
    yield owner
    await owner.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def collector(
    url: str, session: SharedHttpSession, store: Store, clock: Clock, engine: str = "vllm", **canary: Any
) -> tuple[EndpointCollector, CollectorRunner]:
    worker = WorkerConfig(name="w0", endpoint=url, engine=engine, canary=CanaryConfig(**canary))
    c = EndpointCollector(worker, EndpointCollectorConfig(), session, store, clock=clock)
    return c, CollectorRunner(c, store)


def value(store: Store, name: str, **labels: str) -> float | None:
    hits = [s for s in store.latest(name) if all(dict(s.labels).get(k) == v for k, v in labels.items())]
    return hits[0].value if hits else None


async def until(check: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until `check()` is true: the server handles a request after the tick sent it."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def settle(c: EndpointCollector) -> None:
    """Wait (bounded) until the canary in flight, if any, has finished."""
    for _ in range(1000):
        if c.canary is None or not c.canary.in_flight:
            return
        await asyncio.sleep(0.01)


async def test_idle_wedged_engine_is_stalled_by_a_canary_timeout_and_progress_clock_stops_at_its_send(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    state, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock, mode="when_idle", interval=15, deadline=0.3)
    await runner.tick()  # first look: idle, progress clock starts
    t0 = clock.now
    clock.now += 10
    await runner.tick()
    assert state.completions == [], "no canary before `interval` of quiet"
    state.wedged = True  # the model worker stops; /health and /metrics still answer
    clock.now += 6
    await runner.tick()  # 16 s quiet: canary sent
    sent_at = clock.now
    await until(lambda: len(state.completions) == 1)
    assert state.completions[0] == {"prompt": "ping", "max_tokens": 1, "temperature": 0}
    await asyncio.sleep(0.5)  # past the deadline (real time: aiohttp's timeout)
    clock.now += 40
    await runner.tick()
    assert value(store, "sentinel_canary_requests_total", outcome="timeout") == 1
    assert value(store, "sentinel_endpoint_stalled") == 1
    # The clock stopped when the canary was sent, although every scrape since said idle.
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds") == sent_at
    assert sent_at - t0 == 16
    await c.close()


async def test_healthy_idle_engine_answers_the_canary_and_stays_unstalled(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    _, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock, mode="when_idle", interval=5, deadline=2)
    await runner.tick()
    clock.now += 6
    await runner.tick()
    await settle(c)
    clock.now += 1
    await runner.tick()
    assert value(store, "sentinel_canary_requests_total", outcome="ok") == 1
    assert value(store, "sentinel_canary_last_success_timestamp_seconds") == clock.now - 1
    assert value(store, "sentinel_endpoint_stalled") == 0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds") == clock.now
    await c.close()


async def test_when_idle_sends_no_canary_while_traffic_moves_the_counters(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    state, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock, mode="when_idle", interval=5, deadline=2)
    state.running = 2
    for _ in range(10):
        state.tokens += 30
        clock.now += 2
        await runner.tick()
    assert state.completions == []
    await c.close()


async def test_always_mode_sends_every_interval_even_under_traffic(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    state, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock, mode="always", interval=4, deadline=2)
    state.running = 2
    for _ in range(9):
        state.tokens += 30
        await runner.tick()
        await settle(c)
        clock.now += 2
    assert len(state.completions) == 5  # at 0, 4, 8, 12, 16 s
    await c.close()


async def test_never_more_than_one_canary_in_flight(served: tuple[Engine, str], session: SharedHttpSession) -> None:
    state, url = served
    store, clock = Store(), Clock()
    state.wedged = True
    c, runner = collector(url, session, store, clock, mode="always", interval=3, deadline=3)
    await runner.tick()
    await until(lambda: len(state.completions) == 1)
    for _ in range(5):  # 0.1 s real time per tick: the 3 s deadline has not passed yet
        clock.now += 3
        await runner.tick()
        await asyncio.sleep(0.1)
    assert len(state.completions) == 1
    assert state.max_in_flight == 1
    assert value(store, "sentinel_canary_in_flight") == 1
    await c.close()


async def test_an_error_answer_is_counted_but_is_not_a_stall(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    state, url = served
    store, clock = Store(), Clock()
    state.status = 503
    c, runner = collector(url, session, store, clock, mode="when_idle", interval=1, deadline=2)
    await runner.tick()
    clock.now += 2
    await runner.tick()
    await settle(c)
    clock.now += 1
    await runner.tick()
    assert value(store, "sentinel_canary_requests_total", outcome="error") == 1
    assert value(store, "sentinel_endpoint_stalled") == 0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds") == clock.now
    await c.close()


async def test_sglang_preset_posts_a_one_token_generate(served: tuple[Engine, str], session: SharedHttpSession) -> None:
    state, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock, engine="sglang", mode="always", interval=5, deadline=2)
    await runner.tick()
    await until(lambda: len(state.paths) == 1)
    await settle(c)
    assert state.paths == ["/generate"]
    assert state.completions == [dict(CANARY_PRESETS["sglang"][1])]
    await c.close()


async def test_off_sends_nothing_and_writes_no_canary_series(
    served: tuple[Engine, str], session: SharedHttpSession
) -> None:
    state, url = served
    store, clock = Store(), Clock()
    c, runner = collector(url, session, store, clock)
    for _ in range(5):
        await runner.tick()
        clock.now += 100
    assert state.completions == []
    assert store.latest("sentinel_canary_requests_total") == []
    await c.close()


def test_tracker_counter_movement_clears_a_canary_stall() -> None:
    from sentinel.collectors.engine_progress import EngineSnapshot

    t = ProgressTracker()
    t.observe(EngineSnapshot(0, 10, None), 100)
    t.canary_started(110)
    t.canary_finished("timeout", 110, 120)
    state = t.observe(EngineSnapshot(0, 10, None), 130)
    assert state is not None and state.stalled and state.last_progress_s == 100
    state = t.observe(EngineSnapshot(0, 0, None), 200)  # restarted engine: counters reset
    assert state is not None and not state.stalled and state.last_progress_s == 200


def test_config_takes_per_engine_body_and_rejects_a_deadline_longer_than_the_period() -> None:
    text = """
workers:
  - name: w
    endpoint: http://127.0.0.1:8000
    engine: vllm
    canary: {mode: when_idle, interval: 20s, deadline: 5s, body: {model: m, prompt: hi, max_tokens: 1}}
"""
    worker = parse_config(text, "s.yaml").workers[0]
    assert worker.canary.request("vllm") == ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 1})
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("when_idle", "always").replace("5s", "30s"), "s.yaml")
    assert "canary" in str(err.value) and "deadline" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("when_idle", "sometimes"), "s.yaml")
    assert "workers.0.canary.mode" in str(err.value)
    json.dumps(worker.canary.model_dump())  # the body is plain JSON
