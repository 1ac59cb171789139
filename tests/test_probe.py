"""The in-worker probe on tiny random-weight transformers MoE models (CPU), against a real daemon side."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import require_module
from tests.support import eventually_async as eventually
from tests.test_probe_support import serve_registry

torch = require_module("torch")
transformers = require_module("transformers")

from torch import nn  # noqa: E402

from sentinel.collectors.probe_reports import EVENT_OOM  # noqa: E402
from sentinel.collectors.probe_reports import REPORT_PATH as DAEMON_REPORT_PATH  # noqa: E402
from sentinel.collectors.probe_reports import REPORT_VERSION as DAEMON_REPORT_VERSION  # noqa: E402
from sentinel.probe import (  # noqa: E402
    GpuNamer,
    Probe,
    RouterSpec,
    attach,
    balancedness,
    expert_placement,
    find_routers,
    is_cuda_oom,
    parse_target,
)
from sentinel.probe.report import REPORT_PATH, REPORT_VERSION, hottest_experts, layer_entries, tokens_per_gpu  # noqa: E402

EXPERTS, TOP_K, VOCAB = 8, 2, 128
FOUR_GPUS = [0, 0, 1, 1, 2, 2, 3, 3]
OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 5.06 MiB is free."
)

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=TOP_K,
    max_position_embeddings=64,
)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": EXPERTS, "moe_intermediate_size": 16}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": EXPERTS, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": EXPERTS}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": EXPERTS}),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "n_routed_experts": EXPERTS,
            "moe_intermediate_size": 16,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "kv_lora_rank": 8,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 4,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
    ),
}


def tiny_moe(family: str = "qwen3_moe", seed: int = 0) -> nn.Module:
    """A 2-layer, 8-expert, top-2 random-weight model of a transformers MoE family."""
    config_name, model_name, extra = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def tokens(batch: int = 4, seq: int = 16, seed: int = 1) -> Any:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def record_router_choices(model: nn.Module) -> tuple[dict[int, Any], Callable[[], None]]:
    """Reference counts from the routers' outputs, taken by an independent hook."""
    reference: dict[int, Any] = {}
    handles = []
    for spec in find_routers(model):

        def hook(module: nn.Module, args: Any, output: Any, layer: int = spec.layer) -> None:
            chosen = output[2] if isinstance(output, tuple) else torch.topk(output, TOP_K, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1).cpu(), minlength=EXPERTS)
            reference[layer] = reference.get(layer, 0) + counts

        handles.append(spec.module.register_forward_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return reference, remove


def bias_towards_four_experts(model: nn.Module, scale: float = 10.0) -> None:
    """Give experts 0..3 large gate rows (+v, -v, +u, -u): every token's top-2 is one of
    {0, 1} and one of {2, 3}, so with two experts per GPU only GPUs 0 and 1 work.

    Large, not huge: beyond ~80 logits apart the softmax underflows to exact zeros and
    top-k then picks among tied zeros, i.e. arbitrary experts."""
    for spec in find_routers(model):
        weight = spec.module.weight
        with torch.no_grad():
            v, u = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(spec.layer))
            v, u = v / v.norm(), u / u.norm()
            weight[0], weight[1], weight[2], weight[3] = scale * v, -scale * v, scale * u, -scale * u


@pytest.fixture
def no_daemon(tmp_path: Path) -> str:
    """A unix socket address nobody listens on (reports fail fast)."""
    return f"unix:{tmp_path / 'nobody.sock'}"


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    """Probes made by a test, all closed afterwards."""
    made: list[Probe] = []
    yield made
    for probe in made:
        probe.close()


# -- discovery and counting ------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routers_of_each_family_are_found_and_counts_equal_their_top_k_choices(
    family: str, no_daemon: str, probes: list[Probe]
) -> None:
    model = tiny_moe(family)
    specs = find_routers(model)
    assert [s.layer for s in specs] == [0, 1]
    assert all(s.num_experts == EXPERTS and s.top_k == TOP_K for s in specs)
    assert all(s.name == f"model.layers.{s.layer}.mlp.gate" for s in specs)
    reference, remove = record_router_choices(model)
    probe = attach(model, "w0", no_daemon, interval_s=60)
    probes.append(probe)
    with torch.no_grad():
        model(tokens(seed=1))
        model(tokens(batch=2, seq=9, seed=2))
    remove()
    counts = probe.token_counts()
    for layer in (0, 1):
        assert counts[layer] == reference[layer].tolist()
        assert sum(counts[layer]) == (4 * 16 + 2 * 9) * TOP_K


