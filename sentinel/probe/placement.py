"""Where each expert runs: the GPU label of every (layer, expert).

Balancedness is a per-GPU quantity, so the probe needs the GPU of every expert. In
order of precedence it comes from: the user's expert-parallel layout (`expert_to_gpu`,
for layouts the weights do not show, e.g. one process per rank); the model's
`hf_device_map` (accelerate's dispatch, which also covers offloaded modules whose
weights sit on `meta`); the device of the expert weights themselves (4.x keeps one
module per expert, 5.x one fused 3-D tensor per layer, i.e. all of a layer's experts on
one device); and last the router's own device.

GPU labels match the NVML collector's `gpu` label (the physical NVML index): a CUDA
device index inside the process is translated through `CUDA_VISIBLE_DEVICES` when that
lists plain indices. With UUIDs there, the in-process index is kept (documented limit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

import torch
from torch import nn

from sentinel.probe.routers import RouterSpec

__all__ = ["ExpertLayout", "GpuNamer", "expert_placement", "module_device"]

ExpertLayout: TypeAlias = Sequence[int | str] | Mapping[int, Sequence[int | str]]
"""The GPU of each expert: one sequence for every layer, or a sequence per layer index."""


class GpuNamer:
    """Turns torch devices (and `hf_device_map` values) into `gpu` label values."""

    def __init__(self, cuda_visible_devices: str | None) -> None:
        parts = [p.strip() for p in (cuda_visible_devices or "").split(",") if p.strip()]
        # Only a list of plain indices can be translated; UUIDs or MIG names cannot
        # without NVML, which the worker process should not need.
        self._physical = parts if parts and all(p.isdigit() for p in parts) else []

    def cuda(self, index: int) -> str:
        """Label of in-process CUDA device `index`."""
        if 0 <= index < len(self._physical):
            return self._physical[index]
        return str(index)

    def device(self, device: torch.device | int | str) -> str:
        """Label of any device: CUDA devices by index, others by type (`cpu`, `disk`, `mps`)."""
        if isinstance(device, int):
            return self.cuda(device)  # accelerate writes bare ints for CUDA devices
        if isinstance(device, str):
            if device in ("cpu", "disk", "meta", "mps"):
                return device
            device = torch.device(device)
        if device.type == "cuda":
            index = device.index
            if index is None:
                index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            return self.cuda(index)
        return device.type


def module_device(module: nn.Module | None) -> torch.device | None:
    """Device of a module's first parameter or buffer that is not on `meta`."""
    if module is None:
        return None
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def _from_device_map(device_map: Mapping[str, object], name: str) -> object | None:
    """The entry of the longest module-path prefix of `name` in an hf_device_map."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    return None


def _layout_for(layout: ExpertLayout | None, spec: RouterSpec) -> tuple[str, ...] | None:
    if layout is None:
        return None
    if isinstance(layout, Mapping):
        per_layer = layout.get(spec.layer)
        if per_layer is None:
            return None
        gpus = tuple(str(g) for g in per_layer)
    else:
        gpus = tuple(str(g) for g in layout)
    if len(gpus) != spec.num_experts:
        raise ValueError(
            f"expert_to_gpu gives {len(gpus)} GPUs for layer {spec.layer}, which has {spec.num_experts} experts"
        )
    return gpus


def _discovered(model: nn.Module, spec: RouterSpec, namer: GpuNamer) -> tuple[str, ...]:
    device_map = getattr(model, "hf_device_map", None)
    fallback = module_device(spec.experts) or module_device(spec.module) or torch.device("cpu")
    out: list[str] = []
    per_expert = isinstance(spec.experts, nn.ModuleList) and len(spec.experts) == spec.num_experts
    for e in range(spec.num_experts):
        name = f"{spec.experts_name}.{e}" if per_expert else spec.experts_name
        if isinstance(device_map, Mapping) and spec.experts_name:
            entry = _from_device_map(device_map, name)
            if isinstance(entry, (int, str, torch.device)):
                out.append(namer.device(entry))
                continue
        device = module_device(spec.experts[e]) if isinstance(spec.experts, nn.ModuleList) and per_expert else None
        out.append(namer.device(device or fallback))
    return tuple(out)


def expert_placement(
    model: nn.Module,
    specs: Sequence[RouterSpec],
    namer: GpuNamer,
    expert_to_gpu: ExpertLayout | None = None,
) -> dict[int, tuple[str, ...]]:
    """Layer index -> the GPU label of each of its experts (index = expert)."""
    return {spec.layer: _layout_for(expert_to_gpu, spec) or _discovered(model, spec, namer) for spec in specs}
