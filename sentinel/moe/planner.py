"""The expert placement planner: replicate hot experts, pack replicas onto GPUs, move few weights.

Input: tokens per expert per layer over a recent window, the placement the worker runs
now (`Placement`: slot -> expert, per GPU, per layer) and `PlannerSettings`. Output: a
`Plan` with the new placement, the predicted balancedness before and after (mean over
max of per-GPU load, as vLLM and SGLang define it), and the weight copies it takes.

The idea is DeepSeek's EPLB (replicas for hot experts, balanced packing, hierarchical
when experts are grouped by node); the code is our own, and unlike EPLB it starts from
where the experts are, because copying weights costs time and memory on a serving GPU.
Per layer:

1. Replicas (EPLB's rule): one more replica at a time to the expert whose replicas
   carry the most tokens each, until none carries more than half an even GPU share
   (`tokens / GPUs / 2`) or the slots run out; never two replicas on one GPU.
   EPLB fills every slot; we stop earlier because every new replica is a copy, and
   pieces of half a share pack well on skewed loads (measured, see bench/planner.py).
   When that plan stays under 0.95, the layer is planned again with every slot filled
   (a few equally hot experts need a replica count that divides over the GPUs) and
   the better score of the two wins.
2. Packing: replicas in decreasing order of load, each onto the least loaded GPU
   with a free slot (longest-processing-time first, EPLB's balanced packing), except
   that a replica *stays* on a GPU that holds its expert now when that GPU is within
   3 % of the mean load of the least loaded one.
3. Bringing copies home: packing for balance still scatters experts that could have
   stayed (two equal experts swapped between their GPUs cost two copies and buy
   nothing). Each replica that landed away from its expert's current GPUs moves back
   to one of them, or swaps with a copied replica there, when that does not raise the
   peak load or costs less balancedness than `min_gain_per_copy` per copy saved.
4. The trade-off, explicit: the layer's new placement is taken only when
   `balancedness after - min_gain_per_copy x copies > balancedness before`, i.e. every
   copy buys at least `min_gain_per_copy` (default 0.002: 10 copies must buy 0.02).
   Otherwise the layer keeps its placement, so the predicted balancedness never gets
   worse, layer by layer and overall (sum of means over sum of maxima).
5. Budgets: with `max_copies` or per-GPU staging memory (`staging_bytes`, checked
   against `copies into the GPU x expert_bytes`: new weights are staged next to the
   old ones until the swap), layers are taken in order of score gained per copy until
   the next one does not fit; the rest keep their placement and `Plan.notes` says why.
   When no layer fits at all, `PlanRefused` says which limit stopped it.
6. Slots: within a GPU a replica keeps the slot it has; new replicas take the freed
   slots in order; `copies_between` picks each copy's source GPU.

With `gpus_per_node` and `expert_groups` (experts in equal contiguous groups, as
DeepSeek-V3's group-limited routing has them) and groups a multiple of nodes, the plan
is hierarchical as in EPLB: groups are packed onto nodes first (staying where most of
their replicas are when that node is within the tolerance), then each node replicates
and packs its own experts on its own GPUs, so a group's tokens never leave its node.
Otherwise the policy is global (a note says so when groups were given).

Pure Python on purpose: the work is a few hundred greedy steps per layer, each
depending on the last. A numpy version of the packing step, vectorised over layers,
was measured no faster (one pass over the 62 layers of the 480B shape: 28 ms against
27 ms in Python, on the 2-vCPU development VM): with 8-16 GPUs a numpy call on a
[layers, GPUs] array costs what the Python step it replaces does, so numpy is not a
dependency. bench/planner.py has the figures. The daemon should still call the
planner off its event loop (a thread).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sentinel.moe.placement import (
    EMPTY,
    Copy,
    LayerSlots,
    Placement,
    PlacementError,
    balancedness,
    copies_between,
    gpu_loads,
    layer_balancedness,
    validate_tokens,
)

__all__ = ["LayerPlan", "Plan", "PlanRefused", "PlannerSettings", "plan_rebalance"]

# Replicate until no replica carries more than this share of the mean GPU load: first
# half a share (small enough pieces to pack well, few enough to copy; on Zipf loads 1.0
# packs worse and filling every slot copies more for no gain, see bench/planner.py),
# then, when that leaves more than 5 % on the table, every slot (EPLB's rule: a few
# equally hot experts need a replica count that is a multiple of the GPUs).
_REPLICA_SHARES = (0.5, 0.0)
_GOOD_ENOUGH = 0.95
# A replica stays on a GPU that holds its expert when that GPU's load is within this
# share of the mean of the least loaded GPU's.
_STAY_TOLERANCE = 0.03
_EPS = 1e-12


class PlanRefused(Exception):
    """No plan fits the limits (slots, staging memory, copies); `reason` says which and where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PlannerSettings:
    """What the planner may do. Every field is checked when the settings are made.

    - `min_gain_per_copy`: balancedness (0..1, per layer) one weight copy must buy.
    - `max_copies`: at most this many expert copies in one plan (None: no limit).
    - `expert_bytes`: bytes of one expert's weights (for `Plan.copy_bytes` and staging).
    - `staging_bytes`: memory each GPU can spare for incoming copies until the swap,
      one figure for all GPUs or one per GPU (None: not checked; needs `expert_bytes`).
    - `redundant_slots_per_gpu`: the slot budget: `ceil(experts / GPUs)` plus this per
      GPU; the current placement is padded with empty slots to it (None: the current
      placement's slots are the budget).
    - `gpus_per_node`, `expert_groups`: the hierarchical policy (see the module doc).
    """

    min_gain_per_copy: float = 0.002
    max_copies: int | None = None
    expert_bytes: int = 0
    staging_bytes: int | tuple[int, ...] | None = None
    redundant_slots_per_gpu: int | None = None
    gpus_per_node: int | None = None
    expert_groups: int | None = None

    def __post_init__(self) -> None:
        problems = []
        gain = self.min_gain_per_copy
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not math.isfinite(gain) or gain < 0:
            problems.append(f"min_gain_per_copy: expected a number >= 0, got {gain!r}")
        for name in ("max_copies", "redundant_slots_per_gpu"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                problems.append(f"{name}: expected an integer >= 0 or None, got {value!r}")
        for name in ("gpus_per_node", "expert_groups"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name}: expected a positive integer or None, got {value!r}")
        if isinstance(self.expert_bytes, bool) or not isinstance(self.expert_bytes, int) or self.expert_bytes < 0:
            problems.append(f"expert_bytes: expected an integer >= 0, got {self.expert_bytes!r}")
        staging = self.staging_bytes
        if staging is not None:
            values = staging if isinstance(staging, tuple) else (staging,)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                problems.append(f"staging_bytes: expected bytes >= 0 (one figure or one per GPU), got {staging!r}")
            elif self.expert_bytes <= 0:
                problems.append("staging_bytes: needs expert_bytes to know what a copy costs")
        if problems:
            raise ValueError("planner settings: " + "; ".join(problems))


@dataclass(frozen=True)
class LayerPlan:
    """What the plan does to one layer."""

    layer: int
    tokens: float
    balancedness_before: float | None
    balancedness_after: float | None
    copies: int
    policy: str  # "keep", or the candidate that won, e.g. "need+5%"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types."""
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "balancedness_before": self.balancedness_before,
            "balancedness_after": self.balancedness_after,
            "copies": self.copies,
            "policy": self.policy,
        }


