"""Daemon side of the probe: reports over real HTTP become series, events and replies (no torch)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from sentinel.collectors.probe_access import ProbeAccess
from sentinel.collectors.probe_reports import (
    EVENT_DOWN,
    EVENT_OOM,
    EVENT_REPORT,
    PROBE_METRICS,
    REPORT_PATH,
    ReportError,
    parse_report,
)
from sentinel.remediation.backend import BackendError, LiveControl
from sentinel.store import is_stale_marker
from tests.support import eventually_async as eventually
from tests.test_probe_support import Daemon, series_labels, serve_registry

GIB = 1024**3


def report(seq: int = 1, **overrides: Any) -> dict[str, Any]:
    """A valid interval report of worker w0: two layers on two GPUs."""
    body: dict[str, Any] = {
        "version": 1,
        "kind": "interval",
        "worker": "w0",
        "probe_id": "p1",
        "seq": seq,
        "interval_s": 1.0,
        "time": time.time(),
        "batch_limit": None,
        "report_failures_total": 0,
        "hook_errors_total": 0,
        "layers": [
            {
                "layer": 0,
                "tokens": 100,
                "balancedness": 0.5,
                "hot_experts": [{"expert": 3, "tokens": 60, "tokens_total": 600}],
            },
            {"layer": 1, "tokens": 100, "balancedness": 0.9, "hot_experts": []},
        ],
        "gpus": {
            "0": {
                "tokens_total": 1200,
                "num_ooms": 0,
                "num_alloc_retries": 2,
                "allocated_bytes": 3 * GIB,
                "reserved_bytes": 4 * GIB,
            },
            "1": {"tokens_total": 800},
        },
        "oom": None,
    }
    body.update(overrides)
    return body


def oom_report(seq: int, num_ooms: int, **overrides: Any) -> dict[str, Any]:
    return report(
        seq,
        kind="oom",
        layers=[],
        gpus={"0": {"num_ooms": num_ooms, "allocated_bytes": 4 * GIB, "reserved_bytes": 4 * GIB}},
        oom={"gpu": "0", "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB."},
        **overrides,
    )


async def post(
    daemon: Daemon, body: object, path: str = REPORT_PATH, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST a report over the daemon's unix socket, as the probe does by default."""
    connector = aiohttp.UnixConnector(path=daemon.socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post("http://localhost" + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_interval_report_writes_catalogue_series_and_answers_no_opinion() -> None:
    async with serve_registry() as d:
        status, reply = await post(d, report(batch_limit=32))
        assert status == 200
        assert reply == {"batch_limit": None}
        assert d.value("sentinel_probe_up", worker="w0") == 1
        assert d.value("sentinel_probe_batch_limit", worker="w0") == 32
        assert d.value("sentinel_moe_balancedness", worker="w0", layer="0") == 0.5
        assert d.value("sentinel_moe_balancedness", worker="w0", layer="1") == 0.9
        assert d.value("sentinel_moe_expert_tokens_total", worker="w0", layer="0", expert="3") == 600
        assert d.value("sentinel_moe_gpu_tokens_total", worker="w0", gpu="0") == 1200
        assert d.value("sentinel_moe_gpu_tokens_total", worker="w0", gpu="1") == 800
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 0
        assert d.value("sentinel_probe_alloc_retries_total", worker="w0", gpu="0") == 2
        assert d.value("sentinel_probe_memory_allocated_bytes", worker="w0", gpu="0") == 3 * GIB
        assert d.value("sentinel_probe_memory_reserved_bytes", worker="w0", gpu="0") == 4 * GIB
        assert d.value("sentinel_probe_memory_fragmentation_ratio", worker="w0", gpu="0") == pytest.approx(0.25)
        # GPU 1 reported no allocator counters: no allocator series for it.
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="1") is None
        last = d.value("sentinel_probe_last_report_timestamp_seconds", worker="w0")
        assert last is not None and abs(last - time.time()) < 30
        for name, type_, _ in PROBE_METRICS:
            meta = d.store.meta(name)
            assert meta is not None and meta.type == type_
        (event,) = d.names(EVENT_REPORT)
        assert event.labels == {"worker": "w0"}
        assert event.value == 0.5
        assert event.metrics == ("sentinel_moe_balancedness",)
        assert "layer 0" in event.message


async def test_idle_layer_writes_no_balancedness_and_the_old_value_goes_stale() -> None:
    async with serve_registry() as d:
        await post(d, report(1))
        idle = [{"layer": 0, "tokens": 0, "balancedness": None, "hot_experts": []}]
        await post(d, report(2, layers=idle))
        series = d.store.get(series_labels("sentinel_moe_balancedness", worker="w0", layer="0"))
        assert series is not None and series.last_value is not None and is_stale_marker(series.last_value)
        assert d.names(EVENT_REPORT)[-1].metrics == ()


async def test_hot_expert_series_are_capped_per_layer() -> None:
    hot = [{"expert": e, "tokens": 10 - e, "tokens_total": 100 - e} for e in range(6)]
    layers = [{"layer": 0, "tokens": 45, "balancedness": 0.8, "hot_experts": hot}]
    async with serve_registry(hot_experts_max=2) as d:
        await post(d, report(layers=layers))
        names = {dict(s.labels)["expert"] for s in d.store.latest("sentinel_moe_expert_tokens_total")}
        assert names == {"0", "1"}


async def test_oom_report_publishes_probe_cuda_oom_at_once_and_keeps_other_series() -> None:
    async with serve_registry() as d:
        await post(d, report(1))
        status, reply = await post(d, oom_report(2, num_ooms=1))
        assert status == 200 and reply == {"batch_limit": None}
        (event,) = d.names(EVENT_OOM)
        assert event.labels == {"worker": "w0", "gpu": "0"}
        assert event.metrics == ("sentinel_probe_cuda_ooms_total",)
        assert event.value == 1
        assert "CUDA out of memory" in event.message
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 1
        assert d.value("sentinel_probe_memory_fragmentation_ratio", worker="w0", gpu="0") == 0
        # An OOM report is not a full pass: the worker's other series stay live.
        assert d.value("sentinel_moe_balancedness", worker="w0", layer="0") == 0.5
        # A periodic report built before the OOM but arriving after it never pulls
        # the counter back, and is no news.
        await post(d, report(3))
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 1
        assert len(d.names(EVENT_OOM)) == 1


async def test_oom_report_without_allocator_count_counts_itself() -> None:
    async with serve_registry() as d:
        body = oom_report(1, 0)
        body["gpus"] = {}
        await post(d, body)
        await post(d, {**body, "seq": 2})
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 2
        assert [e.value for e in d.names(EVENT_OOM)] == [1, 2]


async def test_periodic_report_with_more_ooms_than_seen_is_an_oom_event() -> None:
    async with serve_registry() as d:
        await post(d, report(1))
        gpus = report()["gpus"]
        gpus["0"]["num_ooms"] = 3
        await post(d, report(2, gpus=gpus))
        (event,) = d.names(EVENT_OOM)
        assert event.value == 3 and "3 CUDA out-of-memory" in event.message
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 3


async def test_probe_seen_first_mid_life_gives_an_oom_baseline_not_an_event() -> None:
    # Sentinel restarted: the probe's old OOMs were news to the previous Sentinel.
    async with serve_registry() as d:
        gpus = report()["gpus"]
        gpus["0"]["num_ooms"] = 5
        await post(d, report(40, gpus=gpus))
        assert d.names(EVENT_OOM) == []
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 5


async def test_restarted_probe_starts_its_counts_afresh() -> None:
    async with serve_registry() as d:
        gpus = report()["gpus"]
        gpus["0"]["num_ooms"] = 5
        await post(d, report(1, gpus=gpus))
        assert len(d.names(EVENT_OOM)) == 1
        gpus["0"]["num_ooms"] = 1
        await post(d, report(1, probe_id="p2", gpus=gpus))
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 1
        assert len(d.names(EVENT_OOM)) == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": 2}, "report.version"),
        ({"kind": "weird"}, "report.kind"),
        ({"worker": ""}, "report.worker"),
        ({"seq": -1}, "report.seq"),
        ({"interval_s": 0}, "report.interval_s"),
        ({"batch_limit": "8"}, "report.batch_limit"),
        ({"layers": {}}, "report.layers"),
        ({"layers": [{"layer": 0, "tokens": 1, "balancedness": 1.5}]}, "report.layers[0].balancedness"),
        ({"layers": [{"layer": 0, "tokens": 1, "balancedness": None, "hot_experts": [{}]}]}, "hot_experts[0]"),
        ({"gpus": {"0": {"tokens_total": True}}}, "gpus['0'].tokens_total"),
        ({"kind": "oom", "oom": None}, "report.oom"),
    ],
)
async def test_malformed_report_is_refused_with_the_field_named(change: dict[str, Any], field: str) -> None:
    async with serve_registry() as d:
        status, reply = await post(d, report(**change))
        assert status == 400
        assert field in reply["error"]
        assert d.registry.rejected_total == 1
        assert d.store.latest("sentinel_probe_up") == []


