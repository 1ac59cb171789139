"""Daemon overhead: CPU share of one core and peak RSS of a running `sentinel run`.

Two scenarios, each next to a baseline measured in the same run (a Python process that
only imports the same libraries and sleeps):

- `idle`: `--simulate healthy-8gpu` with 1 s polling, no rules, no workers.
- `loaded` (issue 16's target configuration): 8 simulated GPUs, the default rules
  (rules/*.yml), one worker whose endpoint serves 2,000 series scraped every second
  (values move on every scrape, as a busy engine's do), and its log growing by 100
  lines a second (one event-shaped line in a hundred).

The endpoint and the log writer run in a helper process of their own, so only the
daemon's CPU is counted. Targets: idle at most 2 % of one core; loaded, the daemon as a
whole at most 1 % of one core and 80 MB RSS, reported as `cpu_core_ratio` and
`peak_rss_bytes` in the JSON line (`--json`). A window of a minute sees the store only a
few percent full, so the loaded scenario also projects the RSS at full retention from the
store's measured growth (`projected_steady_rss_bytes`), and judges the memory target on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

BASELINE = (
    "import aiohttp, prometheus_client, pydantic, yaml, psutil, pynvml, "
    "promql_parser, sentinel.cli.main, time; print('ready', flush=True); time.sleep(10**6)"
)

# The worker's side: /metrics with SERIES series whose values move on every scrape, /health,
# and a log growing by LINES_PER_S lines a second. Prints its port once serving.
WORKER = textwrap.dedent(
    """
    import sys, threading, time
    from aiohttp import web
    series, lines_per_s, log_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
    counters = ["vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:num_preemptions_total"]
    n = [0]
    def body():
        n[0] += 1
        out = []
        for name in names:
            out.append(f"# TYPE {name} gauge")
            out.append(f'{name}{{model_name="qwen3",engine="0"}} {n[0] % 7}')
        for name in counters:
            out.append(f"# TYPE {name} counter")
            out.append(f'{name}{{model_name="qwen3",engine="0"}} {n[0] * 13}')
        out.append("# TYPE vllm:request_latency_bucket_seconds gauge")
        for i in range(series - len(names) - len(counters)):
            out.append(f'vllm:request_latency_bucket_seconds{{model_name="qwen3",le="{i}"}} {n[0] + i}')
        return "\\n".join(out) + "\\n"
    async def metrics(request):
        return web.Response(text=body(), content_type="text/plain", charset="utf-8")
    async def health(request):
        return web.Response()
    def writer():
        with open(log_path, "a", buffering=1) as f:
            i = 0
            while True:
                t = time.monotonic()
                for _ in range(lines_per_s):
                    i += 1
                    if i % 100 == 0:
                        f.write("[rank0]:[W1207 10:00:00.000000 ProcessGroupNCCL.cpp:1000] NCCL WARN slow peer\\n")
                    else:
                        f.write(f"INFO 12-07 10:00:00 [engine.py:1] request {i} finished in 0.05 s\\n")
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
    threading.Thread(target=writer, daemon=True).start()
    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/health", health)])
    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        while True:
            await __import__("asyncio").sleep(3600)
    __import__("asyncio").run(main())
    """
)


def peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) * 1024 if m else 0


def measure(
    argv: list[str],
    ready: str,
    seconds: float,
    env: dict[str, str],
    check: Callable[[str], None] | None = None,
    at_start: Callable[[str], None] | None = None,
) -> tuple[float, int]:
    """CPU seconds per wall second after `ready` appears on a stream, and peak RSS.

    `check` gets the ready line after the window, to confirm the process did the work;
    `at_start` gets it when the window opens.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if ready in line:
                break
        else:
            raise SystemExit(f"{argv[:4]} exited before it was ready")
        # Keep reading its output, or a chatty process blocks on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        # Leave start-up out of the rate: settle, then measure a steady window.
        time.sleep(5)
        p = psutil.Process(proc.pid)
        if at_start is not None:
            at_start(line)
        t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
        time.sleep(seconds)
        t1, c1 = time.monotonic(), sum(p.cpu_times()[:2])
        rss = peak_rss_bytes(proc.pid)
        if check is not None:
            check(line)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return (c1 - c0) / (t1 - t0), rss


def idle_config(state: Path) -> Path:
    config = state / "sentinel.yaml"
    config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\n")
    return config


def loaded_config(state: Path, port: int, log: Path) -> Path:
    config = state / "sentinel.yaml"
    rules = sorted(str(p) for p in (REPO / "rules").glob("*.yml"))
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"kernel_log": "off"}},
                "rules": {"files": rules},
                "workers": [
                    {
                        "name": "qwen3",
                        "gpus": [0, 1, 2, 3, 4, 5, 6, 7],
                        "endpoint": f"http://127.0.0.1:{port}",
                        "logs": [{"path": str(log)}],
                    }
                ],
            }
        )
    )
    return config


def run_daemon(
    config: Path,
    seconds: float,
    env: dict[str, str],
    check: Callable[[str], None] | None = None,
    at_start: Callable[[str], None] | None = None,
) -> tuple[float, int]:
    argv = [sys.executable, "-m", "sentinel", "run", "-c", str(config), "--simulate", "healthy-8gpu"]
    return measure([*argv, "--listen", "127.0.0.1:0"], "listening on", seconds, env, check, at_start)


