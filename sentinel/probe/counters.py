"""Token counts per (layer, expert), kept on the device and read from a background thread.

Each router's forward hook does one `index_add_` of ones into its layer's row of an
int64 count tensor on the router's device: one small kernel per MoE layer per forward
pass, no `.item()`, no copy to the host. The ones come from a per-device cache keyed by
the number of routed slots (a serving loop sees few distinct batch shapes), because a
contiguous source makes `index_add_` cheaper than a stride-0 `expand` view, and the
hook's CPU time is what a launch-bound decode step pays. Counts are cumulative since
`attach`; the reporter works with differences.

The reporter thread copies each device's count tensor to pinned host memory on a side
stream and waits on a CUDA event. Only that thread waits; the serving stream never does,
because the copy is not ordered after it. A copy may therefore see an `index_add_`
half-applied. That is harmless: every element only grows, so a later snapshot sees the
rest, and nothing is lost or counted twice. On CPU the copy is a plain `clone`.

Row layout: `num_experts + 1` columns; the last one is the bucket for index
`num_experts`, which expert-parallel code uses for "an expert on another rank". It is
kept so that such indices are counted safely instead of writing out of bounds (an
out-of-range index is a device-side assert on CUDA, which would kill the worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sentinel.probe.placement import module_device
from sentinel.probe.routers import RouterSpec

__all__ = ["ExpertCounters"]

log = logging.getLogger(__name__)

_ONES_CACHE_MAX = 256


class _DeviceCounts:
    """The count tensor of one device and what it takes to read it without a device sync."""

    def __init__(self, device: torch.device, rows: int, columns: int) -> None:
        self.device = device
        self.tensor = torch.zeros(rows, columns, dtype=torch.int64, device=device)
        self._ones: dict[int, torch.Tensor] = {}
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._host = torch.zeros(rows, columns, dtype=torch.int64, pin_memory=True)
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]

    def ones(self, n: int) -> torch.Tensor:
        """`n` int64 ones on the device; cached per size, the cache bounded (allocation never syncs)."""
        cached = self._ones.get(n)
        if cached is None:
            if len(self._ones) >= _ONES_CACHE_MAX:
                self._ones.clear()  # many shapes (long prompts): start over rather than grow
            cached = self._ones[n] = torch.ones(n, dtype=torch.int64, device=self.device)
        return cached

    def read(self) -> list[list[int]]:
        """Host copy of the counts; on CUDA only the calling (reporter) thread waits."""
        if not self._cuda:
            return self.tensor.clone().tolist()
        with torch.cuda.stream(self._stream):
            self._host.copy_(self.tensor, non_blocking=True)
            self._event.record(self._stream)
        self._event.synchronize()
        return self._host.tolist()


@dataclass(frozen=True)
class _Row:
    counts: _DeviceCounts
    index: int
    num_experts: int


class ExpertCounters:
    """Per-layer expert token counters fed by forward hooks on the routers."""

    def __init__(self, specs: Sequence[RouterSpec]) -> None:
        self._specs = list(specs)
        by_device: dict[torch.device, list[RouterSpec]] = {}
        for spec in self._specs:
            device = module_device(spec.module) or module_device(spec.experts) or torch.device("cpu")
            by_device.setdefault(device, []).append(spec)
        self._rows: dict[int, _Row] = {}
        self._devices: list[_DeviceCounts] = []
        for device, group in by_device.items():
            width = max(s.num_experts for s in group) + 1
            counts = _DeviceCounts(device, len(group), width)
            self._devices.append(counts)
            for i, spec in enumerate(group):
                self._rows[spec.layer] = _Row(counts, i, spec.num_experts)
        self._handles: list[RemovableHandle] = []
        self._uninstall: list[Callable[[], None]] = []
        self.hook_errors_total = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self._rows)

    def num_experts(self, layer: int) -> int:
        return self._rows[layer].num_experts

    def install(self) -> None:
        """Register one forward hook per router."""
        for spec in self._specs:
            count = self._count_for(spec)
            if spec.install is not None:
                self._uninstall.append(spec.install(count))
                continue

            def hook(module: nn.Module, args: Any, output: Any, count: Callable[[Any], None] = count) -> None:
                count(output)

            self._handles.append(spec.module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for uninstall in self._uninstall:
            uninstall()
        self._uninstall.clear()

    def _count_for(self, spec: RouterSpec) -> Callable[[Any], None]:
        row = self._rows[spec.layer]
        target = row.counts.tensor[row.index]  # a view: updates land in the device tensor
        ones = row.counts.ones
        extract = spec.extract_indices
        state = {"broken": False}

        def count(output: Any) -> None:
            if state["broken"]:
                return
            try:
                index = extract(output).reshape(-1)
                # An index on another device (a model moved after attach) raises here:
                # the layer is then dropped and logged below, never silently wrong.
                target.index_add_(0, index, ones(index.numel()))
            except Exception as exc:  # the probe must never break the forward pass
                state["broken"] = True
                self.hook_errors_total += 1
                log.error(
                    "sentinel probe: hook on router %s failed (%s); layer %d is no longer counted",
                    spec.name,
                    exc,
                    spec.layer,
                )

        return count

    def snapshot(self) -> dict[int, list[int]]:
        """Cumulative tokens per expert of each layer (the overflow bucket dropped)."""
        tables = {id(counts): counts.read() for counts in self._devices}
        return {layer: tables[id(row.counts)][row.index][: row.num_experts] for layer, row in self._rows.items()}
