"""Collectors: each observes one source and writes its samples (and events) to the store.

- `base`: what a collector is, and `CollectorRunner`, which bounds, times and guards each pass;
- `nvml` (with `xid`): GPUs through one bounded door per GPU, Xid errors as events;
- `host` (with `workers`): host memory and CPU, the workers' processes, cgroup OOM kills;
- `endpoint` (with `promtext`, `engine_progress`, `http`): `/health`, `/metrics` and
  engine progress of each worker;
- `nccl_ras` (with `nccl_ras_report`): NCCL's RAS service;
- `probe_reports`: reports from the in-worker probe (`sentinel.probe`), which also carry
  the live batch limit back.

Worker and kernel logs are collected by `sentinel.logs`.
"""

__all__ = [
    "base",
    "endpoint",
    "engine_progress",
    "host",
    "http",
    "nccl_ras",
    "nccl_ras_report",
    "nvml",
    "probe_reports",
    "promtext",
    "workers",
    "xid",
]
