"""A tiny random-weight Qwen3-MoE (transformers) on CPU, in full precision or int8.

The architecture is transformers' own `Qwen3MoeForCausalLM`, built from a
`Qwen3MoeConfig` small enough for a shared CI core: 2 decoder layers, each a sparse MoE
block of 16 experts with top-2 routing, hidden size 64, vocabulary 512. Weights are
random (fixed seed) and the model runs in eval mode without gradients. Its experts are
served expert-parallel over 4 virtual devices (`ep.ExpertParallel`): each device has
4 slots for its experts (experts 0-3 on device 0, ...) plus redundant slots, empty
until a new placement fills them; the EPLB line reports the load each device gets.

Two things are changed on the stock model, both on the real modules the probe hooks:

- every router (`mlp.gate`) is a `SkewableRouter`: the transformers router plus a
  per-expert logit bias, zero unless the skew fault sets it. A bias on the logits
  moves every token's choice towards the chosen experts; adding it to the gate's
  weight rows would not, since `w·h` shifts by `bias * sum(h)`, whose sign varies from
  token to token.
- with `quantization="int8"`, the attention projections and the LM head go through
  PyTorch's dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic` on
  `nn.Linear`), and the experts, which transformers 5.x stores as fused 3-D
  parameters (`gate_up_proj`, `down_proj`) rather than `nn.Linear` modules, are
  stored as int8 with one scale per output channel and dequantized, one expert at a
  time, in forward (`Int8Experts`). Routers, norms and the embedding stay in fp32, as
  in vLLM's int8/fp8 schemes. Where `torch.ao.quantization` is gone (it is deprecated
  upstream), linear layers fall back to the same weight-only scheme (`Int8Linear`).

`weight_bytes()` measures the footprint: the bytes of every parameter and buffer, and
for dynamically quantized layers their int8 weights, scales, zero points and biases.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter

from sentinel.sim.worker.ep import ExpertParallel
from sentinel.sim.worker.profile import DEFAULT_REDUNDANT_EXPERTS, DEFAULT_SEED
from sentinel.sim.worker.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE

__all__ = [
    "EP_GROUP_SIZE",
    "Int8Experts",
    "Int8Linear",
    "SkewableRouter",
    "TinyMoe",
    "build_model",
    "expert_to_gpu",
    "quantize_int8",
    "tiny_config",
    "weight_bytes",
]

log = logging.getLogger(__name__)

EP_GROUP_SIZE = 4  # simulated GPUs the experts are spread over
LinearInt8 = Literal["dynamic", "weight_only"]


def tiny_config(max_model_len: int = 256) -> Qwen3MoeConfig:
    """The worker's model shape: 2 layers x 16 experts (top-2), hidden 64, vocabulary 512."""
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim: hidden_size / num_attention_heads = 16
        num_experts=16,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=max_model_len,
        tie_word_embeddings=False,
        eos_token_id=EOS_TOKEN_ID,
    )


