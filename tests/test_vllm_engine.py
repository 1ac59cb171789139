"""Sentinel supervising a real vLLM (CPU build, from `make vllm-env`) with its process backend.

One Sentinel and one vLLM serve the whole module (vLLM takes a minute or more to start
on 2 cores; every restart Sentinel orders costs another): the tests run in file order,
each leaving the engine serving for the next. Faults are real operations on the engine
(SIGSTOP/SIGKILL of its model worker, more long requests than its KV cache holds); see
sentinel.demo.vllm, which this module drives scenario by scenario.

Skipped with a how-to where the environment is missing, failed under CI=true.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml

from sentinel.collectors.endpoint import VLLM_RENAMED
from sentinel.demo.common import Timeline
from sentinel.demo.vllm import FAULTS, REDUCED_SEQS, VllmHarness
from sentinel.sim.vllm_env import VllmEnv, VllmEnvMissing, find_vllm_env
from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]
FAULT = {f.name: f for f in FAULTS}

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(1800),
]


def _env() -> VllmEnv:
    try:
        return find_vllm_env()
    except VllmEnvMissing as exc:
        if IN_CI:
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def harness() -> AsyncIterator[VllmHarness]:
    env = _env()
    # The timeline goes to stderr: pytest shows it with a failing test's output.
    async with VllmHarness(env, Timeline(time.monotonic(), sys.stderr, quiet=False)) as h:
        yield h


def _add_rule_file(harness: VllmHarness, groups: dict[str, object]) -> int:
    """Add a rule file to the running config (for a reload); returns the worker log's size now."""
    rule_file = harness.tmp / "rules" / "zz-drill.yml"
    rule_file.write_text(yaml.safe_dump(groups))
    config = yaml.safe_load(Path(harness.config_path).read_text())
    config["rules"]["files"].append(str(rule_file))
    Path(harness.config_path).write_text(yaml.safe_dump(config, sort_keys=False))
    return harness.log_file.stat().st_size


async def harness_sleep(seconds: float = 0.5) -> None:
    await asyncio.sleep(seconds)


def _store_values(h: VllmHarness, name: str, **labels: str) -> list[float]:
    return [s.value for s in h.daemon.store.latest(name) if all(dict(s.labels).get(k) == v for k, v in labels.items())]


def _named_vllm_series() -> dict[str, set[str]]:
    """Every `vllm:` series named in rules/, grafana/, docs/ and the package -> where."""
    legacy = {old for old, _ in VLLM_RENAMED}
    found: dict[str, set[str]] = {}
    globs = ("rules/*.yml", "grafana/**/*.json", "docs/*.md", "README.md", "sentinel/**/*.py")
    for pattern in globs:
        for path in REPO.glob(pattern):
            for name in re.findall(r"vllm:[a-z0-9_]+", path.read_text()):
                if not any(name.startswith(old) for old in legacy):
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def _families(exposition: str) -> set[str]:
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("vllm:"):
            sample = re.split(r"[{ ]", line, maxsplit=1)[0]
            names.add(sample)
            names.add(re.sub(r"_(total|bucket|count|sum|created)$", "", sample))
        elif line.startswith("# TYPE vllm:"):
            names.add(line.split()[2])
    return names


async def test_every_vllm_series_sentinel_names_is_in_the_real_exposition(harness: VllmHarness) -> None:
    assert await harness.complete(max_tokens=4)
    async with harness.http.get(harness.worker_url + "/metrics") as r:
        assert r.status == 200
        exposition = await r.text()
    real = _families(exposition)
    named = _named_vllm_series()
    assert len(named) >= 10, named
    missing = {name: sorted(where) for name, where in named.items() if name not in real}
    assert not missing, f"named by Sentinel but absent from vLLM {harness.env.vllm_version}'s /metrics: {missing}"


async def test_health_and_scraped_series_land_in_the_store_under_the_worker_label(harness: VllmHarness) -> None:
    async with harness.http.get(harness.worker_url + "/health") as r:
        assert r.status == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _store_values(harness, "vllm:generation_tokens_total", worker="vllm"):
        await harness_sleep()
    assert _store_values(harness, "sentinel_endpoint_up", worker="vllm") == [1.0]
    assert _store_values(harness, "sentinel_endpoint_scrape_up", worker="vllm") == [1.0]
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"):
        assert _store_values(harness, name, worker="vllm"), f"{name} not scraped into the store"
    # The progress tracker reads vLLM's own counters: the engine is judged, not skipped.
    assert _store_values(harness, "sentinel_endpoint_last_progress_timestamp_seconds", worker="vllm")
    assert _store_values(harness, "sentinel_endpoint_stalled", worker="vllm") == [0.0]


# -- Sentinel's probe inside vLLM's worker (sentinel.probe.vllm_plugin) ----------------------

TOP_K, MOE_LAYERS = 2, 2  # the tiny Qwen3-MoE (sentinel.sim.vllm_model)
_VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total")


def _live(values: list[float]) -> list[float]:
    return [v for v in values if v == v]  # a stale marker is a NaN


