"""Where every expert replica runs: physical slot -> logical expert, per GPU, per layer.

Vocabulary (vLLM's and SGLang's EPLB): a *logical* expert is one set of weights of the
model (`0 .. num_experts-1`); a *physical slot* is room for one expert's weights on one
GPU of the expert-parallel group; a *replica* is a logical expert loaded into a slot.
Every logical expert has at least one replica; a hot one may have several, and the
tokens routed to it are split evenly among them. Each GPU has a fixed number of slots
(its share of the model's experts plus its budget of redundant slots); a slot may be
empty (`EMPTY`), which is how a worker starts before any rebalance fills its redundant
slots.

Load and balancedness, as vLLM and SGLang define it: a GPU's load in a layer is the sum
over its replicas of the replica's share of its expert's tokens (`tokens / replicas`);
a layer's balancedness is the mean over GPUs of that load divided by its maximum; over
several layers it is the sum of the per-layer means over the sum of the per-layer
maxima (1.0 is perfect; all load on one of 4 GPUs gives 0.25). A layer without tokens
has no balancedness (`None`) and does not enter the sum.

Pure Python, no torch and no numpy: the daemon, the planner and the test worker share
this model, and the worker validates every plan it is sent with `Placement.validate`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "EMPTY",
    "Copy",
    "LayerSlots",
    "Placement",
    "PlacementError",
    "balancedness",
    "copies_between",
    "gpu_loads",
    "layer_balancedness",
    "validate_tokens",
]

EMPTY = -1
"""The expert id of an empty slot."""

LayerSlots = tuple[tuple[int, ...], ...]
"""One layer's slots: `[gpu][slot] -> expert` (or `EMPTY`)."""


class PlacementError(ValueError):
    """A placement or a token table that is malformed or impossible; the message says where."""