def expert_to_gpu(num_experts: int, gpus: int = EP_GROUP_SIZE) -> dict[int, int]:
    """Expert index -> simulated GPU, in contiguous blocks as vLLM places experts without EPLB."""
    per_gpu = max(1, num_experts // gpus)
    return {e: min(e // per_gpu, gpus - 1) for e in range(num_experts)}


class SkewableRouter(Qwen3MoeTopKRouter):
    """transformers' Qwen3-MoE top-k router with a per-expert logit bias (zero unless skewed).

    Returns what the stock router returns, `(logits, scores, indices)`, computed from the
    biased logits, so every consumer of the router's output (the experts, Sentinel's
    probe, the EPLB counters) sees the skew.
    """

    logit_bias: torch.Tensor

    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__(config)  # type: ignore[no-untyped-call]
        self.register_buffer("logit_bias", torch.zeros(self.num_experts), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route each token to its top-k experts; same shapes as `Qwen3MoeTopKRouter.forward`."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight) + self.logit_bias
        router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per output channel (the last dimension is reduced)."""
    scale = weight.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(weight.detach() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class Int8Experts(nn.Module):
    """Qwen3-MoE experts with int8 weights, dequantized one expert at a time in forward.

    Same call as `Qwen3MoeExperts`: `(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`. Only the experts a batch routes to are dequantized,
    so the fp32 copy of one expert is the only transient.
    """

    gate_up_q: torch.Tensor
    gate_up_scale: torch.Tensor
    down_q: torch.Tensor
    down_scale: torch.Tensor

    def __init__(self, experts: Qwen3MoeExperts) -> None:
        super().__init__()
        self.num_experts: int = experts.num_experts
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = experts.act_fn
        gate_up_q, gate_up_scale = _quantize_rows(experts.gate_up_proj)  # [E, 2I, H], [E, 2I, 1]
        down_q, down_scale = _quantize_rows(experts.down_proj)  # [E, H, I], [E, H, 1]
        self.register_buffer("gate_up_q", gate_up_q)
        self.register_buffer("gate_up_scale", gate_up_scale)
        self.register_buffer("down_q", down_q)
        self.register_buffer("down_scale", down_scale)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of each token's routed experts."""
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            token_idx, k_pos = torch.where(top_k_index == expert)
            x = hidden_states[token_idx]
            gate_up = self.gate_up_q[expert].to(x.dtype) * self.gate_up_scale[expert]
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            down = self.down_q[expert].to(x.dtype) * self.down_scale[expert]
            y = F.linear(self.act_fn(gate) * up, down) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class Int8Linear(nn.Module):
    """Weight-only int8 `nn.Linear` (per-output-channel scales), for torch builds without `torch.ao`."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight_q, weight_scale = _quantize_rows(linear.weight)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` with W dequantized from int8."""
        return F.linear(x, self.weight_q.to(x.dtype) * self.weight_scale, self.bias)


@contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    # torch.ao.quantization warns on every use that it is deprecated in favour of torchao
    # (not installed here); the warning says nothing about this worker, so keep stderr clean.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        yield


def _dynamic_linear_type() -> type[nn.Module] | None:
    """The class of a dynamically quantized linear layer; None when `torch.ao` is gone."""
    try:
        with _quiet_torch_ao():
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:
        return None
    return DynamicLinear


def _replace_linears(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += _replace_linears(child)
    return count


def quantize_int8(model: nn.Module, linear: LinearInt8 = "dynamic") -> str:
    """Quantize `model` in place: experts int8 weight-only, `nn.Linear` dynamic (or weight-only).

    Returns how the linear layers were quantized: "dynamic" or "weight_only" (asked for,
    or the fallback when `torch.ao.quantization` is missing).
    """
    for block in list(model.modules()):
        experts = getattr(block, "experts", None)
        if isinstance(experts, Qwen3MoeExperts):
            block.experts = Int8Experts(experts)
    if linear == "dynamic":
        try:
            with _quiet_torch_ao():
                from torch.ao.quantization import quantize_dynamic

                quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)  # type: ignore[no-untyped-call]
            return "dynamic"
        except ImportError:
            log.warning("torch.ao.quantization is not available; int8 linear layers use weight-only int8")
    _replace_linears(model)
    return "weight_only"


def _dynamic_linear_bytes(module: nn.Module) -> int:
    """Bytes of a dynamically quantized linear layer's packed weight: int8 values, scales, zero points, bias."""
    with _quiet_torch_ao():
        weight_fn = getattr(module, "weight")  # noqa: B009 - a method on these modules, not a tensor
        bias_fn = getattr(module, "bias")  # noqa: B009
        qweight: torch.Tensor = weight_fn()
        bias: torch.Tensor | None = bias_fn()
    total = qweight.int_repr().nbytes
    if qweight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        total += 8 + 8  # one double scale, one int64 zero point
    else:
        total += qweight.q_per_channel_scales().nbytes + qweight.q_per_channel_zero_points().nbytes
    if bias is not None:
        total += bias.nbytes
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters, buffers and packed int8 linear weights."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        # Tied or shared tensors count once.
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.nbytes
    dynamic = _dynamic_linear_type()
    if dynamic is not None:
        total += sum(_dynamic_linear_bytes(m) for m in model.modules() if isinstance(m, dynamic))
    return total


@dataclass
class TinyMoe:
    """The built model and the facts the engine and `/admin/state` report about it."""

    model: Qwen3MoeForCausalLM
    config: Qwen3MoeConfig
    routers: list[SkewableRouter]
    quantization: str
    linear_int8: str | None
    weights_bytes: int
    weights_bytes_fp32: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    ep: ExpertParallel

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        return int(self.config.num_experts)

    @property
    def per_token_bytes(self) -> int:
        """Memory one token of one running sequence takes: its KV cache plus its hidden states."""
        return self.kv_bytes_per_token + self.activation_bytes_per_token

    def set_skew(self, experts: tuple[int, ...] | list[int], bias: float) -> None:
        """Add `bias` to the router logits of `experts` in every MoE layer; `()` clears the skew."""
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert indices {bad} out of range 0..{self.num_experts - 1}")
        for router in self.routers:
            router.logit_bias.zero_()
            if experts:
                router.logit_bias[list(experts)] = float(bias)


def build_model(
    quantization: str = "none",
    *,
    seed: int = DEFAULT_SEED,
    max_model_len: int = 256,
    linear_int8: LinearInt8 = "dynamic",
    redundant_experts: int = DEFAULT_REDUNDANT_EXPERTS,
) -> TinyMoe:
    """Build the tiny Qwen3-MoE with random weights from `seed`, quantized when asked.

    `redundant_experts` (vLLM's `num_redundant_experts`) is the number of extra expert
    slots over the expert-parallel group, a multiple of its size.
    """
    if redundant_experts < 0 or redundant_experts % EP_GROUP_SIZE:
        raise ValueError(f"redundant_experts={redundant_experts}: must be a multiple of {EP_GROUP_SIZE} (>= 0)")
    if quantization not in ("none", "int8"):
        raise ValueError(f"unknown quantization {quantization!r}")
    config = tiny_config(max_model_len)
    # The model's attention reads the implementation from the config; sdpa is the CPU default.
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    routers: list[SkewableRouter] = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, Qwen3MoeTopKRouter):
            router = SkewableRouter(config)
            router.weight = gate.weight
            layer.mlp.gate = router
            routers.append(router)
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    fp32_bytes = weight_bytes(model)
    linear_used: str | None = None
    if quantization == "int8":
        linear_used = quantize_int8(model, linear_int8)
    weights = weight_bytes(model)
    ep = ExpertParallel.install(
        model, devices=EP_GROUP_SIZE, redundant_slots_per_device=redundant_experts // EP_GROUP_SIZE
    )
    layers = int(config.num_hidden_layers)
    kv_heads = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return TinyMoe(
        model=model,
        config=config,
        routers=routers,
        quantization=quantization,
        linear_int8=linear_used,
        weights_bytes=weights,
        weights_bytes_fp32=fp32_bytes,
        # keys and values of every layer, fp32: the KV cache stays full precision under int8 weights
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * 4,
        # the residual stream and its normalised copy, fp32
        activation_bytes_per_token=2 * int(config.hidden_size) * 4,
        ep=ep,
    )
