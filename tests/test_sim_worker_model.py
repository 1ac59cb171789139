"""The simulated worker's parts in-process: model, int8 footprint, engine, faults, text formats."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sentinel.sim.worker.profile import ProfileError, WorkerProfile
from tests.conftest import require_module

require_module("torch")
require_module("transformers")

import torch  # noqa: E402

from sentinel.sim.worker.engine import Completion, EngineDeadError, ServingEngine  # noqa: E402
from sentinel.sim.worker.eplb import balance, tokens_per_gpu  # noqa: E402
from sentinel.sim.worker.formats import format_size, nccl_watchdog_lines, oom_message  # noqa: E402
from sentinel.sim.worker.model import TinyMoe, build_model, expert_to_gpu  # noqa: E402
from sentinel.sim.worker.server import create_app  # noqa: E402

# One intra-op thread: the model is tiny, and threads only contend on a shared 2-core host.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fp32() -> TinyMoe:
    return build_model("none")


def greedy_reference(moe: TinyMoe, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the whole context each time: no cache, no batching."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(moe.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


class Results:
    """Collects engine callbacks; `wait()` until `n` arrived."""

    def __init__(self) -> None:
        self.items: dict[int, Completion | BaseException] = {}
        self._cv = threading.Condition()

    def callback(self, key: int) -> Any:
        def done(result: Completion | BaseException) -> None:
            with self._cv:
                self.items[key] = result
                self._cv.notify_all()

        return done

    def wait(self, n: int, timeout: float = 30.0) -> dict[int, Completion | BaseException]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.items) >= n, timeout), f"{len(self.items)} of {n} results"
        return self.items


class FakeProbe:
    """Stands in for `sentinel.probe`'s handle: a scripted live batch limit and an OOM recorder."""

    def __init__(self, limits: list[int | None]) -> None:
        self.limits = limits  # one value per read; the last one sticks
        self.reads = 0
        self.ooms: list[BaseException] = []

    @property
    def batch_limit(self) -> int | None:
        value = self.limits[min(self.reads, len(self.limits) - 1)]
        self.reads += 1
        return value

    @contextmanager
    def oom_guard(self) -> Iterator[None]:
        try:
            yield
        except torch.OutOfMemoryError as exc:
            self.ooms.append(exc)
            raise


# -- model and quantization --------------------------------------------------------------


def test_int8_profile_has_a_measurably_smaller_footprint_and_still_generates(fp32: TinyMoe) -> None:
    int8 = build_model("int8")
    print(f"\nweights: fp32 {fp32.weights_bytes} bytes, int8 {int8.weights_bytes} bytes ({int8.linear_int8} linear)")
    assert int8.weights_bytes_fp32 == fp32.weights_bytes
    assert int8.weights_bytes * 2.5 < fp32.weights_bytes
    ids = torch.randint(33, 127, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = fp32.model(input_ids=ids).logits
        b = int8.model(input_ids=ids).logits
    assert torch.isfinite(b).all()
    # Quantization noise, not a different model: nearly every greedy choice agrees.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert greedy_reference(int8, [72, 105], 8)


def test_int8_quantizes_the_fused_experts_and_linear_layers() -> None:
    moe = build_model("int8")
    names = {type(m).__name__ for m in moe.model.modules()}
    assert "Int8Experts" in names
    assert "Qwen3MoeExperts" not in names  # transformers 5.x keeps experts as fused 3-D parameters
    assert not any(isinstance(m, torch.nn.Linear) for m in moe.model.modules())
    assert moe.linear_int8 == "dynamic"


def test_linear_layers_fall_back_to_weight_only_int8_without_torch_ao(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # import now raises ImportError
    moe = build_model("int8")
    assert moe.linear_int8 == "weight_only"
    assert {type(m).__name__ for m in moe.model.modules()} >= {"Int8Linear", "Int8Experts"}
    assert moe.weights_bytes * 2.5 < moe.weights_bytes_fp32
    assert greedy_reference(moe, [72, 105], 4)


def test_skew_sends_every_token_to_the_chosen_experts(fp32: TinyMoe) -> None:
    moe = build_model("none")
    engine = ServingEngine(moe, max_num_seqs=4, model_name="m")
    ids = torch.randint(33, 127, (8, 16), generator=torch.Generator().manual_seed(2))
    try:
        with torch.inference_mode():
            moe.model(input_ids=ids)
            spread = engine.expert_load.take_window()
            moe.set_skew((0, 1), 10.0)
            moe.model(input_ids=ids)
            skewed = engine.expert_load.take_window()
    finally:
        engine.stop()
    mapping = expert_to_gpu(moe.num_experts)
    assert balance(tokens_per_gpu(spread, mapping)).balancedness > 0.7
    assert skewed[:, 2:].sum() == 0 and skewed[:, :2].sum() == 2 * 8 * 16 * 2  # layers x tokens x top-2
    assert balance(tokens_per_gpu(skewed, mapping)).balancedness == pytest.approx(0.25)


def test_balancedness_is_mean_over_max_tokens_per_gpu_summed_over_layers() -> None:
    per_gpu = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0]])
    b = balance(per_gpu)
    assert (b.avg_tokens, b.max_tokens) == (20.0, 50.0)
    assert b.balancedness == pytest.approx(0.4)
    assert balance(torch.zeros(2, 4, dtype=torch.int64)).balancedness == 0.0


