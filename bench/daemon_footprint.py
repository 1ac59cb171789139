"""The daemon's footprint, to size the unit's MemoryMax=, TasksMax= and LimitNOFILE=.

`sentinel run --simulate healthy-8gpu` with the default rules (rules/*.yml) and one
worker endpoint serving the reference vLLM /metrics body (2,000-odd series) is run in
three phases, and its RSS (VmRSS, peak VmHWM), threads and open descriptors sampled
every second:

1. steady: the configuration above, as on a real 8-GPU host;
2. churn: the worker now serves `sample_limit` fresh series names on every scrape, the
   worst a worker can do within the limits; the store must plateau at `series_limit`;
3. attack: 1,100 idle and slow-header connections on top (C7).

The baseline, measured in the same run, is phase 1: phases 2 and 3 print their ratio
to it. `--json` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = [
    REPO / "shared" / "reference" / "samples" / "vllm-metrics.txt",
    REPO.parent / "shared" / "reference" / "samples" / "vllm-metrics.txt",
]


class Worker(BaseHTTPRequestHandler):
    body = b""
    churn = 0  # fresh series per scrape; 0 serves `body`
    scrapes = 0

    def do_GET(self) -> None:
        if self.path == "/metrics":
            Worker.scrapes += 1
            body = Worker.body
            if Worker.churn:
                n = Worker.scrapes
                body += "".join(f'vllm:churn{{request="{n}-{i}"}} 1\n' for i in range(Worker.churn)).encode()
        else:
            body = b""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def worker(body: bytes) -> Iterator[str]:
    Worker.body = body
    server = ThreadingHTTPServer(("127.0.0.1", 0), Worker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()

    def kb(field: str) -> int:
        m = re.search(rf"{field}:\s+(\d+) kB", status)
        return int(m.group(1)) * 1024 if m else 0

    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss": kb("VmRSS"), "hwm": kb("VmHWM"), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def watch(pid: int, seconds: float) -> dict[str, int]:
    """Peaks over `seconds` of one-second samples."""
    peak = {"rss": 0, "hwm": 0, "threads": 0, "fds": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = sample(pid)
        peak = {k: max(peak[k], now[k]) for k in peak}
        time.sleep(1.0)
    return {**peak, "rss_last": sample(pid)["rss"]}


def attack(port: int, count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            break
        if i % 2:
            with contextlib.suppress(OSError):
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(s)
    return socks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--retention", default="2m", help="store retention (the churn plateau needs one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sample_path = next((p for p in SAMPLE if p.exists()), None)
    body = sample_path.read_bytes() if sample_path else b""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp, worker(body) as url:
        config = Path(tmp) / "sentinel.yaml"
        config.write_text(
            json.dumps(
                {
                    "log": {"level": "warning"},
                    "store": {"retention": args.retention},
                    "collectors": {"nvml": {"kernel_log": "off"}},
                    "workers": [{"name": "qwen3", "gpus": list(range(8)), "endpoint": url, "engine": "vllm"}],
                    "rules": {"files": [str(p) for p in sorted((REPO / "rules").glob("*.yml"))]},
                }
            )
        )
        env = {**os.environ, "STATE_DIRECTORY": str(Path(tmp) / "state")}
        # The unit's descriptor limit is what is being sized: run under the default soft one.
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel", "run", "-c", str(config), "--simulate", "healthy-8gpu",
             "--listen", "127.0.0.1:0", "--log-level", "info"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
        )  # fmt: skip
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        try:
            steady = watch(proc.pid, args.seconds)
            Worker.churn = 5000  # collectors.endpoint.sample_limit
            churn = watch(proc.pid, args.seconds)
            socks = attack(port, 1100)
            try:
                attacked = watch(proc.pid, min(args.seconds, 30.0))
            finally:
                for s in socks:
                    s.close()
        finally:
            proc.terminate()
            proc.wait(10)
    mib = 1024 * 1024
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    for name, phase in (("steady", steady), ("churn", churn), ("attack", attacked)):
        print(
            f"{name:7s} RSS peak {phase['rss'] / mib:6.1f} MiB (last {phase['rss_last'] / mib:6.1f}, "
            f"ratio to steady {phase['rss'] / steady['rss']:.2f})  threads {phase['threads']:3d}  fds {phase['fds']:4d}"
        )
    if args.json:
        print(json.dumps({"steady": steady, "churn": churn, "attack": attacked, "retention": args.retention}))


if __name__ == "__main__":
    main()
