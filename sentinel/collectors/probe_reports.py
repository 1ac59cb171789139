"""Daemon side of the in-worker probe: its reports become store series and events.

`sentinel.probe` (inside the serving process, with torch) POSTs a JSON report to
`/api/v1/probe/report` once per interval, and at once when an OOM happens. This module
validates the report, writes the probe's series into the store, publishes events, and
answers with the batch limit Sentinel wants (`{"batch_limit": N}` or `null` for "no
opinion"). It never imports torch: it is the half the daemon loads.

The daemon wires it like this:

    access = await asyncio.to_thread(ProbeAccess.load, config.workers, tcp=config.probe.tcp)
    registry = ProbeRegistry(store, bus, access=access, limits=config.probe)
    ctx = ServerContext(..., extra_routes=registry.routes())     # POST /api/v1/probe/report (TCP)
    await registry.start()                                       # the staleness watchdog
    await registry.start_unix_site("/run/sentinel/probe.sock")   # the recommended transport
    ...                                                          # pass `registry` as LiveControl
    registry.access = ...                                        # on reload: tokens re-read
    await registry.close()

Who may report for which worker is `ProbeAccess`'s decision (see `probe_access`): the
unix socket, whose mode (0660) and group decide who may connect, is on by default;
the TCP route answers 403 unless `probe.tcp` is on, and then needs the claimed
worker's bearer token. A report must be `Content-Type: application/json` (a browser's
cross-origin "simple" POST cannot be), at most `probe.max_report_bytes`, and may
write at most `probe.max_series_per_report` series; a worker's probe holds at most
`probe.max_series_per_worker` series in the store (`Store.limit_source`). Refused
reports are counted in `sentinel_probe_reports_rejected_total{reason}` and logged at
most once a minute per reason. The probe attaches with
`sentinel="unix:/run/sentinel/probe.sock"`.

Series (source `probe:<worker>`; a worker's series go stale together when its probe
stops reporting for `STALE_AFTER_INTERVALS` intervals, except `sentinel_probe_up`, which
turns 0, and the last report's timestamp):

- `sentinel_probe_up{worker}`, `sentinel_probe_last_report_timestamp_seconds{worker}`,
  `sentinel_probe_batch_limit{worker}` (the limit in force, as the probe reported it),
  `sentinel_probe_report_failures_total{worker}`, `sentinel_probe_hook_errors_total{worker}`;
- `sentinel_moe_balancedness{worker,layer}`: mean over max of tokens per GPU over the
  last interval; absent for a layer without traffic in the interval;
- `sentinel_moe_expert_tokens_total{worker,layer,expert}`: only the layer's hottest
  experts of the interval, at most `hot_experts_max` (default 4) per layer, so the
  cardinality is bounded by layers x that, not layers x experts (128 experts x 48
  layers would be 6144 series per worker). An expert that cools down goes stale;
- `sentinel_moe_gpu_tokens_total{worker,gpu}`;
- with CUDA: `sentinel_probe_cuda_ooms_total{worker,gpu}`,
  `sentinel_probe_alloc_retries_total{worker,gpu}`,
  `sentinel_probe_memory_allocated_bytes{worker,gpu}`,
  `sentinel_probe_memory_reserved_bytes{worker,gpu}`,
  `sentinel_probe_memory_fragmentation_ratio{worker,gpu}` (1 - allocated / reserved).

Events (source `probe`): `probe_cuda_oom{worker,gpu}` the moment an OOM report arrives,
or when a periodic report shows the OOM counter grew (an OOM the guard did not see);
`probe_report{worker}` for every other report (value: the worst layer's balancedness);
`probe_down{worker}` when a probe stops reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sentinel.api.guard import ConnectionGuard, GuardedSite
from sentinel.collectors.probe_access import TCP_OFF, ProbeAccess, Refusal, Transport
from sentinel.collectors.probe_placement import PLACEMENT_PATH, PlacementControl
from sentinel.collectors.probe_schema import (
    MAX_LABEL,
    REPORT_VERSION,
    GpuReport,
    HotExpert,
    LayerReport,
    ProbeReport,
    ReportError,
    parse_report,
)
from sentinel.collectors.probe_settings import ProbeConfig
from sentinel.collectors.probe_socket import BoundSocket, bind_probe_socket, remove_probe_socket
from sentinel.remediation.backend import BackendError
from sentinel.remediation.rebalance import LiveRebalancer
from sentinel.remediation.rebalance_params import RebalanceSettings
from sentinel.runtime.timeouts import wait_for
from sentinel.store import Store, labels_from, now_ms
from sentinel.store.events import Event, EventBus

__all__ = [
    "EVENT_DOWN",
    "EVENT_OOM",
    "EVENT_REPORT",
    "HOT_EXPERTS_MAX",
    "PROBE_METRICS",
    "REJECT_REASONS",
    "REPORT_PATH",
    "REPORT_VERSION",
    "STALE_AFTER_INTERVALS",
    "GpuReport",
    "HotExpert",
    "LayerReport",
    "ProbeRegistry",
    "ProbeReport",
    "ReportError",
    "declare_probe_metrics",
    "parse_report",
]

log = logging.getLogger(__name__)

REPORT_PATH = "/api/v1/probe/report"
STALE_AFTER_INTERVALS = 3
"""A probe silent for this many of its intervals is down (`sentinel_probe_up` 0)."""
HOT_EXPERTS_MAX = 4

EVENT_OOM = "probe_cuda_oom"
EVENT_REPORT = "probe_report"
EVENT_DOWN = "probe_down"

_SOURCE = "probe"
_UP = "sentinel_probe_up"
_LAST = "sentinel_probe_last_report_timestamp_seconds"
_LIMIT = "sentinel_probe_batch_limit"
_FAILURES = "sentinel_probe_report_failures_total"
_HOOK_ERRORS = "sentinel_probe_hook_errors_total"
_BALANCEDNESS = "sentinel_moe_balancedness"
_EXPERT_TOKENS = "sentinel_moe_expert_tokens_total"
_GPU_TOKENS = "sentinel_moe_gpu_tokens_total"
_OOMS = "sentinel_probe_cuda_ooms_total"
_RETRIES = "sentinel_probe_alloc_retries_total"
_ALLOCATED = "sentinel_probe_memory_allocated_bytes"
_RESERVED = "sentinel_probe_memory_reserved_bytes"
_FRAGMENTATION = "sentinel_probe_memory_fragmentation_ratio"
_REJECTED = "sentinel_probe_reports_rejected_total"
_PLACEMENT_VERSION = "sentinel_moe_placement_version"

REJECT_REASONS = ("content_type", "too_large", "invalid", "unauthorized", "forbidden", "too_many_series")
"""Every `reason` of `sentinel_probe_reports_rejected_total` (all exported from the start)."""

PROBE_METRICS: tuple[tuple[str, str, str], ...] = (
    (_UP, "gauge", "1 while the worker's in-worker probe reports; 0 after 3 intervals without a report."),
    (_LAST, "gauge", "Unix time Sentinel received the probe's last report."),
    (_LIMIT, "gauge", "Batch limit in force in the worker, as its probe reported it; absent when none is set."),
    (_FAILURES, "counter", "Reports the probe could not deliver (as counted by the probe)."),
    (_HOOK_ERRORS, "counter", "Router hooks the probe disabled after an error (layers no longer counted)."),
    (
        _BALANCEDNESS,
        "gauge",
        "Expert-parallel load balance, mean over max tokens per GPU (1.0 is perfectly balanced).",
    ),
    (_EXPERT_TOKENS, "counter", "Tokens routed to the expert; reported only for each layer's hottest experts."),
    (_GPU_TOKENS, "counter", "Token-to-expert assignments routed to experts on the GPU, all MoE layers together."),
    (_OOMS, "counter", "CUDA out-of-memory errors of the worker process on the GPU (allocator num_ooms)."),
    (
        _RETRIES,
        "counter",
        "Allocations the CUDA caching allocator retried after freeing its cache (num_alloc_retries).",
    ),
    (_ALLOCATED, "gauge", "Bytes allocated by the worker's CUDA caching allocator on the GPU."),
    (_RESERVED, "gauge", "Bytes reserved (allocated plus cached) by the worker's CUDA caching allocator on the GPU."),
    (_FRAGMENTATION, "gauge", "Reserved but unallocated share of the allocator's memory: 1 - allocated / reserved."),
    (_REJECTED, "counter", "Probe reports refused, by reason (see the Security section of docs/operations.md)."),
    (
        _PLACEMENT_VERSION,
        "gauge",
        "Version of the expert placement the worker runs (0: its default; rebalance_experts raises it).",
    ),
)

_UNIX_MAX_CONNECTIONS = 64
_INLINE_REPORT_BYTES = 64 * 1024  # larger reports are decoded and validated in a thread
_REJECT_LOG_EVERY_S = 60.0
_WATCHDOG_PERIOD_S = 0.5


def declare_probe_metrics(store: Store) -> None:
    """Declare type and help of every series the probe endpoint writes."""
    for name, type_, help_ in PROBE_METRICS:
        store.set_meta(name, type_, help_)


# -- the registry ----------------------------------------------------------------------


@dataclass
class _Waiter:
    limit: int
    future: asyncio.Future[None]


@dataclass
class _Probe:
    """What Sentinel knows of one worker's probe."""

    probe_id: str
    interval_s: float
    last_report: float  # monotonic
    last_report_ms: int = 0  # wall clock, for sentinel_probe_last_report_timestamp_seconds
    up: bool = True
    reported_limit: int | None = None
    live_batch_limit: bool = True  # the probe's serving loop takes a batch limit live
    ooms: dict[str, int] = field(default_factory=dict)  # per GPU, highest seen from this probe_id
    reports: int = 0  # interval reports received from this probe_id