# -- engine --------------------------------------------------------------------------------


def test_continuous_batching_gives_each_request_its_unbatched_greedy_tokens(fp32: TinyMoe) -> None:
    engine = ServingEngine(fp32, max_num_seqs=3, model_name="m")
    engine.start()
    results = Results()
    prompts = [list(f"prompt {i}{'x' * (i % 4)}".encode()) for i in range(7)]
    try:
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, 6 + i, results.callback(i), ignore_eos=True)
        got = results.wait(len(prompts))
    finally:
        engine.stop()
    assert engine.max_running_seen == 3
    for i, prompt in enumerate(prompts):
        result = got[i]
        assert isinstance(result, Completion)
        assert list(result.token_ids) == greedy_reference(fp32, prompt, 6 + i)
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)


def test_live_probe_limit_caps_running_and_preempted_requests_still_complete(fp32: TinyMoe) -> None:
    # No limit for the first steps (all 6 admitted), then a live limit of 2: four are preempted.
    probe = FakeProbe([None, None, None, 2])
    engine = ServingEngine(fp32, max_num_seqs=8, model_name="m", probe=probe)
    results = Results()
    prompts = [list(f"request {i}".encode()) for i in range(6)]
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, 10, results.callback(i), ignore_eos=True)
    engine.start()
    try:
        got = results.wait(len(prompts))
    finally:
        engine.stop()
    assert engine.preemptions >= 4
    assert engine.batch_limit == 2
    for i, prompt in enumerate(prompts):
        result = got[i]
        assert isinstance(result, Completion)
        assert list(result.token_ids) == greedy_reference(fp32, prompt, 10)  # recomputed after preemption


def test_memory_budget_raises_a_real_oom_the_probe_sees_and_the_engine_dies(fp32: TinyMoe) -> None:
    probe = FakeProbe([None])
    died = threading.Event()
    budget = fp32.weights_bytes + 4 * 20 * fp32.per_token_bytes
    engine = ServingEngine(
        fp32, max_num_seqs=8, model_name="m", probe=probe, memory_budget_bytes=budget, on_dead=lambda _: died.set()
    )
    engine.start()
    results = Results()
    try:
        for i in range(8):
            engine.submit(list(f"prompt number {i:02d}".encode()), 20, results.callback(i), ignore_eos=True)
        assert died.wait(30)
        got = results.wait(8)
    finally:
        engine.stop()
    assert not engine.alive
    assert len(probe.ooms) == 1 and isinstance(probe.ooms[0], torch.OutOfMemoryError)
    assert str(probe.ooms[0]).startswith("CUDA out of memory. Tried to allocate ")
    assert all(isinstance(r, EngineDeadError) for r in got.values())
    assert engine.dead_reason is not None and engine.dead_reason.startswith("torch.OutOfMemoryError: CUDA out of")


def test_crash_hangs_the_loop_then_prints_the_watchdog_lines_and_dies(fp32: TinyMoe) -> None:
    stderr = io.StringIO()
    died = threading.Event()
    engine = ServingEngine(fp32, max_num_seqs=4, model_name="m", stderr=stderr, on_dead=lambda _: died.set())
    engine.start()
    results = Results()
    try:
        engine.submit(list(b"a long request"), 200, results.callback(0), ignore_eos=True)
        time.sleep(0.05)
        started = time.monotonic()
        engine.stall(0.1)  # expires before the crash: the pending crash must keep holding the loop
        engine.crash(after_seconds=0.6)
        time.sleep(0.2)
        steps = engine.steps
        assert died.wait(10)
        waited = time.monotonic() - started
        got = results.wait(1)
    finally:
        engine.stop()
    assert waited >= 0.55 and engine.steps == steps  # no step ran while the collective "hung"
    assert isinstance(got[0], EngineDeadError)
    text = stderr.getvalue()
    assert "Watchdog caught collective operation timeout: WorkNCCL(" in text
    ran = re.search(r"Timeout\(ms\)=600000\) ran for (\d+) milliseconds before timing out\.", text)
    assert ran is not None and int(ran.group(1)) >= 600_000 + 550  # the timeout plus the hang


