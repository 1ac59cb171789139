"""Run `sentinel run` as a real subprocess and talk to it over HTTP and its stderr."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

LISTENING = re.compile(r"listening on http://([^\s:]+|\[[^\]]+\]):(\d+)")


class DaemonProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, state_dir: Path | None = None) -> None:
        full_env = dict(os.environ)
        if state_dir is not None:
            full_env["STATE_DIRECTORY"] = str(state_dir)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        match = self.wait_for_log(LISTENING, timeout=30)
        self.port = int(match.group(2))
        self.base = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
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
            with urllib.request.urlopen(req, timeout=5) as resp:
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
            self.proc.kill()
            self.proc.wait()
            raise
