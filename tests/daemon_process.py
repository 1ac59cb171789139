"""Run `sentinel run` as a real subprocess and talk to it over HTTP and its stderr."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"listening on http://([^\s:]+|\[[^\]]+\]):(\d+)")


class DaemonProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, state_dir: Path | None = None) -> None:
        full_env = dict(os.environ)
        if state_dir is not None:
            full_env["STATE_DIRECTORY"] = str(state_dir)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        try:
            match = self.wait_for_log(LISTENING, timeout=60)
        except BaseException:
            self._reap(kill=True)
            raise
        self.port = int(match.group(2))
        self.base = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:  # closed at EOF, however the process ended (kill -9 included)
            for line in self.proc.stderr:
                self.lines.append(line)
                self._queue.put(line)

    def wait_for_log(self, pattern: re.Pattern[str] | str, timeout: float = 10) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for line in list(self.lines):
            if m := regex.search(line):
                return m
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    break
                continue
            if m := regex.search(line):
                return m
        raise AssertionError(f"no log line matching {regex.pattern!r}; got:\n{''.join(self.lines)}")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        return self.request("GET", path, headers=headers)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        """One request; returns (status, Content-Type, body text), HTTP errors included."""
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # a loaded machine answers slowly
                return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read().decode()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 5) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._reap(kill=True)
            raise
        finally:
            self._reap(kill=False)

    def _reap(self, *, kill: bool) -> None:
        """Kill (if asked) and wait for the process and for the pump to read its last lines."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        if self.proc.poll() is not None or kill:
            self.proc.wait()
            self._pump_thread.join(timeout=10)

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one series in /metrics (None when absent)."""
        _, _, body = self.get("/metrics")
        for line in body.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            series_name, _, label_text = head.partition("{")
            if series_name != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(value)
        return None

    def json(self, path: str) -> Any:
        _, _, body = self.get(path)
        data = json.loads(body)
        return data["data"] if isinstance(data, dict) and "data" in data else data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on a fixed port that can be started late (it is 'down' before)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> Receiver:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def alerts(self, alertname: str, status: str) -> list[dict[str, Any]]:
        """Alerts of the webhook payloads received so far with this name and status."""
        return [
            a
            for b in list(self.bodies)
            for a in b.get("alerts", [])
            if a["labels"].get("alertname") == alertname and a["status"] == status
        ]
