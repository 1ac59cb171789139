"""The daemon as a real subprocess: scrape, promtool, signals, systemd notify."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tool
from tests.daemon_process import DaemonProcess


def samples(body: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def wait_for_metric(
    daemon: DaemonProcess, predicate: object, timeout: float = 15
) -> dict[str, list[tuple[dict[str, str], float]]]:
    deadline = time.monotonic() + timeout
    last: dict[str, list[tuple[dict[str, str], float]]] = {}
    while time.monotonic() < deadline:
        _, _, body = daemon.get("/metrics")
        last = samples(body)
        if predicate(last):  # type: ignore[operator]
            return last
        time.sleep(0.2)
    raise AssertionError(f"condition not met; last scrape had {sorted(last)}")


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[DaemonProcess]:
    config = tmp_path / "sentinel.yaml"
    config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\n")
    daemon = DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=tmp_path / "state")
    daemon.config_path = config  # type: ignore[attr-defined]
    yield daemon
    daemon.stop()


def test_simulated_host_reports_all_eight_gpus(simulated: DaemonProcess) -> None:
    metrics = wait_for_metric(simulated, lambda m: len(m.get("sentinel_gpu_up", [])) == 8)
    assert all(v == 1 for _, v in metrics["sentinel_gpu_up"])
    assert {labels["gpu"] for labels, _ in metrics["sentinel_gpu_utilization_ratio"]} == {str(i) for i in range(8)}
    assert metrics["sentinel_gpus_visible"][0][1] == 8
    status, _, body = simulated.get("/api/v1/gpus")
    assert status == 200 and body.count('"uuid"') == 8


def test_metrics_pass_promtool_check_metrics(simulated: DaemonProcess) -> None:
    promtool = require_tool("promtool", "prometheus")
    wait_for_metric(
        simulated, lambda m: len(m.get("sentinel_gpu_up", [])) == 8 and "sentinel_host_memory_used_bytes" in m
    )
    _, content_type, body = simulated.get("/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_openmetrics_by_content_negotiation(simulated: DaemonProcess) -> None:
    _, content_type, body = simulated.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_health_and_readiness_endpoints(simulated: DaemonProcess) -> None:
    assert simulated.get("/-/healthy")[0] == 200
    # Ready once the collectors and rules have started, a moment after the port opens.
    deadline = time.monotonic() + 10
    while simulated.get("/-/ready")[0] != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.05)


def test_sighup_with_broken_config_keeps_running(simulated: DaemonProcess) -> None:
    config: Path = simulated.config_path  # type: ignore[attr-defined]
    config.write_text("collectors:\n  nvml:\n    interval: never\n")
    simulated.signal(signal.SIGHUP)
    simulated.wait_for_log(r"reload failed, keeping the running config")
    simulated.wait_for_log(r"collectors\.nvml\.interval: invalid duration")
    assert simulated.proc.poll() is None
    metrics = wait_for_metric(
        simulated, lambda m: m.get("sentinel_config_last_reload_successful", [({}, 1)])[0][1] == 0
    )
    assert len(metrics["sentinel_gpu_up"]) == 8
    # A good file is then picked up.
    config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\n    interval: 2s\n")
    simulated.signal(signal.SIGHUP)
    simulated.wait_for_log(r"configuration reloaded")
    wait_for_metric(simulated, lambda m: m.get("sentinel_config_last_reload_successful", [({}, 0)])[0][1] == 1)


@pytest.mark.wallclock
def test_sigterm_exits_zero_within_two_seconds(simulated: DaemonProcess) -> None:
    wait_for_metric(simulated, lambda m: "sentinel_gpu_up" in m)
    started = time.monotonic()
    simulated.signal(signal.SIGTERM)
    rc = simulated.proc.wait(5)
    elapsed = time.monotonic() - started
    assert rc == 0
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop"


@pytest.mark.wallclock
def test_hung_driver_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    daemon = DaemonProcess("--simulate", "hung-driver", state_dir=tmp_path)
    try:
        # Let the scenario's hang start, then stop while a call is blocked.
        wait_for_metric(daemon, lambda m: any(v == 0 for _, v in m.get("sentinel_gpu_up", [])), timeout=30)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(5) == 0
        assert time.monotonic() - started < 2.0
    finally:
        daemon.stop()


def test_systemd_notify_ready_and_watchdog(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    daemon = DaemonProcess(
        "--simulate",
        "healthy-8gpu",
        state_dir=tmp_path / "state",
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )
    try:
        received: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            any("READY=1" in d for d in received) and sum("WATCHDOG=1" in d for d in received) >= 2
        ):
            received.append(sock.recv(4096).decode())
        assert any(d.startswith("READY=1") and "STATUS=serving" in d for d in received), received
        assert sum("WATCHDOG=1" in d for d in received) >= 2, received
        daemon.signal(signal.SIGHUP)
        reload_msgs = [sock.recv(4096).decode() for _ in range(2)]
        assert any("RELOADING=1" in m for m in reload_msgs), reload_msgs
        daemon.signal(signal.SIGTERM)
        tail = []
        while True:
            try:
                tail.append(sock.recv(4096).decode())
            except TimeoutError:
                break
            if any("STOPPING=1" in m for m in tail):
                break
        assert any("STOPPING=1" in m for m in tail), tail
    finally:
        daemon.stop()
        sock.close()


def test_without_a_driver_nvml_is_down_with_its_reason_and_the_rest_runs(tmp_path: Path) -> None:
    config = tmp_path / "sentinel.yaml"
    config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\n")
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state")
    try:
        metrics = wait_for_metric(
            daemon, lambda m: any(labels.get("collector") == "nvml" for labels, _ in m.get("sentinel_collector_up", []))
        )
        up = {labels["collector"]: v for labels, v in metrics["sentinel_collector_up"]}
        if up["nvml"] == 1:
            pytest.skip("this machine has a working NVIDIA driver")
        assert up["host"] == 1
        daemon.wait_for_log(re.compile(r"collector nvml failed: .*NVML"))
        status, _, body = daemon.get("/api/v1/collectors")
        assert status == 200 and "NVML" in body
    finally:
        assert daemon.stop() == 0


def test_sighup_with_unchanged_config_keeps_alerts_firing(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n  - name: gpu\n    rules:\n      - alert: GpuUp\n        expr: sentinel_gpu_up == 1\n")
    config = tmp_path / "sentinel.yaml"
    config.write_text(f"collectors:\n  nvml:\n    kernel_log: 'off'\nrules:\n  files: ['{rules}']\n")
    daemon = DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=tmp_path / "state")
    try:

        def firing() -> dict[str, str]:
            _, _, body = daemon.get("/api/v1/alerts")
            alerts = json.loads(body)["data"]["alerts"]
            return {a["labels"]["gpu"]: a["activeAt"] for a in alerts if a["state"] == "firing"}

        deadline = time.monotonic() + 15
        while len(before := firing()) < 8:
            assert time.monotonic() < deadline, before
            time.sleep(0.2)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log(r"configuration reloaded")
        for _ in range(15):  # three seconds of evaluations after the reload
            assert firing() == before
            time.sleep(0.2)
    finally:
        daemon.stop()
