"""Finding the MoE routers of a model, and reading the experts each token was sent to.

transformers 5.x MoE blocks (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 and the
families copied from them) hold a `gate` router module next to an `experts` module; the
router returns `(router_logits, routing_weights, selected_experts)`, the last an int64
`(tokens, top_k)` tensor. In 4.x the same `gate` was a bare `nn.Linear` returning logits
(the block took the top-k itself, `config.num_experts_per_tok` of them), and 4.x
DeepSeek-V3 returned `(topk_indices, topk_weights)`. `default_router_finder` handles all
of these with one rule: a module with a `gate` (or `router`) child and an `experts`
child is an MoE block; the router's output is read by dtype, not position: the first
integer tensor is the expert indices, and a lone float tensor is logits whose top-k we
take ourselves.

Custom models pass `router_finder=` to `sentinel.probe.attach`: a function from the
model to a list of `RouterSpec`s or plain tuples
`(layer_index, router_module, num_experts, top_k, extract_indices)`, where
`extract_indices(router_output) -> Tensor` returns the expert index of every routed
(token, slot), any shape, values in `[0, num_experts]` (`num_experts` itself is the
"not counted" bucket that expert-parallel code uses for experts living on other
ranks). It runs inside the forward pass: it must stay on the device (no `.item()`,
`.cpu()`, `.tolist()`), or the probe would add a host-device synchronisation per step.

    def my_routers(model):
        return [
            (i, block.router, 64, 6, lambda out: out.expert_ids)
            for i, block in enumerate(model.blocks)
        ]

    probe = sentinel.probe.attach(model, worker="w0", sentinel="unix:/run/sentinel/probe.sock",
                                  router_finder=my_routers)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import torch
from torch import nn

__all__ = [
    "IndexExtractor",
    "RouterFinder",
    "RouterSpec",
    "RouterTuple",
    "default_router_finder",
    "find_routers",
    "indices_from_output",
    "normalize_specs",
]

log = logging.getLogger(__name__)

IndexExtractor: TypeAlias = Callable[[Any], torch.Tensor]
"""Maps a router module's forward output to the expert indices it chose (on the device)."""

RouterTuple: TypeAlias = tuple[int, nn.Module, int, int, IndexExtractor]
"""`(layer_index, router_module, num_experts, top_k, extract_indices)`."""


@dataclass(frozen=True)
class RouterSpec:
    """One hooked router: which layer it routes, over how many experts, and how to read it.

    `experts` is the module holding that layer's expert weights, used to find the GPU
    each expert lives on; `name` is the router's qualified module name (for messages).
    """

    layer: int
    module: nn.Module
    num_experts: int
    top_k: int
    extract_indices: IndexExtractor
    name: str = ""
    experts: nn.Module | None = None
    experts_name: str = ""
    # Engines whose router is not a module (vLLM's FusedMoERouter) offer a callback on the
    # routed expert ids instead of a forward hook: `install(count)` registers `count(ids)`
    # and returns a function that unregisters it.
    install: Callable[[Callable[[Any], None]], Callable[[], None]] | None = None


RouterFinder: TypeAlias = Callable[[nn.Module], Sequence[RouterSpec | RouterTuple]]

_ROUTER_ATTRS = ("gate", "router")
# Attribute names transformers configs use for the number of routed experts and top-k.
_NUM_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_ATTRS = ("num_experts_per_tok", "top_k", "moe_top_k", "moe_topk", "num_selected_experts")
_INT_COMPONENT = re.compile(r"^\d+$")


def indices_from_output(output: Any, top_k: int) -> torch.Tensor:
    """The expert indices in a router's output, whatever its layout (see module docstring).

    Runs in the forward hook: only attribute checks and, for logits, one `topk` kernel.
    """
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            return torch.topk(output, top_k, dim=-1).indices
        return output
    if isinstance(output, (tuple, list)):
        logits: torch.Tensor | None = None
        for item in output:
            if isinstance(item, torch.Tensor):
                if not item.is_floating_point():
                    return item
                if logits is None:
                    logits = item
        if logits is not None:
            return torch.topk(logits, top_k, dim=-1).indices
    raise TypeError(f"router output of type {type(output).__name__} holds no expert indices")


