"""A continuous-batching engine loop, in its own thread, over the tiny Qwen3-MoE.

Requests wait in a FIFO queue. Each engine step admits waiting requests while fewer
than the batch limit are running (`max_num_seqs`, or the probe's live limit when lower;
surplus running sequences are preempted, newest first, and later recomputed, as vLLM
does), prefills the newly admitted ones (one forward per prompt length, so no padding),
then runs one decoding forward for all other running sequences together and samples
greedily. Each sequence keeps its own KV cache; the decoding forward left-pads them
into one batched cache with an attention mask and splits the result back, so a
sequence's tokens are what it would get alone.

Simulated GPU memory: before a step the engine "allocates" the step's working set,

    footprint = weights_bytes + rows x context x per_token_bytes

(rows: running sequences; context: the longest of their contexts, as a padded batch
holds; per_token_bytes: fp32 KV cache of every layer plus two hidden-state vectors).
Above the memory budget it raises a real `torch.OutOfMemoryError` carrying PyTorch's
message. Like vLLM's engine core on a CUDA OOM, the engine then dies: it logs
`EngineCore encountered a fatal error.` with the traceback, fails every request, and
reports itself dead (`/health` answers 503 and the process exits non-zero). A restart
with the same profile meets the same OOM under the same load (the crash loop); one
with a smaller batch limit or int8 weights has a smaller footprint and does not.

Faults: a stall blocks the loop (requests stay running, nothing is generated, `/health`
stays 200); a crash blocks it for a while, then prints ProcessGroupNCCL's watchdog lines
and dies the same way.

Expert placement (`apply_placement`, the function Sentinel's live rebalance calls):
the caller's thread checks and stages the new placement (`ep.ExpertParallel.stage`:
new replicas are copied beside serving), the engine swaps it in at its next step
boundary, between two forward passes, and the caller gets a `PlacementResult`. The
replicas beyond one per expert count in the simulated memory footprint, and so do the
staged copies until the swap: a plan that would not fit the memory budget is refused.
If no step boundary comes within the timeout (a stalled engine), the request is
withdrawn and the old placement runs on; placements carry increasing versions, so a
late or repeated one is refused rather than applied out of order.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sentinel.moe import Placement
from sentinel.sim.worker.ep import PlacementRefused, PlacementResult, StagedPlacement
from sentinel.sim.worker.eplb import REARRANGEMENT_INTERVAL, ExpertLoad, balance
from sentinel.sim.worker.formats import eplb_line, nccl_watchdog_lines, oom_message
from sentinel.sim.worker.metrics import EngineMetrics
from sentinel.sim.worker.model import TinyMoe, expert_to_gpu
from sentinel.sim.worker.tokenizer import EOS_TOKEN_ID, decode

__all__ = ["Completion", "ServingEngine", "EngineDeadError", "EngineStats", "ProbeHandle", "RequestError"]

log = logging.getLogger(__name__)

NCCL_TIMEOUT_MS = 600_000  # PyTorch's default collective timeout (10 min)


class EngineDeadError(RuntimeError):
    """The engine has died; no request can be served (vLLM's EngineDeadError)."""

    def __init__(self, message: str = "EngineCore encountered an issue. See stack trace (above) for the root cause."):
        super().__init__(message)


class RequestError(ValueError):
    """A request the engine cannot take (too long for the model, bad parameters)."""


class ProbeHandle(Protocol):
    """What the worker uses of an attached `sentinel.probe` handle."""

    @property
    def batch_limit(self) -> int | None:
        """The live batch limit Sentinel has set; None for no limit."""
        ...

    def oom_guard(self) -> AbstractContextManager[Any]:
        """A context that records CUDA out-of-memory errors raised inside it."""
        ...


@dataclass(frozen=True)
class Completion:
    """A finished request."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids)


Callback = Callable[[Completion | BaseException], None]


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    on_done: Callback
    arrival: float
    output: list[int] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, [1, kv_heads, len, head_dim]
    scheduled_at: float | None = None
    last_token_at: float | None = None
    aborted: bool = False

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(eq=False)
class _PlacementRequest:
    staged: StagedPlacement
    version: int
    state: str = "pending"  # -> committing -> applied | refused; or pending -> withdrawn
    reason: str = ""
    step: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of the engine at one moment."""

    alive: bool
    stalled: bool
    steps: int
    running: int
    waiting: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    kv_cache_usage: float


class ServingEngine:
    """The engine thread; see the module doc. `submit()` and the fault knobs are thread-safe."""

    def __init__(
        self,
        moe: TinyMoe,
        *,
        max_num_seqs: int,
        model_name: str,
        max_model_len: int = 256,
        memory_budget_bytes: int | None = None,
        metrics: EngineMetrics | None = None,
        probe: ProbeHandle | None = None,
        eplb_interval: float = 5.0,
        on_dead: Callable[[str], None] | None = None,
        stderr: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.moe = moe
        self.max_num_seqs = max_num_seqs
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.memory_budget_bytes = memory_budget_bytes
        self.metrics = metrics or EngineMetrics(model_name)
        self.probe = probe
        self.eplb_interval = eplb_interval
        self.expert_load = ExpertLoad(moe.routers, moe.num_experts, expert_to_gpu(moe.num_experts))
        self.ep = moe.ep
        self.placement_version = 0
        self.placement_step: int | None = None  # engine step the running placement came in at
        self._pending_placement: _PlacementRequest | None = None
        self._placement_lock = threading.Lock()  # one apply_placement at a time
        self._on_dead = on_dead
        self._stderr = stderr
        self._clock = clock
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns until 5.40).
        self._cache_kw = "cache" if "cache" in inspect.signature(moe.model.forward).parameters else "past_key_values"

        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._alive = True
        self.dead_reason: str | None = None
        self._stall_until: float | None = None
        self._crash_at: float | None = None
        self._crash_requested_at = 0.0
        self._skew: tuple[tuple[int, ...], float] | None = None

        self.steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.max_running_seen = 0
        self.last_footprint_bytes = moe.weights_bytes
        self.peak_footprint_bytes = moe.weights_bytes
        self._last_kv_bytes = 0
        self._last_eplb = clock()
        self._last_step_numel = 0
        self.metrics.bind_gauges(
            lambda: float(len(self._running)), lambda: float(len(self._waiting)), self.kv_cache_usage
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="EngineCore_DP0", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; requests still queued or running end as aborted."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(None)
        self._drop_pending_placement("the engine stopped")
        self.expert_load.close()

    @property
    def alive(self) -> bool:
        """False once the engine has died (OOM, crash, internal error)."""
        return self._alive

    # -- requests --------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_tokens: int, on_done: Callback, *, ignore_eos: bool = False) -> str:
        """Queue a request; `on_done` gets a `Completion` or an exception, on the engine thread."""
        if not self._alive:
            raise EngineDeadError()
        if not prompt:
            raise RequestError("the prompt is empty")
        if max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if len(prompt) + max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the completion)."
            )
        seq = _Sequence(f"cmpl-{uuid.uuid4().hex}", list(prompt), max_tokens, ignore_eos, on_done, self._clock())
        with self._cv:
            self._waiting.append(seq)
            self._by_id[seq.request_id] = seq
            self._cv.notify_all()
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Drop a request whose client went away; it ends with finish reason `abort`."""
        with self._cv:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.aborted = True
                self._cv.notify_all()

    # -- faults ----------------------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """Block the engine loop for `seconds` (an NCCL hang seen from the serving side)."""
        with self._cv:
            self._stall_until = self._clock() + seconds
            self._cv.notify_all()

    def crash(self, after_seconds: float = 0.0) -> None:
        """Hang for `after_seconds`, then die the way a NCCL watchdog timeout kills a worker."""
        with self._cv:
            self._crash_requested_at = self._clock()
            self._crash_at = self._crash_requested_at + after_seconds
            self._cv.notify_all()

    def set_memory_budget(self, budget: int | None) -> None:
        """Simulated GPU memory from the next step on; None removes the limit."""
        self.memory_budget_bytes = budget

    def set_skew(self, experts: tuple[int, ...], bias: float) -> None:
        """Bias the routers towards `experts`; `()` clears it."""
        # Router buffers are read by the forward on the engine thread: change them between steps.
        with self._cv:
            self.moe.set_skew(experts, bias)
            self._skew = (experts, bias) if experts else None

    def clear_faults(self) -> None:
        """Remove every fault: skew, memory budget, stall, a crash not yet fired."""
        self.set_skew((), 0.0)
        with self._cv:
            self.memory_budget_bytes = None
            self._stall_until = None
            self._crash_at = None
            self._cv.notify_all()

    # -- expert placement --------------------------------------------------------------

    def apply_placement(
        self, target: Placement, *, version: int | None = None, timeout_s: float = 10.0
    ) -> PlacementResult:
        """Run `target` from the next step boundary; see the module doc. Thread-safe, blocking.

        `version` must be newer than the running one (default: the next). Never call
        this from the engine thread: it waits for that thread's next step boundary.
        """
        started = self._clock()
        with self._placement_lock:
            running = self.placement_version
            wanted = running + 1 if version is None else version

            def answer(status: str, reason: str = "", staged: StagedPlacement | None = None) -> PlacementResult:
                return PlacementResult(
                    status=status,
                    version=self.placement_version,
                    requested_version=wanted,
                    reason=reason,
                    copies=len(staged.copies) if staged else 0,
                    copy_bytes=staged.copy_bytes if staged else 0,
                    seconds=self._clock() - started,
                    step=self.placement_step if status == "applied" else None,
                )

            if not self._alive:
                return answer("refused", f"the engine is dead ({self.dead_reason})")
            if wanted <= running:
                return answer("refused", f"version {wanted} is not newer than the running version {running}")
            try:
                staged = self.ep.stage(target)
            except PlacementRefused as exc:
                return answer("refused", exc.reason)
            if staged.placement == staged.base:
                self.placement_version = wanted  # already running it: nothing to swap
                self.placement_step = self.steps
                return answer("applied", "the worker already runs this placement", staged)
            too_big = self._staging_over_budget(staged)
            if too_big:
                return answer("refused", too_big, staged)
            request = _PlacementRequest(staged, wanted)
            with self._cv:
                self._pending_placement = request
                self._cv.notify_all()
            if not request.done.wait(timeout_s):
                with self._cv:
                    if request.state == "pending":
                        request.state = "withdrawn"
                        self._pending_placement = None
                if request.state == "withdrawn":
                    log.warning(
                        "placement version %d withdrawn: no step boundary within %.1fs; version %d runs on",
                        wanted,
                        timeout_s,
                        self.placement_version,
                    )
                    return answer(
                        "timed_out",
                        f"no step boundary within {timeout_s:g}s (engine stalled?); "
                        f"placement version {self.placement_version} runs on",
                        staged,
                    )
                request.done.wait()  # being swapped in right now: a few pointer assignments
            if request.state != "applied":
                return answer("refused", request.reason, staged)
            return answer("applied", "", staged)

    def _staging_over_budget(self, staged: StagedPlacement) -> str:
        """Why staging `staged` would not fit the memory budget; empty when it fits."""
        budget = self.memory_budget_bytes
        if budget is None:
            return ""
        weights = self.moe.weights_bytes + self.ep.replica_bytes
        peak = weights + staged.copy_bytes + self._last_kv_bytes
        after = self.moe.weights_bytes + staged.replica_bytes + self._last_kv_bytes
        worst = max(peak, after)
        if worst <= budget:
            return ""
        return (
            f"{len(staged.copies)} expert copies ({staged.copy_bytes} bytes staged next to {weights} bytes of "
            f"weights and {self._last_kv_bytes} bytes of KV cache) would take the footprint to {worst} bytes, "
            f"over the memory budget of {budget} bytes"
        )

    def _commit_placement(self) -> None:
        """At a step boundary, on the engine thread: swap in a pending placement."""
        with self._cv:
            request = self._pending_placement
            if request is None:
                return
            self._pending_placement = None
            request.state = "committing"
        try:
            self.ep.commit(request.staged)
        except PlacementRefused as exc:
            request.state, request.reason = "refused", exc.reason
        else:
            self.placement_version = request.version
            self.placement_step = self.steps
            request.state = "applied"
            log.info(
                "Expert placement version %d in from step %d: %d expert copies (%d bytes)",
                request.version,
                self.steps,
                len(request.staged.copies),
                request.staged.copy_bytes,
            )
        request.done.set()

    def _drop_pending_placement(self, reason: str) -> None:
        """Answer a placement no step boundary will ever take (the loop ended): refused, old placement."""
        with self._cv:
            request, self._pending_placement = self._pending_placement, None
            if request is None or request.state != "pending":
                return
            request.state, request.reason = "refused", reason
        request.done.set()

    # -- state -----------------------------------------------------------------------------

    @property
    def batch_limit(self) -> int:
        """Sequences allowed to run at once: `max_num_seqs`, or the probe's live limit when lower."""
        limit = self.max_num_seqs
        if self.probe is not None:
            live = self.probe.batch_limit
            if live is not None and live > 0:
                limit = min(limit, int(live))
        return limit

    def kv_cache_usage(self) -> float:
        """Tokens held by running sequences over the cache capacity (max_num_seqs x max_model_len)."""
        used = sum(seq.context_len for seq in list(self._running))
        return min(1.0, used / (self.max_num_seqs * self.max_model_len))

    def stats(self) -> EngineStats:
        """A snapshot of the counters; cheap and lock-free, safe while the loop is blocked."""
        now = self._clock()
        holds = [t for t in (self._stall_until, self._crash_at) if t is not None]
        return EngineStats(
            alive=self._alive,
            stalled=any(t > now for t in holds),
            steps=self.steps,
            running=len(self._running),
            waiting=len(self._waiting),
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            preemptions=self.preemptions,
            kv_cache_usage=self.kv_cache_usage(),
        )

    def state(self) -> dict[str, Any]:
        """What `/admin/state` shows: profile facts, memory, faults, counters, expert load."""
        now = self._clock()
        totals = self.expert_load.totals()
        per_gpu = torch.tensor(self.ep.device_tokens(), dtype=torch.int64)
        bal = balance(per_gpu)
        stall, crash = self._stall_until, self._crash_at
        moe = self.moe
        return {
            "model": self.model_name,
            "alive": self._alive,
            "dead_reason": self.dead_reason,
            "max_num_seqs": self.max_num_seqs,
            "batch_limit": self.batch_limit,
            "quantization": moe.quantization,
            "linear_int8": moe.linear_int8,
            "memory": {
                "weights_bytes": moe.weights_bytes,
                "weights_bytes_fp32": moe.weights_bytes_fp32,
                "per_token_bytes": moe.per_token_bytes,
                "budget_bytes": self.memory_budget_bytes,
                "footprint_bytes": self.last_footprint_bytes,
                "peak_footprint_bytes": self.peak_footprint_bytes,
            },
            "faults": {
                "skew": None if self._skew is None else {"experts": list(self._skew[0]), "bias": self._skew[1]},
                "memory_budget": self.memory_budget_bytes,
                "stall_remaining_s": max(0.0, stall - now) if stall is not None and stall > now else None,
                "crash_in_s": max(0.0, crash - now) if crash is not None else None,
            },
            "engine": {
                "steps": self.steps,
                "running": len(self._running),
                "waiting": len(self._waiting),
                "max_running_seen": self.max_running_seen,
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "preemptions": self.preemptions,
                "kv_cache_usage": self.kv_cache_usage(),
            },
            "experts": {
                "tokens": totals.tolist(),  # per layer, per logical expert, since start
                "gpu_tokens": per_gpu.tolist(),  # per layer, per device: the measured load
                "balancedness": bal.balancedness,
                "placement_version": self.placement_version,
                "placement": [[list(device) for device in layer] for layer in self.ep.placement.layers],
                "replica_bytes": self.ep.replica_bytes,
            },
            "probe": self.probe is not None,
        }

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._wait_for_work():
                        return
                    if self._crash_at is not None and self._crash_at <= self._clock():
                        self._watchdog_abort()
                        return
                    self._commit_placement()
                    guard = self.probe.oom_guard() if self.probe is not None else contextlib.nullcontext()
                    with guard:
                        self._step()
                    self._maybe_log_eplb()
                except Exception as exc:
                    # vLLM's engine core treats any exception in its busy loop as fatal.
                    self._die(exc)
                    return

    def _wait_for_work(self) -> bool:
        """Block until there is something to do and no stall holds the loop; False on stop."""
        with self._cv:
            while not self._stop:
                now = self._clock()
                if self._crash_at is not None and self._crash_at <= now:
                    return True
                # A stall holds the loop; so does a pending crash, like the collective that never returns.
                holds = [t for t in (self._stall_until, self._crash_at) if t is not None and t > now]
                if holds:
                    self._cv.wait(min(holds) - now)
                    continue
                if self._waiting or self._running or self._pending_placement is not None:
                    return True
                self._cv.wait(1.0)
            return False

    def _step(self) -> None:
        now = self._clock()
        new: list[_Sequence] = []
        finished: list[tuple[_Sequence, str]] = []
        with self._cv:
            for seq in [s for s in self._running if s.aborted]:
                self._running.remove(seq)
                finished.append((seq, "abort"))
            limit = self.batch_limit
            while len(self._running) > limit:
                # A lowered live limit takes effect now: recompute the newest later, as vLLM preempts.
                seq = self._running.pop()
                seq.kv = None
                self._waiting.appendleft(seq)
                self.preemptions += 1
                self.metrics.preemptions.inc()
            while self._waiting and len(self._running) < limit:
                seq = self._waiting.popleft()
                if seq.aborted:
                    finished.append((seq, "abort"))
                    continue
                if seq.scheduled_at is None:
                    seq.scheduled_at = now
                    self.metrics.queue_time.observe(now - seq.arrival)
                self._running.append(seq)
                new.append(seq)
            batch = list(self._running)
        for seq, why in finished:
            self._finish(seq, why)
        if not batch:
            return
        self.max_running_seen = max(self.max_running_seen, len(batch))
        self._reserve(len(batch), max(seq.context_len for seq in batch))

        step_tokens = 0
        for seqs in _by_length(new):
            step_tokens += self._prefill(seqs)
        admitted = {id(s) for s in new}
        decoding = [s for s in batch if id(s) not in admitted]
        if decoding:
            self._decode(decoding)
            step_tokens += len(decoding)

        now = self._clock()
        produced = len(batch)
        self.generation_tokens += produced
        self.metrics.generation_tokens.inc(produced)
        self.metrics.iteration_tokens.observe(step_tokens)
        self.steps += 1
        self._last_step_numel = step_tokens * int(self.moe.config.hidden_size)
        for seq in batch:
            if seq.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - seq.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_at)
            seq.last_token_at = now
            reason: str | None = None
            if not seq.ignore_eos and seq.output[-1] == EOS_TOKEN_ID:
                reason = "stop"
            elif len(seq.output) >= seq.max_tokens:
                reason = "length"
            if reason is not None:
                with self._cv:
                    self._running.remove(seq)
                self._finish(seq, reason)

    def _reserve(self, rows: int, context: int) -> None:
        """Account the step's working set against the memory budget; a real OOM above it."""
        moe = self.moe
        requested = rows * context * moe.per_token_bytes
        weights = moe.weights_bytes + self.ep.replica_bytes
        footprint = weights + requested
        budget = self.memory_budget_bytes
        if budget is not None and footprint > budget:
            raise torch.OutOfMemoryError(
                oom_message(
                    device=0,
                    requested=requested,
                    total=budget,
                    in_use=weights,
                    allocated=weights,
                    reserved=weights,
                )
            )
        self.last_footprint_bytes = footprint
        self._last_kv_bytes = requested
        self.peak_footprint_bytes = max(self.peak_footprint_bytes, footprint)

    def _forward(self, **kwargs: Any) -> torch.Tensor:
        """Next-token logits `[batch, vocab]`; only the last position goes through the LM head."""
        cache = kwargs.pop("cache")
        out = self.moe.model(**kwargs, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _prefill(self, seqs: list[_Sequence]) -> int:
        """One forward over same-length contexts (new prompts, or preempted sequences); returns tokens."""
        ids = torch.tensor([s.prompt + s.output for s in seqs], dtype=torch.long)
        cache = DynamicCache(config=self.moe.config)
        logits = self._forward(input_ids=ids, cache=cache)
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            seq.kv = [(keys[i : i + 1], values[i : i + 1]) for keys, values in _layers(cache)]
            if not seq.output:
                self.prompt_tokens += len(seq.prompt)
                self.metrics.prompt_tokens.inc(len(seq.prompt))
            seq.output.append(int(tokens[i]))
        return int(ids.numel())

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One forward for all `seqs`: their caches left-padded into one batch, split back after."""
        caches = [s.kv for s in seqs]
        assert all(kv is not None for kv in caches), "a decoding sequence has been prefilled"
        kvs = [kv for kv in caches if kv is not None]
        lengths = [kv[0][0].shape[2] for kv in kvs]
        width = max(lengths)
        batched: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(len(kvs[0])):
            first = kvs[0][layer][0]  # [1, kv_heads, len, head_dim]
            keys = first.new_zeros(len(kvs), first.shape[1], width, first.shape[3])
            values = torch.zeros_like(keys)
            for i, kv in enumerate(kvs):
                keys[i, :, width - lengths[i] :] = kv[layer][0][0]
                values[i, :, width - lengths[i] :] = kv[layer][1][0]
            batched.append((keys, values))
        # Padding sits left of each cache, so every sequence's new token lands in the same last column.
        mask = torch.zeros(len(seqs), width + 1, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, width - length :] = 1
        cache = DynamicCache(batched, config=self.moe.config)
        logits = self._forward(
            input_ids=torch.tensor([[s.output[-1]] for s in seqs], dtype=torch.long),
            attention_mask=mask,
            position_ids=torch.tensor(lengths, dtype=torch.long).unsqueeze(1),
            cache=cache,
        )
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            start = width - lengths[i]
            seq.kv = [(keys[i : i + 1, :, start:], values[i : i + 1, :, start:]) for keys, values in _layers(cache)]
            seq.output.append(int(tokens[i]))

    def _finish(self, seq: _Sequence, reason: str) -> None:
        with self._cv:
            self._by_id.pop(seq.request_id, None)
        seq.kv = None
        self.metrics.request_success[reason].inc()
        self.metrics.e2e_latency.observe(self._clock() - seq.arrival)
        result = Completion(seq.request_id, decode(seq.output), tuple(seq.output), len(seq.prompt), reason)
        self._deliver(seq, result)

    def _deliver(self, seq: _Sequence, result: Completion | BaseException) -> None:
        try:
            seq.on_done(result)
        except Exception:
            log.exception("request %s: result callback failed", seq.request_id)

    def _maybe_log_eplb(self) -> None:
        now = self._clock()
        if now - self._last_eplb < self.eplb_interval:
            return
        self._last_eplb = now
        self.expert_load.take_window()  # keep the logical window in step with the device one
        window = torch.tensor(self.ep.take_window(), dtype=torch.int64)
        if int(window.sum()) == 0:
            return
        bal = balance(window)  # the load each device really got, replicas and all
        step = self.steps % REARRANGEMENT_INTERVAL
        log.info(
            "%s",
            eplb_line(
                step=step,
                model=self.model_name,
                avg_tokens=bal.avg_tokens,
                max_tokens=bal.max_tokens,
                balancedness=bal.balancedness,
                steps_left=REARRANGEMENT_INTERVAL - step,
            ),
        )

    # -- death -----------------------------------------------------------------------------

    def _watchdog_abort(self) -> None:
        """Print the NCCL watchdog's lines for a timed-out all-reduce, then die."""
        # The simulated all-reduce has been stuck since the crash was asked for.
        hung_ms = max(0, int((self._clock() - self._crash_requested_at) * 1000))
        lines = nccl_watchdog_lines(
            rank=0,
            seq=self.steps + 1,
            numel=max(self._last_step_numel, int(self.moe.config.hidden_size)),
            timeout_ms=NCCL_TIMEOUT_MS,
            ran_ms=NCCL_TIMEOUT_MS + hung_ms,
        )
        stream = self._stderr or sys.stderr
        stream.write("".join(line + "\n" for line in lines))
        stream.flush()
        error_type: type[Exception] = getattr(torch.distributed, "DistBackendError", RuntimeError)
        try:
            raise error_type("NCCL communicator was aborted on rank 0.")
        except Exception as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        # Dead before the log line: whoever reads the line finds /health already at 503.
        self._alive = False
        self.dead_reason = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        log.error("EngineCore encountered a fatal error.", exc_info=exc)
        self._fail_all(EngineDeadError())
        self._drop_pending_placement(f"the engine died ({self.dead_reason})")
        if self._on_dead is not None:
            self._on_dead(self.dead_reason)

    def _fail_all(self, error: BaseException | None) -> None:
        """End every queued and running request: with `error`, or as aborted when None."""
        with self._cv:
            seqs = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            self._by_id.clear()
        for seq in seqs:
            seq.kv = None
            if error is None:
                self.metrics.request_success["abort"].inc()
                result = Completion(seq.request_id, decode(seq.output), tuple(seq.output), len(seq.prompt), "abort")
                self._deliver(seq, result)
            else:
                self._deliver(seq, error)


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer of a filled full-attention cache."""
    out = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        out.append((layer.keys, layer.values))
    return out


def _by_length(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """`seqs` grouped by context length, so each prefill group is one unpadded batch."""
    ordered = sorted(seqs, key=lambda s: s.context_len)
    return [list(group) for _, group in itertools.groupby(ordered, key=lambda s: s.context_len)]
