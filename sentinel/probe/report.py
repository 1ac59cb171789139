"""Turning cumulative counter snapshots into the JSON report the daemon reads.

Pure functions over host-side lists, so they are tested without a model. "Tokens" are
token-to-expert assignments: a token routed to its top-2 experts counts twice, once on
each expert's GPU, which is the load each GPU's expert kernels actually see.

Report shape (version 1; `sentinel.collectors.probe_reports` validates it):

    {"version": 1, "kind": "interval" | "oom", "worker": str, "probe_id": str, "seq": int,
     "interval_s": float, "time": float, "batch_limit": int | null,
     "report_failures_total": int, "hook_errors_total": int,
     "layers": [{"layer": int, "tokens": int, "balancedness": float | null,
                 "hot_experts": [{"expert": int, "tokens": int, "tokens_total": int}]}],
     "gpus": {gpu: {"tokens_total": int, "num_ooms": int, "num_alloc_retries": int,
                    "allocated_bytes": int, "reserved_bytes": int}},  # every field optional
     "oom": {"gpu": str, "message": str} | null}

`tokens`, `balancedness` and `hot_experts[].tokens` cover the last interval; `*_total`
fields are cumulative since the probe started (`probe_id` changes on every attach,
which tells the daemon a counter went back to zero on purpose). A GPU's `tokens_total`
is present when it holds experts, its allocator fields when CUDA is.
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


def layer_entries(
    previous: Mapping[int, Sequence[int]],
    current: Mapping[int, Sequence[int]],
    placement: Mapping[int, Sequence[str]],
    hot: int,
) -> list[dict[str, Any]]:
    """Per-layer interval statistics between two cumulative snapshots."""
    out: list[dict[str, Any]] = []
    for layer in sorted(current):
        totals = current[layer]
        before = previous.get(layer)
        # max(0, ...): a copy that raced an index_add_ can only lag, never lead, but a
        # negative delta must not turn into negative load either way.
        delta = [max(0, t - (before[e] if before else 0)) for e, t in enumerate(totals)]
        out.append(
            {
                "layer": layer,
                "tokens": sum(delta),
                "balancedness": balancedness(tokens_per_gpu(delta, placement[layer])),
                "hot_experts": hottest_experts(delta, totals, hot),
            }
        )
    return out


def gpu_entries(
    current: Mapping[int, Sequence[int]],
    placement: Mapping[int, Sequence[str]],
    allocator: Mapping[str, AllocatorStats],
) -> dict[str, dict[str, int]]:
    """Per-GPU cumulative expert tokens, with the allocator's counters where CUDA has them."""
    out: dict[str, dict[str, int]] = {}
    for layer, totals in current.items():
        for gpu, n in tokens_per_gpu(totals, placement[layer]).items():
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
