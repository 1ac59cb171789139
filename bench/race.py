"""The race: time from a fault to a notification, Sentinel against Prometheus + Alertmanager, in one run.

Everything runs on loopback, at once, against the same collectors:

- Sentinel (`sentinel run -c CONFIG --simulate SCENARIO`) watches a simulated 8-GPU
  host, two fake vLLM workers (`race_fakes.FakeVllm`: /health and vLLM-named /metrics)
  and one worker's log file; it evaluates `rules/*.yml` itself (every second, and at
  once when an event such as an Xid or a log line is recorded) and notifies a webhook
  sink's `/sentinel`.
- A real Prometheus (Debian's) scrapes Sentinel's /metrics and the workers' /metrics
  every 15 s, evaluates the same rule files every 15 s and sends to a real
  Alertmanager (group_wait 30 s, group_interval 5 m, repeat_interval 4 h, grouped by
  alertname), which delivers to the sink's `/alertmanager`. That is the fleet set-up:
  Sentinel as the exporter, Prometheus and Alertmanager as the alerting path. The rules
  read Sentinel-side series (`sentinel_endpoint_up`, `sentinel_log_events_total`, ...),
  which Prometheus gets by scraping Sentinel: same rules, same collectors, a different
  evaluation and notification path. The groups' own `interval:` (1 s for the event
  groups) is dropped from Prometheus's copy, so it evaluates at its global 15 s as a
  fleet Prometheus would (`--prometheus-group-intervals` keeps them).

Faults, one of each, after every Prometheus target has been scraped twice:

- gpu_lost: GPU 3 falls off the bus (Xid 79 and NVML `GpuIsLost`) at a time fixed in
  the scenario file (the simulator has no live control); the race reads the
  simulator's clock from GPU 0's memory, which the scenario ramps by 1e-4 of the total
  a second, so it knows that moment within milliseconds (never later than it was, so
  Sentinel's figure for it errs long, if at all);
- cuda_oom: a PyTorch `torch.OutOfMemoryError: CUDA out of memory. ...` line appended
  to worker qwen3-a's log;
- endpoint_down: qwen3-a's engine dies (/health answers 503, as vLLM after
  EngineDeadError; nothing runs);
- stall: qwen3-b's engine wedges (6 requests stay running, /health 200, token and step
  counters frozen: an NCCL hang as vLLM shows it).

They are injected concurrently, a quarter of the scrape interval apart, so each lands
at a different phase of Prometheus's scrape and evaluation cycles. That is safe with
Alertmanager because each fault's alert has its own alertname and the route groups by
alertname: every alert opens its own group and waits its own group_wait. The race
waits until both paths delivered every expected alert, or `--timeout` (120 s) after
the fault, then prints per alert and per fault the time to notification on each path
(and, from the payload's startsAt, when the alert began firing) and the ratio. The
target is Sentinel at least 20x faster on event-driven faults; endpoint_down
(`for: 30s`) and stall (no progress for 30 s) are bounded by their rules on both
paths, and reported as they are.

Each figure is one sample. On the Prometheus path it is, by construction, the phase
of the fault in the scrape cycle (0-15 s) plus that in the evaluation cycle (0-15 s)
plus `for` rounded up to whole evaluations plus group_wait (30 s); Sentinel's is the
collector and group intervals (1 s each; neither for events) plus `for` plus milliseconds.

`--quick` is a smoke run (CUDA OOM only; scrape, evaluation and group_wait 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the race_* helpers beside this file

from race_fakes import Arrival, FakeVllm, WebhookSink
from race_stack import (
    Child,
    alertmanager_argv,
    alertmanager_config,
    free_port,
    prometheus_argv,
    prometheus_config,
    prometheus_rule_files,
    query_url,
    sentinel_argv,
    sentinel_port,
    tool_version,
    which,
)

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "rules").glob("*.yml"))
PATHS = ("sentinel", "alertmanager")
T = TypeVar("T")

# The simulated host. GPU 0's used memory is a clock (see `sim_epoch`).
GPU_TOTAL_BYTES = 85_520_809_984
RAMP_FROM, RAMP_TO, RAMP_S = 0.80, 0.90, 1000.0
LOST_GPU = 3
OOM_LINE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total capacity of "
    "79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
    "Of the allocated memory 75.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


@dataclass(frozen=True)
class Expect:
    """An alert a fault must raise, identified by its name and some of its labels."""

    alertname: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Fault:
    """One fault of the race."""

    key: str
    title: str
    kind: str  # "event": a log line or driver event; "condition": a state held for a while
    expects: tuple[Expect, ...]


FAULTS = {
    f.key: f
    for f in (
        Fault(
            "gpu_lost",
            f"GPU {LOST_GPU} lost (Xid 79 event, NVML GpuIsLost)",
            "event",
            (Expect("GPUFallenOffBus", {"gpu": str(LOST_GPU)}), Expect("GPULost", {"gpu": str(LOST_GPU)})),
        ),
        Fault("cuda_oom", "CUDA OOM line in qwen3-a's log", "event", (Expect("CudaOOM", {"worker": "qwen3-a"}),)),
        Fault(
            "endpoint_down",
            "qwen3-a /health answers 503 (engine dead)",
            "condition",
            (Expect("EndpointDown", {"worker": "qwen3-a"}),),
        ),
        Fault(
            "stall",
            "qwen3-b engine stalled (requests running, counters frozen)",
            "condition",
            (Expect("EngineStalled", {"worker": "qwen3-b"}),),
        ),
    )
}


@dataclass(frozen=True)
class Settings:
    """What one race runs."""

    faults: tuple[str, ...]
    scrape_interval_s: int
    eval_interval_s: int
    group_wait_s: int
    gpu_lost_at_s: float  # scenario time of the GPU loss (seconds after Sentinel built its simulator)
    timeout_s: float  # per fault, per path
    stagger_s: float  # between two injections
    keep_group_intervals: bool
    keep_tmp: bool


@dataclass
class Outcome:
    """One expected alert on both paths (seconds from the fault; None: not delivered in time)."""

    fault: str
    alertname: str
    rule: str
    delivered: dict[str, float | None] = field(default_factory=dict)
    firing: dict[str, float | None] = field(default_factory=dict)  # the payload's startsAt


# -- small async helpers -------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    """GET a JSON document; None on any failure (callers poll)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def until(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout: float, children: list[Child], every: float = 0.2
) -> T:
    """Poll `probe` until it returns a value; fails fast if a child process died."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            child.check()
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(every)


async def ready(session: aiohttp.ClientSession, url: str) -> bool | None:
    """True when `url` answers 200 (a readiness probe), else None."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return True if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the results."""
    print(f"race: {message}", file=sys.stderr, flush=True)