@dataclass(frozen=True)
class _QuietPoint:
    """A moment with no request in vLLM, after which a probe report was taken."""

    at: float  # monotonic: the receipt of the probe report that covers everything before it
    counters: tuple[float, ...]  # vLLM's own token and request counters then
    gpu_tokens: float  # Sentinel's sentinel_moe_gpu_tokens_total{gpu="cpu"} then


async def _vllm_counters(h: VllmHarness) -> tuple[float, ...] | None:
    values = [await h.engine_metric(name) for name in (*_VLLM_COUNTERS, "vllm:num_requests_running")]
    if any(v is None for v in values) or values[-1] != 0:
        return None
    return tuple(v for v in values[:-1] if v is not None)


async def _quiet_point(h: VllmHarness, deadline_s: float = 240.0) -> _QuietPoint:
    """vLLM idle, then two probe reports (the second was snapshotted after the first
    arrived, so after the idle moment), then vLLM's counters unchanged: the counts up to
    that report are exactly those of the requests finished before it. A canary request
    that slips in between makes it try again."""
    placements = h.daemon.probes.placements
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        before = await _vllm_counters(h)
        since = time.monotonic()
        while len(placements.loads_since("vllm", since)) < 2 and time.monotonic() < deadline:
            await harness_sleep(0.1)
        loads = placements.loads_since("vllm", since)
        after = await _vllm_counters(h)
        if before is not None and before == after and len(loads) >= 2:
            tokens = _live(_store_values(h, "sentinel_moe_gpu_tokens_total", worker="vllm", gpu="cpu"))
            assert len(tokens) == 1, tokens
            return _QuietPoint(loads[1].at, before, tokens[0])
    raise AssertionError(f"vLLM never went quiet with the probe reporting for {deadline_s:g}s")


async def _completion(h: VllmHarness, prompt: str, max_tokens: int) -> dict[str, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with h.http.post(h.worker_url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=300)) as r:
        assert r.status == 200, await r.text()
        usage: dict[str, int] = (await r.json())["usage"]
        return usage


async def test_the_probe_plugin_counts_the_experts_vllm_routes_and_reports_them(harness: VllmHarness) -> None:
    if not harness.env.has_probe_plugin():
        how = f"Sentinel's vLLM plugin is not installed in {harness.env.root}: run `make vllm-env`"
        if IN_CI:
            pytest.fail(how, pytrace=False)
        pytest.skip(how)
    # vLLM loaded the plugin in its worker process, which attached to its Qwen3-MoE.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _store_values(harness, "sentinel_probe_up", worker="vllm") != [1.0]:
        await harness_sleep()
    assert _store_values(harness, "sentinel_probe_up", worker="vllm") == [1.0]
    log_text = harness.log_file.read_text(errors="replace")
    assert re.search(r"Worker pid=\d+\).*Sentinel probe attached to Qwen3MoeForCausalLM \(2 MoE layers\)", log_text)
    # vLLM's scheduler is in another process: the probe must not pose as a live batch knob.
    assert harness.daemon.probes.probe_up("vllm")
    assert not harness.daemon.probes.supports_live_batch_limit("vllm")

    start = await _quiet_point(harness)
    # Requests one after another until each layer's balancedness and hottest experts have
    # reached the store (they are per-interval series: present while the layer routes).
    usages: list[dict[str, int]] = []
    enough = asyncio.Event()

    async def send() -> None:
        while not enough.is_set():
            usages.append(await _completion(harness, f"the probe watches answer {len(usages)}", 24))

    sender = asyncio.create_task(send())
    balanced: dict[str, list[float]] = {}
    hot: dict[str, list[float]] = {}
    deadline = time.monotonic() + 240
    while (len(balanced) < MOE_LAYERS or len(hot) < MOE_LAYERS) and time.monotonic() < deadline:
        assert not sender.done() or sender.exception() is None, sender.exception()
        for layer in map(str, range(MOE_LAYERS)):
            values = _live(_store_values(harness, "sentinel_moe_balancedness", worker="vllm", layer=layer))
            if values:
                balanced[layer] = values
            tokens = _live(_store_values(harness, "sentinel_moe_expert_tokens_total", worker="vllm", layer=layer))
            if tokens:
                hot[layer] = tokens
        await harness_sleep(0.1)
    enough.set()
    await sender  # the request in flight finishes: its tokens are counted below
    more = (("a", 3), ("expert " * 20, 9), ("b c", 17))
    usages += await asyncio.gather(*(_completion(harness, prompt, n) for prompt, n in more))
    end = await _quiet_point(harness)

    # One CPU "GPU" holds every expert: each layer's balancedness is 1 whenever it routed.
    assert balanced == {layer: [1.0] for layer in map(str, range(MOE_LAYERS))}, balanced
    # vLLM forwards each request's prompt and every generated token but the last.
    ours = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usages)
    prompt, generated, finished = (b - a for a, b in zip(start.counters, end.counters, strict=True))
    forwarded = int(prompt + generated - finished)  # ours, plus any canary that slipped in
    assert finished >= len(usages) and forwarded >= ours
    if finished == len(usages):
        assert forwarded == ours
    # Per layer: every forwarded token was routed to top_k experts, each counted once.
    loads = [m for m in harness.daemon.probes.placements.loads_since("vllm", start.at) if m.at <= end.at]
    per_layer = [sum(m.layers[i][0] for m in loads) for i in range(MOE_LAYERS)]
    assert per_layer == [TOP_K * forwarded] * MOE_LAYERS, (per_layer, forwarded, usages)
    # The same total reached Sentinel's metrics.
    assert end.gpu_tokens - start.gpu_tokens == MOE_LAYERS * TOP_K * forwarded
    # The hottest experts of each layer (at most 4 of 8) with their running totals.
    assert sorted(hot) == ["0", "1"] and all(0 < len(v) <= 4 and min(v) > 0 for v in hot.values()), hot