def query(base: str, expr: str) -> float:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        result = json.load(resp)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def base_url(ready_line: str) -> str:
    m = re.search(r"listening on (http://[^ ]+)", ready_line)
    if m is None:
        raise SystemExit(f"no address in {ready_line!r}")
    return m.group(1)


class StoreGrowth:
    """The store's samples at the window's start and end, to project its size at full retention.

    A window of a minute sees the store a few percent full: samples are kept for the
    retention (15 min by default), so the RSS measured then is not the steady state. At
    steady state the store holds about (samples appended per second) x retention; the
    samples still to come cost at least their 16 bytes each (two array buffers).
    """

    BYTES_PER_SAMPLE = 16
    RETENTION_S = 900.0  # the default store.retention

    def __init__(self) -> None:
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def sample(self, ready_line: str) -> tuple[float, float]:
        return time.monotonic(), query(base_url(ready_line), "sentinel_store_samples")

    def at_start(self, ready_line: str) -> None:
        self.start = self.sample(ready_line)

    def projected_extra_bytes(self) -> float:
        assert self.start is not None and self.end is not None
        (t0, n0), (t1, n1) = self.start, self.end
        steady = (n1 - n0) / (t1 - t0) * self.RETENTION_S
        return max(0.0, steady - n1) * self.BYTES_PER_SAMPLE


def confirm_loaded_work(series: int, lines_per_s: int, growth: StoreGrowth) -> Callable[[str], None]:
    """A check that the daemon really scraped the endpoint and read the log during the window."""

    def check(ready_line: str) -> None:
        growth.end = growth.sample(ready_line)
        base = base_url(ready_line)
        scraped = query(base, 'count({worker="qwen3", __name__=~"vllm:.*"})')
        lines = query(base, "sum(sentinel_log_lines_total)")
        print(f"confirmed: {scraped:.0f} engine series in the store, {lines:.0f} log lines read")
        if scraped < series * 0.99 or lines < lines_per_s:
            raise SystemExit("the daemon did not do the loaded scenario's work; the figures would be meaningless")

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--scenario", choices=["idle", "loaded", "both"], default="both")
    parser.add_argument("--series", type=int, default=2000)
    parser.add_argument("--lines-per-s", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object with the figures last")
    args = parser.parse_args()
    figures: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "seconds": args.seconds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        env = dict(os.environ, STATE_DIRECTORY=str(state))
        base_cpu, base_rss = measure([sys.executable, "-c", BASELINE], "ready", args.seconds, env)
        figures["baseline_cpu_core_ratio"], figures["baseline_peak_rss_bytes"] = base_cpu, base_rss
        print(figures["machine"])
        print(f"baseline: {base_cpu * 100:.2f} % of one core, peak RSS {base_rss / 2**20:.1f} MiB (imports only)")
        if args.scenario in ("idle", "both"):
            cpu, rss = run_daemon(idle_config(state), args.seconds, env)
            figures["idle"] = {"cpu_core_ratio": cpu, "peak_rss_bytes": rss}
            print(
                f"idle:     {cpu * 100:.2f} % of one core, peak RSS {rss / 2**20:.1f} MiB "
                f"(target <= 2 %: {'met' if cpu <= 0.02 else 'MISSED'})"
            )
        if args.scenario in ("loaded", "both"):
            log = state / "worker.log"
            log.touch()
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(args.series), str(args.lines_per_s), str(log)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert worker.stdout is not None
                port = int(worker.stdout.readline())
                growth = StoreGrowth()
                check = confirm_loaded_work(args.series, args.lines_per_s, growth)
                cpu, rss = run_daemon(loaded_config(state, port, log), args.seconds, env, check, growth.at_start)
            finally:
                worker.kill()
                worker.wait()
            steady_rss = rss + growth.projected_extra_bytes()
            figures["loaded"] = {"cpu_core_ratio": cpu, "peak_rss_bytes": rss, "projected_steady_rss_bytes": steady_rss}
            figures["cpu_core_ratio"], figures["peak_rss_bytes"] = cpu, rss
            figures["projected_steady_rss_bytes"] = steady_rss
            print(
                f"loaded:   {cpu * 100:.2f} % of one core, peak RSS {rss / 2**20:.1f} MiB with 8 GPUs, the default "
                f"rules, {args.series} endpoint series at 1 s and {args.lines_per_s} log lines/s"
            )
            print(
                f"          at full retention ({StoreGrowth.RETENTION_S:.0f} s of samples) the store adds at least "
                f"{(steady_rss - rss) / 2**20:.1f} MiB: RSS >= {steady_rss / 2**20:.1f} MiB (projected)"
            )
            print(
                f"targets: <= 1 % of one core: {'met' if cpu <= 0.01 else 'MISSED'}; "
                f"<= 80 MB RSS: {'met' if steady_rss <= 80e6 else 'MISSED'} (projected steady state); "
                f"above the baseline: +{(cpu - base_cpu) * 100:.2f} % of one core, RSS {rss / base_rss:.2f}x"
            )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
