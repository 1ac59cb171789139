"""The probe object: hooks, a reporter thread, the OOM guard and the live batch limit."""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sentinel.probe.control import PlacementApplier, PlacementChannel, PlacementSource
from sentinel.probe.counters import ExpertCounters
from sentinel.probe.cuda_stats import StatsReader, read_allocator_stats
from sentinel.probe.placement import ExpertLayout, GpuNamer, expert_placement, module_device
from sentinel.probe.report import REPORT_VERSION, gpu_entries, layer_entries
from sentinel.probe.routers import RouterFinder, RouterSpec, find_routers
from sentinel.probe.slots import SlotFinder, SlotSpec, default_slot_finder, slot_layout, slot_router_specs
from sentinel.probe.transport import TOKEN_FILE_ENV, DeliveryError, Target, parse_target, post_json, read_token_file

__all__ = ["Probe", "attach", "is_cuda_oom"]

log = logging.getLogger(__name__)

_GPU_IN_MESSAGE = re.compile(r"\bGPU (\d+)\b")
_OOM_MESSAGE_MAX = 1000


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, typed (`torch.OutOfMemoryError`) or as older builds raise it."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


class Probe:
    """Sentinel's in-worker probe for one model; made by `attach`, stopped by `close`.

    `batch_limit` is the live knob: the serving loop reads it before forming each batch
    (`None`: no limit set). Sentinel sets it through its answer to a report; the serving
    loop may set it too. The next report carries the value in force, which is how the
    daemon learns the new limit took effect.
    """

    def __init__(
        self,
        worker: str,
        target: Target,
        routers: Sequence[RouterSpec],
        placement: Mapping[int, tuple[str, ...]],
        *,
        namer: GpuNamer,
        interval_s: float = 1.0,
        hot_experts: int = 4,
        report_timeout_s: float | None = None,
        oom_timeout_s: float = 0.5,
        stats_reader: StatsReader | None = None,
        on_batch_limit: Callable[[int], None] | None = None,
        slots: Sequence[SlotSpec] = (),
        live_batch_limit: bool = True,
    ) -> None:
        if not worker:
            raise ValueError("worker: a non-empty worker name is needed (it is the `worker` label)")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.worker = worker
        self.target = target
        self.routers = tuple(routers)
        self.placement = dict(placement)
        self.interval_s = float(interval_s)
        self.hot_experts = hot_experts
        # About an interval, so a hung daemon cannot hold the thread for long; at least
        # 0.5 s, because a loaded host can take that long over loopback.
        default_timeout = min(2.0, max(0.5, self.interval_s))
        self.report_timeout_s = report_timeout_s if report_timeout_s is not None else default_timeout
        self.oom_timeout_s = oom_timeout_s
        self.batch_limit: int | None = None
        self.live_batch_limit = live_batch_limit
        self.probe_id = secrets.token_hex(8)
        self.reports_sent_total = 0
        self.report_failures_total = 0
        self.last_error = ""
        self._namer = namer
        used = {d.index for spec in self.routers if (d := module_device(spec.module)) is not None and d.type == "cuda"}
        self._stats_reader: StatsReader = stats_reader or (lambda: read_allocator_stats(namer, used))
        self._on_batch_limit = on_batch_limit
        self._counters = ExpertCounters(self.routers)
        self._previous: dict[int, list[int]] = {}
        # Per physical slot, where the engine dispatches to replicas (sentinel.probe.slots).
        self._slot_counters = ExpertCounters(slot_router_specs(slots)) if slots else None
        self._slot_gpus = slot_layout(slots)
        self._slot_previous: dict[int, list[int]] = {}
        self.control = PlacementChannel(target, worker)
        self._want_placement = False
        self._guard_ooms: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._tick_failing = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Install the router hooks and start the reporter thread."""
        if self._thread is not None:
            return
        self._previous = self._counters.snapshot()
        self._counters.install()
        if self._slot_counters is not None:
            self._slot_previous = self._slot_counters.snapshot()
            self._slot_counters.install()
        self._thread = threading.Thread(target=self._run, name=f"sentinel-probe-{self.worker}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the reporter thread and remove every hook (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._counters.remove()
        if self._slot_counters is not None:
            self._slot_counters.remove()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hook_errors_total(self) -> int:
        """Router hooks disabled after an error (their layers are no longer counted)."""
        return self._counters.hook_errors_total

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the reporter thread (after its report in flight) until the block ends.

        For CUDA graph capture in the default "global" mode: while any thread captures,
        CUDA refuses other threads' synchronising calls, and the reporter's snapshot
        waits on an event. Wrap the capture (`torch.cuda.graph`, a first call of a
        `torch.compile(mode="reduce-overhead")` model) in `probe.paused()`. The hooks
        stay: captured into the graph, they count on every replay.
        """
        with self._tick_lock:
            yield

    def serve_placement(self, current: PlacementSource, apply: PlacementApplier | None = None) -> None:
        """Report the placement the worker runs (`current()`), and take Sentinel's new ones (`apply`).

        The live `rebalance_experts` path; see `sentinel.probe.control`. `apply` runs on
        a thread of the probe's own and may block until the engine's next step boundary.
        """
        self.control.bind(current, apply)

    def slot_counts(self) -> dict[int, list[int]]:
        """Tokens per physical slot of each layer since attach (empty without slot dispatch)."""
        return self._slot_counters.snapshot() if self._slot_counters is not None else {}

    def token_counts(self) -> dict[int, list[int]]:
        """Tokens per expert of each hooked layer since attach (a host copy; waits for the device)."""
        return self._counters.snapshot()

    # -- reporting -----------------------------------------------------------------

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            now = time.monotonic()
            # Keep the cadence, but after a long stall start afresh instead of bursting.
            next_at = next_at + self.interval_s if next_at + self.interval_s > now else now + self.interval_s
            try:
                self.report_now()
            except Exception:  # a bug here must not end the thread: log it once
                if not self._tick_failing:
                    log.exception("sentinel probe: building a report failed; retrying every interval")
                self._tick_failing = True
            else:
                self._tick_failing = False

    def report_now(self) -> bool:
        """Snapshot, report and apply the daemon's answer now; True when it was delivered.

        The reporter thread calls this every interval; a serving loop may call it at
        shutdown to flush the last counts.
        """
        with self._tick_lock:
            current = self._counters.snapshot()
            slots = self._slot_counters.snapshot() if self._slot_counters is not None else None
            layers = layer_entries(
                self._previous,
                current,
                self.placement,
                self.hot_experts,
                slots_previous=self._slot_previous,
                slots_current=slots,
                slot_gpus=self._slot_gpus,
            )
            self._previous = current
            if slots is not None:
                self._slot_previous = slots
            gpus = gpu_entries(
                current, self.placement, self._stats_reader(), slots_current=slots, slot_gpus=self._slot_gpus
            )
            self._merge_guard_ooms(gpus)
            body: dict[str, Any] = {"layers": layers, "gpus": gpus}
            placement = self.control.report_entry(full=self._want_placement)
            if placement is not None:
                body["placement"] = placement
                self._want_placement = False
            report = self._envelope("interval", **body)
            return self._deliver(report, self.report_timeout_s)

    def _envelope(self, kind: str, **body: Any) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "kind": kind,
            "worker": self.worker,
            "probe_id": self.probe_id,
            "seq": next(self._seq),
            "interval_s": self.interval_s,
            "time": time.time(),
            "batch_limit": self.batch_limit,
            "live_batch_limit": self.live_batch_limit,
            "report_failures_total": self.report_failures_total,
            "hook_errors_total": self.hook_errors_total,
            "layers": [],
            "gpus": {},
            "oom": None,
            **body,
        }

    def _merge_guard_ooms(self, gpus: dict[str, dict[str, int]]) -> None:
        # On CUDA the allocator already counted every OOM the guard saw; the guard's own
        # count matters where it saw OOMs the allocator does not know (another allocator).
        for gpu, seen in self._guard_ooms.items():
            entry = gpus.setdefault(gpu, {})
            entry["num_ooms"] = max(entry.get("num_ooms", 0), seen)

    def _deliver(self, report: dict[str, Any], timeout_s: float) -> bool:
        try:
            reply = post_json(self.target, report, timeout_s)
        except DeliveryError as exc:
            self.report_failures_total += 1
            self.last_error = str(exc)
            if not self._failing:
                log.warning("sentinel probe: cannot report (%s); retrying every interval", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sentinel probe: reporting to %s again", self.target.describe())
        self._failing = False
        self.reports_sent_total += 1
        self._apply_reply(reply)
        return True

    def _apply_reply(self, reply: Mapping[str, Any]) -> None:
        self._want_placement = reply.get("want_placement") is True
        self.control.on_reply(reply.get("placement"))
        limit = reply.get("batch_limit")
        if limit is None or not self.live_batch_limit:
            return  # no opinion, or nobody here would apply it (the daemon knows: the report says so)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            log.warning("sentinel probe: ignoring batch_limit %r from the daemon", limit)
            return
        if limit != self.batch_limit:
            log.info("sentinel probe: batch limit of worker %s set to %d by Sentinel", self.worker, limit)
            self.batch_limit = limit
            if self._on_batch_limit is not None:
                try:
                    self._on_batch_limit(limit)
                except Exception:
                    log.exception("sentinel probe: on_batch_limit callback failed")

    # -- OOM -----------------------------------------------------------------------

    def _oom_gpu(self, exc: BaseException) -> str:
        found = _GPU_IN_MESSAGE.search(str(exc))
        if found is not None:
            return self._namer.cuda(int(found.group(1)))
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return self._namer.cuda(torch.cuda.current_device())
        return "cpu"

    def report_oom(self, exc: BaseException) -> bool:
        """Send an OOM report now, from the calling thread (bounded by `oom_timeout_s`).

        For serving loops that catch OOMs themselves; `oom_guard` calls it for you.
        """
        gpu = self._oom_gpu(exc)
        self._guard_ooms[gpu] = self._guard_ooms.get(gpu, 0) + 1
        stats = self._stats_reader()
        gpus: dict[str, dict[str, int]] = {}
        if gpu in stats:
            s = stats[gpu]
            gpus[gpu] = {
                "num_ooms": s.num_ooms,
                "num_alloc_retries": s.num_alloc_retries,
                "allocated_bytes": s.allocated_bytes,
                "reserved_bytes": s.reserved_bytes,
            }
        self._merge_guard_ooms(gpus)
        message = f"{type(exc).__name__}: {exc}"[:_OOM_MESSAGE_MAX]
        report = self._envelope("oom", gpus=gpus, oom={"gpu": gpu, "message": message})
        return self._deliver(report, self.oom_timeout_s)

    @contextmanager
    def oom_guard(self) -> Iterator[None]:
        """Report a CUDA OOM raised inside the block the moment it happens, then re-raise it."""
        try:
            yield
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if is_cuda_oom(exc):
                try:
                    self.report_oom(exc)
                except Exception:  # reporting must never mask the OOM itself
                    log.exception("sentinel probe: reporting an OOM failed")
            raise


def attach(
    model: nn.Module,
    worker: str,
    sentinel: str,
    *,
    interval_s: float = 1.0,
    expert_to_gpu: ExpertLayout | None = None,
    router_finder: RouterFinder | None = None,
    hot_experts: int = 4,
    on_batch_limit: Callable[[int], None] | None = None,
    token_file: str | None = None,
    slot_finder: SlotFinder | None = None,
    live_batch_limit: bool = True,
) -> Probe:
    """Hook `model`'s MoE routers and start reporting to Sentinel every `interval_s`.

    `sentinel` is the daemon's address: `unix:/run/sentinel/probe.sock` (the default
    transport: the socket's group decides who may report), or `http://127.0.0.1:9847`
    (the report path is added; Sentinel accepts it only with `probe.tcp: true` and the
    worker's token). `token_file` (default `$SENTINEL_PROBE_TOKEN_FILE`) holds the
    worker's probe token, the one `workers[].probe_token_file` names on Sentinel's side;
    it is sent as a bearer token over either transport. `expert_to_gpu` overrides where experts
    run (one GPU per expert for every layer, or a mapping layer -> that list);
    `router_finder` finds the routers of a custom model (see `sentinel.probe.routers`);
    `hot_experts` is how many of each layer's busiest experts are reported by name;
    `on_batch_limit` is called (on the probe's thread) when Sentinel changes the limit;
    `slot_finder` finds the engine's dispatch to physical expert slots (replicas), so
    per-GPU load is counted where it lands (`sentinel.probe.slots`; the default finds
    experts modules exposing `dispatch` and `slot_gpus`). A worker that can change its
    placement live calls `probe.serve_placement(current, apply)` after attach.
    `live_batch_limit=False` tells Sentinel that nothing reads `probe.batch_limit` (an
    engine whose scheduler runs in another process, like vLLM's), so `reduce_batch`
    restarts on a profile instead of sending a limit nobody would apply.
    """
    token_source = token_file or os.environ.get(TOKEN_FILE_ENV) or None
    target = parse_target(sentinel, token=read_token_file(token_source) if token_source else None)
    routers = find_routers(model, router_finder)
    if not routers:
        log.warning(
            "sentinel probe: no MoE routers found in %s; reporting allocator counters, OOMs and the batch limit only",
            type(model).__name__,
        )
    namer = GpuNamer(os.environ.get("CUDA_VISIBLE_DEVICES"))
    placement = expert_placement(model, routers, namer, expert_to_gpu)
    slots = list((slot_finder or default_slot_finder)(model, routers))
    probe = Probe(
        worker,
        target,
        routers,
        placement,
        namer=namer,
        interval_s=interval_s,
        hot_experts=hot_experts,
        on_batch_limit=on_batch_limit,
        slots=slots,
        live_batch_limit=live_batch_limit,
    )
    probe.start()
    return probe