# -- configuration files --------------------------------------------------------------------


def scenario_yaml(gpu_lost_at_s: float | None) -> str:
    """The simulated host: 8 H100s; GPU 3 lost at `gpu_lost_at_s` (never if None)."""
    scenario: dict[str, Any] = {
        "name": "race",
        "description": "Eight H100s; GPU 3 falls off the bus (Xid 79) at a time the race chose.",
        "driver_version": "550.127.05",
        "gpu_defaults": {
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total_bytes": GPU_TOTAL_BYTES,
            "utilization": {"kind": "sine", "mean": 0.7, "amplitude": 0.1, "period_s": 60},
            "memory_utilization": 0.4,
            # A slow ramp (80 % -> 90 % over 1000 s): the used bytes tell the scenario time.
            "memory_used_ratio": {"kind": "ramp", "from": RAMP_FROM, "to": RAMP_TO, "duration_s": RAMP_S},
            "temperature_celsius": 63,
            "power_watts": 450,
        },
        "gpus": 8,
    }
    if gpu_lost_at_s is not None:
        scenario["xids"] = [{"gpu": LOST_GPU, "xid": 79, "at_s": gpu_lost_at_s}]
        scenario["lost"] = [{"gpu": LOST_GPU, "at_s": gpu_lost_at_s, "error": "gpu_is_lost"}]
    return yaml.safe_dump(scenario, sort_keys=False)