async def test_stall_under_load_is_detected_restarted_and_serving_again(harness: VllmHarness) -> None:
    result = await harness.play(FAULT["stall-load"])
    assert result.alert == "EngineStalled", result
    assert result.action == "restart", result
    assert result.recovered_at is not None, result
    assert await harness.complete(max_tokens=4)


async def test_stall_while_idle_is_seen_by_the_canary_restarted_and_serving_again(harness: VllmHarness) -> None:
    before = sum(_store_values(harness, "sentinel_canary_requests_total", worker="vllm", outcome="timeout"))
    result = await harness.play(FAULT["stall-idle"])
    assert result.alert == "EngineStalled", result
    assert result.action == "restart", result
    assert result.recovered_at is not None, result
    after = sum(_store_values(harness, "sentinel_canary_requests_total", worker="vllm", outcome="timeout"))
    assert after > before, "the stall was not seen through a canary timeout"
    assert await harness.complete(max_tokens=4)


async def test_engine_death_is_detected_from_its_log_and_endpoint_restarted_and_serving_again(
    harness: VllmHarness,
) -> None:
    result = await harness.play(FAULT["engine-death"])
    assert result.alert in ("EngineDead", "WorkerDown", "EndpointDown"), result
    assert result.action == "restart", result
    assert result.recovered_at is not None, result
    # The real log lines reached the catalogue: vLLM's own words for a dead engine.
    log_text = harness.log_file.read_text(errors="replace")
    assert "EngineCore encountered a fatal error" in log_text
    assert "EngineDeadError" in log_text
    assert sum(_store_values(harness, "sentinel_log_events_total", worker="vllm", event="engine_dead")) >= 1
    assert await harness.complete(max_tokens=4)


async def test_kv_cache_pressure_reduces_the_batch_and_the_preemptions_stop(harness: VllmHarness) -> None:
    result = await harness.play(FAULT["kv-pressure"])
    assert result.alert in ("KVCachePreempting", "KVCacheSaturated"), result
    assert result.action == "reduce_batch", result
    assert result.recovered_at is not None, result
    rows = [a for a in harness.actions if a["action"] == "reduce_batch" and a["outcome"] == "succeeded"]
    assert rows and rows[-1]["profile_before"] == "full" and rows[-1]["profile_after"] == "reduced"
    assert f"--max-num-seqs {REDUCED_SEQS}" in harness.log_file.read_text(errors="replace")
    assert harness.phases["kv-pressure"].preemptions_after == 0, harness.phases["kv-pressure"]
    await harness.stop_loads()


async def test_quantized_fallback_serves_the_int8_checkpoint(harness: VllmHarness) -> None:
    # An operator's drill: a rule whose action is quantized_fallback, added by a reload.
    drill = {
        "groups": [
            {
                "name": "drill",
                "interval": "1s",
                "rules": [
                    {
                        "alert": "QuantizedFallbackDrill",
                        # Once: it stops firing when the worker runs its quantized profile.
                        "expr": 'sentinel_worker_profile{worker="vllm", profile="int8"} == 0',
                        "for": "2s",
                        "labels": {"severity": "warning", "action": "quantized_fallback"},
                        "annotations": {"summary": "drill"},
                    }
                ],
            }
        ]
    }
    log_size = _add_rule_file(harness, drill)
    started = time.time()
    assert await harness.daemon.reload()
    deadline = time.monotonic() + 900
    row = None
    while time.monotonic() < deadline:
        remediator = harness.daemon.healing.remediator
        assert remediator is not None
        rows = await remediator.actions_json(limit=20, worker="vllm")
        done = [r for r in rows if r["action"] == "quantized_fallback" and r["started"] >= started and r["outcome"]]
        if done:
            row = done[0]
            break
        await harness_sleep(1.0)
    assert row is not None and row["outcome"] == "succeeded", row
    assert row["profile_after"] == "int8"
    assert await harness.wait_serving(600)
    after = harness.log_file.read_bytes()[log_size:].decode(errors="replace")
    assert "tiny-qwen3-moe-int8" in after
    assert "CompressedTensorsW8A8Int8" in after  # vLLM chose its int8 linear kernel