@dataclass(frozen=True)
class Plan:
    """A new placement, what it is predicted to do, and what applying it costs."""

    current: Placement
    placement: Placement
    balancedness_before: float | None
    balancedness_after: float | None
    layers: tuple[LayerPlan, ...]
    copies: tuple[Copy, ...]
    expert_bytes: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        """False when the plan keeps the current placement."""
        return self.placement != self.current

    @property
    def copy_bytes(self) -> int:
        """Bytes of expert weights the plan copies."""
        return len(self.copies) * self.expert_bytes

    def copies_per_gpu(self) -> list[int]:
        """Copies into each GPU."""
        out = [0] * self.current.num_gpus
        for copy in self.copies:
            out[copy.gpu] += 1
        return out

    def staging_bytes_per_gpu(self) -> list[int]:
        """Memory each GPU needs for its incoming copies until the swap frees the old slots."""
        return [n * self.expert_bytes for n in self.copies_per_gpu()]

    def describe(self) -> str:
        """One line for logs and notifications."""
        changed = sum(1 for layer in self.layers if layer.copies or layer.policy != "keep")
        return (
            f"predicted balancedness {_fmt(self.balancedness_before)} -> {_fmt(self.balancedness_after)}; "
            f"{len(self.copies)} expert copies ({_mib(self.copy_bytes)}) in {changed} of {len(self.layers)} layers"
        )

    def to_json(self) -> dict[str, Any]:
        """Summary, per-layer figures, the new placement and the copies, in plain JSON types."""
        return {
            "balancedness_before": self.balancedness_before,
            "balancedness_after": self.balancedness_after,
            "copies": len(self.copies),
            "copy_bytes": self.copy_bytes,
            "changed": self.changed,
            "notes": list(self.notes),
            "layers": [layer.to_json() for layer in self.layers],
            "placement": self.placement.to_json(),
            "moves": [copy.to_json() for copy in self.copies],
        }


