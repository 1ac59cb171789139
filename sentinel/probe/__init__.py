"""Sentinel's in-worker probe for PyTorch/transformers MoE serving processes (extra `probe`).

    import sentinel.probe

    probe = sentinel.probe.attach(model, worker="qwen3-a", sentinel="unix:/run/sentinel/probe.sock")
    while serving:
        batch = queue.take(limit=probe.batch_limit)   # None: no limit set
        with probe.oom_guard():                       # an OOM is reported at once, then re-raised
            model(**batch)
    probe.close()

What it does, without one host-device synchronisation per forward pass:
- hooks the MoE routers (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 and their
  look-alikes, transformers 4.x and 5.x; custom models pass `router_finder=`, see
  `sentinel.probe.routers`) and counts tokens per (layer, expert) on the device;
- every `interval_s`, from its own thread, reads the counts, computes each layer's
  balancedness (mean over max of tokens per GPU) and hottest experts, reads the CUDA
  allocator's counters, and POSTs a report to the daemon's `/api/v1/probe/report`;
- takes the daemon's answer as the new `probe.batch_limit` (Sentinel's live path for
  `reduce_batch`).

This package imports torch; the daemon never imports it (its side is
`sentinel.collectors.probe_reports`).
"""

from sentinel.probe.cuda_stats import AllocatorStats, read_allocator_stats
from sentinel.probe.placement import ExpertLayout, GpuNamer, expert_placement
from sentinel.probe.probe import Probe, attach, is_cuda_oom
from sentinel.probe.report import REPORT_PATH, REPORT_VERSION, balancedness
from sentinel.probe.routers import (
    IndexExtractor,
    RouterFinder,
    RouterSpec,
    RouterTuple,
    default_router_finder,
    find_routers,
    indices_from_output,
)
from sentinel.probe.transport import DeliveryError, Target, parse_target

__all__ = [
    "REPORT_PATH",
    "REPORT_VERSION",
    "AllocatorStats",
    "DeliveryError",
    "ExpertLayout",
    "GpuNamer",
    "IndexExtractor",
    "Probe",
    "RouterFinder",
    "RouterSpec",
    "RouterTuple",
    "Target",
    "attach",
    "balancedness",
    "default_router_finder",
    "expert_placement",
    "find_routers",
    "indices_from_output",
    "is_cuda_oom",
    "parse_target",
    "read_allocator_stats",
]
