"""The processes of `bench/race.py`: Sentinel, a real Prometheus and a real Alertmanager, on loopback.

Each runs as a child process with its output in a log file in the race's temporary
directory (a pipe nobody drains would block it), is asked to stop with SIGTERM and
killed if it does not stop within 10 s, and gets SIGTERM from the kernel should the
race itself die without cleaning up (`PR_SET_PDEATHSIG`), so no daemon outlives a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

__all__ = [
    "Child",
    "alertmanager_argv",
    "alertmanager_config",
    "free_port",
    "prometheus_argv",
    "prometheus_config",
    "prometheus_rule_files",
    "query_url",
    "sentinel_argv",
    "sentinel_port",
    "tool_version",
    "which",
]

_PR_SET_PDEATHSIG = 1
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def free_port() -> int:
    """A loopback port free right now (for tools that cannot report a port-0 bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Not Linux: cleanup then relies on the race's own finally blocks alone.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Child:
    """One child process, its output in `log`; `stop()` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            # Started from the main thread only: PDEATHSIG fires when the *thread* that
            # forked exits, so a child forked from a worker thread could die early.
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll the log until a line matches; raises with the tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := pattern.search(self.log.read_text(errors="replace")):
                return m
            self.check()
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no log line matching {pattern.pattern!r} in {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tool_version(binary: str) -> str:
    """First line of `binary --version`, e.g. `prometheus, version 2.42.0+ds (...)`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def sentinel_argv(config: Path, scenario: Path) -> list[str]:
    """`sentinel run -c CONFIG --simulate SCENARIO --listen 127.0.0.1:0` with this interpreter's install."""
    script = Path(sys.executable).parent / "sentinel"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "sentinel"]
    return [*head, "run", "-c", str(config), "--simulate", str(scenario), "--listen", "127.0.0.1:0"]


def sentinel_port(child: Child, timeout: float = 60.0) -> int:
    """The port Sentinel bound (it logs `listening on http://127.0.0.1:PORT`)."""
    return int(child.wait_for_log(_LISTENING, timeout).group(1))


def prometheus_rule_files(rule_files: Sequence[Path], out_dir: Path, keep_group_intervals: bool) -> list[Path]:
    """Copies of the rule files for Prometheus, the groups' own `interval:` dropped unless kept.

    The default rules give event groups `interval: 1s` for Sentinel; a fleet Prometheus
    evaluating hundreds of hosts runs them at its global evaluation_interval, so that is
    what the race measures by default. Expressions, `for`, labels are untouched.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in rule_files:
        doc = yaml.safe_load(path.read_text())
        if not keep_group_intervals:
            for group in doc.get("groups", []):
                group.pop("interval", None)
        copy = out_dir / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        copies.append(copy)
    return copies


def prometheus_config(
    *,
    scrape_interval: str,
    evaluation_interval: str,
    rule_files: Sequence[Path],
    alertmanager: str,
    sentinel: str,
    workers: Mapping[str, str],
) -> str:
    """prometheus.yml: Sentinel's /metrics, each worker's /metrics with a static `worker` label.

    Sentinel adds `worker` to the engine series it scrapes itself; here the target's
    static label does it, so the same rules see the same labels. `honor_labels` stays
    false: Sentinel's series carry no `job`/`instance` and vLLM's carry no `worker`, so
    nothing collides (with a collision the target label would win and the scraped one
    become `exported_worker`).
    """
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(p) for p in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": "sentinel", "static_configs": [{"targets": [sentinel]}]},
            {
                "job_name": "vllm",
                "static_configs": [
                    {"targets": [target], "labels": {"worker": name}} for name, target in workers.items()
                ],
            },
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def alertmanager_config(*, webhook_url: str, group_wait: str) -> str:
    """alertmanager.yml: one route grouped by alertname, to the sink's /alertmanager.

    `group_by: [alertname]` is set on purpose: without it a route puts every alert in one
    group, and an alert joining a group already flushed waits group_interval (5 m).
    """
    config = {
        "route": {
            "receiver": "race-sink",
            "group_by": ["alertname"],
            "group_wait": group_wait,
            "group_interval": "5m",
            "repeat_interval": "4h",
        },
        "receivers": [{"name": "race-sink", "webhook_configs": [{"url": webhook_url, "send_resolved": False}]}],
    }
    return yaml.safe_dump(config, sort_keys=False)


def prometheus_argv(binary: str, config: Path, data: Path, port: int) -> list[str]:
    """Command line of the race's Prometheus."""
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]


def alertmanager_argv(binary: str, config: Path, data: Path, port: int) -> list[str]:
    """Command line of the race's Alertmanager (cluster off: one instance, no gossip wait)."""
    return [
        binary,
        f"--config.file={config}",
        f"--storage.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]


def which(tool: str, package: str) -> str:
    """Path of an external tool; RuntimeError naming the Debian package when it is absent."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: install the Debian package {package!r} (apt-get install {package})")
    return path


def query_url(base: str, expr: str) -> str:
    """An instant-query URL of Prometheus's (or Sentinel's) HTTP API."""
    return f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
