"""Health probe and `/metrics` scrape of one worker's serving endpoint.

One `EndpointCollector` per worker that has an `endpoint` (collector name
`endpoint:<worker>`); all of them share the daemon's `SharedHttpSession`. Each pass
runs the health probe and the scrape concurrently, each bounded by its own timeout.

A worker that is down is not a collector failure: the pass still succeeds and reports
`sentinel_endpoint_up 0` (the collector is up; the worker is down). Only a bug on
Sentinel's side makes `collect` raise. Every failure mode of the worker (refused
connection, an endpoint that accepts and never answers, a non-2xx status, an
oversized, non-UTF-8 or unparsable body) is counted and logged once per change of
state, never once per pass.

With `workers[].canary` enabled, the collector also runs the worker's active canary
(`sentinel.collectors.canary`): a one-token request when the engine has shown no
progress for a while, whose timeout counts as a stall in `sentinel_endpoint_stalled`
and stops `sentinel_endpoint_last_progress_timestamp_seconds`.

Engine series land in the store as they are on the wire (`vllm:...` with `_total`,
`_bucket`, `_count`, `_sum`) plus a `worker` label. For vLLM's renamed metrics the new
name is also written when only the old one is present, so rules use new names only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp

from sentinel.collectors.canary import Canary, declare_canary_metrics
from sentinel.collectors.engine_progress import (
    PROGRESS_WATCH,
    BalancednessTracker,
    EngineSnapshot,
    ProgressTracker,
)
from sentinel.collectors.http import SharedHttpSession
from sentinel.collectors.promtext import (
    LimitError,
    ParsedMetrics,
    ParseError,
    ScrapeLimits,
    TextParser,
    is_openmetrics,
    parse_openmetrics,
)
from sentinel.config.models import EndpointCollectorConfig, WorkerConfig
from sentinel.runtime.clock import wall_time
from sentinel.store import Appender, Labels, Store
from sentinel.store.events import Event, EventBus

__all__ = [
    "DEFAULT_METRICS_PATH",
    "ENGINE_HEALTH_PATHS",
    "SCRAPE_ERROR_REASONS",
    "VLLM_RENAMED",
    "EndpointCollector",
    "HealthResult",
    "ScrapeError",
    "ScrapeResult",
    "declare_endpoint_metrics",
    "endpoint_collectors",
    "legacy_vllm_aliases",
]

log = logging.getLogger(__name__)

ENGINE_HEALTH_PATHS: Mapping[str, str] = {"vllm": "/health", "sglang": "/health", "generic": "/health"}
DEFAULT_METRICS_PATH = "/metrics"

SCRAPE_ERROR_REASONS = (
    "timeout",
    "connection",
    "http_status",
    "too_large",
    "encoding",
    "parse",
    "sample_limit",
    "label_limit",
)
"""Every `reason` of `sentinel_endpoint_scrape_errors_total` (all exported from the start)."""

VLLM_RENAMED: tuple[tuple[str, str], ...] = (
    ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"),
)
"""(old family, new family) pairs of vLLM metrics renamed between versions."""

_FAMILY_SUFFIXES = ("", "_bucket", "_sum", "_count", "_created")
_DUPLICATE_LOG_EVERY_S = 60.0
_HEALTH_BODY_MAX = 64 * 1024
_CHUNK_BYTES = 64 * 1024
# Bodies above this (and OpenMetrics ones, whose parser is slow) are parsed in a thread
# so the loop keeps serving the other collectors meanwhile.
_INLINE_PARSE_MAX_BYTES = 1024 * 1024
_COLD_INLINE_MAX_BYTES = 64 * 1024
# Room between our own HTTP timeouts and the runner's bound on the whole pass, so a
# timeout is reported as the worker's (endpoint down), not as the collector's failure.
_PASS_MARGIN_S = 1.0
# Never ask for OpenMetrics (prometheus-client's parser for it is slow), and no
# compression: the worker would spend its own CPU, next to the engine, gzipping for a
# loopback connection.
_SCRAPE_HEADERS = {"Accept": "text/plain;version=0.0.4;q=1.0,*/*;q=0.1", "Accept-Encoding": "identity"}
_HEALTH_HEADERS = {"Accept-Encoding": "identity"}


def declare_endpoint_metrics(store: Store) -> None:
    """Exposition metadata of every series this collector writes."""
    meta = (
        ("sentinel_endpoint_up", "gauge", "1 when the worker's health probe answered with a 2xx status."),
        (
            "sentinel_endpoint_health_latency_seconds",
            "gauge",
            "Duration of the last health probe (about the timeout when no answer came).",
        ),
        (
            "sentinel_endpoint_health_status_code",
            "gauge",
            "HTTP status of the last health probe; 0 when no response arrived.",
        ),
        ("sentinel_endpoint_scrape_up", "gauge", "1 when the last /metrics scrape of the worker was read and parsed."),
        (
            "sentinel_endpoint_scrape_duration_seconds",
            "gauge",
            "Duration of the last /metrics scrape, parsing included.",
        ),
        ("sentinel_endpoint_scrape_samples", "gauge", "Samples in the last /metrics body; 0 when the scrape failed."),
        ("sentinel_endpoint_scrape_errors_total", "counter", "Failed /metrics scrapes of the worker, by reason."),
        (
            "sentinel_endpoint_scrape_duplicate_samples_total",
            "counter",
            "Samples of a series the /metrics body had already given (dropped, as Prometheus does).",
        ),
        (
            "sentinel_endpoint_requests_running",
            "gauge",
            "Requests the engine is running (vllm:num_requests_running or sglang:num_running_reqs, summed).",
        ),
        (
            "sentinel_endpoint_progress_total",
            "counter",
            "Scrapes at which the engine's generated tokens or engine steps had advanced.",
        ),
        (
            "sentinel_endpoint_stalled",
            "gauge",
            "1 when requests were running at the last two scrapes and neither tokens nor steps advanced.",
        ),
        (
            "sentinel_endpoint_last_progress_timestamp_seconds",
            "gauge",
            "Unix time the engine last advanced or had no running requests.",
        ),
        (
            "sentinel_moe_balancedness",
            "gauge",
            "Expert-parallel load balance, mean over max tokens per GPU (1.0 is perfectly balanced).",
        ),
    )
    for name, type_, help_ in meta:
        store.set_meta(name, type_, help_)


@dataclass(frozen=True)
class HealthResult:
    """One health probe. `reason` is a short stable key ("ok", "timeout", "http_503", ...)."""

    up: bool
    status_code: int
    latency_s: float
    reason: str
    detail: str


@dataclass(frozen=True)
class ScrapeResult:
    """One scrape: the parsed body, or the failure's reason (one of SCRAPE_ERROR_REASONS)."""

    parsed: ParsedMetrics | None
    duration_s: float
    reason: str | None = None
    detail: str = ""


