"""Daemon overhead: `sentinel run --simulate healthy-8gpu` with 1 s polling.

Measures CPU seconds per wall second and peak RSS of the daemon over the run, next to a
baseline measured in the same run: a Python process that only imports the same
libraries and sleeps. Targets: at most 2 % of one core and 80 MB RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BASELINE = (
    "import aiohttp, apscheduler.schedulers.asyncio, prometheus_client, pydantic, yaml, psutil, pynvml, "
    "promql_parser, sentinel.cli.main, time; print('ready', flush=True); time.sleep(10**6)"
)


def peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) * 1024 if m else 0


def measure(argv: list[str], ready: str, seconds: float, env: dict[str, str]) -> tuple[float, int]:
    """CPU seconds per wall second after `ready` appears on a stream, and peak RSS."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ready in line:
            break
    # Leave start-up out of the rate: settle, then measure a steady window.
    time.sleep(2)
    p = psutil.Process(proc.pid)
    t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
    time.sleep(seconds)
    t1, c1 = time.monotonic(), sum(p.cpu_times()[:2])
    rss = peak_rss_bytes(proc.pid)
    proc.terminate()
    proc.wait(10)
    return (c1 - c0) / (t1 - t0), rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        env = dict(os.environ, STATE_DIRECTORY=state)
        config = Path(state) / "sentinel.yaml"
        config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\n")
        daemon_cpu, daemon_rss = measure(
            [
                sys.executable,
                "-m",
                "sentinel",
                "run",
                "-c",
                str(config),
                "--simulate",
                "healthy-8gpu",
                "--listen",
                "127.0.0.1:0",
            ],
            "listening on",
            args.seconds,
            env,
        )
        base_cpu, base_rss = measure([sys.executable, "-c", BASELINE], "ready", args.seconds, env)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"window: {args.seconds:.0f} s, healthy-8gpu, NVML and host collectors at 1 s")
    print(f"daemon:   {daemon_cpu * 100:.2f} % of one core, peak RSS {daemon_rss / 2**20:.1f} MiB")
    print(f"baseline: {base_cpu * 100:.2f} % of one core, peak RSS {base_rss / 2**20:.1f} MiB (imports only)")
    print(
        f"added by Sentinel's work: {(daemon_cpu - base_cpu) * 100:.2f} % CPU, "
        f"{(daemon_rss - base_rss) / 2**20:.1f} MiB; RSS ratio {daemon_rss / base_rss:.2f}"
    )
    print(
        f"targets: <= 2 % of one core: {'met' if daemon_cpu <= 0.02 else 'MISSED'}; "
        f"<= 80 MB RSS: {'met' if daemon_rss <= 80e6 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