@dataclass(frozen=True)
class Placement:
    """Physical slot -> logical expert for every (layer, GPU, slot).

    `layers[l][g][s]` is the expert in slot `s` of GPU `g` in MoE layer `l` (0-based
    positions in the layer list, not model layer numbers). Every layer has the same
    GPUs, and a GPU has the same number of slots in every layer.
    """

    num_experts: int
    layers: tuple[LayerSlots, ...]

    # -- construction -------------------------------------------------------------

    @classmethod
    def contiguous(
        cls, num_layers: int, num_experts: int, num_gpus: int, redundant_slots_per_gpu: int = 0
    ) -> Placement:
        """vLLM's layout without EPLB: experts in equal contiguous blocks, redundant slots empty."""
        if num_gpus < 1 or num_experts < 1 or num_layers < 0 or redundant_slots_per_gpu < 0:
            raise PlacementError(
                f"cannot lay out {num_experts} experts on {num_gpus} GPUs with "
                f"{redundant_slots_per_gpu} redundant slots each over {num_layers} layers"
            )
        per_gpu = math.ceil(num_experts / num_gpus)
        gpus = []
        for g in range(num_gpus):
            experts = [e for e in range(g * per_gpu, min((g + 1) * per_gpu, num_experts))]
            experts += [EMPTY] * (per_gpu + redundant_slots_per_gpu - len(experts))
            gpus.append(tuple(experts))
        layer = tuple(gpus)
        return cls(num_experts, tuple(layer for _ in range(num_layers)))

    @classmethod
    def from_lists(cls, num_experts: int, layers: Sequence[Sequence[Sequence[int]]]) -> Placement:
        """Build from nested lists and validate; raises `PlacementError` naming the bad entry."""
        placement = cls(num_experts, tuple(tuple(tuple(gpu) for gpu in layer) for layer in layers))
        placement.validate()
        return placement

    @classmethod
    def from_json(cls, data: Any, where: str = "placement") -> Placement:
        """Parse `{"num_experts": E, "layers": [[[expert, ...] per GPU] per layer]}` and validate it."""
        if not isinstance(data, Mapping):
            raise PlacementError(f"{where}: expected an object, got {type(data).__name__}")
        num_experts = data.get("num_experts")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise PlacementError(f"{where}.num_experts: expected a positive integer, got {num_experts!r}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise PlacementError(f"{where}.layers: expected a list of layers, got {type(layers).__name__}")
        out: list[LayerSlots] = []
        for li, layer in enumerate(layers):
            if not isinstance(layer, list):
                raise PlacementError(f"{where}.layers[{li}]: expected a list of GPUs")
            gpus: list[tuple[int, ...]] = []
            for gi, gpu in enumerate(layer):
                if not isinstance(gpu, list):
                    raise PlacementError(f"{where}.layers[{li}][{gi}]: expected a list of slots")
                for si, e in enumerate(gpu):
                    if isinstance(e, bool) or not isinstance(e, int):
                        raise PlacementError(f"{where}.layers[{li}][{gi}][{si}]: expected an integer, got {e!r}")
                gpus.append(tuple(gpu))
            out.append(tuple(gpus))
        placement = cls(num_experts, tuple(out))
        placement.validate(where)
        return placement

    def to_json(self) -> dict[str, Any]:
        """The JSON form `from_json` reads."""
        return {"num_experts": self.num_experts, "layers": [[list(gpu) for gpu in layer] for layer in self.layers]}

    def digest(self) -> str:
        """A short fingerprint of the placement (sha256 of its compact JSON), for acknowledgements."""
        text = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def padded(self, slots_per_gpu: int) -> Placement:
        """The same placement with every GPU grown to `slots_per_gpu` slots (new ones empty).

        Raises `PlacementError` when a GPU already has more slots than that.
        """
        for gi, n in enumerate(self.slots_per_gpu):
            if n > slots_per_gpu:
                used = max(sum(1 for e in layer[gi] if e != EMPTY) for layer in self.layers)
                raise PlacementError(
                    f"GPU {gi} has {n} slots ({used} in use), more than the budget of {slots_per_gpu} slots per GPU"
                )
        return Placement(
            self.num_experts,
            tuple(tuple(gpu + (EMPTY,) * (slots_per_gpu - len(gpu)) for gpu in layer) for layer in self.layers),
        )

    # -- shape --------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """MoE layers."""
        return len(self.layers)

    @property
    def num_gpus(self) -> int:
        """GPUs of the expert-parallel group."""
        return len(self.layers[0]) if self.layers else 0

    @property
    def slots_per_gpu(self) -> tuple[int, ...]:
        """Slots of each GPU (the same in every layer)."""
        return tuple(len(gpu) for gpu in self.layers[0]) if self.layers else ()

    def replicas(self, layer: int) -> list[int]:
        """Replica count of every expert of `layer`."""
        counts = [0] * self.num_experts
        for gpu in self.layers[layer]:
            for e in gpu:
                if e != EMPTY:
                    counts[e] += 1
        return counts

    def holders(self, layer: int, expert: int) -> list[int]:
        """GPUs holding a replica of `expert` in `layer` (a GPU once per replica)."""
        return [g for g, gpu in enumerate(self.layers[layer]) for e in gpu if e == expert]

    def filled_slots(self) -> int:
        """Slots holding a replica, over all layers and GPUs."""
        return sum(1 for layer in self.layers for gpu in layer for e in gpu if e != EMPTY)

    def validate(self, where: str = "placement") -> None:
        """Raise `PlacementError` unless the shape is consistent and every expert has a replica."""
        if not self.layers:
            raise PlacementError(f"{where}: no layers")
        slots = self.slots_per_gpu
        if not slots:
            raise PlacementError(f"{where}.layers[0]: no GPUs")
        total = sum(slots)
        if total < self.num_experts:
            raise PlacementError(
                f"{where}: {self.num_experts} experts do not fit in {total} slots "
                f"({len(slots)} GPUs with {', '.join(str(s) for s in slots)} slots)"
            )
        everyone = set(range(self.num_experts))
        for li, layer in enumerate(self.layers):
            if len(layer) == len(slots) and all(len(gpu) == n for gpu, n in zip(layer, slots, strict=True)):
                present = {e for gpu in layer for e in gpu}
                present.discard(EMPTY)
                if present == everyone:
                    continue  # the common case, checked in C; the loop below names what is wrong
            if len(layer) != len(slots):
                raise PlacementError(f"{where}.layers[{li}]: {len(layer)} GPUs, layer 0 has {len(slots)}")
            for gi, gpu in enumerate(layer):
                if len(gpu) != slots[gi]:
                    raise PlacementError(
                        f"{where}.layers[{li}][{gi}]: {len(gpu)} slots, GPU {gi} has {slots[gi]} in layer 0"
                    )
                for si, e in enumerate(gpu):
                    if isinstance(e, bool) or not isinstance(e, int) or (e != EMPTY and not 0 <= e < self.num_experts):
                        raise PlacementError(
                            f"{where}.layers[{li}][{gi}][{si}]: expert {e} out of range 0..{self.num_experts - 1}"
                            f" (or {EMPTY} for an empty slot)"
                        )
            missing = [e for e, n in enumerate(self.replicas(li)) if n == 0]
            if missing:
                raise PlacementError(f"{where}.layers[{li}]: experts {_ids(missing)} have no replica")

    # -- load ---------------------------------------------------------------------

    def gpu_loads(self, tokens: Sequence[Sequence[float]]) -> list[list[float]]:
        """Expected load `[layer][gpu]` of `tokens[layer][expert]`, each expert split evenly over its replicas."""
        validate_tokens(tokens, self.num_layers, self.num_experts)
        return [gpu_loads(tokens[li], layer, self.num_experts) for li, layer in enumerate(self.layers)]

    def balancedness(self, tokens: Sequence[Sequence[float]]) -> float | None:
        """Predicted balancedness of the whole placement under `tokens` (None without tokens)."""
        return balancedness(self.gpu_loads(tokens))

    def layer_balancedness(self, tokens: Sequence[Sequence[float]]) -> list[float | None]:
        """Predicted balancedness of each layer under `tokens`."""
        return [layer_balancedness(loads) for loads in self.gpu_loads(tokens)]


class Copy(NamedTuple):
    """One expert's weights copied into a slot: what applying a placement costs.

    `source_gpu` holds a replica of `expert` in the placement being replaced. The copy
    reads the old weights, so copies into slots that are themselves sources elsewhere
    are safe as long as every copy is staged before the placement is swapped. (A named
    tuple: a first rebalance of a large model makes thousands.)
    """

    layer: int
    gpu: int
    slot: int
    expert: int
    source_gpu: int

    def to_json(self) -> dict[str, int]:
        """`{"layer", "gpu", "slot", "expert", "source_gpu"}`."""
        return {
            "layer": self.layer,
            "gpu": self.gpu,
            "slot": self.slot,
            "expert": self.expert,
            "source_gpu": self.source_gpu,
        }


def copies_between(current: Placement, target: Placement, gpus_per_node: int | None = None) -> list[Copy]:
    """The weight copies that turn `current` into `target` (same GPUs and slots).

    A slot whose expert changes to another (non-empty) expert needs a copy; emptying a
    slot or keeping its expert costs nothing. The source is a GPU that holds the expert
    now: the receiving GPU itself when it does, else one on the same node
    (`gpus_per_node`: NVLink rather than the network), else the holder that has sent
    the fewest copies so far (spreading the reads), lowest index first.
    """
    if current.num_experts != target.num_experts or current.slots_per_gpu != target.slots_per_gpu:
        raise PlacementError(
            f"target placement has {target.num_gpus} GPUs with slots {list(target.slots_per_gpu)} and "
            f"{target.num_experts} experts; the current one {current.num_gpus} GPUs with slots "
            f"{list(current.slots_per_gpu)} and {current.num_experts} experts"
        )
    if current.num_layers != target.num_layers:
        raise PlacementError(f"target placement has {target.num_layers} layers, the current one {current.num_layers}")
    out: list[Copy] = []
    sent = [0] * current.num_gpus
    for li, (old, new) in enumerate(zip(current.layers, target.layers, strict=True)):
        if old == new:
            continue
        holders: dict[int, list[int]] = {}
        for g, gpu in enumerate(old):
            for e in gpu:
                if e != EMPTY:
                    holders.setdefault(e, []).append(g)
        for g, (old_gpu, new_gpu) in enumerate(zip(old, new, strict=True)):
            for s, (was, now) in enumerate(zip(old_gpu, new_gpu, strict=True)):
                if now in (EMPTY, was):
                    continue
                sources = holders.get(now)
                if not sources:
                    raise PlacementError(f"layer {li}: expert {now} has no replica in the current placement")
                if g in sources:
                    source = g
                else:
                    source = sources[0]
                    rank = (not _same_node(source, g, gpus_per_node), sent[source])
                    for h in sources[1:]:
                        other = (not _same_node(h, g, gpus_per_node), sent[h])
                        if other < rank:
                            source, rank = h, other
                sent[source] += 1
                out.append(Copy(li, g, s, now, source))
    return out


def _same_node(a: int, b: int, gpus_per_node: int | None) -> bool:
    return gpus_per_node is not None and a // gpus_per_node == b // gpus_per_node


def gpu_loads(tokens: Sequence[float], layer: Sequence[Sequence[int]], num_experts: int) -> list[float]:
    """One layer's load per GPU: each expert's tokens split evenly over its replicas."""
    replicas = [0] * num_experts
    for gpu in layer:
        for e in gpu:
            if e != EMPTY:
                replicas[e] += 1
    share = [tokens[e] / n if n else 0.0 for e, n in enumerate(replicas)]
    share.append(0.0)  # EMPTY (-1) indexes this last entry: an empty slot carries nothing
    return [sum([share[e] for e in gpu]) for gpu in layer]


def layer_balancedness(loads: Sequence[float]) -> float | None:
    """Mean over max of one layer's per-GPU load; None when the layer had no tokens."""
    peak = max(loads, default=0.0)
    if peak <= 0:
        return None
    return sum(loads) / len(loads) / peak


def balancedness(loads: Sequence[Sequence[float]]) -> float | None:
    """Sum over layers of the mean per-GPU load over the sum of the maxima; None without tokens."""
    avg = peak = 0.0
    for layer in loads:
        top = max(layer, default=0.0)
        if top > 0:
            avg += sum(layer) / len(layer)
            peak += top
    return avg / peak if peak > 0 else None


_PLAIN_NUMBERS = {int, float}


def validate_tokens(tokens: Sequence[Sequence[float]], num_layers: int, num_experts: int) -> None:
    """Raise `PlacementError` unless `tokens` is `[num_layers][num_experts]` of finite counts >= 0."""
    if len(tokens) != num_layers:
        raise PlacementError(f"tokens: {len(tokens)} layers, the placement has {num_layers}")
    for li, row in enumerate(tokens):
        if len(row) != num_experts:
            raise PlacementError(f"tokens[{li}]: {len(row)} experts, the placement has {num_experts}")
        # Fast path in C (sum, min): a NaN or an infinity makes the sum non-finite.
        try:
            fine = math.isfinite(sum(row)) and min(row) >= 0
        except TypeError:
            fine = False
        if fine and set(map(type, row)) <= _PLAIN_NUMBERS:
            continue
        for e, n in enumerate(row):
            # numbers.Real also takes numpy scalars, which a caller's counts often are.
            if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 0:
                raise PlacementError(f"tokens[{li}][{e}]: expected a finite count >= 0, got {n!r}")


def _ids(items: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