@dataclass
class _LayerResult:
    slots: LayerSlots
    loads: list[float]  # per GPU, current placement
    before: float | None
    after: float | None
    copies: int
    incoming: list[int]  # copies into each GPU
    policy: str

    @property
    def gain(self) -> float:
        return (self.after or 0.0) - (self.before or 0.0)


def plan_rebalance(
    tokens: Sequence[Sequence[float]], current: Placement, settings: PlannerSettings | None = None
) -> Plan:
    """Plan a new placement for `tokens[layer][expert]` (see the module doc).

    Raises `PlacementError` for a malformed placement or token table, `PlanRefused`
    when the slot budget or the copy and staging limits leave no plan that fits.
    """
    settings = settings or PlannerSettings()
    current.validate()
    validate_tokens(tokens, current.num_layers, current.num_experts)
    if settings.redundant_slots_per_gpu is not None:
        budget = math.ceil(current.num_experts / current.num_gpus) + settings.redundant_slots_per_gpu
        try:
            current = current.padded(budget)
        except PlacementError as exc:
            raise PlanRefused(str(exc)) from None
    num_gpus = current.num_gpus
    staging = _staging_limits(settings, num_gpus)
    nodes, groups, notes = _hierarchy(settings, current)

    results: list[_LayerResult] = []
    for li, slots in enumerate(current.layers):
        results.append(_plan_layer([float(n) for n in tokens[li]], slots, current.num_experts, settings, nodes, groups))

    chosen, more_notes = _within_budgets(results, settings, staging)
    notes.extend(more_notes)
    layers = tuple(r.slots if chosen[i] else current.layers[i] for i, r in enumerate(results))
    placement = Placement(current.num_experts, layers)
    copies = copies_between(current, placement, settings.gpus_per_node)
    per_layer_copies = [0] * current.num_layers
    for copy in copies:
        per_layer_copies[copy.layer] += 1
    before_loads = [r.loads for r in results]
    after_loads = [
        gpu_loads(tokens[li], layers[li], current.num_experts) if chosen[li] else r.loads
        for li, r in enumerate(results)
    ]
    layer_plans = tuple(
        LayerPlan(
            layer=li,
            tokens=float(sum(tokens[li])),
            balancedness_before=layer_balancedness(before_loads[li]),
            balancedness_after=layer_balancedness(after_loads[li]),
            copies=per_layer_copies[li],
            policy=results[li].policy if chosen[li] else "keep",
        )
        for li in range(current.num_layers)
    )
    return Plan(
        current=current,
        placement=placement,
        balancedness_before=balancedness(before_loads),
        balancedness_after=balancedness(after_loads),
        layers=layer_plans,
        copies=tuple(copies),
        expert_bytes=settings.expert_bytes,
        notes=tuple(notes),
    )


# -- settings against the placement ----------------------------------------------------