class ScrapeError(Exception):
    """A scrape failed for a reason of the worker's (one of SCRAPE_ERROR_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class EndpointCollector:
    """Probes `/health` and scrapes `/metrics` of one worker, once per pass."""

    def __init__(
        self,
        worker: WorkerConfig,
        config: EndpointCollectorConfig,
        session: SharedHttpSession,
        store: Store,
        bus: EventBus | None = None,
        *,
        clock: Callable[[], float] = wall_time,
    ) -> None:
        if worker.endpoint is None:
            raise ValueError(f"worker {worker.name!r} has no endpoint to collect from")
        self.worker = worker.name
        self.name = f"endpoint:{worker.name}"
        self.interval_s = config.interval
        self.timeout_s = max(config.health_timeout, config.scrape_timeout) + _PASS_MARGIN_S
        self.health_url = _join(
            worker.endpoint, worker.health_path or ENGINE_HEALTH_PATHS.get(worker.engine, "/health")
        )
        self.metrics_url = _join(worker.endpoint, worker.metrics_path or DEFAULT_METRICS_PATH)
        self._config = config
        self._session = session
        self._bus = bus
        self._clock = clock
        self._target = {"worker": worker.name}
        self._limits = ScrapeLimits(
            sample_limit=config.sample_limit,
            label_limit=config.label_limit,
            label_name_length_limit=config.label_name_length_limit,
            label_value_length_limit=config.label_value_length_limit,
        )
        self._parser = TextParser(self._target, watch=PROGRESS_WATCH, limits=self._limits)
        self._duplicates_total = 0
        self._duplicates_logged = -_DUPLICATE_LOG_EVERY_S
        # The series this worker's scrapes may hold, churning names included (Store.limit_source).
        store.limit_source(self.name, config.series_limit)
        self._progress = ProgressTracker()
        self._balancedness = BalancednessTracker()
        self._errors = dict.fromkeys(SCRAPE_ERROR_REASONS, 0)
        self._health_state: str | None = None
        self._scrape_state: str | None = None
        self._stalled = False
        self.canary: Canary | None = None
        if worker.canary.mode != "off":
            self.canary = Canary(worker.name, worker.endpoint, worker.engine, worker.canary, session, clock=clock)
            declare_canary_metrics(store)
        declare_endpoint_metrics(store)

    async def start(self) -> None:
        """Nothing to start: the shared session opens lazily and belongs to the daemon."""

    async def close(self) -> None:
        """Cancel a canary in flight; the shared session is closed by its owner at shutdown."""
        if self.canary is not None:
            await self.canary.close()

    async def collect(self, out: Appender) -> None:
        """One probe and one scrape, concurrently; writes the endpoint's series into `out`."""
        health, scrape = await asyncio.gather(self.probe_health(), self.scrape())
        now_s = self._clock()
        target = self._target
        out.add("sentinel_endpoint_up", 1.0 if health.up else 0.0, target)
        out.add("sentinel_endpoint_health_latency_seconds", health.latency_s, target)
        out.add("sentinel_endpoint_health_status_code", float(health.status_code), target)
        self._note_health(health)

        parsed = scrape.parsed
        if scrape.reason is not None:
            self._errors[scrape.reason] += 1
        out.add("sentinel_endpoint_scrape_up", 0.0 if parsed is None else 1.0, target)
        out.add("sentinel_endpoint_scrape_duration_seconds", scrape.duration_s, target)
        out.add("sentinel_endpoint_scrape_samples", 0.0 if parsed is None else float(len(parsed.samples)), target)
        for reason, count in self._errors.items():
            out.add("sentinel_endpoint_scrape_errors_total", float(count), target, reason=reason)
        if parsed is not None and parsed.duplicates:
            self._note_duplicates(parsed.duplicates)
        out.add("sentinel_endpoint_scrape_duplicate_samples_total", float(self._duplicates_total), target)
        self._note_scrape(scrape)

        canary = self.canary
        if canary is not None:
            finished = canary.finished()
            if finished is not None:
                self._progress.canary_finished(finished.outcome, finished.started_s, finished.finished_s)
        if parsed is not None:
            self._write_engine(out, parsed, now_s)
        if canary is not None:
            if canary.due(now_s, self._progress.last_advanced_s, health.up):
                self._progress.canary_started(canary.start())
            canary.write(out)
        if self._progress.last_progress_s is not None:
            # Written even when this scrape failed: `time() - last_progress` must keep
            # growing while /metrics hangs along with the engine. A refused connection is
            # not a hang: nothing listens (the server is down, or starting again after a
            # restart, which takes vLLM minutes); that is EndpointDown's and WorkerDown's
            # to judge, and EngineStalled must not fire through every slow restart.
            out.add("sentinel_endpoint_progress_total", float(self._progress.progress_total), target)
            if scrape.reason != "connection":
                out.add("sentinel_endpoint_last_progress_timestamp_seconds", self._progress.last_progress_s, target)

    # -- health ---------------------------------------------------------------------

    async def probe_health(self) -> HealthResult:
        """GET the health path; never raises for anything the worker does."""
        timeout = self._config.health_timeout
        started = time.perf_counter()
        try:
            async with self._session.get().get(
                self.health_url, headers=_HEALTH_HEADERS, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                status = resp.status
                # Drain a small body so the keep-alive connection is reused next pass.
                drained = 0
                while drained <= _HEALTH_BODY_MAX:
                    chunk = await resp.content.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    drained += len(chunk)
        except Exception as exc:
            reason, detail = _classify(exc, timeout)
            return HealthResult(False, 0, time.perf_counter() - started, reason, detail)
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return HealthResult(True, status, latency, "ok", f"HTTP {status}")
        return HealthResult(False, status, latency, f"http_{status}", f"HTTP {status}")

    def _note_health(self, health: HealthResult) -> None:
        previous, self._health_state = self._health_state, health.reason
        if health.reason == previous:
            return
        if health.up:
            if previous is not None:
                log.info("worker %s endpoint %s is up again", self.worker, self.health_url)
                self._publish("endpoint_up", 1.0, health.detail)
            return
        log.warning("worker %s endpoint %s is down: %s", self.worker, self.health_url, health.detail)
        self._publish("endpoint_down", 0.0, health.detail)

    # -- scrape ---------------------------------------------------------------------

    async def scrape(self) -> ScrapeResult:
        """GET and parse the metrics path; never raises for anything the worker does."""
        started = time.perf_counter()
        try:
            body, content_type = await self._fetch()
            if self._parse_in_thread(body, content_type):
                parsed = await asyncio.to_thread(self.parse_body, body, content_type)
            else:
                parsed = self.parse_body(body, content_type)
        except ScrapeError as failed:
            return ScrapeResult(None, time.perf_counter() - started, failed.reason, failed.detail)
        return ScrapeResult(parsed, time.perf_counter() - started)

    async def _fetch(self) -> tuple[bytes, str | None]:
        limit = self._config.max_body_bytes
        timeout = self._config.scrape_timeout
        try:
            async with self._session.get().get(
                self.metrics_url, headers=_SCRAPE_HEADERS, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise ScrapeError("http_status", f"HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    resp.close()  # drop the connection rather than read what we refuse
                    raise ScrapeError("too_large", f"Content-Length {resp.content_length} > {limit} bytes")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                    size += len(chunk)
                    if size > limit:
                        resp.close()
                        raise ScrapeError("too_large", f"body larger than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), resp.headers.get("Content-Type")
        except ScrapeError:
            raise
        except Exception as exc:
            reason, detail = _classify(exc, timeout)
            raise ScrapeError(reason, detail) from None

    def _parse_in_thread(self, body: bytes, content_type: str | None) -> bool:
        if is_openmetrics(content_type) or len(body) > _INLINE_PARSE_MAX_BYTES:
            return True
        # The first parse builds every series' labels (tens of ms for 2,000 series):
        # in a thread, the loop keeps its time slices meanwhile. Later parses hit the cache.
        return self._parser.cached_series == 0 and len(body) > _COLD_INLINE_MAX_BYTES

    def parse_body(self, body: bytes, content_type: str | None) -> ParsedMetrics:
        """Decode and parse one body; raises ScrapeError ("encoding" or "parse") and nothing else."""
        try:
            text = body.decode("utf-8-sig")  # a BOM is harmless; drop it rather than fail the line
        except UnicodeDecodeError as exc:
            raise ScrapeError("encoding", f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            if is_openmetrics(content_type):
                return parse_openmetrics(text, self._target, PROGRESS_WATCH, self._limits)
            return self._parser.parse(text)
        except LimitError as exc:
            raise ScrapeError(exc.reason, str(exc)) from None
        except ParseError as exc:
            raise ScrapeError("parse", str(exc)) from None

    def _note_duplicates(self, count: int) -> None:
        self._duplicates_total += count
        now = time.monotonic()
        if now - self._duplicates_logged >= _DUPLICATE_LOG_EVERY_S:
            self._duplicates_logged = now
            log.warning(
                "worker %s metrics %s give %d series twice; the first samples are kept "
                "(sentinel_endpoint_scrape_duplicate_samples_total)",
                self.worker,
                self.metrics_url,
                count,
            )

    def _note_scrape(self, scrape: ScrapeResult) -> None:
        state = scrape.reason or "ok"
        previous, self._scrape_state = self._scrape_state, state
        if state == previous:
            return
        if scrape.reason is None:
            if previous is not None:
                log.info("worker %s metrics %s are readable again", self.worker, self.metrics_url)
            return
        log.warning(
            "worker %s metrics scrape of %s failed (%s): %s", self.worker, self.metrics_url, state, scrape.detail
        )

    # -- engine series and progress -----------------------------------------------

    def _write_engine(self, out: Appender, parsed: ParsedMetrics, now_s: float) -> None:
        for labels, value in parsed.samples.items():
            out.add_labels(labels, value)
        for labels, value in legacy_vllm_aliases(parsed).items():
            out.add_labels(labels, value)

        target = self._target
        snapshot = EngineSnapshot.from_parsed(parsed)
        if snapshot.running is not None:
            out.add("sentinel_endpoint_requests_running", snapshot.running, target)
        state = self._progress.observe(snapshot, now_s)
        if state is not None:
            out.add("sentinel_endpoint_stalled", 1.0 if state.stalled else 0.0, target)
            self._note_stall(state.stalled, snapshot)
        balancedness = self._balancedness.observe(parsed, now_s)
        if balancedness is not None:
            out.add("sentinel_moe_balancedness", balancedness, {**target, "origin": "metrics"})

    def _note_stall(self, stalled: bool, snapshot: EngineSnapshot) -> None:
        if stalled == self._stalled:
            return
        self._stalled = stalled
        if stalled:
            if self._progress.canary_stalled:
                deadline = self.canary.config.deadline if self.canary is not None else 0.0
                message = f"a one-token canary request got no answer within {deadline:g}s"
            else:
                message = (
                    f"{snapshot.running:g} requests running and no generated tokens or engine steps since last scrape"
                )
            log.warning("worker %s engine stalled: %s", self.worker, message)
            self._publish("endpoint_stalled", 1.0, message)
        else:
            log.info("worker %s engine is making progress again", self.worker)
            self._publish("endpoint_progressing", 0.0, "generated tokens or engine steps advanced")

    def _publish(self, kind: str, value: float, message: str) -> None:
        # `metrics` stays empty: the samples reach the store only when the runner
        # commits this pass, so the rule engine must not re-evaluate on this event.
        if self._bus is not None:
            self._bus.publish(Event(kind, self.name, {"worker": self.worker}, value, message))


def endpoint_collectors(
    workers: Iterable[WorkerConfig],
    config: EndpointCollectorConfig,
    session: SharedHttpSession,
    store: Store,
    bus: EventBus | None = None,
) -> list[EndpointCollector]:
    """One collector per worker that has an endpoint; none when the collector is disabled."""
    if not config.enabled:
        return []
    return [EndpointCollector(w, config, session, store, bus) for w in workers if w.endpoint is not None]


def legacy_vllm_aliases(parsed: ParsedMetrics) -> dict[Labels, float]:
    """Samples of renamed vLLM families under their new names, when only the old ones exist."""
    extra: dict[Labels, float] = {}
    for old, new in VLLM_RENAMED:
        old_names = {old + suffix for suffix in _FAMILY_SUFFIXES} & parsed.names
        if not old_names or any(new + suffix in parsed.names for suffix in _FAMILY_SUFFIXES):
            continue
        for labels, value in parsed.samples.items():
            renamed = _renamed(labels, old_names, old, new)
            if renamed is not None:
                extra[renamed] = value
    return extra


def _renamed(labels: Labels, old_names: set[str], old: str, new: str) -> Labels | None:
    for i, (key, name) in enumerate(labels):
        if key == "__name__":
            if name not in old_names:
                return None
            # Only the value changes, not the key: the tuple stays sorted.
            return (*labels[:i], ("__name__", new + name[len(old) :]), *labels[i + 1 :])
    return None


def _classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(reason, detail) of a failed request; reason is stable, detail is for the log."""
    # TimeoutError first: on 3.11+ it is an OSError, and aiohttp's timeouts subclass it.
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", f"no complete answer within {timeout:g}s"
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return "connection", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ValueError):  # e.g. aiohttp.InvalidURL raised before any I/O
        return "connection", f"{type(exc).__name__}: {exc}"
    raise exc


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + (path if path.startswith("/") else f"/{path}")