@dataclass
class _Worker:
    probe: _Probe | None = None
    desired_limit: int | None = None
    waiters: list[_Waiter] = field(default_factory=list)


class ProbeRegistry:
    """Receives probe reports, keeps each worker's probe state, and is the `LiveControl`.

    `access` decides who may report for which worker (default: nobody, until the daemon
    hands over the configured one); `limits` bounds report sizes and series.
    """

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        access: ProbeAccess | None = None,
        limits: ProbeConfig | None = None,
        hot_experts_max: int = HOT_EXPERTS_MAX,
        ack_timeout_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.bus = bus
        self.access = access if access is not None else ProbeAccess()
        self.limits = limits if limits is not None else ProbeConfig()
        self.hot_experts_max = hot_experts_max
        self.ack_timeout_s = ack_timeout_s
        self.reports_total = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._monotonic = monotonic
        self._workers: dict[str, _Worker] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []
        self._sockets: list[BoundSocket] = []
        self._reject_logged: dict[str, float] = {}
        # Live expert placement (rebalance_experts): token windows, placements sent and acknowledged.
        self.placements = PlacementControl(monotonic)
        declare_probe_metrics(store)
        for reason in REJECT_REASONS:
            store.append(labels_from(_REJECTED, reason=reason), now_ms(), 0.0)

    @property
    def rejected_total(self) -> int:
        """Reports refused for any reason."""
        return sum(self.rejected.values())

    # -- wiring --------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """The TCP route, for `ServerContext.extra_routes` (403 unless `probe.tcp` is on)."""
        return [web.post(REPORT_PATH, self.handle_tcp_report), web.get(PLACEMENT_PATH, self.handle_tcp_placement)]

    async def start(self) -> None:
        """Start the watchdog that marks silent probes down."""
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="probe-watchdog")

    async def start_unix_site(self, path: str, mode: int = 0o660, group: str | None = None) -> web.AppRunner:
        """Serve reports on a unix socket at `path`, created with `mode` and `group` (see `probe_socket`)."""
        bound = await asyncio.to_thread(bind_probe_socket, path, mode, group)
        app = web.Application(client_max_size=self.limits.max_report_bytes)
        guard = ConnectionGuard(_UNIX_MAX_CONNECTIONS, name="probe socket")
        app.middlewares.append(guard.middleware)
        app.add_routes(
            [web.post(REPORT_PATH, self.handle_unix_report), web.get(PLACEMENT_PATH, self.handle_unix_placement)]
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=10.0)
        try:
            await runner.setup()
            await GuardedSite(runner, guard, sock=bound.sock).start()
        except BaseException:
            await runner.cleanup()
            bound.sock.close()
            remove_probe_socket(bound)
            raise
        self._runners.append(runner)
        self._sockets.append(bound)
        log.info("probe reports on unix socket %s (mode %04o)", path, mode)
        return runner

    async def close(self) -> None:
        """Stop the watchdog and the unix sites; pending `set_batch_limit` calls fail."""
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for bound in self._sockets:
            remove_probe_socket(bound)
        self._sockets.clear()
        for worker in self._workers.values():
            for waiter in worker.waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(BackendError("Sentinel is shutting down"))
            worker.waiters.clear()
        self.placements.close("Sentinel is shutting down")

    # -- placements ------------------------------------------------------------------

    async def handle_tcp_placement(self, request: web.Request) -> web.Response:
        """GET /api/v1/probe/placement?worker=W&version=N on the HTTP server."""
        return self.handle_placement(request, "tcp")

    async def handle_unix_placement(self, request: web.Request) -> web.Response:
        """GET /api/v1/probe/placement?worker=W&version=N on the unix socket."""
        return self.handle_placement(request, "unix")

    def handle_placement(self, request: web.Request, transport: Transport) -> web.Response:
        """A placement too large for a reply, for the worker it is meant for (same credentials as reports)."""
        worker = request.query.get("worker", "")
        if transport == "tcp" and not self.access.tcp:
            return web.json_response({"error": TCP_OFF}, status=403)
        refusal = self.access.refusal(worker, transport, request.headers.get("Authorization"))
        if refusal is not None:
            return web.json_response({"error": refusal.message}, status=refusal.status)
        try:
            version = int(request.query.get("version", ""))
        except ValueError:
            return web.json_response({"error": "version: expected an integer"}, status=400)
        message = self.placements.message(worker, version)
        if message is None:
            return web.json_response({"error": f"no placement version {version} is wanted for {worker}"}, status=404)
        return web.json_response(message)

    # -- reports -------------------------------------------------------------------

    async def handle_tcp_report(self, request: web.Request) -> web.Response:
        """POST /api/v1/probe/report on the HTTP server."""
        return await self.handle_report(request, "tcp")

    async def handle_unix_report(self, request: web.Request) -> web.Response:
        """POST /api/v1/probe/report on the unix socket."""
        return await self.handle_report(request, "unix")

    async def handle_report(self, request: web.Request, transport: Transport) -> web.Response:
        """Check, validate, record; answer with the desired batch limit."""
        media_type = request.content_type.lower()
        if media_type != "application/json":
            return self._refuse("content_type", 415, f"Content-Type must be application/json, not {media_type!r}")
        if transport == "tcp" and not self.access.tcp:
            return self._refuse("forbidden", 403, TCP_OFF)
        limit = self.limits.max_report_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._refuse("too_large", 413, f"a report is at most {limit} bytes (probe.max_report_bytes)")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse("too_large", 413, f"a report is at most {limit} bytes (probe.max_report_bytes)")
        if len(raw) > limit:
            return self._refuse("too_large", 413, f"a report is at most {limit} bytes (probe.max_report_bytes)")
        authorization = request.headers.get("Authorization")
        try:
            # A large body is decoded and validated off the event loop; either way the
            # claimed worker's credentials are checked before the (costlier) validation.
            if len(raw) > _INLINE_REPORT_BYTES:
                report = await asyncio.to_thread(self._checked_report, raw, transport, authorization)
            else:
                report = self._checked_report(raw, transport, authorization)
        except ReportError as exc:
            return self._refuse("invalid", 400, str(exc))
        except _Refused as refused:
            reason = "unauthorized" if refused.refusal.status == 401 else "forbidden"
            return self._refuse(reason, refused.refusal.status, refused.refusal.message)
        series = self.series_of(report)
        if series > self.limits.max_series_per_report:
            return self._refuse(
                "too_many_series",
                400,
                f"the report would write {series} series; at most {self.limits.max_series_per_report} "
                "per report (probe.max_series_per_report)",
            )
        return web.json_response(self.ingest(report))

    def _checked_report(self, raw: bytes, transport: Transport, authorization: str | None) -> ProbeReport:
        decoded = _decode_json(raw)
        claimed = decoded.get("worker") if isinstance(decoded, dict) else None
        if isinstance(claimed, str) and 0 < len(claimed) <= MAX_LABEL:
            refusal = self.access.refusal(claimed, transport, authorization)
            if refusal is not None:
                raise _Refused(refusal)
        return parse_report(decoded)  # a report without a valid worker name is refused here

    def series_of(self, report: ProbeReport) -> int:
        """How many series a report writes (the per-report bound is checked before any is)."""
        per_layer = sum(
            (layer.balancedness is not None) + min(len(layer.hot_experts), self.hot_experts_max)
            for layer in report.layers
        )
        return 6 + per_layer + 6 * len(report.gpus)

    def _refuse(self, reason: str, status: int, message: str) -> web.Response:
        self.rejected[reason] += 1
        self.store.append(labels_from(_REJECTED, reason=reason), now_ms(), float(self.rejected[reason]))
        now = self._monotonic()
        if now - self._reject_logged.get(reason, -_REJECT_LOG_EVERY_S) >= _REJECT_LOG_EVERY_S:
            self._reject_logged[reason] = now
            log.warning("refused a probe report (%s, %d so far): %s", reason, self.rejected[reason], message[:300])
        return web.json_response({"error": message}, status=status)

    def ingest(self, report: ProbeReport) -> dict[str, Any]:
        """Record one report; returns the reply for the probe."""
        self.reports_total += 1
        # Every time, not only at first sight: a reload may have changed the limit.
        self.store.limit_source(_source(report.worker), self.limits.max_series_per_worker)
        worker = self._workers.setdefault(report.worker, _Worker())
        probe = worker.probe
        first_look = probe is None or probe.probe_id != report.probe_id
        if probe is None or first_look:
            if probe is not None:
                log.info("probe of worker %s restarted (new probe id %s)", report.worker, report.probe_id)
            probe = worker.probe = _Probe(report.probe_id, report.interval_s, self._monotonic())
        was_up = probe.up
        probe.up = True
        probe.interval_s = report.interval_s
        probe.last_report = self._monotonic()
        probe.reported_limit = report.batch_limit
        probe.live_batch_limit = report.live_batch_limit
        probe.reports += report.kind == "interval"
        if not was_up:
            log.info("probe of worker %s reports again", report.worker)
        ts = probe.last_report_ms = now_ms()
        # A probe's first report (seq 1) starts its OOM count at 0: every OOM in it is
        # news. A probe seen first in the middle of its life (Sentinel restarted) only
        # gives a baseline: its old OOMs were reported to the previous Sentinel.
        oom_news = self._record_ooms(report, probe, baseline=first_look and report.seq > 1)
        if report.kind == "oom":
            self._write_oom(report, probe, ts)
        else:
            self._write_interval(report, probe, ts)
        self._publish(report, probe, oom_news)
        self._resolve_waiters(report.worker, worker)
        self.placements.on_report(report)
        return {"batch_limit": worker.desired_limit, **self.placements.reply(report.worker)}

    def _record_ooms(self, report: ProbeReport, probe: _Probe, *, baseline: bool) -> list[tuple[str, int, int]]:
        """Raise the per-GPU OOM counts; returns (gpu, new count, increase) where it grew."""
        news: list[tuple[str, int, int]] = []
        for name, gpu in report.gpus.items():
            if gpu.num_ooms is None:
                continue
            seen = probe.ooms.get(name, gpu.num_ooms if baseline else 0)
            if gpu.num_ooms > seen:
                news.append((name, gpu.num_ooms, gpu.num_ooms - seen))
            # Counts only grow within one probe: a report built before an OOM that
            # arrives after the OOM report must not pull the counter back.
            probe.ooms[name] = max(seen, gpu.num_ooms)
        return news

    def _write_interval(self, report: ProbeReport, probe: _Probe, ts: int) -> None:
        w = report.worker
        out = self.store.appender(_source(w), ts)
        out.add(_UP, 1, worker=w)
        out.add(_LAST, ts / 1000.0, worker=w)
        out.add(_FAILURES, report.report_failures_total, worker=w)
        out.add(_HOOK_ERRORS, report.hook_errors_total, worker=w)
        if report.batch_limit is not None:
            out.add(_LIMIT, report.batch_limit, worker=w)
        if report.placement is not None:
            out.add(_PLACEMENT_VERSION, report.placement.version, worker=w)
        for layer in report.layers:
            lbl = str(layer.layer)
            if layer.balancedness is not None:
                out.add(_BALANCEDNESS, layer.balancedness, worker=w, layer=lbl)
            for hot in layer.hot_experts[: self.hot_experts_max]:
                out.add(_EXPERT_TOKENS, hot.tokens_total, worker=w, layer=lbl, expert=str(hot.expert))
        for gpu_name, gpu in report.gpus.items():
            if gpu.tokens_total is not None:
                out.add(_GPU_TOKENS, gpu.tokens_total, worker=w, gpu=gpu_name)
            for name, value in self._allocator_series(gpu_name, gpu, probe):
                out.add(name, value, worker=w, gpu=gpu_name)
        out.commit()

    def _write_oom(self, report: ProbeReport, probe: _Probe, ts: int) -> None:
        # Written outside the worker's pass: an OOM report carries only the OOM's GPU,
        # and a pass would mark every other series of the worker stale.
        # They count against the worker's series budget like its passes do.
        w = report.worker
        owner = _source(w)
        for gpu_name, gpu in report.gpus.items():
            for name, value in self._allocator_series(gpu_name, gpu, probe):
                self.store.append(labels_from(name, worker=w, gpu=gpu_name), ts, value, owner=owner)
        oom_gpu = report.oom_gpu or ""
        oom_entry = report.gpus.get(oom_gpu)
        if oom_entry is None or oom_entry.num_ooms is None:
            # The report carries no count for the OOM's GPU (a client without allocator
            # stats): the OOM itself is one more.
            probe.ooms[oom_gpu] = probe.ooms.get(oom_gpu, 0) + 1
            self.store.append(labels_from(_OOMS, worker=w, gpu=oom_gpu), ts, probe.ooms[oom_gpu], owner=owner)

    def _allocator_series(self, gpu_name: str, gpu: GpuReport, probe: _Probe) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        if gpu.num_ooms is not None:
            out.append((_OOMS, probe.ooms.get(gpu_name, gpu.num_ooms)))
        if gpu.num_alloc_retries is not None:
            out.append((_RETRIES, gpu.num_alloc_retries))
        if gpu.allocated_bytes is not None:
            out.append((_ALLOCATED, gpu.allocated_bytes))
        if gpu.reserved_bytes is not None:
            out.append((_RESERVED, gpu.reserved_bytes))
            if gpu.allocated_bytes is not None:
                reserved = gpu.reserved_bytes
                frag = 1.0 - gpu.allocated_bytes / reserved if reserved > 0 else 0.0
                out.append((_FRAGMENTATION, min(1.0, max(0.0, frag))))
        return out

    def _publish(self, report: ProbeReport, probe: _Probe, oom_news: list[tuple[str, int, int]]) -> None:
        w = report.worker
        if report.kind == "oom":
            gpu = report.oom_gpu or ""
            count = probe.ooms.get(gpu)
            self.bus.publish(
                Event(
                    kind=EVENT_OOM,
                    source=_SOURCE,
                    labels={"worker": w, "gpu": gpu},
                    value=None if count is None else float(count),
                    message=f"worker {w}: {report.oom_message or 'CUDA out of memory'}",
                    metrics=(_OOMS,),
                )
            )
            return
        for gpu, count, increase in oom_news:
            self.bus.publish(
                Event(
                    kind=EVENT_OOM,
                    source=_SOURCE,
                    labels={"worker": w, "gpu": gpu},
                    value=float(count),
                    message=f"worker {w}: {increase} CUDA out-of-memory error(s) on GPU {gpu} since the last report",
                    metrics=(_OOMS,),
                )
            )
        scored = [(layer.balancedness, layer.layer) for layer in report.layers if layer.balancedness is not None]
        worst = min(scored) if scored else None
        self.bus.publish(
            Event(
                kind=EVENT_REPORT,
                source=_SOURCE,
                labels={"worker": w},
                value=worst[0] if worst else None,
                message=(
                    f"worker {w}: worst MoE balancedness {worst[0]:.3f} (layer {worst[1]})"
                    if worst
                    else f"worker {w}: no MoE traffic in the interval"
                ),
                metrics=(_BALANCEDNESS,) if worst else (),
            )
        )

    # -- staleness -----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # never a dead watchdog
                log.exception("probe watchdog pass failed")
            await asyncio.sleep(_WATCHDOG_PERIOD_S)

    def tick(self) -> list[str]:
        """Mark probes silent for `STALE_AFTER_INTERVALS` intervals down; returns their workers."""
        now = self._monotonic()
        downed = []
        for name, worker in self._workers.items():
            probe = worker.probe
            if probe is None or not probe.up or now - probe.last_report <= STALE_AFTER_INTERVALS * probe.interval_s:
                continue
            probe.up = False
            downed.append(name)
            # Nothing sent to it will be acknowledged now: fail fast (a dead engine is restarted instead).
            self._fail_waiters(worker, f"worker {name}: the probe stopped reporting")
            self.placements.probe_down(name)
            log.warning("probe of worker %s stopped reporting (%.1fs silent)", name, now - probe.last_report)
            ts = now_ms()
            out = self.store.appender(_source(name), ts)
            out.add(_UP, 0, worker=name)
            out.add(_LAST, probe.last_report_ms / 1000.0, worker=name)
            out.commit()  # every other series of the worker goes stale here
            self.bus.publish(
                Event(
                    kind=EVENT_DOWN,
                    source=_SOURCE,
                    labels={"worker": name},
                    value=0.0,
                    message=f"worker {name}: the in-worker probe stopped reporting",
                    metrics=(_UP,),
                )
            )
        return downed

    # -- LiveControl ---------------------------------------------------------------

    def probe_up(self, worker: str) -> bool:
        """True while the worker's probe reports (within `STALE_AFTER_INTERVALS` intervals)."""
        state = self._workers.get(worker)
        probe = state.probe if state is not None else None
        if probe is None or not probe.up:
            return False
        return self._monotonic() - probe.last_report <= STALE_AFTER_INTERVALS * probe.interval_s

    def supports_live_batch_limit(self, worker: str) -> bool:
        """LiveControl: the worker's probe reported recently and its serving loop takes a limit live."""
        state = self._workers.get(worker)
        probe = state.probe if state is not None else None
        return self.probe_up(worker) and probe is not None and probe.live_batch_limit

    def supports_live_rebalance(self, worker: str) -> bool:
        """LivePlacement: the probe is up and reports the placement it runs (layers included)."""
        running = self.placements.running(worker)
        return self.probe_up(worker) and running is not None and running.placement is not None

    async def rebalance_experts(self, worker: str, settings: RebalanceSettings) -> str:
        """LivePlacement: plan from the probe's counts, send, verify measured, roll back on failure."""
        if not self.probe_up(worker):
            raise BackendError(f"worker {worker} has no live probe: its experts cannot be rebalanced live")
        rebalancer = LiveRebalancer(
            self.placements, self.store, interval_of=self._interval_of, monotonic=self._monotonic
        )
        outcome = await rebalancer.run(worker, settings)
        return outcome.describe()

    def _interval_of(self, worker: str) -> float:
        state = self._workers.get(worker)
        return state.probe.interval_s if state is not None and state.probe is not None else 1.0

    def desired_batch_limit(self, worker: str) -> int | None:
        """The limit Sentinel sends the worker's probe; None when it has no opinion."""
        state = self._workers.get(worker)
        return state.desired_limit if state is not None else None

    def clear_batch_limit(self, worker: str) -> None:
        """Forget the desired limit (e.g. the worker was restarted with a profile of its own)."""
        state = self._workers.get(worker)
        if state is not None:
            state.desired_limit = None
            self._fail_waiters(state, "the desired batch limit was cleared")

    async def set_batch_limit(self, worker: str, limit: int) -> None:
        """LiveControl: send `limit` with the next reply; return once a report shows it in force.

        Raises `BackendError` when the worker has no live probe, or when no report
        acknowledges the limit within the ack timeout (default: 3 intervals + 2 s).
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"batch limit must be a positive integer, got {limit!r}")
        state = self._workers.get(worker)
        probe = state.probe if state is not None else None
        if state is None or probe is None or not self.probe_up(worker):
            raise BackendError(f"worker {worker} has no live probe: its batch limit cannot change without a restart")
        if not probe.live_batch_limit:
            raise BackendError(f"worker {worker}: its probe cannot change the batch limit live (a restart can)")
        if state.desired_limit != limit:
            self._fail_waiters(state, f"superseded by batch limit {limit}")
        state.desired_limit = limit
        if probe.reported_limit == limit:
            return
        waiter = _Waiter(limit, asyncio.get_running_loop().create_future())
        state.waiters.append(waiter)
        timeout = self.ack_timeout_s if self.ack_timeout_s is not None else 3 * probe.interval_s + 2.0
        try:
            await wait_for(asyncio.shield(waiter.future), timeout)
        except asyncio.TimeoutError:
            raise BackendError(
                f"worker {worker}: the probe did not acknowledge batch limit {limit} within {timeout:.1f}s"
            ) from None
        finally:
            if waiter in state.waiters:
                state.waiters.remove(waiter)

    async def still_reporting(self, worker: str, reports: int = 2) -> bool:
        """Whether the worker's probe sends `reports` more interval reports (False: it went down first).

        A limit acknowledged by a process whose engine just died (the OOM that asked for
        the limit killed it) would otherwise pass for a live change: its probe still
        reports for a moment while the process shuts down, then stops.
        """
        state = self._workers.get(worker)
        probe = state.probe if state is not None else None
        if probe is None:
            return False
        target = probe.reports + reports
        deadline = self._monotonic() + (STALE_AFTER_INTERVALS + reports) * probe.interval_s + 2.0
        while self._monotonic() < deadline:
            current = state.probe if state is not None else None
            if current is not probe or not self.probe_up(worker):
                return False
            if probe.reports >= target:
                return True
            await asyncio.sleep(min(0.1, probe.interval_s / 4))
        return self.probe_up(worker)

    def _resolve_waiters(self, name: str, state: _Worker) -> None:
        probe = state.probe
        if probe is None:
            return
        for waiter in list(state.waiters):
            if waiter.limit == probe.reported_limit and not waiter.future.done():
                waiter.future.set_result(None)
                log.info("probe of worker %s acknowledged batch limit %d", name, waiter.limit)

    def _fail_waiters(self, state: _Worker, why: str) -> None:
        for waiter in state.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(BackendError(why))
        state.waiters.clear()

    # -- status --------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker that ever reported (for the API and `sentinel status`)."""
        now = self._monotonic()
        out = []
        for name, state in sorted(self._workers.items()):
            probe = state.probe
            out.append(
                {
                    "worker": name,
                    "up": self.probe_up(name),
                    "probe_id": probe.probe_id if probe else None,
                    "seconds_since_report": round(now - probe.last_report, 3) if probe else None,
                    "interval_s": probe.interval_s if probe else None,
                    "batch_limit": probe.reported_limit if probe else None,
                    "desired_batch_limit": state.desired_limit,
                    "placement": self.placements.status(name),
                }
            )
        return out


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _source(worker: str) -> str:
    """The store source of a worker's probe series (its series budget is per source)."""
    return f"{_SOURCE}:{worker}"


def _decode_json(raw: bytes) -> object:
    """JSON from a body; anything undecodable or absurdly nested is a `ReportError` (400, not 500)."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise ReportError("report: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of > 4,300 digits
        raise ReportError(f"report: not valid JSON ({str(exc)[:200]})") from None


def _not_json(constant: str) -> object:
    # Python's json reads NaN and Infinity; JSON (RFC 8259) has neither.
    raise ValueError(f"{constant} is not a JSON value")
