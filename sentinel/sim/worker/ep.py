"""Expert parallelism over virtual devices, with a placement that can change live.

The tiny model's experts are served the way vLLM serves them with
`--enable-expert-parallel --enable-eplb`: `EP_GROUP_SIZE` virtual devices, each with a
fixed number of expert slots (its share of the experts plus redundant slots), and a
placement (`sentinel.moe.Placement`) saying which logical expert each slot holds. The
`experts` module of every MoE layer becomes an `ExpertParallelExperts`:

- dispatch (`SlotDispatch`, its own module so a probe can hook it): each routed
  (token, k) assignment of logical expert `e` goes to one of `e`'s replicas, round
  robin from a per-expert offset that carries over between forward passes, so the
  replicas of an expert split its tokens evenly, within one token per replica over
  any stretch of traffic. It returns physical slot ids (`device * slots + slot`).
- compute: each slot's assignments go through that slot's own weights (fp32: one
  `grouped_mm` per projection over the slots' weights stacked in slot order, as
  transformers' own experts compute; int8: a loop over the slots), and the slot's
  device is charged them: that is the measured per-device load (`take_window`,
  `device_tokens`).
- combine: per-assignment outputs are summed over k in a fixed order, so a token's
  output does not depend on where its experts live.

Virtual devices are CPU tensors. What is real: tokens go where the placement says,
the per-device load is counted from that dispatch, and a new replica is a real copy
of the weights (a `clone` of a current replica's tensors), with its bytes.

Changing the placement live is two steps. `ExpertParallel.stage(target)` runs beside
serving, on the caller's thread: it checks the target against the slots (refusing
with a reason) and builds each layer's new slot table, where kept slots share their
tensors and new replicas are cloned from a current one; the old tensors stay in use
until the swap, which is the staging memory a plan costs. `commit(staged)` is one
attribute assignment per layer; the engine calls it between two forward passes,
never inside one, so every forward pass sees one placement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from sentinel.moe import EMPTY, Copy, LayerSlots, Placement, PlacementError, copies_between

__all__ = [
    "ExpertParallel",
    "ExpertParallelExperts",
    "ExpertWeights",
    "LayerState",
    "PlacementRefused",
    "PlacementResult",
    "SlotDispatch",
    "StagedPlacement",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


class PlacementRefused(Exception):
    """A placement the worker will not run; `reason` says why (shape, slots, memory, version)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights in one slot: fp32 matrices, or int8 with one scale per output channel."""

    gate_up: torch.Tensor  # [2 x intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    gate_up_scale: torch.Tensor | None = None  # [2 x intermediate, 1] when int8
    down_scale: torch.Tensor | None = None  # [hidden, 1] when int8

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors, as stored."""
        tensors = (self.gate_up, self.down, self.gate_up_scale, self.down_scale)
        return sum(t.nbytes for t in tensors if t is not None)

    def copy(self) -> ExpertWeights:
        """A real copy: new storage for every tensor (what moving an expert to a device costs)."""

        def clone(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        gate_up, down = clone(self.gate_up), clone(self.down)
        assert gate_up is not None and down is not None
        return ExpertWeights(gate_up, down, clone(self.gate_up_scale), clone(self.down_scale))

    def apply(self, x: torch.Tensor, act_fn: Activation) -> torch.Tensor:
        """The expert MLP: `down(act(gate(x)) * up(x))`."""
        gate_up = self.gate_up if self.gate_up_scale is None else self.gate_up.to(x.dtype) * self.gate_up_scale
        down = self.down if self.down_scale is None else self.down.to(x.dtype) * self.down_scale
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(act_fn(gate) * up, down)


def loaded_weights(experts: nn.Module) -> list[ExpertWeights]:
    """Every expert's weights as loaded: views into transformers' fused tensors (fp32 or int8)."""
    # Imported here: model.py imports this module to install expert parallelism.
    from sentinel.sim.worker.model import Int8Experts

    if isinstance(experts, Int8Experts):
        return [
            ExpertWeights(experts.gate_up_q[e], experts.down_q[e], experts.gate_up_scale[e], experts.down_scale[e])
            for e in range(experts.num_experts)
        ]
    if isinstance(experts, Qwen3MoeExperts):
        return [
            ExpertWeights(experts.gate_up_proj.detach()[e], experts.down_proj.detach()[e])
            for e in range(experts.num_experts)
        ]
    raise TypeError(f"cannot serve {type(experts).__name__} expert-parallel")


@dataclass(frozen=True)
class LayerState:
    """One layer's placement and slot weights; replaced whole, never changed in place."""

    slots: LayerSlots  # [device][slot] -> expert
    weights: tuple[tuple[ExpertWeights | None, ...], ...]  # [device][slot]
    replica_table: torch.Tensor  # [experts, devices]: global slot of each replica, -1 past the count
    replica_count: torch.Tensor  # [experts]
    slot_device: torch.Tensor  # [devices x slots]: device of each global slot
    single: bool  # every expert has exactly one replica
    # fp32 slot weights stacked per global slot ([slots, hidden, 2 x inter], [slots, inter, hidden],
    # zeros in empty slots) for one grouped matmul per projection; None for int8 (a loop per slot).
    stacks: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def build(
        cls, slots: LayerSlots, weights: tuple[tuple[ExpertWeights | None, ...], ...], num_experts: int
    ) -> LayerState:
        """Index tables for dispatch; `slots` must give every expert a replica."""
        per_device = len(slots[0])
        replicas: list[list[int]] = [[] for _ in range(num_experts)]
        for d, device in enumerate(slots):
            for s, e in enumerate(device):
                if e != EMPTY:
                    replicas[e].append(d * per_device + s)
        width = max(len(r) for r in replicas)
        table = torch.full((num_experts, width), -1, dtype=torch.int64)
        for e, where in enumerate(replicas):
            table[e, : len(where)] = torch.tensor(where, dtype=torch.int64)
        count = torch.tensor([len(r) for r in replicas], dtype=torch.int64)
        device_of = torch.arange(len(slots), dtype=torch.int64).repeat_interleave(per_device)
        return cls(slots, weights, table, count, device_of, width == 1, _stacks(weights))

    @property
    def filled(self) -> int:
        """Slots holding a replica."""
        return sum(1 for device in self.slots for e in device if e != EMPTY)


def _stacks(weights: tuple[tuple[ExpertWeights | None, ...], ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fp32 weights of every slot in one tensor per projection, laid out for `grouped_mm`."""
    flat = [w for device in weights for w in device]
    sample = next(w for w in flat if w is not None)
    if sample.gate_up_scale is not None or not hasattr(F, "grouped_mm"):
        return None
    gate_up = torch.zeros(len(flat), *sample.gate_up.shape[::-1], dtype=sample.gate_up.dtype)
    down = torch.zeros(len(flat), *sample.down.shape[::-1], dtype=sample.down.dtype)
    with torch.no_grad():
        for i, w in enumerate(flat):
            if w is not None:
                gate_up[i].copy_(w.gate_up.t())
                down[i].copy_(w.down.t())
    return gate_up, down


class SlotDispatch(nn.Module):
    """Routed logical experts -> physical slots, replicas taken round robin (see the module doc)."""

    offsets: torch.Tensor

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("offsets", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, experts: torch.Tensor, state: LayerState) -> torch.Tensor:
        """Global slot of every assignment in `experts` (1-D, logical expert ids)."""
        if state.single:
            return state.replica_table[experts, 0]  # one replica each: nothing to split
        counts = torch.bincount(experts, minlength=self.num_experts)
        # Rank of each assignment among those of its expert, in arrival order.
        order = torch.argsort(experts, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(experts)
        rank[order] = torch.arange(experts.numel(), dtype=torch.int64) - starts[experts[order]]
        n = state.replica_count[experts]
        replica = (self.offsets[experts] + rank) % n
        self.offsets.add_(counts).remainder_(state.replica_count)
        return state.replica_table[experts, replica]

    def reset(self) -> None:
        """Start every expert's round robin over (a new placement)."""
        self.offsets.zero_()


class ExpertParallelExperts(nn.Module):
    """A MoE layer's experts over virtual devices; same call as transformers' `Qwen3MoeExperts`."""

    def __init__(self, loaded: nn.Module, state: LayerState, act_fn: Activation, devices: int) -> None:
        super().__init__()
        # The weights as loaded stay a child: the first placement's slots are views into them.
        self.loaded = loaded
        self.dispatch = SlotDispatch(int(state.replica_count.numel()))
        self.state = state
        self.act_fn = act_fn
        self.devices = devices
        self._lock = threading.Lock()
        self._total = [0] * devices
        self._window = [0] * devices

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of each token's routed experts, each computed in the slot dispatch picked."""
        state = self.state  # one placement for the whole pass, whatever a swap does meanwhile
        tokens, k = top_k_index.shape
        slots = self.dispatch(top_k_index.reshape(-1), state)
        # Assignments sorted by slot: one gather in, a group per slot, one scatter out.
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=state.slot_device.numel())
        per_slot = counts.tolist()
        x = hidden_states[order // k]
        scale = top_k_weights.reshape(-1)[order, None]
        width = len(state.slots[0])
        if state.stacks is not None:
            # One grouped matmul per projection over every slot, as transformers' own experts do.
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            gate_up, down = state.stacks
            gate, up = F.grouped_mm(x, gate_up, offs=offsets).chunk(2, dim=-1)
            y = F.grouped_mm(self.act_fn(gate) * up, down, offs=offsets) * scale
        else:
            parts = []
            start = 0
            for slot, n in enumerate(per_slot):
                if n:
                    expert = state.weights[slot // width][slot % width]
                    assert expert is not None, "dispatch only picks filled slots"
                    parts.append(expert.apply(x[start : start + n], self.act_fn) * scale[start : start + n])
                    start += n
            y = torch.cat(parts)
        out = torch.empty(tokens * k, hidden_states.shape[-1], dtype=hidden_states.dtype)
        out[order] = y.to(out.dtype)
        load = [sum(per_slot[d * width : (d + 1) * width]) for d in range(self.devices)]
        with self._lock:
            for d, n in enumerate(load):
                self._total[d] += n
                self._window[d] += n
        return out.view(tokens, k, -1).sum(dim=1)

    @property
    def slot_gpus(self) -> list[int]:
        """The device of every global slot (fixed: a placement changes what a slot holds, not where it is).

        With `dispatch`, this is what `sentinel.probe`'s default slot finder hooks to
        count each device's real load after replication.
        """
        return [int(d) for d in self.state.slot_device.tolist()]

    def swap(self, state: LayerState) -> None:
        """Install a new placement; only between forward passes (the engine's step boundary)."""
        self.state = state
        self.dispatch.reset()

    def take_window(self) -> list[int]:
        """Assignments per device since the previous call."""
        with self._lock:
            window, self._window = self._window, [0] * self.devices
        return window

    def totals(self) -> list[int]:
        """Assignments per device since start."""
        with self._lock:
            return list(self._total)


@dataclass(frozen=True)
class StagedPlacement:
    """A placement ready to swap in: new slot tables built, copies made."""

    base: Placement  # the placement it was staged against
    placement: Placement
    states: tuple[LayerState, ...]
    copies: tuple[Copy, ...]
    copy_bytes: int
    replica_bytes: int  # bytes of replicas beyond one per expert, once swapped in


class ExpertParallel:
    """The expert-parallel group: every layer's `ExpertParallelExperts`, their placement and load."""

    def __init__(self, layers: Sequence[ExpertParallelExperts], num_experts: int, expert_bytes: int) -> None:
        self.layers = list(layers)
        self.num_experts = num_experts
        self.expert_bytes = expert_bytes
        self._lock = threading.Lock()  # one stage/commit at a time

    @classmethod
    def install(cls, model: nn.Module, *, devices: int, redundant_slots_per_device: int) -> ExpertParallel:
        """Replace every MoE block's `experts` by an `ExpertParallelExperts` in vLLM's default layout.

        vLLM's layout without EPLB: contiguous blocks of experts per device; the
        redundant slots start empty (vLLM fills them with copies of the first experts;
        an empty slot keeps the first rebalance's copies honest).
        """
        blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE block with an `experts` module")
        layers: list[ExpertParallelExperts] = []
        num_experts = 0
        expert_bytes = 0
        placement: Placement | None = None
        for block in blocks:
            experts = getattr(block, "experts")  # noqa: B009 - nn.Module's __getattr__ types it loosely
            assert isinstance(experts, nn.Module)
            if isinstance(experts, ExpertParallelExperts):
                raise ValueError("expert parallelism is already installed on this model")
            loaded = loaded_weights(experts)
            if placement is None:
                num_experts = len(loaded)
                expert_bytes = loaded[0].nbytes
                placement = Placement.contiguous(1, num_experts, devices, redundant_slots_per_device)
            slots = placement.layers[0]
            weights = tuple(tuple(None if e == EMPTY else loaded[e] for e in device) for device in slots)
            act_fn = getattr(experts, "act_fn")  # noqa: B009
            assert callable(act_fn)
            module = ExpertParallelExperts(experts, LayerState.build(slots, weights, num_experts), act_fn, devices)
            block.experts = module
            layers.append(module)
        return cls(layers, num_experts, expert_bytes)

    # -- placement ---------------------------------------------------------------------

    @property
    def placement(self) -> Placement:
        """The placement every layer runs now."""
        return Placement(self.num_experts, tuple(layer.state.slots for layer in self.layers))

    @property
    def devices(self) -> int:
        """Virtual devices of the group."""
        return self.layers[0].devices

    @property
    def replica_bytes(self) -> int:
        """Bytes of the replicas beyond one per expert (the memory redundant slots use now)."""
        filled = sum(layer.state.filled for layer in self.layers)
        return (filled - self.num_experts * len(self.layers)) * self.expert_bytes

    def stage(self, target: Placement) -> StagedPlacement:
        """Check `target` against the slots and build its slot tables, copying new replicas.

        Raises `PlacementRefused` with the reason when the target does not fit: wrong
        number of layers, devices, slots or experts, an expert without a replica.
        """
        with self._lock:
            base = self.placement
            try:
                target.validate("placement")
            except PlacementError as exc:
                raise PlacementRefused(str(exc)) from None
            if target.num_experts != base.num_experts or target.num_layers != base.num_layers:
                raise PlacementRefused(
                    f"placement has {target.num_layers} layers of {target.num_experts} experts; "
                    f"this worker serves {base.num_layers} layers of {base.num_experts}"
                )
            if target.slots_per_gpu != base.slots_per_gpu:
                raise PlacementRefused(
                    f"placement has {target.num_gpus} devices with {list(target.slots_per_gpu)} slots; "
                    f"this worker has {base.num_gpus} devices with {list(base.slots_per_gpu)} slots"
                )
            copies = copies_between(base, target)
            states = []
            with torch.no_grad():
                for li, layer in enumerate(self.layers):
                    old = layer.state
                    new_slots = target.layers[li]
                    if new_slots == old.slots:
                        states.append(old)
                        continue
                    mine = [c for c in copies if c.layer == li]
                    states.append(LayerState.build(new_slots, _slot_weights(old, new_slots, mine), self.num_experts))
            filled = sum(state.filled for state in states)
            return StagedPlacement(
                base=base,
                placement=target,
                states=tuple(states),
                copies=tuple(copies),
                copy_bytes=len(copies) * self.expert_bytes,
                replica_bytes=(filled - self.num_experts * len(self.layers)) * self.expert_bytes,
            )

    def commit(self, staged: StagedPlacement) -> None:
        """Swap the staged placement in: the engine calls this between two forward passes."""
        with self._lock:
            if self.placement != staged.base:
                raise PlacementRefused("the placement changed since this one was staged; stage it again")
            for layer, state in zip(self.layers, staged.states, strict=True):
                if layer.state is not state:
                    layer.swap(state)

    # -- load ----------------------------------------------------------------------------

    def take_window(self) -> list[list[int]]:
        """Assignments per `[layer][device]` since the previous call."""
        return [layer.take_window() for layer in self.layers]

    def device_tokens(self) -> list[list[int]]:
        """Assignments per `[layer][device]` since start."""
        return [layer.totals() for layer in self.layers]


def _slot_weights(
    old: LayerState, new_slots: LayerSlots, copies: Sequence[Copy]
) -> tuple[tuple[ExpertWeights | None, ...], ...]:
    """New slot weights: a slot that keeps its expert keeps its tensors; a copy reads its source device."""
    out = [
        [
            w if e != EMPTY and old.slots[d][s] == e else None
            for s, (e, w) in enumerate(zip(device, old.weights[d], strict=True))
        ]
        for d, device in enumerate(new_slots)
    ]
    for copy in copies:
        source = next(
            w
            for e, w in zip(old.slots[copy.source_gpu], old.weights[copy.source_gpu], strict=True)
            if e == copy.expert and w is not None
        )
        out[copy.gpu][copy.slot] = source.copy()
    return tuple(tuple(row) for row in out)


@dataclass(frozen=True)
class PlacementResult:
    """What `ServingEngine.apply_placement` did: the worker's acknowledgement of a placement.

    `status`: `applied` (the worker runs `version` from engine step `step` on),
    `refused` (`reason` says why; the old placement runs on) or `timed_out` (no step
    boundary came within the timeout, e.g. the engine is stalled; the request was
    withdrawn and the old placement runs on). `version` is always the placement
    version the worker runs after the call.
    """

    status: str
    version: int
    requested_version: int
    reason: str = ""
    copies: int = 0
    copy_bytes: int = 0
    seconds: float = 0.0
    step: int | None = None

    def to_json(self) -> dict[str, object]:
        """Plain JSON types, for the HTTP answer and the probe's report."""
        return {
            "status": self.status,
            "version": self.version,
            "requested_version": self.requested_version,
            "reason": self.reason,
            "copies": self.copies,
            "copy_bytes": self.copy_bytes,
            "seconds": round(self.seconds, 6),
            "step": self.step,
        }