def _staging_limits(settings: PlannerSettings, num_gpus: int) -> list[int] | None:
    staging = settings.staging_bytes
    if staging is None:
        return None
    if isinstance(staging, tuple):
        if len(staging) != num_gpus:
            raise PlanRefused(f"staging_bytes gives {len(staging)} GPUs, the placement has {num_gpus}")
        return list(staging)
    return [staging] * num_gpus


def _hierarchy(settings: PlannerSettings, current: Placement) -> tuple[list[list[int]] | None, int | None, list[str]]:
    """Node -> GPUs and the number of expert groups when the hierarchical policy applies."""
    notes: list[str] = []
    per_node = settings.gpus_per_node
    if per_node is None:
        if settings.expert_groups is not None:
            notes.append("expert_groups without gpus_per_node: global policy")
        return None, None, notes
    num_gpus = current.num_gpus
    if num_gpus % per_node:
        raise PlanRefused(f"gpus_per_node {per_node} does not divide the {num_gpus} GPUs of the placement")
    nodes = [list(range(n * per_node, (n + 1) * per_node)) for n in range(num_gpus // per_node)]
    groups = settings.expert_groups
    if groups is None or len(nodes) == 1:
        return None, None, notes
    experts = current.num_experts
    if experts % groups or groups % len(nodes):
        notes.append(
            f"{groups} expert groups of {experts} experts on {len(nodes)} nodes: groups must divide the experts "
            "and be a multiple of the nodes for the hierarchical policy; global policy used"
        )
        return None, None, notes
    slots = current.slots_per_gpu
    need = experts // len(nodes)
    short = [n for n, gpus in enumerate(nodes) if sum(slots[g] for g in gpus) < need]
    if short:
        notes.append(f"node {short[0]} has fewer slots than the {need} experts of its groups: global policy used")
        return None, None, notes
    return nodes, groups, notes


# -- one layer ---------------------------------------------------------------------------


def _plan_layer(
    w: list[float],
    slots: LayerSlots,
    num_experts: int,
    settings: PlannerSettings,
    nodes: list[list[int]] | None,
    groups: int | None,
) -> _LayerResult:
    num_gpus = len(slots)
    before_loads = gpu_loads(w, slots, num_experts)
    before = layer_balancedness(before_loads)
    keep = _LayerResult(slots, before_loads, before, before, 0, [0] * num_gpus, "keep")
    if before is None or before >= 1.0 - _EPS:
        return keep
    # What to pack where: every expert on every GPU (global policy), or per node the
    # experts of the groups it got (hierarchical).
    if nodes is not None and groups is not None:
        parts = _groups_to_nodes(w, slots, nodes, groups)
    else:
        parts = [(list(range(num_experts)), list(range(num_gpus)))]
    mean = sum(w) / num_gpus
    price = settings.min_gain_per_copy
    current = _count(slots, num_experts)
    best: tuple[float, list[list[int]], float, int] | None = None  # (score, members, after, copies)
    for share in _REPLICA_SHARES:
        if best is not None and best[2] >= _GOOD_ENOUGH:
            break
        plans = [
            (experts, gpus, _replicas(w, experts, sum(len(slots[g]) for g in gpus), len(gpus), mean * share))
            for experts, gpus in parts
        ]
        # Skip a packing that cannot pay: balancedness is at most mean / largest replica
        # (and 1), and every replica beyond the current count is a copy.
        largest = max(w[e] / n for *_, replicas in plans for e, n in replicas.items())
        new_replicas = sum(max(0, n - current[e]) for *_, replicas in plans for e, n in replicas.items())
        ceiling = min(1.0, mean / largest) if largest > 0 else 1.0
        if ceiling - price * new_replicas <= max(before, best[0] if best else before) + _EPS:
            continue
        members: list[list[int]] = [[] for _ in slots]
        peak = 0.0
        copies = 0
        for experts, gpus, replicas in plans:
            got, loads, moved = _pack_gpus(w, experts, slots, gpus, replicas, price)
            for g, ids in zip(gpus, got, strict=True):
                members[g] = ids
            peak = max(peak, *loads)
            copies += moved
        after = mean / peak if peak > 0 else 0.0
        score = after - price * copies
        # The trade-off, per layer: the copies must buy at least `price` each.
        if score > max(before, best[0] if best else before) + _EPS and after > before + _EPS:
            best = (score, members, after, copies)
    if best is None:
        return keep
    _, members, after, copies = best
    new_slots, incoming = _assign_slots(slots, members)
    return _LayerResult(new_slots, before_loads, before, after, copies, incoming, "rebalance")


def _groups_to_nodes(
    w: list[float], slots: LayerSlots, nodes: list[list[int]], groups: int
) -> list[tuple[list[int], list[int]]]:
    """EPLB's first step: pack expert groups onto nodes, equal counts, balanced load.

    A group stays on the node holding most replicas of its experts when that node is
    within the stay tolerance of the least loaded one. Returns (experts, GPUs) per node.
    """
    size = len(w) // groups
    group_load = [sum(w[g * size : (g + 1) * size]) for g in range(groups)]
    node_of_gpu = {gpu: n for n, gpus in enumerate(nodes) for gpu in gpus}
    held = [[0] * len(nodes) for _ in range(groups)]
    for gpu, experts in enumerate(slots):
        for e in experts:
            if e != EMPTY:
                held[e // size][node_of_gpu[gpu]] += 1
    group_node = {grp: [max(range(len(nodes)), key=lambda n: (held[grp][n], -n))] for grp in range(groups)}
    items = sorted((-group_load[g], g) for g in range(groups))
    tolerance = sum(group_load) / len(nodes) * _STAY_TOLERANCE
    node_groups, _ = _pack(items, [groups // len(nodes)] * len(nodes), group_node, tolerance)
    return [
        ([e for grp in sorted(node_groups[n]) for e in range(grp * size, (grp + 1) * size)], gpus)
        for n, gpus in enumerate(nodes)
    ]


def _pack_gpus(
    w: list[float], experts: list[int], slots: LayerSlots, gpus: list[int], replicas: dict[int, int], price: float
) -> tuple[list[list[int]], list[float], int]:
    """Pack the replicas of `experts` onto `gpus`; returns (members and loads per GPU, copies)."""
    size = {e: w[e] / n for e, n in replicas.items()}
    items = sorted([(-size[e], e) for e, n in replicas.items() for _ in range(n)])
    origin: dict[int, list[int]] = {}
    for local, g in enumerate(gpus):
        for e in slots[g]:
            if e in replicas:
                origin.setdefault(e, []).append(local)
    cap = [len(slots[g]) for g in gpus]
    mean = sum(w[e] for e in experts) / len(gpus)
    members, loads = _pack(items, cap, {e: list(where) for e, where in origin.items()}, mean * _STAY_TOLERANCE)
    copies = _bring_home(members, loads, cap, origin, size, mean, price)
    return members, loads, copies


def _count(slots: LayerSlots, num_experts: int) -> list[int]:
    counts = [0] * num_experts
    for gpu in slots:
        for e in gpu:
            if e != EMPTY:
                counts[e] += 1
    return counts


def _replicas(w: list[float], experts: list[int], slots: int, gpus: int, limit: float) -> dict[int, int]:
    """EPLB's greedy replication: one more replica to the expert with the most tokens per replica.

    Stops once no replica carries more than `limit` tokens (0: when the slots run out).
    An expert gets at most one replica per GPU: two on one GPU split nothing.
    """
    replicas = dict.fromkeys(experts, 1)
    heap = [(-w[e], e) for e in experts if gpus > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(experts)):
        if not heap:
            break
        top, e = heap[0]
        if -top <= limit * (1 + _EPS):
            break
        replicas[e] += 1
        if replicas[e] < gpus:
            heapq.heapreplace(heap, (-w[e] / replicas[e], e))
        else:
            heapq.heappop(heap)
    return replicas


def _pack(
    items: list[tuple[float, int]], cap: list[int], holders: dict[int, list[int]], tolerance: float
) -> tuple[list[list[int]], list[float]]:
    """Sticky balanced packing of `items` (`(-load, id)`, heaviest first) into bins of `cap` slots.

    Longest-processing-time first: each item goes to the least loaded bin with room,
    except that it stays in a bin that held its id before (`holders`, consumed) when
    that bin has room and is within `tolerance` of the least loaded one. A bin gets a
    second copy of an id only when no other bin has room. Returns (ids, load) per bin.
    """
    bins = len(cap)
    load = [0.0] * bins
    room = list(cap)
    members: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0.0, b) for b in range(bins)]  # (load, bin); entries with an outdated load are skipped
    heappop, heappush = heapq.heappop, heapq.heappush
    # The planner's hot path: a few hundred items per layer and candidate.
    for neg, item in items:
        while heap and (heap[0][0] != load[heap[0][1]] or not room[heap[0][1]]):
            heappop(heap)
        if not heap:
            raise AssertionError("no bin has room: the caller packs at most as many items as slots")
        chosen = -1
        where = holders.get(item)
        if where:
            floor = heap[0][0] + tolerance
            for b in where:
                if room[b] and load[b] <= floor and item not in members[b] and (chosen < 0 or load[b] < load[chosen]):
                    chosen = b
            if chosen >= 0:
                where.remove(chosen)
        if chosen < 0:
            aside: list[tuple[float, int]] = []
            while heap:
                entry = heappop(heap)
                b = entry[1]
                if entry[0] != load[b] or not room[b]:
                    continue
                if item in members[b]:
                    aside.append(entry)
                    continue
                chosen = b
                break
            if chosen < 0:
                aside.sort()
                chosen = aside.pop(0)[1]
            for entry in aside:
                heappush(heap, entry)
            if where and chosen in where:
                where.remove(chosen)
        load[chosen] -= neg
        room[chosen] -= 1
        members[chosen].append(item)
        if room[chosen]:
            heappush(heap, (load[chosen], chosen))
    return members, load


def _bring_home(
    members: list[list[int]],
    load: list[float],
    cap: list[int],
    origin: dict[int, list[int]],
    size: dict[int, float],
    mean: float,
    price: float,
) -> int:
    """Send copied items back to a bin that held their id before, where that is worth it.

    Packing for balance scatters items that could have stayed: two equal items swapped
    between their home bins cost two copies and buy nothing. For each item in a bin
    that did not hold it (a copy), in bin and item order: move it to a bin that held
    it and has lost it, if that bin has room; else swap it with a copied item there,
    preferring one whose own home is here (two copies saved). A step is taken when it
    does not raise the peak load, or when the balancedness it costs (`mean / peak`
    before minus after) is less than `price` per copy saved: the per-copy trade-off,
    applied one copy at a time. Every step removes at least one copy. `members` and
    `load` change in place; returns the copies left.
    """
    bins = len(members)
    peak = max(load, default=0.0)
    # lost[b][id]: replicas of `id` bin b held before and has not kept (homes to return to).
    lost: list[dict[int, int]] = [{} for _ in range(bins)]
    for item, where in origin.items():
        for b in where:
            lost[b][item] = lost[b].get(item, 0) + 1
    foreign: list[list[int]] = [[] for _ in range(bins)]
    for b in range(bins):
        for item in members[b]:
            if lost[b].get(item, 0) > 0:
                lost[b][item] -= 1
            else:
                foreign[b].append(item)

    def ceiling(saved: int) -> float:
        # The highest peak a step saving `saved` copies may leave: mean/peak - mean/P < price x saved.
        slack = mean / peak - price * saved if peak > 0 else 0.0
        return peak if price <= 0 else (mean / slack if slack > 0 else math.inf)

    one, two = ceiling(1), ceiling(2)
    for g in range(bins):
        i = 0
        while i < len(foreign[g]):
            x = foreign[g][i]
            ux = size[x]
            done = False
            for h in origin.get(x, ()):
                if h == g or lost[h].get(x, 0) <= 0 or x in members[h]:
                    continue
                if len(members[h]) < cap[h] and load[h] + ux <= one:
                    members[g].remove(x)
                    members[h].append(x)
                    load[g] -= ux
                    load[h] += ux
                    lost[h][x] -= 1
                    foreign[g].pop(i)
                    done = True
                    break
                # A swap with y keeps both bins under `limit` when
                # load[h] + ux - limit <= uy <= limit - load[g] + ux; a y going home may use `two`.
                lo1, hi1 = load[h] + ux - one, one - load[g] + ux
                lo2, hi2 = load[h] + ux - two, two - load[g] + ux
                lost_g, members_g = lost[g], members[g]
                pick = -1
                for j, y in enumerate(foreign[h]):
                    uy = size[y]
                    if uy < lo2 or uy > hi2:
                        continue
                    home = lost_g.get(y, 0) > 0
                    if (not home and (uy < lo1 or uy > hi1)) or y == x or y in members_g:
                        continue
                    pick = j
                    if home:
                        break  # y goes home too: two copies saved
                if pick < 0:
                    continue
                y = foreign[h].pop(pick)
                uy = size[y]
                members[g].remove(x)
                members[h].remove(y)
                members[h].append(x)
                members[g].append(y)
                load[g] += uy - ux
                load[h] += ux - uy
                lost[h][x] -= 1
                foreign[g].pop(i)
                if lost[g].get(y, 0) > 0:
                    lost[g][y] -= 1
                else:
                    foreign[g].append(y)  # still a copy, now here; it may find its way home later
                done = True
                break
            if done:
                top = max(load)
                if top != peak:
                    peak = top
                    one, two = ceiling(1), ceiling(2)
            else:
                i += 1
    return sum(len(f) for f in foreign)


def _assign_slots(slots: LayerSlots, members: list[list[int]]) -> tuple[LayerSlots, list[int]]:
    """New slots per GPU: replicas keep their slot, new ones fill freed slots in order; copies per GPU."""
    out: list[tuple[int, ...]] = []
    incoming: list[int] = []
    for old, want_list in zip(slots, members, strict=True):
        want: dict[int, int] = {}
        for e in want_list:
            want[e] = want.get(e, 0) + 1
        new = list(old)
        free: list[int] = []
        for s, e in enumerate(old):
            n = want.get(e, 0)  # EMPTY is never wanted
            if n:
                want[e] = n - 1
            else:
                new[s] = EMPTY
                free.append(s)
        fill = sorted(e for e, n in want.items() for _ in range(n))
        for s, e in zip(free, fill, strict=False):  # fewer new replicas than free slots is normal
            new[s] = e
        out.append(tuple(new))
        incoming.append(len(fill))
    return tuple(out), incoming


# -- budgets ---------------------------------------------------------------------------------


def _within_budgets(
    results: list[_LayerResult], settings: PlannerSettings, staging: list[int] | None
) -> tuple[list[bool], list[str]]:
    """Which layers' plans to take under `max_copies` and the staging memory; notes for the rest."""
    changed = [i for i, r in enumerate(results) if r.policy != "keep"]
    chosen = [False] * len(results)
    if settings.max_copies is None and staging is None:
        for i in changed:
            chosen[i] = True
        return chosen, []
    penalty = settings.min_gain_per_copy
    # Best value per copy first; a plan without copies (only emptied slots) costs nothing.
    order = sorted(
        changed, key=lambda i: (-(results[i].gain - penalty * results[i].copies) / max(1, results[i].copies), i)
    )
    used = 0
    incoming = [0] * len(results[0].incoming) if results else []
    notes: list[str] = []
    blocked: list[str] = []
    for i in order:
        r = results[i]
        why = ""
        if settings.max_copies is not None and used + r.copies > settings.max_copies:
            why = f"layer {i}: {r.copies} copies would exceed max_copies {settings.max_copies} ({used} taken)"
        elif staging is not None:
            for g, n in enumerate(r.incoming):
                need = (incoming[g] + n) * settings.expert_bytes
                if n and need > staging[g]:
                    why = (
                        f"layer {i}: GPU {g} would need {_mib(need)} to stage {incoming[g] + n} expert copies "
                        f"and can spare {_mib(staging[g])}"
                    )
                    break
        if why:
            blocked.append(why)
            continue
        chosen[i] = True
        used += r.copies
        incoming = [a + b for a, b in zip(incoming, r.incoming, strict=True)]
    if blocked and not any(chosen):
        raise PlanRefused("no rebalance fits the limits: " + blocked[0])
    if blocked:
        notes.append(f"{len(blocked)} layer(s) left as they are for lack of budget, first: {blocked[0]}")
    return chosen, notes


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
