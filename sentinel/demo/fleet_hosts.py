"""The simulated fleet of `sentinel demo --fleet`: hosts, their Sentinels and workers.

Each host is a real `sentinel run` process with its own configuration, state
directory and simulated GPU host (`--simulate` with a scenario whose `control_file`
the demo writes to lose a GPU on demand). Its workers are real processes of the light
vLLM stand-in (`sentinel.sim.lite`), started, stopped and restarted by that Sentinel's
process backend. `SlotRecorder` follows the fleet's disruption slots in etcd as they
are taken and given back, so the demo can list every action that held one and check
the budget from etcd's own order of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sentinel.fleet.budget import HolderRecord
from sentinel.fleet.etcd import EtcdClient, WatchEvent
from sentinel.fleet.keys import Keys
from sentinel.fleet.watch import Informer

__all__ = ["FLEET", "GROUP", "HostHandle", "SlotHold", "SlotRecorder", "WorkerPlan", "fleet_plan", "free_port"]

FLEET = "demo"
GROUP = "qwen3"
_LITE_ENV = {"TOKENS_PER_S": "40", "VLLM_LOG_STATS_INTERVAL": "5"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerPlan:
    name: str
    gpus: tuple[int, ...]
    labels: dict[str, str]
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def fleet_plan() -> dict[str, list[WorkerPlan]]:
    """Four hosts; a 2-host serving group (qwen3, head on host-a) and one worker per host besides."""
    qwen = {"model": "qwen3-480b"}
    coder = {"model": "coder"}
    return {
        "host-a": [WorkerPlan("qwen3-r0", (0, 1, 2, 3), qwen), WorkerPlan("coder-a", (4, 5, 6, 7), coder)],
        "host-b": [WorkerPlan("qwen3-r1", (0, 1, 2, 3), qwen), WorkerPlan("coder-b", (4, 5, 6, 7), coder)],
        "host-c": [WorkerPlan("coder-c", (0, 1, 2, 3), coder)],
        "host-d": [WorkerPlan("coder-d", (0, 1, 2, 3), coder)],
    }


def group_section() -> dict[str, Any]:
    return {
        "name": GROUP,
        "labels": {"model": "qwen3-480b"},
        "members": [{"member": "host-a:qwen3-r0", "head": True}, {"member": "host-b:qwen3-r1"}],
        "step_timeout": "20s",
        "verify_timeout": "30s",
    }


class HostHandle:
    """One simulated host: its configuration, its `sentinel run` process and its workers."""

    def __init__(
        self,
        name: str,
        workers: list[WorkerPlan],
        root: Path,
        *,
        endpoints: list[str],
        rule_files: list[str],
        sink_url: str,
        fleet: dict[str, Any],
        log_level: str = "info",
    ) -> None:
        self.name = name
        self.log_level = log_level
        self.workers = workers
        self.dir = root / name
        self.state = self.dir / "state"
        self.port = free_port()
        self.config_path = self.dir / "sentinel.yaml"
        self.scenario_path = self.dir / "scenario.yaml"
        self.control_path = self.dir / "nvml-faults.json"
        self.log_path = self.dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lost_gpus: list[int] = []
        self.dir.mkdir(parents=True)
        (self.state / "workers").mkdir(parents=True)
        self._write(endpoints, rule_files, sink_url, fleet)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self, endpoints: list[str], rule_files: list[str], sink_url: str, fleet: dict[str, Any]) -> None:
        python = sys.executable
        workers = []
        for w in self.workers:
            workers.append(
                {
                    "name": w.name,
                    "gpus": list(w.gpus),
                    "endpoint": w.url,
                    "engine": "vllm",
                    "labels": w.labels,
                    "process": {"pid_file": str(self.state / "workers" / f"{w.name}.pid")},
                    "logs": [{"path": str(self.state / "workers" / f"{w.name}.log")}],
                    "backend": {
                        "type": "process",
                        "argv": [python, "-m", "sentinel.sim.lite", "--port", str(w.port)],
                        "env": _LITE_ENV,
                        "stop_timeout": "3s",
                    },
                    "profiles": [
                        {"name": "full", "env": {"MAX_NUM_SEQS": "8"}},
                        {"name": "reduced", "env": {"MAX_NUM_SEQS": "4"}},
                    ],
                }
            )
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "state_dir": str(self.state),
            "log": {"level": self.log_level},
            "collectors": {"nvml": {"kernel_log": "off"}},
            "workers": workers,
            "rules": {"files": rule_files, "interval": "1s", "external_labels": {"sentinel_host": self.name}},
            "remediation": {
                "mode": "act",
                "cooldown": "10s",
                "budget": {"count": 5, "window": "10m"},
                "verify_timeout": "30s",
                "verify_interval": "500ms",
                "stable_for": "30m",
                # Hosts of one or two workers: the fleet breaker judges what is systemic.
                "circuit_breaker": {"max_ratio": 1.0, "min_workers": 3},
            },
            "notify": {"webhook": [{"name": "demo-sink", "url": sink_url}]},
            "fleet": {**fleet, "endpoints": endpoints, "host_id": self.name},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        scenario = {"name": self.name, "description": f"the demo's {self.name}", "gpus": 8}
        scenario["control_file"] = str(self.control_path)
        self.scenario_path.write_text(yaml.safe_dump(scenario, sort_keys=False))
        self.set_lost_gpus([])

    # -- the Sentinel ---------------------------------------------------------------------

    def start(self) -> None:
        """Start `sentinel run` for this host (its workers start with it)."""
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "sentinel", "run", "-c", str(self.config_path)]
        argv += ["--simulate", str(self.scenario_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the Sentinel (not its workers: they are in sessions of their own)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def kill_workers(self) -> None:
        """Last resort at the end: any worker process group still running (pid files)."""
        for w in self.workers:
            path = self.state / "workers" / f"{w.name}.pid"
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(path.read_text().split()[0])
                os.killpg(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- the simulated GPUs ----------------------------------------------------------------

    def set_lost_gpus(self, gpus: list[int]) -> None:
        """Lose these GPUs (and only these) in the host's simulated NVML, now."""
        self.lost_gpus = list(gpus)
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"lost": self.lost_gpus}))
        tmp.replace(self.control_path)

    # -- HTTP --------------------------------------------------------------------------------

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.base + "/-/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def actions(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """The host's journal, newest first ([] while its Sentinel is down or slow to answer)."""
        return await self.read_actions(http) or []

    async def read_actions(self, http: aiohttp.ClientSession, timeout: float = 5.0) -> list[dict[str, Any]] | None:
        """The host's journal, newest first; None when its Sentinel did not answer."""
        try:
            url = self.base + "/api/v1/actions?limit=500"
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        data = body.get("data") if isinstance(body, dict) else None
        return list(data) if isinstance(data, list) else None