def test_counting_works_under_inference_mode(no_daemon: str, probes: list[Probe]) -> None:
    model = tiny_moe()
    probes.append(probe := attach(model, "w0", no_daemon, interval_s=60))
    with torch.inference_mode():
        model(tokens())
    assert sum(probe.token_counts()[0]) == 4 * 16 * TOP_K


class _OldBlock(nn.Module):
    """transformers 4.x layout: `gate` is a bare Linear, experts one module each."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(32, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(EXPERTS))

    def forward(self, x: Any) -> Any:
        logits = self.gate(x)
        weights, chosen = torch.topk(logits.softmax(-1), TOP_K, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(TOP_K):
            for e in range(EXPERTS):
                mask = chosen[..., slot] == e
                out[mask] += weights[..., slot][mask, None] * self.experts[e](x[mask])
        return out


class _OldModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_experts_per_tok=TOP_K)
        self.layers = nn.ModuleList(nn.ModuleDict({"block_sparse_moe": _OldBlock()}) for _ in range(3))

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = x + layer["block_sparse_moe"](x)
        return x


def test_4x_linear_gate_is_found_and_top_k_comes_from_the_config(no_daemon: str, probes: list[Probe]) -> None:
    torch.manual_seed(0)
    model = _OldModel().eval()
    specs = find_routers(model)
    assert [(s.layer, s.num_experts, s.top_k) for s in specs] == [(0, EXPERTS, TOP_K), (1, EXPERTS, TOP_K), (2, 8, 2)]
    x = torch.randn(5, 7, 32)
    expected = torch.bincount(
        torch.topk(model.layers[0]["block_sparse_moe"].gate(x), TOP_K).indices.reshape(-1), minlength=EXPERTS
    )
    probes.append(probe := attach(model, "w0", no_daemon, interval_s=60))
    with torch.no_grad():
        model(x)
    assert probe.token_counts()[0] == expected.tolist()


def test_custom_router_finder_tuples_are_hooked(no_daemon: str, probes: list[Probe]) -> None:
    class Router(nn.Module):
        def forward(self, x: Any) -> dict[str, Any]:
            return {"expert_ids": (x.sum(-1).long().abs() % 4).unsqueeze(-1)}

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.routers = nn.ModuleList(Router() for _ in range(2))

        def forward(self, x: Any) -> None:
            for r in self.routers:
                r(x)

    model = Custom()

    def finder(m: nn.Module) -> list[tuple[int, nn.Module, int, int, Callable[[Any], Any]]]:
        return [(10 + i, r, 4, 1, lambda out: out["expert_ids"]) for i, r in enumerate(m.routers)]

    probes.append(probe := attach(model, "w0", no_daemon, interval_s=60, router_finder=finder))
    assert [r.name for r in probe.routers] == ["routers.0", "routers.1"]
    model(torch.tensor([[1.0], [2.0], [2.0], [7.0]]))
    assert probe.token_counts() == {10: [0, 1, 2, 1], 11: [0, 1, 2, 1]}


def test_custom_finder_with_a_bad_spec_is_refused() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="top_k"):
        find_routers(model, lambda m: [(0, m, 4, 8, lambda out: out)])
    with pytest.raises(ValueError, match="same layer"):
        find_routers(model, lambda m: [(0, m, 4, 1, lambda out: out), (0, m, 4, 1, lambda out: out)])


def test_a_failing_extractor_disables_its_hook_but_never_the_forward_pass(
    no_daemon: str, probes: list[Probe], caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_moe()
    specs = find_routers(model)

    def broken(out: Any) -> Any:
        raise KeyError("no indices here")

    finder = lambda m: [specs[0], RouterSpec(1, specs[1].module, EXPERTS, TOP_K, broken)]  # noqa: E731
    probes.append(probe := attach(model, "w0", no_daemon, interval_s=60, router_finder=finder))
    with caplog.at_level(logging.ERROR, logger="sentinel.probe"), torch.no_grad():
        for _ in range(3):
            model(tokens())
    assert probe.hook_errors_total == 1
    assert len([r for r in caplog.records if "no longer counted" in r.message]) == 1
    assert sum(probe.token_counts()[0]) == 3 * 4 * 16 * TOP_K
    assert sum(probe.token_counts()[1]) == 0


def test_close_removes_the_hooks_and_stops_the_thread(no_daemon: str) -> None:
    model = tiny_moe()
    probe = attach(model, "w0", no_daemon, interval_s=0.05)
    thread = probe._thread
    assert thread is not None and thread.is_alive()
    probe.close()
    assert not thread.is_alive()
    with torch.no_grad():
        model(tokens())
    assert sum(probe.token_counts()[0]) == 0
    assert all(not spec.module._forward_hooks for spec in probe.routers)


# -- placement and balancedness --------------------------------------------------------


def test_placement_follows_hf_device_map_and_cuda_visible_devices() -> None:
    model = _OldModel()
    model.hf_device_map = {"layers.0": 0, "layers.1.block_sparse_moe.experts.7": 1, "layers.1": 0, "layers.2": "cpu"}
    namer = GpuNamer("4,5")
    placement = expert_placement(model, find_routers(model), namer)
    assert placement[0] == ("4",) * EXPERTS
    assert placement[1] == ("4",) * 7 + ("5",)
    assert placement[2] == ("cpu",) * EXPERTS
    assert GpuNamer("GPU-1234,GPU-5678").cuda(1) == "1"  # UUIDs: in-process index kept


def test_user_layout_overrides_and_must_name_every_expert() -> None:
    model = tiny_moe()
    specs = find_routers(model)
    placement = expert_placement(model, specs, GpuNamer(None), {0: FOUR_GPUS})
    assert placement[0] == tuple(str(g) for g in FOUR_GPUS)
    assert placement[1] == ("cpu",) * EXPERTS  # not in the layout: the weights' device
    with pytest.raises(ValueError, match="gives 3 GPUs"):
        expert_placement(model, specs, GpuNamer(None), [0, 1, 2])


def test_balancedness_is_mean_over_max_of_tokens_per_gpu() -> None:
    assert balancedness({"0": 10, "1": 10}) == 1.0
    assert balancedness({"0": 30, "1": 10, "2": 0, "3": 0}) == pytest.approx(10 / 30)
    assert balancedness({"0": 0, "1": 0}) is None
    assert tokens_per_gpu([5, 1, 0, 2], ["a", "a", "b", "c"]) == {"a": 6, "b": 0, "c": 2}
    assert hottest_experts([0, 5, 5, 9], [1, 50, 60, 90], 2) == [
        {"expert": 3, "tokens": 9, "tokens_total": 90},
        {"expert": 1, "tokens": 5, "tokens_total": 50},
    ]


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=16))
def test_balancedness_is_in_0_1_and_1_only_when_even(loads: list[int]) -> None:
    per_gpu = {str(i): n for i, n in enumerate(loads)}
    value = balancedness(per_gpu)
    if max(loads) == 0:
        assert value is None
    else:
        assert value is not None and 0 < value <= 1
        assert (value == 1) == (min(loads) == max(loads))


def test_interval_statistics_use_the_difference_between_snapshots() -> None:
    layers = layer_entries({0: [10, 10, 0, 0]}, {0: [20, 40, 0, 0]}, {0: ["0", "0", "1", "1"]}, hot=1)
    assert layers == [
        {
            "layer": 0,
            "tokens": 40,
            "balancedness": 0.5,
            "hot_experts": [{"expert": 1, "tokens": 30, "tokens_total": 40}],
            "expert_tokens": [10, 30, 0, 0],
        }
    ]


def test_slot_counts_give_the_per_gpu_load_after_replication() -> None:
    # Expert 1 is hot and has a replica on GPU 1 (slot 3): by expert -> GPU all of its
    # 30 tokens would land on GPU 0 (0.5); counted per slot, they split 15/15.
    layers = layer_entries(
        {0: [10, 10, 0, 0]},
        {0: [20, 40, 0, 0]},
        {0: ["0", "0", "1", "1"]},
        hot=1,
        slots_previous={0: [10, 10, 0, 0]},
        slots_current={0: [20, 25, 0, 15]},
        slot_gpus={0: ["0", "0", "1", "1"]},
    )
    assert layers[0]["balancedness"] == 0.8  # GPU 0: 10 + 15 = 25, GPU 1: 15
    assert layers[0]["expert_tokens"] == [10, 30, 0, 0]  # the planner's input stays logical


async def test_biased_router_drops_balancedness_below_0_7_at_the_daemon() -> None:
    async with serve_registry() as d:
        balanced, skewed = tiny_moe(seed=0), tiny_moe(seed=0)
        bias_towards_four_experts(skewed)
        fair = attach(balanced, "fair", d.url, interval_s=30, expert_to_gpu=FOUR_GPUS)
        hot = attach(skewed, "hot", d.url, interval_s=30, expert_to_gpu=FOUR_GPUS)
        try:

            def run() -> None:
                with torch.no_grad():
                    balanced(tokens(8, 32))
                    skewed(tokens(8, 32))
                assert fair.report_now() and hot.report_now()

            await asyncio.to_thread(run)
        finally:
            fair.close()
            hot.close()
        for layer in ("0", "1"):
            low = d.value("sentinel_moe_balancedness", worker="hot", layer=layer)
            high = d.value("sentinel_moe_balancedness", worker="fair", layer=layer)
            assert low is not None and low < 0.7
            assert low == pytest.approx(0.5, abs=0.05)  # GPUs 0 and 1 busy, 2 and 3 idle
            assert high is not None and high > 0.8
        idle = sum(d.value("sentinel_moe_gpu_tokens_total", worker="hot", gpu=g) or 0 for g in ("2", "3"))
        busy = sum(d.value("sentinel_moe_gpu_tokens_total", worker="hot", gpu=g) or 0 for g in ("0", "1"))
        assert busy + idle == 2 * (8 * 32 * TOP_K)  # both layers
        assert idle < 0.05 * busy
        hot_experts = {
            dict(s.labels)["expert"]
            for s in d.store.latest("sentinel_moe_expert_tokens_total")
            if dict(s.labels)["worker"] == "hot"
        }
        assert hot_experts <= {"0", "1", "2", "3"}


# -- reporting to a real daemon side ---------------------------------------------------


async def test_reports_reach_the_daemon_every_interval_and_land_in_the_store() -> None:
    async with serve_registry() as d:
        model = tiny_moe()
        probe = attach(model, "w0", d.url, interval_s=0.2)
        try:

            def serve() -> None:
                with torch.no_grad():
                    for _ in range(4):
                        model(tokens())
                        time.sleep(0.1)

            await asyncio.to_thread(serve)
            await eventually(lambda: probe.reports_sent_total >= 3)
        finally:
            probe.close()
        assert probe.reports_sent_total >= 3 and probe.report_failures_total == 0
        assert d.value("sentinel_probe_up", worker="w0") == 1
        assert d.value("sentinel_moe_gpu_tokens_total", worker="w0", gpu="cpu") == 2 * 4 * 4 * 16 * TOP_K
        assert d.value("sentinel_probe_report_failures_total", worker="w0") == 0
        # Hot experts were reported while tokens flowed (idle intervals name none).
        assert "sentinel_moe_expert_tokens_total" in d.store.names()
        assert d.registry.supports_live_batch_limit("w0")


async def test_unreachable_daemon_is_counted_logged_once_and_retried(
    tmp_path: Path, probes: list[Probe], caplog: pytest.LogCaptureFixture
) -> None:
    sock = tmp_path / "later.sock"
    model = tiny_moe()
    probes.append(probe := attach(model, "w0", f"unix:{sock}", interval_s=60))
    with caplog.at_level(logging.WARNING, logger="sentinel.probe"):
        assert not probe.report_now()
        assert not probe.report_now()
    assert probe.report_failures_total == 2
    assert len([r for r in caplog.records if "cannot report" in r.message]) == 1
    async with serve_registry() as d:
        await d.registry.start_unix_site(str(sock))
        assert await asyncio.to_thread(probe.report_now)
        assert d.value("sentinel_probe_report_failures_total", worker="w0") == 2


async def test_oom_guard_reports_at_once_and_reraises() -> None:
    async with serve_registry() as d:
        model = tiny_moe()
        probe = attach(model, "w0", d.url, interval_s=60)  # no periodic report in this test
        try:

            def oom() -> float:
                with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"), probe.oom_guard():
                    raise torch.OutOfMemoryError(OOM_TEXT)
                return time.monotonic()

            raised_at = time.monotonic()
            returned_at = await asyncio.to_thread(oom)
        finally:
            probe.close()
        (event,) = d.names(EVENT_OOM)
        assert event.labels == {"worker": "w0", "gpu": "0"}
        assert event.metrics == ("sentinel_probe_cuda_ooms_total",)
        assert "Tried to allocate 20.00 MiB" in event.message
        assert returned_at - raised_at < 2.0  # synchronous, short timeout: well before any interval
        assert d.value("sentinel_probe_cuda_ooms_total", worker="w0", gpu="0") == 1


def test_oom_guard_ignores_other_errors_and_survives_an_absent_daemon(no_daemon: str, probes: list[Probe]) -> None:
    probes.append(probe := attach(tiny_moe(), "w0", no_daemon, interval_s=60))
    with pytest.raises(ValueError), probe.oom_guard():
        raise ValueError("not memory")
    assert probe.report_failures_total == 0
    with pytest.raises(RuntimeError), probe.oom_guard():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")  # older builds
    assert probe.report_failures_total == 1
    assert is_cuda_oom(torch.OutOfMemoryError("x")) and not is_cuda_oom(RuntimeError("x"))


async def test_batch_limit_set_by_sentinel_reaches_the_probe_and_is_acknowledged() -> None:
    interval = 0.25
    seen: list[int] = []
    async with serve_registry() as d:
        probe = attach(tiny_moe(), "w0", d.url, interval_s=interval, on_batch_limit=seen.append)
        try:
            assert await eventually(lambda: d.registry.supports_live_batch_limit("w0"))
            assert probe.batch_limit is None
            started = time.monotonic()
            await asyncio.wait_for(d.registry.set_batch_limit("w0", 8), 10)
            acked_after = time.monotonic() - started
        finally:
            probe.close()
        assert probe.batch_limit == 8 and seen == [8]
        # Delivered by the next reply, confirmed by the report after it: ~2 intervals.
        assert acked_after < 2 * interval + 1.5
        assert d.value("sentinel_probe_batch_limit", worker="w0") == 8


def test_a_limit_set_by_the_serving_loop_survives_a_reply_without_opinion(no_daemon: str) -> None:
    probe = Probe("w0", parse_target(no_daemon), [], {}, namer=GpuNamer(None))
    probe.batch_limit = 12
    probe._apply_reply({"batch_limit": None})
    assert probe.batch_limit == 12
    probe._apply_reply({"batch_limit": -3})
    assert probe.batch_limit == 12
    probe._apply_reply({"batch_limit": 4})
    assert probe.batch_limit == 4


async def test_a_probe_without_a_live_batch_limit_says_so_and_ignores_the_daemons_limit() -> None:
    async with serve_registry() as d:
        probe = attach(tiny_moe(), "w0", d.url, interval_s=0.25, live_batch_limit=False)
        try:
            assert await eventually(lambda: d.registry.probe_up("w0"))
            assert not d.registry.supports_live_batch_limit("w0")
        finally:
            probe.close()
    probe._apply_reply({"batch_limit": 4})
    assert probe.batch_limit is None


def test_targets_and_report_constants_match_the_daemon() -> None:
    assert REPORT_PATH == DAEMON_REPORT_PATH and REPORT_VERSION == DAEMON_REPORT_VERSION
    assert parse_target("http://127.0.0.1:9400").describe() == "http://127.0.0.1:9400" + REPORT_PATH
    assert parse_target("unix:/run/sentinel/probe.sock").unix_socket == "/run/sentinel/probe.sock"
    assert parse_target("/run/x.sock").unix_socket == "/run/x.sock"
    with pytest.raises(ValueError):
        parse_target("https://example.com")
    with pytest.raises(ValueError):
        parse_target("unix:relative.sock")


def test_forward_hooks_never_touch_the_host_between_reports(no_daemon: str, probes: list[Probe]) -> None:
    """The reporter's copy is the only read of the counters: the hooks only enqueue kernels.

    On CPU there is no device to synchronise with; this checks the property the CUDA
    path relies on, that a hook returns without reading a tensor's value.
    """
    model = tiny_moe()
    probes.append(probe := attach(model, "w0", no_daemon, interval_s=60))
    reads: list[str] = []
    caller = threading.get_ident()
    host_reads = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in host_reads}

    def spy(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == caller:
                reads.append(name)
            return fn(self, *args, **kwargs)

        return wrapper

    specs = probe.routers
    x = torch.randn(64, 32)
    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, spy(name, fn))
        with torch.no_grad():
            for spec in specs:
                spec.module(x)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert reads == []
    assert sum(probe.token_counts()[0]) == 64 * TOP_K


def test_paused_holds_the_reporter_until_the_block_ends(no_daemon: str, probes: list[Probe]) -> None:
    probes.append(probe := attach(tiny_moe(), "w0", no_daemon, interval_s=0.05))
    with probe.paused():
        failures = probe.report_failures_total
        time.sleep(0.3)  # six intervals: an unpaused reporter would have tried six times
        assert probe.report_failures_total == failures
    deadline = time.monotonic() + 5
    while probe.report_failures_total == failures and time.monotonic() < deadline:
        time.sleep(0.02)
    assert probe.report_failures_total > failures
