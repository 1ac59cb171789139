"""Counting routed tokens per *physical slot*, so per-GPU load stays right after a rebalance.

A router's output says which *logical* expert each token goes to. Once a rebalance
gives hot experts replicas on several GPUs, an expert's tokens are split among its
replicas, and "expert -> GPU" no longer tells where the load lands. Engines that
replicate experts dispatch each routed (token, k) to one replica, a physical slot
(vLLM's EPLB: `logical_to_physical_map`; the test worker: `SlotDispatch`); that
dispatch is what the probe must count to measure each GPU's load, as vLLM's own EPLB
counters do.

A `SlotSpec` names that dispatch module for one MoE layer, how to read its output
(global slot ids, any shape, on the device) and the GPU label of every global slot.
Slot -> GPU is fixed for the life of the process (a rebalance changes which expert a
slot holds, never where the slot is), so the labels are read once at attach.

The default finder covers engines whose experts module exposes `dispatch` (an
`nn.Module` returning global slot ids) and `slot_gpus` (the GPU of every global slot):
`sentinel.sim.worker`'s `ExpertParallelExperts` does. Other engines pass
`slot_finder=` to `attach`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from sentinel.probe.routers import RouterSpec

__all__ = [
    "SlotFinder",
    "SlotSpec",
    "default_slot_finder",
    "slot_layout",
    "slot_router_specs",
    "tokens_per_gpu_by_slot",
]


@dataclass(frozen=True)
class SlotSpec:
    """One layer's dispatch module: its output is the global slot of every routed assignment."""

    layer: int
    module: nn.Module
    gpus: tuple[str, ...]  # GPU label of each global slot
    extract_slots: Callable[[Any], torch.Tensor] = lambda output: output
    name: str = ""


SlotFinder: TypeAlias = Callable[[nn.Module, Sequence[RouterSpec]], Sequence[SlotSpec]]


def default_slot_finder(model: nn.Module, routers: Sequence[RouterSpec]) -> list[SlotSpec]:
    """Dispatch modules of experts that expose `dispatch` and `slot_gpus` (see the module doc)."""
    del model
    found: list[SlotSpec] = []
    for spec in routers:
        experts = spec.experts
        dispatch = getattr(experts, "dispatch", None) if experts is not None else None
        gpus = getattr(experts, "slot_gpus", None)
        if not isinstance(dispatch, nn.Module) or not isinstance(gpus, Sequence) or not gpus:
            continue
        name = f"{spec.experts_name}.dispatch" if spec.experts_name else "dispatch"
        found.append(SlotSpec(spec.layer, dispatch, tuple(str(g) for g in gpus), name=name))
    return found


def slot_router_specs(slots: Sequence[SlotSpec]) -> list[RouterSpec]:
    """The slot counters as `RouterSpec`s, so `ExpertCounters` counts them like experts."""
    layers = [s.layer for s in slots]
    if len(set(layers)) != len(layers):
        raise ValueError(f"two slot dispatch modules claim the same layer index: {sorted(layers)}")
    return [
        RouterSpec(
            layer=s.layer,
            module=s.module,
            num_experts=len(s.gpus),
            top_k=1,
            extract_indices=s.extract_slots,
            name=s.name,
        )
        for s in slots
    ]


def tokens_per_gpu_by_slot(counts: Sequence[int], gpus: Sequence[str]) -> dict[str, int]:
    """Sum of a layer's slot counts per GPU; every GPU with a slot appears, idle ones as 0."""
    out = dict.fromkeys(gpus, 0)
    for slot, n in enumerate(counts):
        out[gpus[slot]] += n
    return out


def slot_layout(slots: Sequence[SlotSpec]) -> Mapping[int, tuple[str, ...]]:
    """Layer -> the GPU of each of its global slots."""
    return {s.layer: s.gpus for s in slots}
