"""Smoke run of bench/race.py: a CUDA OOM line reaches the sink via Sentinel and via Prometheus + Alertmanager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

RACE = Path(__file__).resolve().parent.parent / "bench" / "race.py"


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_race_quick_cuda_oom_reaches_both_paths_and_sentinel_first(tmp_path: Path) -> None:
    require_tool("prometheus", "prometheus")
    require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    out = tmp_path / "race.json"
    # --quick: Prometheus scrapes and evaluates every 5 s, Alertmanager's group_wait is 5 s.
    proc = subprocess.run(
        [sys.executable, str(RACE), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    [oom] = [a for a in result["alerts"] if a["alertname"] == "CudaOOM"]
    sentinel, prometheus = oom["delivered"]["sentinel"], oom["delivered"]["alertmanager"]
    assert sentinel is not None, proc.stdout + proc.stderr
    assert prometheus is not None, proc.stdout + proc.stderr
    assert sentinel < prometheus, proc.stdout
    # Alertmanager holds a new group for group_wait: a faster figure would mean the
    # race measured something other than the fault.
    assert prometheus >= result["settings"]["group_wait_s"], proc.stdout
    assert 0 <= sentinel < 5, proc.stdout
