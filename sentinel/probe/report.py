"""Turning cumulative counter snapshots into the JSON report the daemon reads.

Pure functions over host-side lists, so they are tested without a model. "Tokens" are
token-to-expert assignments: a token routed to its top-2 experts counts twice, once on
each expert's GPU, which is the load each GPU's expert kernels actually see.

Report shape (version 1; `sentinel.collectors.probe_reports` validates it):

    {"version": 1, "kind": "interval" | "oom", "worker": str, "probe_id": str, "seq": int,
     "interval_s": float, "time": float, "batch_limit": int | null,
     "live_batch_limit": bool (default true: the serving loop applies the daemon's limit),
     "report_failures_total": int, "hook_errors_total": int,
     "layers": [{"layer": int, "tokens": int, "balancedness": float | null,
                 "hot_experts": [{"expert": int, "tokens": int, "tokens_total": int}],
                 "expert_tokens": [int, ...]}],                 # every expert, this interval
     "placement": {"version": int, "digest": str, "step": int | null, "num_experts": int,
                   "slots_per_gpu": [int], "layers": [[[int]]] (when it changed),
                   "last": {"requested_version": int, "status": str, "reason": str, ...}},
     "gpus": {gpu: {"tokens_total": int, "num_ooms": int, "num_alloc_retries": int,
                    "allocated_bytes": int, "reserved_bytes": int}},  # every field optional
     "oom": {"gpu": str, "message": str} | null}

`tokens`, `balancedness` and `hot_experts[].tokens` cover the last interval; `*_total`
fields are cumulative since the probe started (`probe_id` changes on every attach,
which tells the daemon a counter went back to zero on purpose). A GPU's `tokens_total`
is present when it holds experts, its allocator fields when CUDA is.

`expert_tokens` is the planner's input (the daemon sums a window of them and never
makes series of them). Where the engine dispatches to physical slots (replicas after a
rebalance, `sentinel.probe.slots`), a layer's `balancedness` and the GPUs'
`tokens_total` come from the slot counts, i.e. the load each GPU really computed;
otherwise from expert -> GPU. `placement` is present when the worker serves
placements (`sentinel.probe.control`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sentinel.probe.cuda_stats import AllocatorStats

__all__ = [
    "REPORT_PATH",
    "REPORT_VERSION",
    "balancedness",
    "gpu_entries",
    "hottest_experts",
    "layer_entries",
    "tokens_per_gpu",
]

REPORT_VERSION = 1
# The daemon's route; kept in step with sentinel.collectors.probe_reports (which cannot be shared
# from here: importing this package imports torch).
REPORT_PATH = "/api/v1/probe/report"


def tokens_per_gpu(counts: Sequence[int], placement: Sequence[str]) -> dict[str, int]:
    """Sum of a layer's expert counts per GPU; every GPU of the layer appears, idle ones as 0."""
    out = dict.fromkeys(placement, 0)
    for expert, n in enumerate(counts):
        out[placement[expert]] += n
    return out


def balancedness(per_gpu: Mapping[str, int]) -> float | None:
    """Mean over max of tokens per GPU (vLLM's and SGLang's definition); None without traffic."""
    if not per_gpu:
        return None
    peak = max(per_gpu.values())
    if peak <= 0:
        return None  # an idle interval is neither balanced nor not
    return sum(per_gpu.values()) / len(per_gpu) / peak


def hottest_experts(delta: Sequence[int], totals: Sequence[int], n: int) -> list[dict[str, int]]:
    """The `n` experts with the most tokens in the interval (idle experts never listed)."""
    ranked = sorted((e for e, d in enumerate(delta) if d > 0), key=lambda e: (-delta[e], e))
    return [{"expert": e, "tokens": delta[e], "tokens_total": totals[e]} for e in ranked[:n]]


def _delta(before: Sequence[int] | None, totals: Sequence[int]) -> list[int]:
    # max(0, ...): a copy that raced an index_add_ can only lag, never lead, but a
    # negative delta must not turn into negative load either way.
    return [max(0, t - (before[e] if before else 0)) for e, t in enumerate(totals)]


def layer_entries(
    previous: Mapping[int, Sequence[int]],
    current: Mapping[int, Sequence[int]],
    placement: Mapping[int, Sequence[str]],
    hot: int,
    *,
    slots_previous: Mapping[int, Sequence[int]] | None = None,
    slots_current: Mapping[int, Sequence[int]] | None = None,
    slot_gpus: Mapping[int, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Per-layer interval statistics between two cumulative snapshots (slot counts where given)."""
    out: list[dict[str, Any]] = []
    for layer in sorted(current):
        totals = current[layer]
        delta = _delta(previous.get(layer), totals)
        if slots_current is not None and slot_gpus is not None and layer in slots_current and layer in slot_gpus:
            slot_delta = _delta((slots_previous or {}).get(layer), slots_current[layer])
            per_gpu = tokens_per_gpu(slot_delta, slot_gpus[layer])
        else:
            per_gpu = tokens_per_gpu(delta, placement[layer])
        out.append(
            {
                "layer": layer,
                "tokens": sum(delta),
                "balancedness": balancedness(per_gpu),
                "hot_experts": hottest_experts(delta, totals, hot),
                "expert_tokens": delta,
            }
        )
    return out


def gpu_entries(
    current: Mapping[int, Sequence[int]],
    placement: Mapping[int, Sequence[str]],
    allocator: Mapping[str, AllocatorStats],
    *,
    slots_current: Mapping[int, Sequence[int]] | None = None,
    slot_gpus: Mapping[int, Sequence[str]] | None = None,
) -> dict[str, dict[str, int]]:
    """Per-GPU cumulative expert tokens (by slot where counted), with the allocator's counters."""
    out: dict[str, dict[str, int]] = {}
    for layer, totals in current.items():
        if slots_current is not None and slot_gpus is not None and layer in slots_current and layer in slot_gpus:
            per_gpu = tokens_per_gpu(slots_current[layer], slot_gpus[layer])
        else:
            per_gpu = tokens_per_gpu(totals, placement[layer])
        for gpu, n in per_gpu.items():
            entry = out.setdefault(gpu, {"tokens_total": 0})
            entry["tokens_total"] += n
    for gpu, stats in allocator.items():
        entry = out.setdefault(gpu, {})  # no tokens_total: this GPU holds no experts
        entry.update(
            num_ooms=stats.num_ooms,
            num_alloc_retries=stats.num_alloc_retries,
            allocated_bytes=stats.allocated_bytes,
            reserved_bytes=stats.reserved_bytes,
        )
    return out