async def worker_tokens(http: aiohttp.ClientSession, worker: WorkerPlan) -> float | None:
    """The worker's generated-token counter (None: not answering)."""
    try:
        async with http.get(worker.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    for line in text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def worker_fault(http: aiohttp.ClientSession, worker: WorkerPlan, body: dict[str, Any]) -> bool:
    try:
        async with http.post(worker.url + "/admin/fault", json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return body.get("kind") == "exit"  # the process is gone before it could answer


@dataclass
class SlotHold:
    """One disruption slot held: by whom, for what, from when to when (seconds of the demo)."""

    holder: str
    host: str
    worker: str
    action: str
    pool: str
    taken_at: float
    given_back_at: float | None = None
    revision: int = 0


class SlotRecorder:
    """Follows `slots/holders/` in etcd (list, then watch, resumed across etcd failures)."""

    def __init__(self, client: EtcdClient, clock: Any, fleet: str = FLEET) -> None:
        self.keys = Keys(f"/sentinel/{fleet}/")
        self._clock = clock
        self.holds: list[SlotHold] = []
        self.open: dict[str, SlotHold] = {}  # key -> the hold it holds now
        self.overwrites = 0  # a slot key written while held: must stay 0
        self.peak: dict[str, int] = {}
        self.informer = Informer(client, self.keys.holders, on_change=self._on_change)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.informer.run())

    async def stop(self) -> None:
        if self._task is not None:
            await self.informer.stop(self._task)

    def _on_change(self, _informer: Informer, events: list[WatchEvent]) -> None:
        now = self._clock()
        for e in events:
            key = e.kv.key
            where = self.keys.slot_of(key)
            if where is None:
                continue
            if e.type == "DELETE":
                hold = self.open.pop(key, None)
                if hold is not None:
                    hold.given_back_at = now
                continue
            if key in self.open or e.kv.version != 1:
                self.overwrites += 1
            try:
                record = HolderRecord.model_validate_json(e.kv.value)
            except ValueError:
                continue
            hold = SlotHold(record.holder, record.host, record.worker, record.action, where[0], now)
            hold.revision = e.kv.mod_revision
            self.open[key] = hold
            self.holds.append(hold)
            held = sum(1 for h in self.open.values() if h.pool == where[0])
            self.peak[where[0]] = max(self.peak.get(where[0], 0), held)


def wall_to_demo(wall: float | None, wall0: float) -> float | None:
    return None if wall is None else round(wall - wall0, 3)


def now_s(started: float) -> float:
    return time.monotonic() - started