def sentinel_yaml(tmp: Path, sink: WebhookSink, workers: Mapping[str, FakeVllm], worker_log: Path) -> str:
    """sentinel.yaml: the default rules, both workers, the sink as webhook, observe mode."""
    config = {
        "state_dir": str(tmp / "sentinel-state"),
        "expected_gpus": 8,
        # The simulated host's Xids come through NVML events; the machine's real kernel
        # log has nothing to do with it.
        "collectors": {"nvml": {"kernel_log": "off"}},
        "workers": [
            {
                "name": "qwen3-a",
                "gpus": [0, 1, 2, 3],
                "endpoint": workers["qwen3-a"].endpoint,
                "engine": "vllm",
                "logs": [{"path": str(worker_log)}],
            },
            {"name": "qwen3-b", "gpus": [4, 5, 6, 7], "endpoint": workers["qwen3-b"].endpoint, "engine": "vllm"},
        ],
        "rules": {"files": [str(REPO / "rules" / "*.yml")]},
        "remediation": {"mode": "observe"},
        # Action reports (SentinelAction) are not alerts: the race times alerts only.
        "notify": {"webhook": [{"name": "race-sink", "url": sink.url("sentinel"), "send_actions": False}]},
    }
    return yaml.safe_dump(config, sort_keys=False)


def rule_timing() -> dict[str, str]:
    """alertname -> how its rule waits: `for 30s`, or `none` (fires on the first evaluation)."""
    timing = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    timing[rule["alert"]] = f"for {rule['for']}" if rule.get("for") else "none"
    # Its expression, not a `for`, holds it back.
    timing["EngineStalled"] = "expr: no progress > 30s"
    return timing


# -- the simulator's clock ----------------------------------------------------------------------


async def sim_epoch(session: aiohttp.ClientSession, sentinel: str, children: list[Child]) -> tuple[float, float, int]:
    """Wall time at which the simulator's scenario clock read 0, from GPU 0's ramping memory.

    Each sample is stamped with its collector pass's start, a little before the GPU was
    read, so `stamp - scenario_time` is at most the true epoch; the largest of them is
    the closest. Returns (epoch, spread of the estimates, samples).
    """
    expr = 'sentinel_gpu_memory_used_bytes{gpu="0"}[30s]'

    async def probe() -> list[float] | None:
        data = await get_json(session, query_url(sentinel, expr))
        result = (data or {}).get("data", {}).get("result") or []
        if not result or len(result[0]["values"]) < 5:
            return None
        slope = (RAMP_TO - RAMP_FROM) / RAMP_S
        return [float(ts) - (float(v) / GPU_TOTAL_BYTES - RAMP_FROM) / slope for ts, v in result[0]["values"]]

    estimates = await until("five NVML passes of Sentinel", probe, 30, children)
    return max(estimates), max(estimates) - min(estimates), len(estimates)


# -- the race ----------------------------------------------------------------------------------------


