"""The daemon: wires collectors, store, HTTP server and systemd together.

One asyncio loop, and one scheduler (`sentinel.runtime.scheduler`) for everything
periodic: each collector as its own job (own interval, never two passes at once,
missed ticks counted), the store's trim and the systemd watchdog here, and the rule
groups, remediation and delivery through the components that own them. Blocking work
lives in threads owned by the collectors, the stores and remediation; reloads read
files on a thread of their own. Signals: SIGTERM/SIGINT stop, SIGHUP reloads; a broken
new config keeps the old one running.

The state directory is locked for the life of the process (`sentinel.state.lock`): a
second Sentinel on it refuses to start (issue 15, C5). Its stores report their health
(`sentinel.state.health`) in the `self` collector's series, with the clock's.
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

from sentinel import __version__
from sentinel.api.prometheus import prometheus_api_routes
from sentinel.api.server import ServerContext, ServerGuards, start_server
from sentinel.collectors.base import Collector, CollectorRunner
from sentinel.collectors.http import SharedHttpSession
from sentinel.collectors.probe_access import ProbeAccess
from sentinel.collectors.probe_reports import ProbeRegistry
from sentinel.collectors.probe_settings import resolve_socket_path
from sentinel.config.models import Config, ConfigError, load_config, split_listen
from sentinel.daemon.fleet import FleetLink
from sentinel.daemon.gctune import tune_for_daemon
from sentinel.daemon.healing import HealingStack
from sentinel.daemon.logsetup import setup_logging
from sentinel.daemon.systemd_notify import SystemdNotifier
from sentinel.promql import Engine
from sentinel.promql.runner import QueryLimits, QueryRunner
from sentinel.rules.group import VectorSample
from sentinel.rules.manager import RuleManager
from sentinel.rules.query import engine_query
from sentinel.rules.rulefile import RuleFileError, load_rule_files
from sentinel.runtime.clock import wall_clock
from sentinel.runtime.scheduler import Scheduler
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.health import StateHealth
from sentinel.state.lock import StateDirBusy, StateDirLock
from sentinel.store import Appender, Store
from sentinel.store.events import EventBus

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 15.0
STOP_BUDGET_S = 1.5  # SIGTERM must end the process within 2 s
COLLECTOR_START_BUDGET_S = 5.0


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
        store.set_meta(
            "sentinel_clock_offset_seconds",
            "gauge",
            "How far the system clock is ahead of Sentinel's timestamps (non-zero while a clock step is absorbed).",
        )
        store.set_meta("sentinel_clock_steps_total", "counter", "Steps of the system clock Sentinel has seen.")
        store.set_meta("sentinel_job_missed_ticks_total", "counter", "Ticks a periodic job skipped (it ran late).")
        store.set_meta("sentinel_job_errors_total", "counter", "Runs of a periodic job that raised.")
        daemon.state_health.declare(store)
        for name, type_, help_ in _GUARD_METRICS:
            store.set_meta(name, type_, help_)

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
        out.add("sentinel_clock_offset_seconds", wall_clock.offset())
        out.add("sentinel_clock_steps_total", wall_clock.steps_total)
        for job in d.scheduler.jobs:
            out.add("sentinel_job_missed_ticks_total", job.missed_ticks_total, job=job.name)
            out.add("sentinel_job_errors_total", job.errors_total, job=job.name)
        d.state_health.publish(out)
        # The limits of docs/operations.md, as counters: what they refused or dropped.
        for source, count in list(d.store.series_evicted.items()):
            out.add("sentinel_store_series_evicted_total", count, source=source)
            out.add("sentinel_store_series_refused_total", d.store.series_refused.get(source, 0), source=source)
        guards = d.server_guards
        if guards is not None:
            out.add("sentinel_http_connections_open", guards.connections.open_connections)
            out.add("sentinel_http_connections_closed_total", guards.connections.evicted_total, reason="evicted")
            out.add("sentinel_http_connections_closed_total", guards.connections.refused_total, reason="refused")
            for reason, count in guards.requests.refused_total.items():
                out.add("sentinel_http_requests_refused_total", count, reason=reason)

    async def close(self) -> None:
        return None


CollectorFactory = Callable[["Daemon", Config], list[Collector]]

_GUARD_METRICS = (
    (
        "sentinel_store_series_evicted_total",
        "counter",
        "Ended series of a limited source (a worker's scrapes or probe) removed early to make room.",
    ),
    (
        "sentinel_store_series_refused_total",
        "counter",
        "New series of a limited source refused because all its held series were live.",
    ),
    ("sentinel_http_connections_open", "gauge", "Connections open to Sentinel's HTTP server."),
    (
        "sentinel_http_connections_closed_total",
        "counter",
        "Connections the HTTP server closed at its connection limit: evicted (longest idle) or refused.",
    ),
    (
        "sentinel_http_requests_refused_total",
        "counter",
        "Requests refused before any handler: unknown Host, cross-origin, token in the URL, slow body.",
    ),
)


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
        self.notifier = SystemdNotifier()
        self.state_dir: Path = config.resolved_state_dir()
        self.state_lock = StateDirLock(self.state_dir)
        self.state_health = StateHealth()
        self.scheduler = Scheduler()
        self.started_at = wall_clock.now()
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
        self.healing = HealingStack(self.store, self.state_dir, self.scheduler, self.state_health)
        # Workers running sentinel.probe report here; it is also the live batch-limit path.
        # Nobody may report until `run` has read the workers' probe tokens (ProbeAccess).
        self.probes = ProbeRegistry(self.store, self.bus, limits=config.probe)
        self.server_guards: ServerGuards | None = None
        self._collector_factory = collector_factory or build_collectors
        self._runners: dict[str, CollectorRunner] = {}
        # Reloads read files on their own thread: a hung query pool must not block a SIGHUP.
        self._file_threads = WorkerThreads("config-files", 1)
        self._stop = asyncio.Event()
        self._ready = False
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.self_collector = SelfCollector(self)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        try:
            self.state_lock.acquire()
        except (StateDirBusy, OSError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        try:
            return await self._run()
        finally:
            self.state_lock.release()

    async def _run(self) -> int:
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
            http=self.config.http,
        )
        try:
            groups = await self._file_threads.run(
                load_rule_files, self.config.rules.files, self.config.prometheus_compat
            )
        except RuleFileError as exc:
            log.error("invalid rule files:\n%s", exc)
            return 1
        self.probes.access = await asyncio.to_thread(ProbeAccess.load, self.config.workers, tcp=self.config.probe.tcp)
        try:
            runner, self.bound_port = await start_server(ctx, host, port)
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.listen, exc.strerror or exc)
            return 1
        self.server_guards = ctx.guards
        try:
            await self._start_probe_socket()
        except (OSError, ValueError) as exc:
            log.error("cannot serve probe reports: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(runner.cleanup(), STOP_BUDGET_S / 2)
            return 1
        log.info(
            "Sentinel %s listening on http://%s:%d (state in %s)",
            __version__,
            host if ":" not in host else f"[{host}]",
            self.bound_port,
            self.state_dir,
        )
        await self._apply_collectors(self.config)
        self.rules = RuleManager(
            self.store,
            self.bus,
            self._query,
            self.config.rules,
            self.state_dir,
            self._external_url(host),
            scheduler=self.scheduler,
            health=self.state_health,
        )
        try:
            await self.probes.start()
            fleet = FleetLink(self.config, self.store, self.bus, self.scheduler) if self.config.fleet else None
            await self.healing.start(self.config, self.rules, self._external_url(host), live=self.probes, fleet=fleet)
        except Exception as exc:
            log.error("cannot start notifications and remediation: %s", exc)
            await self._shutdown(runner)
            return 1
        await self.rules.apply(groups)
        log.info("evaluating %d rule group(s) with %d rule(s)", len(groups), sum(len(g.rules) for g in groups))
        self.scheduler.add("store-trim", self._trim, TRIM_INTERVAL_S, first_run_in=TRIM_INTERVAL_S)
        self._ready = True
        tune_for_daemon()
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        if self.notifier.watchdog_interval_s:
            # The ping comes from the loop itself, so a wedged loop stops it and systemd restarts us.
            self.scheduler.add("watchdog", self._watchdog_ping, self.notifier.watchdog_interval_s)
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(runner)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    async def _start_probe_socket(self) -> None:
        probe = self.config.probe
        path = resolve_socket_path(probe)
        if path is None:
            log.info("no unix socket for probe reports (probe.socket; systemd's RuntimeDirectory= gives one)")
            return
        await self.probes.start_unix_site(path, probe.socket_mode, probe.socket_group)

    async def _shutdown(self, runner: Any) -> None:
        log.info("stopping")
        self._ready = False
        self.notifier.notify("STOPPING=1")
        self.queries.close()  # running queries end at their next step; their threads are not awaited
        for job in self.scheduler.jobs:
            if job.name.startswith(("collector:", "store-trim", "watchdog")):
                self.scheduler.remove(job.name)
        for task in list(self._tasks):
            task.cancel()
        if self.rules is not None:
            await self.rules.close()
        await self.healing.close()
        with contextlib.suppress(Exception):
            await wait_for(self.probes.close(), 0.2)
        closers = [self._close_runner(r) for r in self._runners.values()]
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(asyncio.gather(*closers, return_exceptions=True), STOP_BUDGET_S / 2)
        with contextlib.suppress(Exception):
            await wait_for(self.http.close(), 0.2)
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(runner.cleanup(), STOP_BUDGET_S / 2)
        await self.scheduler.stop(0.1)  # whatever the components left behind
        self._file_threads.shutdown(wait=False)
        self.notifier.close()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog_ping(self) -> None:
        self.notifier.notify("WATCHDOG=1")

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
                    new = await self._file_threads.run(load_config, self.config_path)
                except ConfigError as exc:
                    self.last_reload_ok = False
                    log.error("reload failed, keeping the running config:\n%s", exc)
                    return False
                try:
                    groups = await self._file_threads.run(load_rule_files, new.rules.files, new.prometheus_compat)
                except RuleFileError as exc:
                    self.last_reload_ok = False
                    log.error("reload failed, keeping the running config and rules:\n%s", exc)
                    return False
                if split_listen(new.listen) != split_listen(self.config.listen):
                    log.warning("listen address changes need a restart; still serving on %s", self.listen)
                if (new.http, new.probe.socket, new.probe.socket_mode, new.probe.socket_group) != (
                    self.config.http,
                    self.config.probe.socket,
                    self.config.probe.socket_mode,
                    self.config.probe.socket_group,
                ):
                    log.warning("changes to http and to the probe socket take effect at the next restart")
                self.probes.access = await asyncio.to_thread(ProbeAccess.load, new.workers, tcp=new.probe.tcp)
                self.probes.limits = new.probe
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
                self.last_reload_success_at = wall_clock.now()
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
                # Bounded: a start stuck on a full default executor must not hold up a reload.
                await wait_for(collector.start(), COLLECTOR_START_BUDGET_S)
            except asyncio.TimeoutError:
                log.error(
                    "collector %s did not start within %gs; its passes will say why",
                    collector.name,
                    COLLECTOR_START_BUDGET_S,
                )
            except Exception as exc:
                log.error("collector %s failed to start: %s", collector.name, exc)
            self._runners[collector.name] = runner
            self._add_job(runner)

    def _add_job(self, runner: CollectorRunner) -> None:
        self.scheduler.add(
            f"collector:{runner.name}", runner.tick, runner.collector.interval_s, on_missed=runner.note_missed_tick
        )

    def _remove_job(self, name: str) -> None:
        self.scheduler.remove(f"collector:{name}")

    async def _close_runner(self, runner: CollectorRunner) -> None:
        try:
            await wait_for(runner.collector.close(), STOP_BUDGET_S / 2)
        except Exception as exc:
            log.warning("collector %s did not close cleanly: %s", runner.name, exc)

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


def build_collectors(daemon: Daemon, config: Config) -> list[Collector]:
    """The collectors a config asks for (NVML real or simulated, host)."""
    from sentinel.collectors.endpoint import endpoint_collectors
    from sentinel.collectors.host import HostCollector
    from sentinel.collectors.nccl_ras import nccl_ras_collectors
    from sentinel.collectors.nvml import NvmlCollector
    from sentinel.collectors.workers import WorkerProcesses
    from sentinel.logs.collector import LogCollector
    from sentinel.logs.kernel import KernelLog, KernelSourceSpec
    from sentinel.logs.matcher import LogMatcher
    from sentinel.logs.patterns import Catalogue

    collectors: list[Collector] = []
    host_cfg = config.collectors.host
    workers = WorkerProcesses(config.workers, proc_root=host_cfg.proc_root, cgroup_root=host_cfg.cgroup_root)
    # One reader of the host's kernel log, whose matches both collectors subscribe to:
    # the NVML collector takes the Xids (de-duplicated against NVML's own events), the
    # log collector counts and publishes the rest (host OOM kills, fallen off the bus).
    nvml_cfg, logs_cfg = config.collectors.nvml, config.collectors.logs
    catalogue = Catalogue.load(logs_cfg.patterns)
    kernel_log = (
        KernelLog(
            KernelSourceSpec(mode=nvml_cfg.kernel_log), LogMatcher(catalogue), max_line_bytes=logs_cfg.max_line_bytes
        )
        if nvml_cfg.kernel_log != "off" and (nvml_cfg.enabled or logs_cfg.enabled)
        else None
    )
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
                kernel_log=kernel_log,
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
    if logs_cfg.enabled:
        collectors.append(
            LogCollector(
                logs_cfg,
                config.workers,
                daemon.store,
                daemon.bus,
                daemon.state_dir,
                kernel=kernel_log or False,
                catalogue=catalogue,
            )
        )
    return collectors