@pytest.mark.parametrize("profile", ["int8", "batch4"])
def test_the_fallback_profiles_fit_the_budget_the_full_profile_exceeds(fp32: TinyMoe, profile: str) -> None:
    moe = build_model("int8") if profile == "int8" else fp32
    max_num_seqs = 16 if profile == "int8" else 4
    context = len(b"prompt number 000") + 24
    budget = fp32.weights_bytes + 5 * context * fp32.per_token_bytes
    assert fp32.weights_bytes + 16 * context * fp32.per_token_bytes > budget  # the full profile cannot fit
    engine = ServingEngine(moe, max_num_seqs=max_num_seqs, model_name="m", memory_budget_bytes=budget)
    engine.start()
    results = Results()
    try:
        for i in range(16):
            engine.submit(list(f"prompt number {i:03d}".encode()), 24, results.callback(i), ignore_eos=True)
        got = results.wait(16)
    finally:
        engine.stop()
    assert engine.alive
    assert all(isinstance(r, Completion) and r.completion_tokens == 24 for r in got.values())
    assert engine.peak_footprint_bytes <= budget


async def test_health_turns_503_and_completions_fail_once_the_engine_dies(fp32: TinyMoe) -> None:
    engine = ServingEngine(fp32, max_num_seqs=4, model_name="m", memory_budget_bytes=fp32.weights_bytes + 1)
    runner = web.AppRunner(create_app(engine, WorkerProfile(model_name="m")))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    engine.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/health") as resp:
                assert (resp.status, await resp.text()) == (200, "")
            async with http.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}) as resp:
                body = await resp.json()
                assert resp.status == 500 and body["error"]["message"].startswith("EngineCore encountered an issue")
            async with http.get(base + "/health") as resp:
                assert (resp.status, await resp.text()) == (503, "")
            async with http.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}) as resp:
                assert resp.status == 500
    finally:
        engine.stop()
        await runner.cleanup()


def test_requests_longer_than_the_model_are_refused(fp32: TinyMoe) -> None:
    engine = ServingEngine(fp32, max_num_seqs=2, model_name="m", max_model_len=32)
    with pytest.raises(ValueError, match="maximum context length is 32 tokens"):
        engine.submit([65] * 20, 20, lambda _: None)
    engine.stop()


# -- formats and profile -------------------------------------------------------------------


def test_sizes_print_as_pytorch_prints_them() -> None:
    assert format_size(1024) == "1024 bytes"
    assert format_size(1025) == "1.00 KiB"
    assert format_size(20 * 2**20) == "20.00 MiB"
    assert format_size(int(79.19 * 2**30)) == "79.19 GiB"


def test_oom_message_has_pytorchs_shape() -> None:
    text = oom_message(device=0, requested=20 * 2**20, total=80 * 2**30, in_use=79 * 2**30, allocated=77 * 2**30,
                       reserved=78 * 2**30)  # fmt: skip
    assert text.startswith(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 80.00 GiB of which "
        "1024.00 MiB is free. Including non-PyTorch memory, this process has 79.00 GiB memory in use. Of the "
        "allocated memory 77.00 GiB is allocated by PyTorch, and 1024.00 MiB is reserved by PyTorch but unallocated."
    )


def test_watchdog_lines_have_the_glog_prefix_of_formats_md() -> None:
    from datetime import datetime

    lines = nccl_watchdog_lines(
        rank=0, seq=7, numel=1024, timeout_ms=600000, ran_ms=600081, when=datetime(2026, 2, 2, 12, 25, 57, 436000)
    )
    assert lines[0] == (
        "[rank0]:[E202 12:25:57.436 ProcessGroupNCCL.cpp:697] [PG ID 0 PG GUID 0(default_pg) Rank 0] Watchdog caught "
        "collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, NumelIn=1024, NumelOut=1024, "
        "Timeout(ms)=600000) ran for 600081 milliseconds before timing out."
    )
    assert any(line.endswith("To avoid data inconsistency, we are taking the entire process down.") for line in lines)


def test_profile_reads_the_environment_and_lists_every_problem() -> None:
    profile = WorkerProfile.from_env(
        {"MAX_NUM_SEQS": "4", "QUANTIZATION": "INT8", "SENTINEL_PROFILE": "fp8", "SKEW_EXPERTS": "0, 1", "PORT": "0"}
    )
    assert (profile.max_num_seqs, profile.quantization, profile.name) == (4, "int8", "fp8")
    assert (profile.skew_experts, profile.skew_bias, profile.port) == ((0, 1), 10.0, 0)
    assert WorkerProfile.from_env({}).max_num_seqs == 16
    with pytest.raises(ProfileError) as err:
        WorkerProfile.from_env({"MAX_NUM_SEQS": "0", "QUANTIZATION": "fp4", "MEMORY_BUDGET_BYTES": "lots"})
    message = str(err.value)
    for problem in ("MAX_NUM_SEQS=0: must be 1..4096", "QUANTIZATION='fp4'", "MEMORY_BUDGET_BYTES='lots'"):
        assert problem in message
