"""End to end: `sentinel demo` on the real pieces detects every fault, heals, and never storms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import require_module

# The demo runs about 2 minutes on 2 cores (the whole loop, five faults, real restarts).
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_run() -> dict[str, list[dict[str, object]]]:
    require_module("torch")
    require_module("transformers")
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel", "demo", "--json"], capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, list[dict[str, object]]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fault(run: dict[str, list[dict[str, object]]], name: str) -> dict[str, object]:
    return next(f for f in run["faults"] if f["fault"] == name)


def test_json_has_one_entry_per_fault_with_the_documented_keys(demo_run: dict[str, list[dict[str, object]]]) -> None:
    assert [f["fault"] for f in demo_run["faults"]] == ["gpu-lost", "oom", "hotspot", "stall", "crash"]
    for f in demo_run["faults"]:
        assert set(f) == {"fault", "injected_at", "detected_at", "alert", "action", "recovered_at"}


@pytest.mark.parametrize(
    ("name", "alerts", "action"),
    [
        ("gpu-lost", {"GPUFallenOffBus", "GPULost"}, "notify_only"),
        ("oom", {"CudaOOM"}, "reduce_batch"),
        ("hotspot", {"MoEExpertImbalance"}, "rebalance_experts"),
        ("stall", {"EngineStalled"}, "restart"),
        ("crash", {"NCCLCollectiveTimeout", "EngineDead"}, "restart"),
    ],
)
def test_each_fault_is_detected_and_gets_the_right_action(
    demo_run: dict[str, list[dict[str, object]]], name: str, alerts: set[str], action: str
) -> None:
    f = fault(demo_run, name)
    assert f["detected_at"] is not None, f
    assert f["alert"] in alerts, f
    assert f["action"] == action, f
    assert float(f["detected_at"]) >= float(f["injected_at"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["oom", "hotspot", "stall", "crash"])
def test_worker_recovers_after_the_action(demo_run: dict[str, list[dict[str, object]]], name: str) -> None:
    f = fault(demo_run, name)
    assert f["recovered_at"] is not None, f
    assert float(f["recovered_at"]) > float(f["detected_at"])  # type: ignore[arg-type]


def test_no_action_storm(demo_run: dict[str, list[dict[str, object]]]) -> None:
    # One verified action per fault that needs one: reduce_batch for the OOM (the
    # EngineDead that came with it must not restart the healed worker), one restart each
    # for the stall and the crash.
    acted = [a for a in demo_run["actions"] if a["outcome"] not in ("skipped", "would_act")]
    assert [(a["action"], a["outcome"]) for a in acted] == [
        ("reduce_batch", "succeeded"),
        ("rebalance_experts", "succeeded"),
        ("restart", "succeeded"),
        ("restart", "succeeded"),
    ], demo_run["actions"]
    oom = next(a for a in acted if a["action"] == "reduce_batch")
    assert (oom["profile_before"], oom["profile_after"]) == ("full", "reduced")


def test_hotspot_is_healed_live_with_measured_balancedness_above_the_threshold(
    demo_run: dict[str, list[dict[str, object]]],
) -> None:
    # The probe measured the skew, the rebalance was planned from its counts, and the
    # balancedness measured under the new placement is above the rule's 0.7.
    figures: dict[str, float] = demo_run["rebalance"]  # type: ignore[assignment]
    assert figures["before"] < 0.7 <= figures["after"], figures
    assert figures["predicted"] >= 0.7, figures
