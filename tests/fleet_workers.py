"""Real worker processes for fleet tests, and a LocalExecutor that drives them.

A worker is a small Python HTTP server in its own process: `/health` answers 200 and
`/metrics` serves a token counter that grows while it runs (what "making progress"
means for the verify step), and the profile it was started with. Stopping kills the
process for real; starting launches a new one. Nothing is faked but the model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from sentinel.fleet import StepOutcome

WORKER_SOURCE = r"""
import http.server, json, sys, time
profile = sys.argv[1]
started = time.monotonic()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok"
        else:
            tokens = int((time.monotonic() - started) * 100)
            body = json.dumps({"tokens": tokens, "profile": profile}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def _get(port: int, path: str, timeout: float = 1.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return bytes(resp.read())


@dataclass
class WorkerProcess:
    name: str
    profile: str = "full"
    proc: subprocess.Popen[str] | None = None
    port: int = 0

    def start(self) -> None:
        self.stop()  # a start after a crash reaps the old process and its pipe
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SOURCE, self.profile], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class ProcessExecutor:
    """Carries out group steps on this host's WorkerProcesses; records what it did, when."""

    workers: dict[str, WorkerProcess]
    log: list[tuple[float, str, str]] = field(default_factory=list)
    fail_step: str | None = None
    hang_step: str | None = None

    async def _step(self, kind: str, worker: str) -> StepOutcome | None:
        self.log.append((time.monotonic(), kind, worker))
        if self.hang_step == kind:
            await asyncio.sleep(3600)
        if self.fail_step == kind:
            return StepOutcome(False, f"{kind} of {worker} failed on purpose")
        if worker not in self.workers:
            return StepOutcome(False, f"no worker {worker} here")
        return None

    async def stop(self, worker: str) -> StepOutcome:
        if (early := await self._step("stop", worker)) is not None:
            return early
        await asyncio.to_thread(self.workers[worker].stop)
        return StepOutcome(True, "stopped")

    async def apply_profile(self, worker: str, profile: str) -> StepOutcome:
        if (early := await self._step("apply_profile", worker)) is not None:
            return early
        self.workers[worker].profile = profile
        return StepOutcome(True, f"profile {profile}")

    async def start(self, worker: str) -> StepOutcome:
        if (early := await self._step("start", worker)) is not None:
            return early
        await asyncio.to_thread(self.workers[worker].start)
        return StepOutcome(True, f"started on port {self.workers[worker].port}")

    async def verify(self, worker: str, *, head: bool, deadline_s: float) -> StepOutcome:
        if (early := await self._step("verify", worker)) is not None:
            return early
        w = self.workers[worker]
        deadline = time.monotonic() + deadline_s
        first = None
        while time.monotonic() < deadline:
            if not w.alive():
                return StepOutcome(False, f"{worker} is not running")
            if not head:
                return StepOutcome(True, "alive")
            try:
                tokens = json.loads(await asyncio.to_thread(_get, w.port, "/metrics"))["tokens"]
            except OSError:
                tokens = None
            if tokens is not None and first is not None and tokens > first:
                return StepOutcome(True, f"serving, {tokens - first} tokens of progress")
            first = tokens if first is None else first
            await asyncio.sleep(0.1)
        return StepOutcome(False, f"{worker} made no progress within {deadline_s:.0f}s")
