"""The CUDA caching allocator's counters of this process, per device.

`torch.cuda.memory_stats` reads host-side bookkeeping of the allocator: no kernel, no
synchronisation, and (unlike most CUDA calls) no context creation on a device this
process never touched. Those counters exist only inside the worker, which is why the
probe reports them: NVML sees the device's memory, not the allocator's retries, OOMs
or its cached-but-free memory (fragmentation).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeAlias

import torch

from sentinel.probe.placement import GpuNamer

__all__ = ["AllocatorStats", "StatsReader", "read_allocator_stats"]


@dataclass(frozen=True)
class AllocatorStats:
    """One device's allocator counters (`num_ooms` and retries are cumulative)."""

    num_ooms: int
    num_alloc_retries: int
    allocated_bytes: int
    reserved_bytes: int


StatsReader: TypeAlias = Callable[[], dict[str, AllocatorStats]]
"""Returns allocator counters keyed by `gpu` label; `{}` without CUDA."""


def read_allocator_stats(namer: GpuNamer, used: Collection[int] = ()) -> dict[str, AllocatorStats]:
    """Counters of every CUDA device this process allocated on (or of `used` devices)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return {}
    out: dict[str, AllocatorStats] = {}
    for index in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(index)
        reading = AllocatorStats(
            num_ooms=int(stats.get("num_ooms", 0)),
            num_alloc_retries=int(stats.get("num_alloc_retries", 0)),
            allocated_bytes=int(stats.get("allocated_bytes.all.current", 0)),
            reserved_bytes=int(stats.get("reserved_bytes.all.current", 0)),
        )
        # A device the process never allocated on is not ours to report (another
        # worker may own it); an OOM there still counts.
        if reading.reserved_bytes or reading.num_ooms or index in used:
            out[namer.cuda(index)] = reading
    return out
