"""Text in the formats of the systems the worker imitates: vLLM's log lines, PyTorch's
CUDA out-of-memory message and ProcessGroupNCCL's watchdog lines.

The shapes follow shared/reference/FORMATS.md (gathered from vLLM's `loggers.py` and
`eplb_state.py`, PyTorch's `CUDACachingAllocator.cpp` and `ProcessGroupNCCL.cpp`), so
that Sentinel's log patterns meet the same text they meet on a GPU host.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

__all__ = [
    "VllmFormatter",
    "eplb_line",
    "format_size",
    "nccl_watchdog_lines",
    "oom_message",
    "stats_line",
]


class VllmFormatter(logging.Formatter):
    """vLLM's log format: `INFO 11-26 12:25:57 [loggers.py:123] message` (local time)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s", "%m-%d %H:%M:%S")


def format_size(size: int) -> str:
    """A byte count the way PyTorch's allocator prints it (`format_size` in CUDACachingAllocator.cpp)."""
    if size <= 1024:
        return f"{size} bytes"
    if size <= 1048576:
        return f"{size / 1024:.2f} KiB"
    if size <= 1073741824:
        return f"{size / 1048576:.2f} MiB"
    return f"{size / 1073741824:.2f} GiB"


def oom_message(*, device: int, requested: int, total: int, in_use: int, allocated: int, reserved: int) -> str:
    """PyTorch's CUDA out-of-memory message for one failed allocation of `requested` bytes."""
    free = max(0, total - in_use)
    return (
        f"CUDA out of memory. Tried to allocate {format_size(requested)}. "
        f"GPU {device} has a total capacity of {format_size(total)} of which {format_size(free)} is free. "
        f"Including non-PyTorch memory, this process has {format_size(in_use)} memory in use. "
        f"Of the allocated memory {format_size(allocated)} is allocated by PyTorch, and "
        f"{format_size(max(0, reserved - allocated))} is reserved by PyTorch but unallocated. "
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
        "to avoid fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


def stats_line(
    *,
    prompt_throughput: float,
    generation_throughput: float,
    running: int,
    waiting: int,
    kv_cache_usage: float,
    preemptions: int = 0,
) -> str:
    """vLLM's periodic `Engine 000: Avg prompt throughput: ...` line (LoggingStatLogger)."""
    preempted = f"Preemptions: {preemptions}, " if preemptions else ""
    return (
        f"Engine 000: Avg prompt throughput: {prompt_throughput:.1f} tokens/s, "
        f"Avg generation throughput: {generation_throughput:.1f} tokens/s, "
        f"Running: {running} reqs, Waiting: {waiting} reqs, {preempted}"
        f"GPU KV cache usage: {kv_cache_usage * 100:.1f}%, Prefix cache hit rate: 0.0%"
    )


def eplb_line(
    *, step: int, model: str, avg_tokens: float, max_tokens: float, balancedness: float, steps_left: int
) -> str:
    """vLLM's expert-load line (`--eplb-config '{"log_balancedness": true}'`)."""
    return (
        f"EPLB step: {step} for model {model}: avg_tokens={avg_tokens:.2f}, max_tokens={int(max_tokens)}, "
        f"balancedness={balancedness:.4f}, steps until the next rearrangement: {steps_left}"
    )


def _glog_prefix(rank: int, when: datetime, line: int) -> str:
    # c10's logger: severity letter, month without padding, day with; as in FORMATS.md.
    stamp = f"{when.month}{when.day:02d} {when:%H:%M:%S}.{when.microsecond // 1000:03d}"
    return f"[rank{rank}]:[E{stamp} ProcessGroupNCCL.cpp:{line}] "


def nccl_watchdog_lines(
    *, rank: int, seq: int, numel: int, timeout_ms: int, ran_ms: int, when: datetime | None = None
) -> list[str]:
    """What ProcessGroupNCCL prints when its watchdog finds a timed-out collective, before it aborts."""
    when = when or datetime.fromtimestamp(time.time())
    pg = f"[PG ID 0 PG GUID 0(default_pg) Rank {rank}] "
    work = f"WorkNCCL(SeqNum={seq}, OpType=ALLREDUCE, NumelIn={numel}, NumelOut={numel}, Timeout(ms)={timeout_ms})"
    timeout = f"Watchdog caught collective operation timeout: {work} ran for {ran_ms} milliseconds before timing out."
    return [
        _glog_prefix(rank, when, 697) + pg + timeout,
        _glog_prefix(rank, when, 2170)
        + pg
        + f"failure detected by watchdog at work sequence id: {seq} PG status: last enqueued work: {seq}, "
        + f"last completed work: {seq - 1}",
        _glog_prefix(rank, when, 748) + "Stack trace of the failed collective not found, potentially because "
        "FlightRecorder is disabled. You can enable it by setting TORCH_NCCL_TRACE_BUFFER_SIZE to a non-zero value.",
        _glog_prefix(rank, when, 711) + pg + "Some NCCL operations have failed or timed out. Due to the asynchronous "
        "nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data.",
        _glog_prefix(rank, when, 717) + pg + "To avoid data inconsistency, we are taking the entire process down.",
        _glog_prefix(rank, when, 1924)
        + pg
        + "Process group watchdog thread terminated with exception: "
        + pg
        + timeout,
        "terminate called after throwing an instance of 'c10::DistBackendError'",
        "  what():  " + pg + "Process group watchdog thread terminated with exception: " + pg + timeout,
    ]
