"""Endpoint collector against real aiohttp servers playing vLLM and SGLang on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sentinel.collectors.base import CollectorRunner
from sentinel.collectors.endpoint import SCRAPE_ERROR_REASONS, EndpointCollector, ScrapeError, endpoint_collectors
from sentinel.collectors.engine_progress import BalancednessTracker, EngineSnapshot, ProgressTracker
from sentinel.collectors.http import SharedHttpSession
from sentinel.collectors.promtext import ParsedMetrics, ParseError, TextParser, parse_openmetrics
from sentinel.config.models import EndpointCollectorConfig, WorkerConfig
from sentinel.store import Store
from sentinel.store.events import Event, EventBus

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CANDIDATES = [
    Path(os.environ.get("SENTINEL_REFERENCE_DIR", "/nonexistent")) / "samples" / "vllm-metrics.txt",
    REPO / "shared" / "reference" / "samples" / "vllm-metrics.txt",
    REPO.parent / "shared" / "reference" / "samples" / "vllm-metrics.txt",
]
TEXT_CT = "text/plain; version=0.0.4; charset=utf-8"
MODEL = 'model_name="Qwen/Qwen3-30B-A3B",engine="0"'


# -- a fake engine ---------------------------------------------------------------------


@dataclass
class FakeEngine:
    """What the served endpoint does; tests change it between passes."""

    health_status: int = 200
    body: bytes = b""
    content_type: str = TEXT_CT
    hang: bool = False
    chunked: bool = False
    requests: list[str] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)


async def _health(request: web.Request) -> web.StreamResponse:
    engine: FakeEngine = request.app[ENGINE]
    engine.requests.append("health")
    if engine.hang:
        await asyncio.Event().wait()
    return web.Response(status=engine.health_status)


async def _metrics(request: web.Request) -> web.StreamResponse:
    engine: FakeEngine = request.app[ENGINE]
    engine.requests.append("metrics")
    engine.headers_seen.append(dict(request.headers))
    if engine.hang:
        await asyncio.Event().wait()
    if engine.chunked:
        resp = web.StreamResponse(headers={"Content-Type": engine.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(engine.body), 4096):
            await resp.write(engine.body[i : i + 4096])
        await resp.write_eof()
        return resp
    return web.Response(body=engine.body, headers={"Content-Type": engine.content_type})


ENGINE = web.AppKey("engine", FakeEngine)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[FakeEngine, str]]:
    state = FakeEngine()
    app = web.Application()
    app[ENGINE] = state
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield state, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[SharedHttpSession]:
    owner = SharedHttpSession()
    yield owner
    await owner.close()


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make(
    endpoint: str,
    session: SharedHttpSession,
    store: Store,
    *,
    engine: str = "vllm",
    name: str = "w0",
    clock: Callable[[], float] = time.time,
    bus: EventBus | None = None,
    **config: float,
) -> tuple[EndpointCollector, CollectorRunner]:
    worker = WorkerConfig(name=name, endpoint=endpoint, engine=engine)
    collector = EndpointCollector(worker, EndpointCollectorConfig(**config), session, store, bus, clock=clock)
    return collector, CollectorRunner(collector, store)


def value(store: Store, name: str, **labels: str) -> float | None:
    """The live value of the one series of `name` whose labels include `labels`."""
    hits = [s for s in store.latest(name) if all(dict(s.labels).get(k) == v for k, v in labels.items())]
    assert len(hits) <= 1, hits
    return hits[0].value if hits else None


def vllm_body(running: float, tokens: float, steps: float, *, old_names: bool = False) -> bytes:
    cache, itl = (
        ("gpu_cache_usage_perc", "time_per_output_token_seconds")
        if old_names
        else (
            "kv_cache_usage_perc",
            "inter_token_latency_seconds",
        )
    )
    return f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{MODEL}}} {running}
# TYPE vllm:{cache} gauge
vllm:{cache}{{{MODEL}}} 0.25
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{{MODEL}}} {tokens}
# TYPE vllm:{itl} histogram
vllm:{itl}_bucket{{le="0.1",{MODEL}}} 5.0
vllm:{itl}_bucket{{le="+Inf",{MODEL}}} 7.0
vllm:{itl}_count{{{MODEL}}} 7.0
vllm:{itl}_sum{{{MODEL}}} 0.42
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{le="+Inf",{MODEL}}} {steps}
vllm:iteration_tokens_total_count{{{MODEL}}} {steps}
vllm:iteration_tokens_total_sum{{{MODEL}}} {steps * 16}
""".encode()


