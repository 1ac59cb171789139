"""The probe on a real CUDA device: no synchronisation in the hooks, pinned snapshots, a real OOM.

Skipped where no GPU is visible (CI has none); run on a GPU machine with
`python -m pytest tests/test_probe_cuda.py`. It needs torch and transformers only (a
stdlib HTTP sink plays the daemon), so it runs where the daemon's dependencies are not
installed.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_module

torch = require_module("torch")
transformers = require_module("transformers")

from sentinel.probe import GpuNamer, attach, find_routers  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXPERTS, TOP_K = 8, 2
# The `gpu` label of cuda:0 as the probe names it (the physical index where
# CUDA_VISIBLE_DEVICES lists one).
GPU0 = GpuNamer(os.environ.get("CUDA_VISIBLE_DEVICES")).cuda(0)


class Sink:
    """Records every JSON report POSTed to it; answers like the daemon, with `limit`."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.limit: int | None = None
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sink.reports.append(body)
                reply = json.dumps({"batch_limit": sink.limit}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()


def cuda_moe() -> Any:
    config = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).to("cuda").eval()


def test_router_hooks_never_synchronise_with_the_device(sink: Sink) -> None:
    model = cuda_moe()
    probe = attach(model, "w0", sink.url, interval_s=60)
    try:
        hidden = torch.randn(64, 32, device="cuda")
        reference = [0] * EXPERTS
        # set_sync_debug_mode("error") raises on any synchronising CUDA call in this
        # thread; only the routers and our hooks run inside it (the model's own expert
        # loop synchronises, which is not ours to judge).
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = [probe.routers[0].module(hidden) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for out in outputs:
            for e, n in enumerate(torch.bincount(out[2].reshape(-1).cpu(), minlength=EXPERTS).tolist()):
                reference[e] += n
        assert probe.token_counts()[0] == reference
    finally:
        probe.close()


def test_counts_on_cuda_equal_the_routers_choices_and_reports_carry_allocator_counters(sink: Sink) -> None:
    model = cuda_moe()
    reference: dict[int, list[int]] = {0: [0] * EXPERTS, 1: [0] * EXPERTS}

    def record(module: Any, args: Any, output: Any, layer: int) -> None:
        for e, n in enumerate(torch.bincount(output[2].reshape(-1).cpu(), minlength=EXPERTS).tolist()):
            reference[layer][e] += n

    handles = [
        spec.module.register_forward_hook(lambda m, a, o, layer=spec.layer: record(m, a, o, layer))
        for spec in find_routers(model)
    ]
    probe = attach(model, "w0", sink.url, interval_s=0.1)
    try:
        with torch.inference_mode():
            for _ in range(20):
                model(torch.randint(0, 128, (4, 16), device="cuda"))
        for handle in handles:
            handle.remove()
        assert probe.token_counts() == reference
        assert probe.report_now()
    finally:
        probe.close()
    last = sink.reports[-1]
    gpu = last["gpus"][GPU0]
    assert gpu["tokens_total"] == 2 * 20 * 4 * 16 * TOP_K
    assert gpu["reserved_bytes"] >= gpu["allocated_bytes"] > 0
    assert gpu["num_ooms"] >= 0 and gpu["num_alloc_retries"] >= 0
    assert len(sink.reports) >= 2


def test_a_real_cuda_oom_is_reported_by_the_guard_and_reraised(sink: Sink) -> None:
    model = cuda_moe()
    probe = attach(model, "w0", sink.url, interval_s=60)
    try:
        before = torch.cuda.memory_stats(0).get("num_ooms", 0)
        with pytest.raises(torch.OutOfMemoryError), probe.oom_guard():
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a pebibyte: refused at once
    finally:
        probe.close()
    (oom,) = [r for r in sink.reports if r["kind"] == "oom"]
    assert oom["oom"]["gpu"] == GPU0 and "CUDA out of memory" in oom["oom"]["message"]
    assert oom["gpus"][GPU0]["num_ooms"] == before + 1
