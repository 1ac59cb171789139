"""Expert load from the real routers, and vLLM's EPLB balancedness computed from it.

`ExpertLoad` hooks every router (`mlp.gate`) and counts the tokens routed to each
expert of each MoE layer, prefill and decode alike, as vLLM's EPLB counts them. The
counts are grouped per simulated GPU of the expert-parallel group (`expert_to_gpu`)
and turned into balancedness the way FORMATS.md defines it: for each layer the mean
over GPUs of their token counts and the max over GPUs; `avg_tokens` and `max_tokens`
are those summed over layers and `balancedness = avg_tokens / max_tokens` (1.0 is
perfectly balanced; every token on one of 4 GPUs gives 0.25).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Balance", "ExpertLoad", "balance", "tokens_per_gpu"]

# vLLM's default --eplb-config step_interval: the "steps until the next rearrangement" period.
REARRANGEMENT_INTERVAL = 3000


@dataclass(frozen=True)
class Balance:
    """Balancedness of one window of expert load."""

    avg_tokens: float
    max_tokens: float
    balancedness: float


def tokens_per_gpu(expert_tokens: torch.Tensor, mapping: Mapping[int, int]) -> torch.Tensor:
    """`[layers, experts]` token counts summed into `[layers, gpus]` by `mapping` (expert -> GPU)."""
    gpus = max(mapping.values()) + 1
    index = torch.tensor([mapping[e] for e in range(expert_tokens.shape[1])], dtype=torch.int64)
    out = torch.zeros(expert_tokens.shape[0], gpus, dtype=torch.int64)
    return out.index_add_(1, index, expert_tokens.to(torch.int64))


def balance(gpu_tokens: torch.Tensor) -> Balance:
    """Balancedness of `[layers, gpus]` token counts: sum over layers of mean/max over GPUs."""
    counts = gpu_tokens.to(torch.float64)
    avg_tokens = float(counts.mean(dim=1).sum())
    max_tokens = float(counts.max(dim=1).values.sum())
    return Balance(avg_tokens, max_tokens, avg_tokens / max_tokens if max_tokens > 0 else 0.0)


class ExpertLoad:
    """Per-layer, per-expert token counts, fed by forward hooks on the routers.

    The hooks run on the engine thread; `take_window()` and `totals()` may be called from
    any thread.
    """

    def __init__(self, routers: Sequence[nn.Module], num_experts: int, mapping: Mapping[int, int]) -> None:
        self.mapping = dict(mapping)
        self._lock = threading.Lock()
        self._window = torch.zeros(len(routers), num_experts, dtype=torch.int64)
        self._total = torch.zeros(len(routers), num_experts, dtype=torch.int64)
        self._handles: list[RemovableHandle] = [
            router.register_forward_hook(self._counter(layer)) for layer, router in enumerate(routers)
        ]

    def _counter(self, layer: int) -> Any:
        num_experts = self._window.shape[1]

        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
            counts = torch.bincount(output[2].reshape(-1), minlength=num_experts)
            with self._lock:
                self._window[layer] += counts
                self._total[layer] += counts

        return hook

    def take_window(self) -> torch.Tensor:
        """Counts since the previous call, `[layers, experts]`; the window starts again at zero."""
        with self._lock:
            window = self._window.clone()
            self._window.zero_()
        return window

    def totals(self) -> torch.Tensor:
        """Counts since start, `[layers, experts]`."""
        with self._lock:
            return self._total.clone()

    def close(self) -> None:
        """Remove the router hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
