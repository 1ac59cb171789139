"""The daemon: wires collectors, store, HTTP server and systemd together.

One asyncio loop. APScheduler's asyncio scheduler runs each collector as its own job
(own interval, never two passes at once, missed ticks counted). Blocking work lives in
threads owned by the collectors. Signals: SIGTERM/SIGINT stop, SIGHUP reloads; a
broken new config keeps the old one running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from sentinel import __version__
from sentinel.alerting.api import prometheus_api_routes
from sentinel.alerting.group import VectorSample
from sentinel.alerting.manager import RuleManager
from sentinel.alerting.query import engine_query
from sentinel.alerting.rulefile import RuleFileError, load_rule_files
from sentinel.collectors.base import Collector, CollectorRunner
from sentinel.collectors.http import SharedHttpSession
from sentinel.config import Config, ConfigError, load_config, split_listen
from sentinel.events import EventBus
from sentinel.gctune import tune_for_daemon
from sentinel.healing import HealingStack
from sentinel.logsetup import setup_logging
from sentinel.probe_endpoint import ProbeRegistry
from sentinel.promql import Engine
from sentinel.promql.runner import QueryLimits, QueryRunner
from sentinel.sdnotify import Notifier
from sentinel.server import ServerContext, start_server
from sentinel.store import Appender, Store

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 15.0
STOP_BUDGET_S = 1.5  # SIGTERM must end the process within 2 s


class SelfCollector:
    """Sentinel's own series: build info, config reload state, store size."""

    name = "self"
    interval_s = 1.0
    timeout_s = 1.0

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        store = daemon.store
        store.set_meta("sentinel_build_info", "gauge", "Sentinel's version; value 1.")
        store.set_meta("sentinel_start_time_seconds", "gauge", "Unix time Sentinel started.")
        store.set_meta("sentinel_config_last_reload_successful", "gauge", "1 when the last config (re)load worked.")
        store.set_meta(
            "sentinel_config_last_reload_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful config load.",
        )
        store.set_meta("sentinel_store_series", "gauge", "Series held in the in-memory store.")
        store.set_meta("sentinel_store_samples", "gauge", "Samples held in the in-memory store.")
        store.set_meta("sentinel_events_published_total", "counter", "Events published on the event bus.")

    async def start(self) -> None:
        return None

    async def collect(self, out: Appender) -> None:
        d = self._daemon
        out.add("sentinel_build_info", 1, version=__version__, python_version=platform.python_version())
        out.add("sentinel_start_time_seconds", d.started_at)
        out.add("sentinel_config_last_reload_successful", 1 if d.last_reload_ok else 0)
        out.add("sentinel_config_last_reload_success_timestamp_seconds", d.last_reload_success_at)
        out.add("sentinel_store_series", len(d.store))
        out.add("sentinel_store_samples", d.store.sample_count())
        out.add("sentinel_events_published_total", d.bus.published_total)

    async def close(self) -> None:
        return None


CollectorFactory = Callable[["Daemon", Config], list[Collector]]