def _config_int(config: object, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _module_int(modules: Sequence[object], names: Sequence[str]) -> int | None:
    for module in modules:
        found = _config_int(module, names)
        if found is not None:
            return found
    return None


def _num_experts(router: nn.Module, block: nn.Module, experts: nn.Module, config: object) -> int | None:
    found = _module_int((router, block, experts), _NUM_EXPERTS_ATTRS)
    if found is not None:
        return found
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        return len(experts)  # 4.x: one module per expert
    if isinstance(router, nn.Linear):
        return router.out_features
    return _config_int(config, _NUM_EXPERTS_ATTRS)


def _top_k(router: nn.Module, block: nn.Module, config: object) -> int | None:
    return _module_int((router, block), _TOP_K_ATTRS) or _config_int(config, _TOP_K_ATTRS)


def _layer_from_name(name: str) -> int | None:
    """The last integer component of a module path: `model.layers.7.mlp` -> 7."""
    numbers = [int(part) for part in name.split(".") if _INT_COMPONENT.match(part)]
    return numbers[-1] if numbers else None


def default_router_finder(model: nn.Module) -> list[RouterSpec]:
    """Routers of the transformers MoE families (4.x and 5.x), in module order."""
    config = getattr(model, "config", None)
    found: list[RouterSpec] = []
    block_names: list[str] = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        for attr in _ROUTER_ATTRS:
            router = getattr(block, attr, None)
            if isinstance(router, nn.Module):
                break
        else:
            continue
        num_experts = _num_experts(router, block, experts, config)
        top_k = _top_k(router, block, config)
        if num_experts is None or top_k is None:
            log.warning("MoE block %s: cannot tell its number of experts or top-k; not hooked", name or "<root>")
            continue
        k = top_k

        def extract(output: Any, k: int = k) -> torch.Tensor:
            return indices_from_output(output, k)

        prefix = f"{name}." if name else ""
        found.append(
            RouterSpec(
                layer=-1,  # numbered below, once every block is known
                module=router,
                num_experts=num_experts,
                top_k=top_k,
                extract_indices=extract,
                name=f"{prefix}{attr}",
                experts=experts,
                experts_name=f"{prefix}experts",
            )
        )
        block_names.append(name)
    layers = [_layer_from_name(name) for name in block_names]
    named = [layer for layer in layers if layer is not None]
    if len(named) != len(layers) or len(set(named)) != len(named):
        # Names do not give one distinct layer per block (nested sub-models, several
        # MoE blocks in one layer): number the blocks in module order instead.
        return [replace(spec, layer=i) for i, spec in enumerate(found)]
    return [replace(spec, layer=layer) for spec, layer in zip(found, named, strict=True)]


def normalize_specs(model: nn.Module, raw: Sequence[RouterSpec | RouterTuple]) -> list[RouterSpec]:
    """Turn a finder's answer into checked `RouterSpec`s (tuples get their module's name)."""
    names = {id(module): name for name, module in model.named_modules()}
    specs: list[RouterSpec] = []
    for item in raw:
        if isinstance(item, RouterSpec):
            spec = item
        else:
            layer, module, num_experts, top_k, extract = item
            spec = RouterSpec(layer, module, num_experts, top_k, extract, names.get(id(module), ""))
        if spec.num_experts <= 0 or spec.top_k <= 0 or spec.top_k > spec.num_experts:
            raise ValueError(
                f"router {spec.name or spec.layer}: num_experts={spec.num_experts}, top_k={spec.top_k} is not valid"
            )
        specs.append(spec)
    layers = [s.layer for s in specs]
    if len(set(layers)) != len(layers):
        raise ValueError(f"two routers claim the same layer index: {sorted(layers)}")
    return specs


def find_routers(model: nn.Module, router_finder: RouterFinder | None = None) -> list[RouterSpec]:
    """Routers to hook: the custom finder's if given, else the transformers families'."""
    raw = (router_finder or default_router_finder)(model)
    return normalize_specs(model, raw)