async def test_body_that_is_not_json_is_refused() -> None:
    async with (
        serve_registry() as d,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=d.socket)) as session,
        session.post(
            "http://localhost" + REPORT_PATH, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 400


def test_parse_report_accepts_the_documented_shape() -> None:
    parsed = parse_report(report())
    assert parsed.worker == "w0" and [layer.layer for layer in parsed.layers] == [0, 1]
    assert parsed.gpus["1"].num_ooms is None
    with pytest.raises(ReportError):
        parse_report([])


async def test_unconfigured_worker_is_refused() -> None:
    async with serve_registry(access=ProbeAccess.with_tokens({"w1": None})) as d:
        status, reply = await post(d, report())
        assert status == 403 and "'w0' is not configured" in reply["error"]
        assert d.store.latest("sentinel_probe_up") == []


async def test_silent_probe_goes_down_after_three_intervals_and_its_series_go_stale() -> None:
    async with serve_registry() as d:
        await post(d, report(interval_s=0.1))
        assert d.registry.supports_live_batch_limit("w0")
        # 3 intervals = 0.3 s; the watchdog looks every 0.5 s. Generous for a busy box.
        await eventually(lambda: d.value("sentinel_probe_up", worker="w0") == 0)
        assert d.value("sentinel_probe_up", worker="w0") == 0
        assert not d.registry.supports_live_batch_limit("w0")
        assert d.value("sentinel_probe_last_report_timestamp_seconds", worker="w0") is not None
        bal = d.store.get(series_labels("sentinel_moe_balancedness", worker="w0", layer="0"))
        assert bal is not None and bal.last_value is not None and is_stale_marker(bal.last_value)
        (event,) = d.names(EVENT_DOWN)
        assert event.labels == {"worker": "w0"} and event.metrics == ("sentinel_probe_up",)
        await post(d, report(2, interval_s=0.1))
        assert d.value("sentinel_probe_up", worker="w0") == 1


async def test_registry_is_the_live_control_of_remediation() -> None:
    async with serve_registry() as d:
        assert isinstance(d.registry, LiveControl)
        assert not d.registry.supports_live_batch_limit("w0")
        with pytest.raises(BackendError, match="no live probe"):
            await d.registry.set_batch_limit("w0", 8)


async def test_a_probe_without_a_live_batch_limit_is_not_the_live_control_of_reduce_batch() -> None:
    # vLLM's plugin: the probe reports, but the scheduler that would apply a limit runs
    # in another process; reduce_batch must restart on a profile instead.
    async with serve_registry() as d:
        status, reply = await post(d, report(live_batch_limit=False))
        assert status == 200 and reply["batch_limit"] is None
        assert d.registry.probe_up("w0")
        assert not d.registry.supports_live_batch_limit("w0")
        with pytest.raises(BackendError, match="cannot change the batch limit live"):
            await d.registry.set_batch_limit("w0", 8)
        await post(d, report(2))  # the field defaults to true (probes before it existed)
        assert d.registry.supports_live_batch_limit("w0")


async def test_set_batch_limit_is_delivered_in_the_reply_and_resolves_on_acknowledgement() -> None:
    async with serve_registry() as d:
        await post(d, report(1))
        setter = asyncio.create_task(d.registry.set_batch_limit("w0", 8))
        await asyncio.sleep(0.05)
        assert not setter.done()
        _, reply = await post(d, report(2))  # a report sent before the probe knew
        assert reply == {"batch_limit": 8}
        await asyncio.sleep(0.05)
        assert not setter.done()
        await post(d, report(3, batch_limit=8))  # the probe applied it
        await asyncio.wait_for(setter, 1)
        assert d.value("sentinel_probe_batch_limit", worker="w0") == 8
        assert d.registry.desired_batch_limit("w0") == 8
        # Already in force: returns at once.
        await asyncio.wait_for(d.registry.set_batch_limit("w0", 8), 0.5)


async def test_set_batch_limit_without_acknowledgement_times_out() -> None:
    async with serve_registry(ack_timeout_s=0.2) as d:
        await post(d, report(1))
        started = time.monotonic()
        with pytest.raises(BackendError, match="did not acknowledge batch limit 4"):
            await d.registry.set_batch_limit("w0", 4)
        assert time.monotonic() - started < 2


async def test_a_newer_limit_supersedes_a_pending_one() -> None:
    async with serve_registry() as d:
        await post(d, report(1))
        first = asyncio.create_task(d.registry.set_batch_limit("w0", 16))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(d.registry.set_batch_limit("w0", 8))
        with pytest.raises(BackendError, match="superseded"):
            await asyncio.wait_for(first, 1)
        await post(d, report(2, batch_limit=8))
        await asyncio.wait_for(second, 1)
        d.registry.clear_batch_limit("w0")
        _, reply = await post(d, report(3, batch_limit=8))
        assert reply == {"batch_limit": None}


async def test_reports_arrive_over_the_unix_socket_site() -> None:
    async with serve_registry() as d:
        assert os.stat(d.socket).st_mode & 0o777 == 0o660
        status, _ = await post(d, report())
        assert status == 200
        assert d.value("sentinel_probe_up", worker="w0") == 1


async def test_status_lists_every_worker_that_reported() -> None:
    async with serve_registry() as d:
        await post(d, report(batch_limit=8))
        (entry,) = d.registry.status()
        assert entry["worker"] == "w0" and entry["up"] is True and entry["batch_limit"] == 8
        assert entry["desired_batch_limit"] is None


def test_daemon_side_never_imports_torch() -> None:
    code = "import sentinel.collectors.probe_reports, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_fragmentation_is_zero_when_nothing_is_reserved() -> None:
    async with serve_registry() as d:
        await post(d, report(gpus={"0": {"allocated_bytes": 0, "reserved_bytes": 0}}))
        assert d.value("sentinel_probe_memory_fragmentation_ratio", worker="w0", gpu="0") == 0