class Daemon:
    """One Sentinel process."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        simulate: str | None = None,
        listen: str | None = None,
        collector_factory: CollectorFactory | None = None,
        nvml: Any = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.simulate = simulate
        # A pynvml-like object to use instead of the driver (the demo drives its own).
        self.nvml = nvml
        self.listen = listen or config.listen
        self.store = Store(int(config.store.retention * 1000), int(config.store.lookback * 1000))
        self.bus = EventBus()
        self.notifier = Notifier()
        self.state_dir: Path = config.resolved_state_dir()
        self.started_at = time.time()
        self.last_reload_ok = True
        self.last_reload_success_at = self.started_at
        self.bound_port: int | None = None
        self.http = SharedHttpSession()
        self.engine = Engine(
            self.store, lookback_ms=int(config.store.lookback * 1000), prometheus_compat=config.prometheus_compat
        )
        self._query_engine = engine_query(self.engine)
        # API queries get a pool, deadline and sample limit of their own (not the default executor).
        self.queries = QueryRunner(
            QueryLimits(config.query.timeout, config.query.max_samples, config.query.max_concurrency)
        )
        self.rules: RuleManager | None = None
        self.healing = HealingStack(self.store, self.state_dir)
        # Workers running sentinel.probe report here; it is also the live batch-limit path.
        self.probes = ProbeRegistry(self.store, self.bus, allowed_workers=lambda: {w.name for w in self.config.workers})
        self._collector_factory = collector_factory or build_collectors
        self._runners: dict[str, CollectorRunner] = {}
        self._scheduler: AsyncIOScheduler | None = None
        self._stop = asyncio.Event()
        self._ready = False
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.self_collector = SelfCollector(self)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        self.bus.bind_loop(loop)
        self._install_signals(loop)
        host, port = split_listen(self.listen)
        ctx = ServerContext(
            store=self.store,
            ready=lambda: self._ready,
            gpus=self.gpus_snapshot,
            collectors=lambda: [r.health.as_json() for r in self._runners.values()],
            extra_routes=[
                *prometheus_api_routes(lambda: self.engine, lambda: self.rules, self.queries),
                *self.healing.routes(),
                *self.probes.routes(),
            ],
        )
        try:
            groups = await asyncio.to_thread(load_rule_files, self.config.rules.files, self.config.prometheus_compat)
        except RuleFileError as exc:
            log.error("invalid rule files:\n%s", exc)
            return 1
        try:
            runner, self.bound_port = await start_server(ctx, host, port)
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.listen, exc)
            return 1
        log.info(
            "Sentinel %s listening on http://%s:%d (state in %s)",
            __version__,
            host if ":" not in host else f"[{host}]",
            self.bound_port,
            self.state_dir,
        )
        self._scheduler = AsyncIOScheduler(event_loop=loop)
        self._scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self._scheduler.start()
        await self._apply_collectors(self.config)
        self.rules = RuleManager(
            self.store, self.bus, self._query, self.config.rules, self.state_dir, self._external_url(host)
        )
        try:
            await self.probes.start()
            await self.healing.start(self.config, self.rules, self._external_url(host), live=self.probes)
        except Exception as exc:
            log.error("cannot start notifications and remediation: %s", exc)
            await self._shutdown(runner)
            return 1
        await self.rules.apply(groups)
        log.info("evaluating %d rule group(s) with %d rule(s)", len(groups), sum(len(g.rules) for g in groups))
        self._scheduler.add_job(
            self._trim, "interval", seconds=TRIM_INTERVAL_S, id="store-trim", max_instances=1, coalesce=True
        )
        self._ready = True
        tune_for_daemon()
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        if self.notifier.watchdog_interval_s:
            self._spawn(self._watchdog(self.notifier.watchdog_interval_s))
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(runner)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self, runner: Any) -> None:
        log.info("stopping")
        self._ready = False
        self.notifier.notify("STOPPING=1")
        self.queries.close()  # running queries end at their next step; their threads are not awaited
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        if self.rules is not None:
            await self.rules.close()
        await self.healing.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.probes.close(), 0.2)
        closers = [self._close_runner(r) for r in self._runners.values()]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), STOP_BUDGET_S / 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.http.close(), 0.2)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(runner.cleanup(), STOP_BUDGET_S / 2)
        self.notifier.close()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self, interval: float) -> None:
        # The ping comes from the loop itself, so a wedged loop stops it and systemd restarts us.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- reload -------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; a broken file keeps the running config."""
        async with self._reloading:
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                if self.config_path is None:
                    log.info("reload requested; running on built-in defaults, nothing to re-read")
                    return True
                try:
                    new = await asyncio.to_thread(load_config, self.config_path)
                except ConfigError as exc:
                    self.last_reload_ok = False
                    log.error("reload failed, keeping the running config:\n%s", exc)
                    return False
                try:
                    groups = await asyncio.to_thread(load_rule_files, new.rules.files, new.prometheus_compat)
                except RuleFileError as exc:
                    self.last_reload_ok = False
                    log.error("reload failed, keeping the running config and rules:\n%s", exc)
                    return False
                if split_listen(new.listen) != split_listen(self.config.listen):
                    log.warning("listen address changes need a restart; still serving on %s", self.listen)
                setup_logging(new.log.format, new.log.level)
                await self._apply_collectors(new)
                self.config = new
                self.store.retention_ms = int(new.store.retention * 1000)
                self.store.lookback_ms = int(new.store.lookback * 1000)
                self.engine = Engine(
                    self.store, lookback_ms=self.store.lookback_ms, prometheus_compat=new.prometheus_compat
                )
                self._query_engine = engine_query(self.engine)
                if self.rules is not None:
                    await self.rules.apply(groups, new.rules)
                    try:
                        await self.healing.reload(new, self.rules, self._external_url(split_listen(self.listen)[0]))
                    except Exception as exc:
                        log.error("notifications kept the previous settings: %s", exc)
                self.last_reload_ok = True
                self.last_reload_success_at = time.time()
                log.info("configuration reloaded from %s", self.config_path)
                return True
            finally:
                self.notifier.notify("READY=1", f"STATUS={self._status_line()}")

    async def _apply_collectors(self, config: Config) -> None:
        """Replace every collector job with ones built from `config`."""
        try:
            collectors = [self.self_collector, *self._collector_factory(self, config)]
        except Exception as exc:
            log.error("cannot build collectors from the new config, keeping the old ones: %s", exc)
            self.last_reload_ok = False
            return
        old = self._runners
        self._runners = {}
        new_names = {c.name for c in collectors}
        for runner in old.values():
            self._remove_job(runner.name)
            if runner.collector is not self.self_collector:
                await self._close_runner(runner)
                # A collector that comes back under the same name keeps its series
                # live: staleness here would resolve and re-fire every alert on SIGHUP.
                if runner.name not in new_names:
                    runner.retire()
        for collector in collectors:
            previous = old.get(collector.name)
            if collector is self.self_collector and previous is not None:
                runner = previous
            else:
                runner = CollectorRunner(collector, self.store, previous.health if previous else None)
            try:
                await collector.start()
            except Exception as exc:
                log.error("collector %s failed to start: %s", collector.name, exc)
            self._runners[collector.name] = runner
            self._add_job(runner)

    def _add_job(self, runner: CollectorRunner) -> None:
        assert self._scheduler is not None
        interval = runner.collector.interval_s
        self._scheduler.add_job(
            runner.tick,
            "interval",
            seconds=interval,
            id=f"collector:{runner.name}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            next_run_time=_now_dt(),
        )

    def _remove_job(self, name: str) -> None:
        if self._scheduler is not None:
            with contextlib.suppress(Exception):
                self._scheduler.remove_job(f"collector:{name}")

    async def _close_runner(self, runner: CollectorRunner) -> None:
        try:
            await asyncio.wait_for(runner.collector.close(), STOP_BUDGET_S / 2)
        except Exception as exc:
            log.warning("collector %s did not close cleanly: %s", runner.name, exc)

    def _on_missed(self, event: JobExecutionEvent) -> None:
        job_id = getattr(event, "job_id", "")
        if job_id.startswith("collector:"):
            runner = self._runners.get(job_id.removeprefix("collector:"))
            if runner is not None:
                runner.note_missed_tick()

    async def _trim(self) -> None:
        self.store.trim()

    def _query(self, expr: str, t_ms: int) -> list[VectorSample]:
        # Indirect, so a reload that swaps the engine reaches the running rule groups.
        return self._query_engine(expr, t_ms)

    def _external_url(self, host: str) -> str:
        if self.config.rules.external_url:
            return self.config.rules.external_url
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown if ':' not in shown else f'[{shown}]'}:{self.bound_port}/"

    # -- views ----------------------------------------------------------------------

    @property
    def runners(self) -> dict[str, CollectorRunner]:
        return dict(self._runners)

    def gpus_snapshot(self) -> list[dict[str, Any]]:
        for runner in self._runners.values():
            snapshot = getattr(runner.collector, "gpus_snapshot", None)
            if snapshot is not None:
                result: list[dict[str, Any]] = snapshot()
                return result
        return []

    def _status_line(self) -> str:
        down = [r.name for r in self._runners.values() if r.health.ever_ran and not r.health.up]
        base = f"serving on port {self.bound_port}; {len(self._runners)} collectors"
        return base + (f"; down: {', '.join(down)}" if down else "")