def sglang_body(running: float, tokens: float, bal_sum: float, bal_count: float) -> bytes:
    labels = 'model_name="Qwen/Qwen3-30B-A3B",tp_rank="0",moe_ep_rank="0"'
    return f"""# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{{labels}}} {running}
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{{{labels}}} {tokens}
# HELP sglang:eplb_balancedness Balancedness of MoE in expert parallelism.
# TYPE sglang:eplb_balancedness summary
sglang:eplb_balancedness_count{{{labels},forward_mode="decode"}} {bal_count}
sglang:eplb_balancedness_sum{{{labels},forward_mode="decode"}} {bal_sum}
sglang:eplb_balancedness_created{{{labels},forward_mode="decode"}} 1.7e9
""".encode()


def sample_body() -> bytes:
    for path in SAMPLE_CANDIDATES:
        if path.is_file():
            return path.read_bytes()
    pytest.skip("the vLLM sample body is not here: set SENTINEL_REFERENCE_DIR to shared/reference")


# -- vLLM ------------------------------------------------------------------------------


async def test_vllm_sample_body_lands_in_store_with_worker_label_and_wire_names(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.body = sample_body()
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()

    assert runner.health.up
    wire = {"model_name": "Qwen/Qwen3-30B-A3B", "engine": "0", "worker": "w0"}
    assert value(store, "vllm:generation_tokens_total", **wire) == 2918842.0
    assert value(store, "vllm:time_to_first_token_seconds_bucket", le="+Inf", **wire) == 9435.0
    assert value(store, "vllm:iteration_tokens_total_count", **wire) == 103402.0
    assert value(store, "vllm:request_success_total", finished_reason="abort", **wire) == 4.0
    lines = [line for line in state.body.decode().splitlines() if line and not line.startswith("#")]
    assert value(store, "sentinel_endpoint_scrape_samples", worker="w0") == len(lines)
    assert value(store, "sentinel_endpoint_up", worker="w0") == 1.0
    assert value(store, "sentinel_endpoint_health_status_code", worker="w0") == 200.0
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 1.0
    assert value(store, "sentinel_endpoint_requests_running", worker="w0") == 12.0
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 0.0
    # No compression and no OpenMetrics: the worker's CPU belongs to the engine.
    assert state.headers_seen[-1]["Accept-Encoding"] == "identity"
    assert "openmetrics" not in state.headers_seen[-1]["Accept"]


async def test_health_going_503_marks_worker_down_while_collector_stays_up(
    engine: tuple[FakeEngine, str], session: SharedHttpSession, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = engine
    state.body = vllm_body(0, 10, 10)  # idle: frozen counters are no stall
    store, bus = Store(), EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    _, runner = make(url, session, store, bus=bus)
    await runner.tick()
    assert value(store, "sentinel_endpoint_up", worker="w0") == 1.0

    state.health_status = 503
    with caplog.at_level(logging.INFO, logger="sentinel.collectors.endpoint"):
        for _ in range(3):
            await runner.tick()
    assert value(store, "sentinel_endpoint_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_health_status_code", worker="w0") == 503.0
    assert runner.health.up, "a worker that is down is not a collector failure"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 503" in warnings[0].getMessage()
    assert [e.kind for e in events] == ["endpoint_down"]

    state.health_status = 200
    await runner.tick()
    assert value(store, "sentinel_endpoint_up", worker="w0") == 1.0
    assert [e.kind for e in events] == ["endpoint_down", "endpoint_up"]


async def test_refused_connection_reads_status_code_zero_and_counts_a_connection_error(
    session: SharedHttpSession, unused_tcp_port: int
) -> None:
    store = Store()
    _, runner = make(f"http://127.0.0.1:{unused_tcp_port}", session, store)
    await runner.tick()
    assert runner.health.up
    assert value(store, "sentinel_endpoint_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_health_status_code", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="connection") == 1.0


async def test_stall_with_health_200_sets_stalled_and_freezes_last_progress(
    engine: tuple[FakeEngine, str], session: SharedHttpSession, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = engine
    clock = Clock()
    store = Store()
    _, runner = make(url, session, store, clock=clock)

    tokens = steps = 1000.0
    for _ in range(3):  # a healthy engine: counters advance every scrape
        tokens, steps = tokens + 50, steps + 4
        state.body = vllm_body(8, tokens, steps)
        clock.now += 1
        await runner.tick()
    moving = value(store, "sentinel_endpoint_last_progress_timestamp_seconds", worker="w0")
    assert moving == clock.now
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 0.0
    progress_before = value(store, "sentinel_endpoint_progress_total", worker="w0")
    assert progress_before == 2.0  # the first scrape is the baseline

    with caplog.at_level(logging.WARNING, logger="sentinel.collectors.endpoint"):
        for _ in range(4):  # NCCL hang: /health still 200, counters frozen, requests running
            clock.now += 1
            await runner.tick()
    assert value(store, "sentinel_endpoint_up", worker="w0") == 1.0
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 1.0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds", worker="w0") == moving
    assert value(store, "sentinel_endpoint_progress_total", worker="w0") == progress_before
    assert value(store, "sentinel_endpoint_requests_running", worker="w0") == 8.0
    assert len([r for r in caplog.records if "stalled" in r.getMessage()]) == 1

    state.body = vllm_body(8, tokens + 10, steps + 1)
    clock.now += 1
    await runner.tick()
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds", worker="w0") == clock.now


async def test_a_refused_connection_drops_the_progress_timestamp_so_a_slow_restart_is_no_stall(
    engine: tuple[FakeEngine, str], session: SharedHttpSession, unused_tcp_port: int
) -> None:
    state, url = engine
    clock = Clock()
    store = Store()
    collector, runner = make(url, session, store, clock=clock)
    state.body = vllm_body(8, 1000, 100)
    for _ in range(3):  # running requests, frozen counters: a stall
        clock.now += 1
        await runner.tick()
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 1.0
    # The worker is being restarted: nothing listens on its port for a while.
    collector.health_url = f"http://127.0.0.1:{unused_tcp_port}/health"
    collector.metrics_url = f"http://127.0.0.1:{unused_tcp_port}/metrics"
    clock.now += 1
    await runner.tick()
    assert value(store, "sentinel_endpoint_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds", worker="w0") is None
    assert value(store, "sentinel_endpoint_progress_total", worker="w0") is not None


async def test_idle_engine_with_frozen_counters_is_not_stalled(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    clock = Clock()
    store = Store()
    _, runner = make(url, session, store, clock=clock)
    state.body = vllm_body(0, 500, 40)
    for _ in range(3):
        clock.now += 1
        await runner.tick()
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_last_progress_timestamp_seconds", worker="w0") == clock.now


@pytest.mark.wallclock
async def test_endpoint_that_accepts_and_never_answers_is_bounded_by_its_timeouts(
    session: SharedHttpSession, caplog: pytest.LogCaptureFixture
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await asyncio.Event().wait()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = Store()
    _, runner = make(f"http://127.0.0.1:{port}", session, store, health_timeout=0.2, scrape_timeout=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="sentinel.collectors.endpoint"):
            started = time.perf_counter()
            await runner.tick()
            await runner.tick()
            elapsed = time.perf_counter() - started
    finally:
        for writer in accepted:
            writer.close()
        server.close()
    assert accepted, "the server accepted the connections"
    assert elapsed < 2 * 0.3 + 0.5
    assert runner.health.up
    assert value(store, "sentinel_endpoint_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_health_status_code", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="timeout") == 2.0
    assert len(caplog.records) == 2  # one for the probe, one for the scrape; not one per pass


async def test_metrics_handler_that_hangs_after_accepting_is_a_timeout(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.hang = True
    store = Store()
    collector, _ = make(url, session, store, health_timeout=0.2, scrape_timeout=0.2)
    started = time.perf_counter()
    result = await collector.scrape()
    assert time.perf_counter() - started < 1.0
    assert result.reason == "timeout" and result.parsed is None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_refused_and_counted(
    engine: tuple[FakeEngine, str], session: SharedHttpSession, chunked: bool
) -> None:
    state, url = engine
    state.body = vllm_body(1, 1, 1) * 200
    state.chunked = chunked
    store = Store()
    _, runner = make(url, session, store, max_body_bytes=10_000)
    await runner.tick()
    assert runner.health.up
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="too_large") == 1.0
    assert value(store, "sentinel_endpoint_scrape_samples", worker="w0") == 0.0
    assert store.latest("vllm:num_requests_running") == []


async def test_garbage_body_is_a_parse_error_and_earlier_engine_series_go_stale(
    engine: tuple[FakeEngine, str], session: SharedHttpSession, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = engine
    state.body = vllm_body(0, 10, 10)
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()
    assert value(store, "vllm:num_requests_running", worker="w0") == 0.0

    state.body = b"<html><body>502 Bad Gateway</body></html>\n"
    with caplog.at_level(logging.INFO, logger="sentinel.collectors.endpoint"):
        for _ in range(3):
            await runner.tick()
    assert runner.health.up
    assert value(store, "sentinel_endpoint_up", worker="w0") == 1.0
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 0.0
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="parse") == 3.0
    assert value(store, "vllm:num_requests_running", worker="w0") is None
    assert len(caplog.records) == 1 and "parse" in caplog.records[0].getMessage()

    state.body = b"\xff\xfe\x00bad bytes 1\n"
    with caplog.at_level(logging.INFO, logger="sentinel.collectors.endpoint"):
        await runner.tick()
        state.body = vllm_body(0, 10, 10)
        await runner.tick()
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="encoding") == 1.0
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "INFO"]
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 1.0


async def test_every_scrape_error_reason_is_exported_from_the_first_pass(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.body = vllm_body(0, 0, 0)
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()
    for reason in SCRAPE_ERROR_REASONS:
        assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason=reason) == 0.0
    for name in ("sentinel_endpoint_up", "sentinel_endpoint_stalled", "sentinel_endpoint_progress_total"):
        assert store.meta(name) is not None


async def test_old_vllm_names_are_also_written_under_the_new_names(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.body = vllm_body(1, 10, 10, old_names=True)
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()
    assert value(store, "vllm:gpu_cache_usage_perc", worker="w0") == 0.25
    assert value(store, "vllm:kv_cache_usage_perc", worker="w0") == 0.25
    assert value(store, "vllm:inter_token_latency_seconds_bucket", worker="w0", le="0.1") == 5.0
    assert value(store, "vllm:inter_token_latency_seconds_count", worker="w0") == 7.0
    assert value(store, "vllm:time_per_output_token_seconds_sum", worker="w0") == 0.42

    # Both present: the engine's own new series win, nothing is copied over them.
    state.body = vllm_body(1, 10, 10) + f"vllm:gpu_cache_usage_perc{{{MODEL}}} 0.9\n".encode()
    await runner.tick()
    assert value(store, "vllm:kv_cache_usage_perc", worker="w0") == 0.25


async def test_worker_label_on_the_wire_becomes_exported_worker(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.body = b'vllm:num_requests_running{worker="gpu-box-3",engine="0"} 4\nup 1\n'
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()
    assert value(store, "vllm:num_requests_running", worker="w0", exported_worker="gpu-box-3") == 4.0
    assert value(store, "up", worker="w0") == 1.0


# -- SGLang ----------------------------------------------------------------------------


async def test_sglang_counters_feed_progress_and_eplb_balancedness(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    clock = Clock()
    store = Store()
    _, runner = make(url, session, store, engine="sglang", clock=clock)

    state.body = sglang_body(running=3, tokens=100, bal_sum=80.0, bal_count=100)
    await runner.tick()
    assert value(store, "sentinel_endpoint_requests_running", worker="w0") == 3.0
    # The lifetime mean first.
    assert value(store, "sentinel_moe_balancedness", worker="w0", origin="metrics") == pytest.approx(0.8)

    # 50 more forward passes at 0.6 each: the recent value, not the lifetime mean.
    state.body = sglang_body(running=3, tokens=150, bal_sum=80.0 + 30.0, bal_count=150)
    clock.now += 1
    await runner.tick()
    assert value(store, "sentinel_moe_balancedness", worker="w0", origin="metrics") == pytest.approx(0.6)
    assert value(store, "sglang:eplb_balancedness_sum", worker="w0", forward_mode="decode") == 110.0
    assert value(store, "sentinel_endpoint_progress_total", worker="w0") == 1.0

    clock.now += 1
    await runner.tick()  # tokens frozen while 3 requests run
    assert value(store, "sentinel_endpoint_stalled", worker="w0") == 1.0


async def test_openmetrics_body_is_parsed_by_content_type(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    state.body = (
        b"# TYPE vllm:generation_tokens counter\n"
        b'vllm:generation_tokens_total{engine="0"} 12.0\n'
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{engine="0"} 1.0\n'
        b"# EOF\n"
    )
    store = Store()
    _, runner = make(url, session, store)
    await runner.tick()
    assert value(store, "vllm:generation_tokens_total", worker="w0") == 12.0
    assert value(store, "sentinel_endpoint_requests_running", worker="w0") == 1.0

    state.body = state.body.replace(b"# EOF\n", b"")  # OpenMetrics requires the terminator
    await runner.tick()
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="parse") == 1.0


async def test_collectors_of_all_workers_share_one_session(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    state, url = engine
    state.body = vllm_body(1, 1, 1)
    store = Store()
    a, runner_a = make(url, session, store, name="a")
    b, runner_b = make(url, session, store, name="b")
    await asyncio.gather(runner_a.tick(), runner_b.tick())
    pool = session.get()
    await asyncio.gather(runner_a.tick(), runner_b.tick())
    assert session.get() is pool
    assert value(store, "vllm:num_requests_running", worker="a") == 1.0
    assert value(store, "vllm:num_requests_running", worker="b") == 1.0
    await a.close()
    await b.close()
    assert not session.closed, "collectors never close the shared session; the daemon does"
    await session.close()
    assert session.closed


def test_one_collector_per_worker_with_an_endpoint_unless_disabled() -> None:
    workers = [WorkerConfig(name="a", endpoint="http://127.0.0.1:8000"), WorkerConfig(name="b")]
    session, store = SharedHttpSession(), Store()
    built = endpoint_collectors(workers, EndpointCollectorConfig(), session, store)
    assert [c.name for c in built] == ["endpoint:a"]
    assert endpoint_collectors(workers, EndpointCollectorConfig(enabled=False), session, store) == []


def test_worker_without_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="no endpoint"):
        EndpointCollector(WorkerConfig(name="w"), EndpointCollectorConfig(), SharedHttpSession(), Store())


def test_health_and_metrics_paths_come_from_worker_or_engine_preset() -> None:
    worker = WorkerConfig(name="w", endpoint="http://h:8000/", engine="sglang", metrics_path="m")
    collector = EndpointCollector(worker, EndpointCollectorConfig(), SharedHttpSession(), Store())
    assert collector.health_url == "http://h:8000/health"
    assert collector.metrics_url == "http://h:8000/m"
    custom = WorkerConfig(name="w", endpoint="http://h:8000", health_path="/health_generate")
    assert EndpointCollector(custom, EndpointCollectorConfig(), SharedHttpSession(), Store()).health_url.endswith(
        "/health_generate"
    )


# -- progress and balancedness, without HTTP --------------------------------------------


def test_progress_tracker_counts_a_counter_reset_as_progress_not_a_stall() -> None:
    tracker = ProgressTracker()
    tracker.observe(EngineSnapshot(running=4, tokens=1000, steps=100), 1.0)
    state = tracker.observe(EngineSnapshot(running=4, tokens=3, steps=1), 2.0)
    assert state is not None and not state.stalled and state.last_progress_s == 2.0
    assert tracker.observe(EngineSnapshot(running=4, tokens=None, steps=None), 3.0) is None


def test_balancedness_window_forgets_old_passes_and_reports_nothing_without_passes() -> None:
    tracker = BalancednessTracker(window_s=10)

    def scrape(total: float, count: float) -> ParsedMetrics:
        return ParsedMetrics(sums={"sglang:eplb_balancedness_sum": total, "sglang:eplb_balancedness_count": count})

    assert tracker.observe(scrape(50, 100), 0) == pytest.approx(0.5)
    assert tracker.observe(scrape(59, 110), 5) == pytest.approx(0.9)
    assert tracker.observe(scrape(59, 110), 16) is None  # no pass in the last 10 s
    assert tracker.observe(scrape(5, 10), 17) == pytest.approx(0.5)  # engine restarted


# -- the parser ---------------------------------------------------------------------------

_NAMES = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,15}", fullmatch=True).filter(lambda n: not n.startswith("__"))
_LABEL_NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(
    lambda n: not n.startswith("__") and n != "worker"
)
_LABEL_VALUES = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([math.inf, -math.inf, math.nan]),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


_SERIES = st.lists(
    st.tuples(
        _NAMES,
        st.dictionaries(_LABEL_NAMES, _LABEL_VALUES, max_size=4),
        _VALUES,
        st.one_of(st.none(), st.integers(min_value=0, max_value=2**53)),
    ),
    max_size=20,
    unique_by=lambda s: (s[0], tuple(sorted(s[1].items()))),
)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=300, deadline=None)
@given(series=_SERIES)
def test_text_parser_agrees_with_prometheus_client_on_valid_exposition(
    series: list[tuple[str, dict[str, str], float, int | None]],
) -> None:
    lines = []
    for name, labels, v, ts in series:
        block = ",".join(f'{k}="{_escape(val)}"' for k, val in labels.items())
        lines.append(f"{name}{{{block}}} {_format_value(v)}" + ("" if ts is None else f" {ts}"))
    text = "\n".join(lines) + "\n"
    ours = TextParser({"worker": "w"}).parse(text).samples

    expected: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if v != ""}
            key = tuple(sorted({**labels, "__name__": sample.name, "worker": "w"}.items()))
            expected[key] = sample.value
    assert set(ours) == set(expected)
    assert all(_same(ours[k], expected[k]) for k in ours)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_arbitrary_text_raises_nothing_but_parse_error(text: str) -> None:
    for parse in (TextParser({"worker": "w"}).parse, lambda t: parse_openmetrics(t, {"worker": "w"})):
        with contextlib.suppress(ParseError):
            parse(text)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(st.sampled_from([b"vllm:x", b"{", b"}", b'a="b"', b" ", b"1", b"\n", b"# TYPE", b"\\", b'"'])).map(
            b"".join
        ),
    ),
    openmetrics=st.booleans(),
)
def test_arbitrary_bytes_fail_a_scrape_only_with_encoding_or_parse(body: bytes, openmetrics: bool) -> None:
    worker = WorkerConfig(name="w", endpoint="http://127.0.0.1:1")
    collector = EndpointCollector(worker, EndpointCollectorConfig(), SharedHttpSession(), Store())
    content_type = "application/openmetrics-text; version=1.0.0" if openmetrics else TEXT_CT
    try:
        collector.parse_body(body, content_type)
    except ScrapeError as exc:
        assert exc.reason in ("encoding", "parse")


def test_parser_rejects_what_prometheus_rejects() -> None:
    parser = TextParser({"worker": "w"})
    for bad in ('x{a="1" b="2"} 1', "x 1_000", 'x{a="1"', "x", "x 1 2 3", 'x{a="1",a="2"} 1', "9x 1", "x{a=1} 1"):
        with pytest.raises(ParseError):
            parser.parse(bad)
    parsed = parser.parse('x{a="}",b="q\\"\\n\\\\"} 1 123\n  \ny{} NaN\n# any comment\n')
    assert parsed.samples[(("__name__", "x"), ("a", "}"), ("b", 'q"\n\\'), ("worker", "w"))] == 1.0
    assert math.isnan(parsed.samples[(("__name__", "y"), ("worker", "w"))])


def test_parser_fails_fast_on_lines_padded_to_provoke_backtracking() -> None:
    parser = TextParser({"worker": "w"})
    for line in ('x{a="b"' + " " * 50_000 + "c} 1", 'x{a="b" ,' * 10_000 + " " * 50_000 + "c} 1"):
        started = time.perf_counter()
        with pytest.raises(ParseError):
            parser.parse(line)
        assert time.perf_counter() - started < 1.0  # linear; backtracking over 50,000 spaces takes minutes


def test_parser_reuses_cached_series_across_scrapes() -> None:
    parser = TextParser({"worker": "w"}, watch=["a"])
    first = parser.parse('a{x="1"} 1\na{x="2"} 2\n')
    second = parser.parse('a{x="1"} 5\na{x="2"} 6\n')
    assert first.sums == {"a": 3.0} and second.sums == {"a": 11.0}
    assert list(first.samples) == list(second.samples)