class Race:
    """One run: start everything, warm up, inject, wait for both paths, tear down."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.s = settings
        self.tmp = tmp
        self.sink = WebhookSink()
        self.workers = {name: FakeVllm(name) for name in ("qwen3-a", "qwen3-b")}
        self.worker_log = tmp / "logs" / "qwen3-a.log"
        self.children: list[Child] = []
        self.injected: dict[str, float] = {}  # fault -> time.monotonic()
        self.wall_minus_mono = time.time() - time.monotonic()
        self.notes: list[str] = []
        self.prometheus = which("prometheus", "prometheus")
        self.alertmanager = which("prometheus-alertmanager", "prometheus-alertmanager")
        self.started = time.monotonic()

    def t(self) -> str:
        """Seconds since the race started, for the progress log."""
        return f"t+{time.monotonic() - self.started:5.1f}s"

    async def run(self) -> list[Outcome]:
        """The whole race; every process and server is gone when it returns or raises."""
        try:
            async with aiohttp.ClientSession() as session:
                await self._start(session)
                await self._warm_up(session)
                await self._inject_all()
                outcomes = await self._collect()
                await self._check_prometheus_rules(session)
                await self._explain_missing(session, outcomes)
                return outcomes
        finally:
            # Prometheus first, so it does not push to an Alertmanager already gone.
            for child in reversed(self.children):
                child.stop()
            await self.sink.close()
            for worker in self.workers.values():
                await worker.close()

    # -- start ------------------------------------------------------------------------------

    async def _start(self, session: aiohttp.ClientSession) -> None:
        s, tmp = self.s, self.tmp
        await self.sink.start()
        for worker in self.workers.values():
            await worker.start()
        self.worker_log.parent.mkdir()
        self.worker_log.write_text(
            "INFO 11-26 19:00:01 [api_server.py:1880] vLLM API server version 0.11.0\n"
            "INFO 11-26 19:00:42 [launcher.py:29] Available routes are:\n"
        )

        am_port = free_port()
        am_config = tmp / "alertmanager.yml"
        am_config.write_text(
            alertmanager_config(webhook_url=self.sink.url("alertmanager"), group_wait=f"{s.group_wait_s}s")
        )
        argv = alertmanager_argv(self.alertmanager, am_config, tmp / "am-data", am_port)
        self.children.append(Child("alertmanager", argv, tmp / "alertmanager.log"))

        lost_at = s.gpu_lost_at_s if "gpu_lost" in s.faults else None
        scenario = tmp / "race-scenario.yaml"
        scenario.write_text(scenario_yaml(lost_at))
        config = tmp / "sentinel.yaml"
        config.write_text(sentinel_yaml(tmp, self.sink, self.workers, self.worker_log))
        sentinel = Child("sentinel", sentinel_argv(config, scenario), tmp / "sentinel.log")
        self.children.insert(0, sentinel)
        self.sentinel_port = await asyncio.to_thread(sentinel_port, sentinel)
        self.sentinel = f"http://127.0.0.1:{self.sentinel_port}"

        prom_port = free_port()
        rules = prometheus_rule_files(RULE_FILES, tmp / "prometheus-rules", s.keep_group_intervals)
        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(
            prometheus_config(
                scrape_interval=f"{s.scrape_interval_s}s",
                evaluation_interval=f"{s.eval_interval_s}s",
                rule_files=rules,
                alertmanager=f"127.0.0.1:{am_port}",
                sentinel=f"127.0.0.1:{self.sentinel_port}",
                workers={name: f"127.0.0.1:{w.port}" for name, w in self.workers.items()},
            )
        )
        argv = prometheus_argv(self.prometheus, prom_config, tmp / "prometheus-data", prom_port)
        self.children.append(Child("prometheus", argv, tmp / "prometheus.log"))
        self.prom = f"http://127.0.0.1:{prom_port}"
        self.am = f"http://127.0.0.1:{am_port}"

        for name, url in (("Sentinel", self.sentinel), ("Alertmanager", self.am), ("Prometheus", self.prom)):
            await until(f"{name} ready", functools.partial(ready, session, url + "/-/ready"), 60, self.children)
        log(
            f"{self.t()} ready: sink :{self.sink.port}, vLLM fakes :{self.workers['qwen3-a'].port} "
            f":{self.workers['qwen3-b'].port}, Sentinel :{self.sentinel_port}, Prometheus :{prom_port}, "
            f"Alertmanager :{am_port} (in {tmp})"
        )

    # -- warm-up ------------------------------------------------------------------------------

    async def _warm_up(self, session: aiohttp.ClientSession) -> None:
        """Until Prometheus scraped every target twice (all up) and both rule engines have their groups."""
        targets = 1 + len(self.workers)

        async def scraped_twice() -> bool | None:
            counts = await get_json(session, query_url(self.prom, "count_over_time(up[5m]) >= 2 and up == 1"))
            result = (counts or {}).get("data", {}).get("result") or []
            return True if len(result) == targets else None

        async def rules_loaded(base: str) -> bool | None:
            data = await get_json(session, base + "/api/v1/rules")
            groups = (data or {}).get("data", {}).get("groups") or []
            return True if groups else None

        timeout = 4 * self.s.scrape_interval_s + 30
        await until("Prometheus rules loaded", lambda: rules_loaded(self.prom), timeout, self.children)
        await until("Sentinel rules loaded", lambda: rules_loaded(self.sentinel), timeout, self.children)
        await until("Prometheus scraped every target twice", scraped_twice, timeout, self.children, every=0.5)
        early = {a.alertname for a in self.sink.arrivals}
        log(f"{self.t()} warm-up done; alerts so far: {', '.join(sorted(early)) or 'none'}")
        # Read now, when the store holds the most passes: the best of more samples is closer.
        epoch, spread, samples = await sim_epoch(session, self.sentinel, self.children)
        self.sim_epoch_mono = epoch - self.wall_minus_mono
        log(f"{self.t()} simulator clock read from {samples} NVML passes (estimates spread {spread * 1000:.1f} ms)")

    # -- faults ---------------------------------------------------------------------------------

    async def _inject_all(self) -> None:
        order = [f for f in FAULTS if f in self.s.faults]
        if "gpu_lost" in order:
            first = self.sim_epoch_mono + self.s.gpu_lost_at_s
            if time.monotonic() > first - 1.0:
                raise RuntimeError(
                    f"warm-up ended after the scenario's GPU loss ({self.s.gpu_lost_at_s:g}s after Sentinel's "
                    "start): raise --gpu-lost-at"
                )
        else:
            first = time.monotonic() + 1.0
        for i, key in enumerate(order):
            at = first + i * self.s.stagger_s
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            self.injected[key] = self._inject(key, at)
            log(f"{self.t()} injected {key}: {FAULTS[key].title}")

    def _inject(self, key: str, planned: float) -> float:
        """Cause one fault now; returns when it happened (time.monotonic())."""
        if key == "gpu_lost":
            return planned  # the simulator does it by itself at the scenario's time, which `planned` is
        now = time.monotonic()
        if key == "cuda_oom":
            with self.worker_log.open("a") as f:
                f.write(OOM_LINE + "\n")
        elif key == "endpoint_down":
            self.workers["qwen3-a"].die()
        elif key == "stall":
            self.workers["qwen3-b"].stall()
        return now

    # -- results ----------------------------------------------------------------------------------

    def _expected(self) -> list[tuple[str, Expect, str]]:
        return [(key, e, path) for key in self.injected for e in FAULTS[key].expects for path in PATHS]

    def _arrival(self, key: str, expect: Expect, path: str) -> Arrival | None:
        # Half a second of slack before the fault: the GPU loss time is an estimate.
        return self.sink.first(path, expect.alertname, expect.labels, self.injected[key] - 0.5)

    async def _collect(self) -> list[Outcome]:
        """Wait for every expected alert on both paths, or its fault's timeout."""
        while True:
            for child in self.children:
                child.check()
            now = time.monotonic()
            waiting = [
                (key, e, path)
                for key, e, path in self._expected()
                if self._arrival(key, e, path) is None and now < self.injected[key] + self.s.timeout_s
            ]
            if not waiting:
                break
            await asyncio.sleep(0.1)
        timing = rule_timing()
        outcomes = []
        for key in self.injected:
            for e in FAULTS[key].expects:
                o = Outcome(key, e.alertname, timing.get(e.alertname, "?"))
                for path in PATHS:
                    arrival = self._arrival(key, e, path)
                    o.delivered[path] = None if arrival is None else arrival.at - self.injected[key]
                    starts = None if arrival is None else arrival.starts_at_wall
                    o.firing[path] = None if starts is None else starts - self.wall_minus_mono - self.injected[key]
                outcomes.append(o)
        log(f"{self.t()} done")
        return outcomes

    def others(self) -> dict[str, list[str]]:
        """Firing notifications that no fault of this race explains, per path."""
        expected = {e.alertname for key in self.injected for e in FAULTS[key].expects}
        out: dict[str, list[str]] = {p: [] for p in PATHS}
        for a in self.sink.arrivals:
            if a.alertname not in expected:
                ident = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()) if k in ("gpu", "worker", "collector"))
                entry = f"{a.alertname}{{{ident}}}" if ident else a.alertname
                if entry not in out[a.path]:
                    out[a.path].append(entry)
        return out

    async def _check_prometheus_rules(self, session: aiohttp.ClientSession) -> None:
        """Note rules Prometheus could not evaluate: they would never fire there."""
        data = await get_json(session, self.prom + "/api/v1/rules")
        for group in (data or {}).get("data", {}).get("groups") or []:
            for rule in group.get("rules", []):
                if rule.get("health") not in (None, "ok", "unknown"):
                    self.notes.append(f"Prometheus rule {rule.get('name')}: {rule.get('lastError')}")

    async def _explain_missing(self, session: aiohttp.ClientSession, outcomes: list[Outcome]) -> None:
        """For each alert Alertmanager never delivered: did Prometheus ever have it, and what did it see?"""
        window = f"{int(time.monotonic() - self.started) + 60}s"
        for o in outcomes:
            if o.delivered["alertmanager"] is not None:
                continue
            expr = f'count_over_time(ALERTS{{alertname="{o.alertname}"}}[{window}])'
            data = await get_json(session, query_url(self.prom, expr))
            seen = bool((data or {}).get("data", {}).get("result"))
            self.notes.append(
                f"{o.alertname} never reached Alertmanager: Prometheus "
                + ("had it pending or firing" if seen else "never had it pending or firing")
            )
            if o.alertname == "GPUFallenOffBus":
                await self._explain_born_at_one(session, "sentinel_gpu_xid_errors_total", 'xid="79"', window)

    async def _explain_born_at_one(self, session: aiohttp.ClientSession, name: str, matcher: str, window: str) -> None:
        # A counter whose series first appears at 1 in the exposition has no 0 before
        # the increment for Prometheus: increase() over the window is 0, the rule false.
        series = f"{name}{{{matcher}}}"
        data = await get_json(session, query_url(self.prom, f"min_over_time({series}[{window}])"))
        result = (data or {}).get("data", {}).get("result") or []
        if result:
            first = min(float(r["value"][1]) for r in result)
            self.notes.append(
                f"Prometheus's lowest sample of {series} is {first:g}: the series is born at its first "
                "increment in Sentinel's /metrics, so increase() over it stays 0 in Prometheus"
            )