def _now_dt() -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def build_collectors(daemon: Daemon, config: Config) -> list[Collector]:
    """The collectors a config asks for (NVML real or simulated, host)."""
    from sentinel.collectors.endpoint import endpoint_collectors
    from sentinel.collectors.host import HostCollector
    from sentinel.collectors.nccl_ras import nccl_ras_collectors
    from sentinel.collectors.nvml import NvmlCollector
    from sentinel.logs.collector import LogCollector
    from sentinel.workers import WorkerProcesses

    collectors: list[Collector] = []
    host_cfg = config.collectors.host
    workers = WorkerProcesses(config.workers, proc_root=host_cfg.proc_root, cgroup_root=host_cfg.cgroup_root)
    if config.collectors.nvml.enabled:
        nvml: Any = daemon.nvml
        if nvml is None and daemon.simulate:
            from sentinel.sim.nvml import SimulatedNvml, load_scenario

            nvml = SimulatedNvml(load_scenario(daemon.simulate))
        collectors.append(
            NvmlCollector(
                config.collectors.nvml,
                store=daemon.store,
                bus=daemon.bus,
                state_dir=daemon.state_dir,
                expected_gpus=config.expected_gpus,
                pid_owner=workers.pid_owner,
                **({"nvml": nvml} if nvml is not None else {}),
            )
        )
    if host_cfg.enabled:
        collectors.append(HostCollector(host_cfg, workers, daemon.store, daemon.bus))
    if config.collectors.endpoint.enabled:
        collectors += endpoint_collectors(
            config.workers, config.collectors.endpoint, daemon.http, daemon.store, daemon.bus
        )
    collectors += nccl_ras_collectors(config.workers, config.collectors.nccl_ras, daemon.store)
    if config.collectors.logs.enabled:
        nvml_cfg = config.collectors.nvml
        # One reader of the kernel log: the NVML collector's, which de-duplicates Xids
        # against NVML events; the log collector reads it only when NVML is disabled.
        kernel = not nvml_cfg.enabled and nvml_cfg.kernel_log != "off"
        collectors.append(
            LogCollector(
                config.collectors.logs, config.workers, daemon.store, daemon.bus, daemon.state_dir, kernel=kernel
            )
        )
    return collectors
