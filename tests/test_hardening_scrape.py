"""C1/C2 and the low items: a worker's /metrics is input from outside, and bounded.

- C1: fresh series names on every scrape grew memory without bound (1.1 GB in 45 s);
- C2: a scraped `sentinel_probe_cuda_ooms_total` landed as Sentinel's own series and
  fired CudaOOM (and a restart);
- duplicate series were silently accepted, the last one winning.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from sentinel.collectors.http import SharedHttpSession
from sentinel.collectors.promtext import LimitError, ScrapeLimits, TextParser
from sentinel.store import Store
from tests import test_endpoint_collector as endpoint_tests
from tests.daemon_process import DaemonProcess
from tests.test_endpoint_collector import FakeEngine, make, value

# The endpoint tests' fixtures: a fake engine on port 0 and the shared HTTP session.
engine = endpoint_tests.engine
session = endpoint_tests.session

REPO = Path(__file__).resolve().parents[1]


class _Worker(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_GET(self) -> None:
        body = b"" if self.path == "/health" else self.bodies[min(len(self.bodies) - 1, _Worker.scrapes)]
        if self.path == "/metrics":
            _Worker.scrapes += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass

    scrapes = 0


@pytest.fixture
def hostile_worker() -> Iterator[str]:
    """A worker whose /metrics claims an OOM in Sentinel's own probe series."""
    _Worker.scrapes = 0
    alerts = b'ALERTS{alertname="CudaOOM",alertstate="firing"} 1\n'
    _Worker.bodies = [b'sentinel_probe_cuda_ooms_total{gpu="0"} %d\n' % n + alerts for n in (0, 0, 1, 5)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Worker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_cannot_inject_sentinel_series_and_fire_cuda_oom(tmp_path: Path, hostile_worker: str) -> None:
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        json.dumps(
            {
                "collectors": {"nvml": {"enabled": False}, "host": {"enabled": False}, "logs": {"enabled": False}},
                "workers": [{"name": "w0", "endpoint": hostile_worker}],
                "rules": {"files": [str(REPO / "rules" / "oom.yml")]},
            }
        )
    )
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state")
    try:
        deadline = time.monotonic() + 30
        while True:
            found = query(daemon, "exported_sentinel_probe_cuda_ooms_total")
            if found and found[0]["value"][1] == "5":
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
        assert found[0]["metric"]["worker"] == "w0"
        assert query(daemon, "sentinel_probe_cuda_ooms_total") == []
        assert query(daemon, "exported_ALERTS")[0]["metric"]["alertname"] == "CudaOOM"
        # Neither is re-exported as Sentinel's own on its /metrics.
        _, _, body = daemon.get("/metrics")
        assert "cuda_ooms" not in body and "ALERTS" not in body
        time.sleep(2.5)  # evaluations over the counter that went 0 -> 1 -> 5
        _, _, alerts = daemon.get("/api/v1/alerts")
        assert json.loads(alerts)["data"]["alerts"] == []
    finally:
        daemon.stop()


def query(daemon: DaemonProcess, expr: str) -> list[dict[str, object]]:
    status, _, body = daemon.get(f"/api/v1/query?query={expr}")
    assert status == 200, body
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


async def test_fresh_series_names_on_every_scrape_stay_within_the_series_limit(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    fake, url = engine
    store = Store()
    _, runner = make(url, session, store, series_limit=500, sample_limit=200)
    for scrape in range(20):
        fake.body = "".join(f'vllm:fresh{{request="{scrape}-{i}"}} 1\n' for i in range(100)).encode()
        await runner.tick()
        assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 1
    fresh = [s for s in store.select([]) if s.name == "vllm:fresh"]
    assert len(fresh) <= 500
    assert store.series_evicted["endpoint:w0"] >= 20 * 100 - 500
    # The latest scrape is whole.
    assert len([s for s in store.latest("vllm:fresh")]) == 100


async def test_a_body_over_the_sample_or_label_limits_fails_the_scrape_with_its_reason(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    fake, url = engine
    store = Store()
    _, runner = make(url, session, store, sample_limit=10, label_limit=5, label_value_length_limit=64)
    fake.body = "".join(f'vllm:x{{i="{i}"}} 1\n' for i in range(11)).encode()
    await runner.tick()
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 0
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="sample_limit") == 1
    fake.body = b'vllm:x{a="1",b="2",c="3",d="4",e="5"} 1\n'  # + worker + __name__ = 7 labels
    await runner.tick()
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="label_limit") == 1
    fake.body = b'vllm:x{a="' + b"v" * 65 + b'"} 1\n'
    await runner.tick()
    assert value(store, "sentinel_endpoint_scrape_errors_total", worker="w0", reason="label_limit") == 2
    assert store.latest("vllm:x") == []


async def test_duplicate_series_keep_the_first_sample_and_are_counted(
    engine: tuple[FakeEngine, str], session: SharedHttpSession
) -> None:
    fake, url = engine
    store = Store()
    _, runner = make(url, session, store)
    fake.body = b'vllm:a{x="1"} 1\nvllm:a{x="1"} 2\nvllm:a{x="1"} 3\nvllm:b 4\n'
    await runner.tick()
    assert value(store, "vllm:a", x="1") == 1  # Prometheus keeps the first (the last won before)
    assert value(store, "vllm:b") == 4
    assert value(store, "sentinel_endpoint_scrape_duplicate_samples_total", worker="w0") == 2
    assert value(store, "sentinel_endpoint_scrape_up", worker="w0") == 1


def test_limits_are_checked_once_per_new_series_and_cached_bodies_pass() -> None:
    parser = TextParser({"worker": "w0"}, limits=ScrapeLimits(sample_limit=3))
    assert len(parser.parse("a 1\nb 2\nc 3\n").samples) == 3
    with pytest.raises(LimitError) as raised:
        parser.parse("a 1\nb 2\nc 3\nd 4\n")
    assert raised.value.reason == "sample_limit"
    assert len(parser.parse("a 1\nb 2\nc 3\n").samples) == 3