# -- report --------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """The machine the race ran on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kib / 2**20:.0f} GiB"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpu": f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs",
        "memory": mem,
        "python": platform.python_version(),
        "load_average_at_start": load,
    }


def fmt(seconds: float | None, timeout: float) -> str:
    """A time to notification: ms under a second, else seconds; `> timeout` if never."""
    if seconds is None:
        return f"> {timeout:g} s"
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.1f} s"


def ratio(sentinel: float | None, prom: float | None, timeout: float) -> str:
    """Prometheus+AM time over Sentinel's ("> N" when Prometheus never delivered)."""
    if sentinel is None or sentinel <= 0:
        return "n/a"
    if prom is None:
        return f"> {timeout / sentinel:.0f}x"
    return f"{prom / sentinel:.0f}x" if prom / sentinel >= 10 else f"{prom / sentinel:.1f}x"


def summary(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Per fault: the first notification about it on each path."""
    rows = []
    for key in dict.fromkeys(o.fault for o in outcomes):
        mine = [o for o in outcomes if o.fault == key]
        row: dict[str, Any] = {"fault": key, "kind": FAULTS[key].kind}
        for path in PATHS:
            got = [(o.delivered[path], o.alertname) for o in mine if o.delivered[path] is not None]
            best = min(got, key=lambda x: x[0] or 0.0) if got else (None, None)
            row[path] = best[0]
            row[f"{path}_alert"] = best[1]
        rows.append(row)
    return rows


def report(race: Race, outcomes: list[Outcome], info: dict[str, str]) -> dict[str, Any]:
    """Print the results; returns them as a JSON-able document."""
    s = race.s
    timeout = s.timeout_s
    print(f"machine: {info['cpu']}, {info['memory']}, Python {info['python']}, load {info['load_average_at_start']}")
    print(f"prometheus: {info['prometheus']}")
    print(f"alertmanager: {info['alertmanager']}")
    print(
        f"Prometheus: scrape {s.scrape_interval_s}s, evaluation {s.eval_interval_s}s"
        f" ({'group intervals of the files kept' if s.keep_group_intervals else 'groups at the global interval'});"
        f" Alertmanager: group_by [alertname], group_wait {s.group_wait_s}s;"
        f" Sentinel: rules/*.yml as shipped (1 s groups, event-triggered)"
    )
    print(f"faults injected {s.stagger_s:g} s apart; wait per fault and path: {timeout:g} s\n")

    print("| fault | alert | rule waits | Sentinel: firing / notified | Prometheus+AM: firing / notified | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for o in outcomes:
        cells = [
            f"{fmt(o.firing[p], timeout) if o.delivered[p] is not None else '—'} / {fmt(o.delivered[p], timeout)}"
            for p in PATHS
        ]
        r = ratio(o.delivered["sentinel"], o.delivered["alertmanager"], timeout)
        print(f"| {o.fault} | {o.alertname} | {o.rule} | {cells[0]} | {cells[1]} | {r} |")

    print("\nFirst notification per fault:\n")
    print("| fault | kind | Sentinel | Prometheus+AM | ratio | target (>= 20x, event-driven) |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = summary(outcomes)
    for row in rows:
        cells = [
            f"{fmt(row[p], timeout)} ({row[f'{p}_alert']})" if row[p] is not None else fmt(None, timeout) for p in PATHS
        ]
        r = ratio(row["sentinel"], row["alertmanager"], timeout)
        met = ""
        if row["kind"] == "event":
            ok = row["sentinel"] is not None and (
                row["alertmanager"] is None or row["alertmanager"] >= 20 * row["sentinel"]
            )
            row["target_met"] = ok
            met = "met" if ok else "NOT met"
        print(f"| {row['fault']} | {row['kind']} | {cells[0]} | {cells[1]} | {r} | {met} |")

    others = race.others()
    for path in PATHS:
        if others[path]:
            print(f"\nother firing notifications on /{path}: {', '.join(others[path])}")
    for note in race.notes:
        print(f"note: {note}")
    return {
        "machine": info,
        "settings": asdict(s),
        "alerts": [asdict(o) for o in outcomes],
        "faults": rows,
        "other_notifications": others,
        "notes": race.notes,
    }


# -- entry point -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None]:
    """Command line -> settings and the optional JSON output path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: cuda_oom only, 5 s scrape/evaluation/group_wait"
    )
    parser.add_argument("--faults", help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--scrape-interval", type=int, help="Prometheus scrape_interval, s (15; quick 5)")
    parser.add_argument("--eval-interval", type=int, help="Prometheus evaluation_interval, s (15; quick 5)")
    parser.add_argument("--group-wait", type=int, help="Alertmanager group_wait, s (30; quick 5)")
    parser.add_argument("--gpu-lost-at", type=float, default=50.0, help="scenario time of the GPU loss, s (50)")
    parser.add_argument("--timeout", type=float, help="wait per fault and path, s (120; quick 45)")
    parser.add_argument(
        "--prometheus-group-intervals",
        action="store_true",
        help="let Prometheus honour the groups' own interval: (1 s) instead of its global evaluation_interval",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (configs and logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    faults = tuple(args.faults.split(",")) if args.faults else (("cuda_oom",) if quick else tuple(FAULTS))
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    scrape = args.scrape_interval or (5 if quick else 15)
    settings = Settings(
        faults=faults,
        scrape_interval_s=scrape,
        eval_interval_s=args.eval_interval or (5 if quick else 15),
        group_wait_s=args.group_wait if args.group_wait is not None else (5 if quick else 30),
        gpu_lost_at_s=args.gpu_lost_at,
        timeout_s=args.timeout or (45.0 if quick else 120.0),
        stagger_s=scrape / 4,
        keep_group_intervals=args.prometheus_group_intervals,
        keep_tmp=args.keep_tmp,
    )
    return settings, args.json


async def amain(settings: Settings) -> dict[str, Any]:
    """Run one race in a temporary directory and report it."""
    # SIGTERM ends the race like Ctrl-C does: cancelled, so every finally block runs.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    info = machine()
    if settings.keep_tmp:
        tmp_ctx: contextlib.AbstractContextManager[str] = contextlib.nullcontext(
            tempfile.mkdtemp(prefix="sentinel-race-")
        )
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="sentinel-race-")
    with tmp_ctx as tmp:
        race = Race(settings, Path(tmp))
        info["prometheus"] = tool_version(race.prometheus)
        info["alertmanager"] = tool_version(race.alertmanager)
        try:
            outcomes = await race.run()
        except BaseException:
            if settings.keep_tmp:
                log(f"configs and logs kept in {tmp}")
            raise
    return report(race, outcomes, info)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when the race ran (its figures say whether targets were met)."""
    settings, json_out = parse_args(argv)
    try:
        result = asyncio.run(amain(settings))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every process stopped")
        return 130
    except (RuntimeError, TimeoutError) as exc:
        log(f"failed: {exc}")
        return 1
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
