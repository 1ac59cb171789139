"""The expert placement planner: properties over random placements, known cases, refusals."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.moe import (
    EMPTY,
    Placement,
    PlacementError,
    PlannerSettings,
    PlanRefused,
    copies_between,
    plan_rebalance,
)


@dataclass
class Scenario:
    tokens: list[list[int]]
    current: Placement
    settings: PlannerSettings


@st.composite
def placements(draw: st.DrawFn, *, gpus: int | None = None, experts: int | None = None) -> Placement:
    """A valid placement: every expert at least once, extra replicas and empty slots anywhere."""
    num_gpus = gpus if gpus is not None else draw(st.integers(1, 6))
    num_experts = experts if experts is not None else draw(st.integers(1, 16))
    slots = math.ceil(num_experts / num_gpus) + draw(st.integers(0, 3))
    rng = draw(st.randoms(use_true_random=False))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        free = num_gpus * slots - num_experts
        extra = [rng.randrange(num_experts) if rng.random() < 0.5 else EMPTY for _ in range(free)]
        cells = list(range(num_experts)) + extra
        rng.shuffle(cells)
        layers.append([cells[g * slots : (g + 1) * slots] for g in range(num_gpus)])
    return Placement.from_lists(num_experts, layers)


@st.composite
def token_tables(draw: st.DrawFn, num_layers: int, num_experts: int) -> list[list[int]]:
    """Per-expert tokens; often skewed (a few hot experts), sometimes idle or uniform."""
    out = []
    for _ in range(num_layers):
        kind = draw(st.sampled_from(["random", "hot", "uniform", "idle"]))
        if kind == "idle":
            out.append([0] * num_experts)
        elif kind == "uniform":
            out.append([draw(st.integers(0, 500))] * num_experts)
        elif kind == "hot":
            row = draw(st.lists(st.integers(0, 50), min_size=num_experts, max_size=num_experts))
            for e in draw(st.lists(st.integers(0, num_experts - 1), max_size=3)):
                row[e] += draw(st.integers(100, 5000))
            out.append(row)
        else:
            out.append(draw(st.lists(st.integers(0, 1000), min_size=num_experts, max_size=num_experts)))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    current = draw(placements())
    tokens = draw(token_tables(current.num_layers, current.num_experts))
    chosen = PlannerSettings(
        min_gain_per_copy=draw(st.sampled_from([0.0, 0.002, 0.05])),
        max_copies=draw(st.none() | st.integers(0, 12)),
    )
    return Scenario(tokens, current, chosen)


def _layer_experts_per_node(layer: tuple[tuple[int, ...], ...], per_node: int) -> list[set[int]]:
    nodes: list[set[int]] = []
    for g, gpu in enumerate(layer):
        if g % per_node == 0:
            nodes.append(set())
        nodes[-1].update(e for e in gpu if e != EMPTY)
    return nodes


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plans_keep_every_expert_fit_the_slots_never_get_worse_and_are_deterministic(case: Scenario) -> None:
    try:
        plan = plan_rebalance(case.tokens, case.current, case.settings)
    except PlanRefused as refused:
        # Only a copy budget can refuse here, and only one that allows no copy a layer needs.
        assert case.settings.max_copies is not None
        assert "max_copies" in refused.reason
        return
    new = plan.placement
    new.validate()  # every expert of every layer keeps at least one replica
    assert new.slots_per_gpu == case.current.slots_per_gpu  # no GPU has more slots than it had
    assert new.num_layers == case.current.num_layers
    for li in range(new.num_layers):
        assert all(n >= 1 for n in new.replicas(li))
    before, after = plan.balancedness_before, plan.balancedness_after
    assert before == case.current.balancedness(case.tokens)
    assert after == new.balancedness(case.tokens)
    if before is None:
        assert after is None and not plan.changed
    else:
        assert after is not None and after >= before - 1e-12
    for layer in plan.layers:
        if layer.balancedness_before is not None:
            assert layer.balancedness_after is not None
            assert layer.balancedness_after >= layer.balancedness_before - 1e-12
            # The trade-off is honoured: every copy bought at least min_gain_per_copy.
            gain = layer.balancedness_after - layer.balancedness_before
            assert gain >= case.settings.min_gain_per_copy * layer.copies - 1e-9
    assert list(plan.copies) == copies_between(case.current, new)
    if case.settings.max_copies is not None:
        assert len(plan.copies) <= case.settings.max_copies
    again = plan_rebalance(case.tokens, case.current, case.settings)
    assert again.to_json() == plan.to_json()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_staging_memory_per_gpu_is_never_exceeded(data: st.DataObject) -> None:
    current = data.draw(placements())
    tokens = data.draw(token_tables(current.num_layers, current.num_experts))
    limit = data.draw(st.integers(0, 5)) * 1000 + data.draw(st.integers(0, 999))
    chosen = PlannerSettings(expert_bytes=1000, staging_bytes=limit)
    try:
        plan = plan_rebalance(tokens, current, chosen)
    except PlanRefused as refused:
        assert "can spare" in refused.reason
        return
    assert all(b <= limit for b in plan.staging_bytes_per_gpu())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hierarchical_plans_keep_each_group_on_one_node(data: st.DataObject) -> None:
    nodes = data.draw(st.integers(2, 3))
    per_node = data.draw(st.integers(1, 3))
    groups = nodes * data.draw(st.integers(1, 2))
    experts = groups * data.draw(st.integers(1, 4))
    current = data.draw(placements(gpus=nodes * per_node, experts=experts))
    tokens = data.draw(token_tables(current.num_layers, experts))
    plan = plan_rebalance(tokens, current, PlannerSettings(gpus_per_node=per_node, expert_groups=groups))
    size = experts // groups
    for li, layer in enumerate(plan.layers):
        if layer.policy == "keep":
            continue
        per_node_experts = _layer_experts_per_node(plan.placement.layers[li], per_node)
        for grp in range(groups):
            members = set(range(grp * size, (grp + 1) * size))
            assert sum(1 for node in per_node_experts if node & members) == 1, (li, grp, per_node_experts)
    assert plan.balancedness_after is None or plan.balancedness_after >= (plan.balancedness_before or 0) - 1e-12


# -- known cases ------------------------------------------------------------------------------


def test_one_hot_expert_is_replicated_across_gpus_with_few_copies() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4, redundant_slots_per_gpu=2)
    tokens = [[100] * 16]
    tokens[0][5] = 1500  # half of all tokens go to expert 5 (on GPU 1)
    plan = plan_rebalance(tokens, current)
    assert plan.balancedness_before == pytest.approx(0.25 * 3000 / (1500 + 300))
    assert plan.balancedness_after is not None and plan.balancedness_after >= 0.9
    assert plan.placement.replicas(0)[5] >= 3
    assert sorted(plan.placement.holders(0, 5)) == sorted(set(plan.placement.holders(0, 5)))  # one per GPU
    assert all(c.expert == 5 for c in plan.copies[:3])  # the hot expert's replicas go first
    assert len(plan.copies) <= 6


def test_many_equal_experts_already_balanced_need_no_copy() -> None:
    current = Placement.contiguous(num_layers=4, num_experts=64, num_gpus=8, redundant_slots_per_gpu=2)
    plan = plan_rebalance([[250] * 64] * 4, current)
    assert not plan.changed
    assert plan.copies == ()
    assert plan.balancedness_before == plan.balancedness_after == pytest.approx(1.0)
    assert [layer.policy for layer in plan.layers] == ["keep"] * 4


def test_more_hot_experts_than_redundant_slots_replicates_the_hottest_within_the_budget() -> None:
    # 8 hot experts (10x the others), one redundant slot per GPU: only 4 spare slots.
    current = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4, redundant_slots_per_gpu=1)
    tokens = [[1000 + 10 * e if e < 8 else 100 for e in range(16)]]
    plan = plan_rebalance(tokens, current)
    replicas = plan.placement.replicas(0)
    assert sum(replicas) <= 20  # 4 GPUs x 5 slots
    assert all(n >= 1 for n in replicas)
    # Any extra replica went to a hot expert, the hottest first.
    assert all(replicas[e] == 1 for e in range(8, 16))
    assert plan.balancedness_before is not None and plan.balancedness_before < 0.6
    assert plan.balancedness_after is not None and plan.balancedness_after >= 0.95


def test_a_rebalanced_placement_is_not_churned_by_the_same_counts() -> None:
    current = Placement.contiguous(num_layers=2, num_experts=32, num_gpus=4, redundant_slots_per_gpu=2)
    rng = random.Random(3)
    tokens = [[int(1000 / (rank + 1)) for rank in rng.sample(range(32), 32)] for _ in range(2)]
    first = plan_rebalance(tokens, current)
    assert first.changed
    second = plan_rebalance(tokens, first.placement)
    assert not second.changed and second.copies == ()


def test_a_higher_price_per_copy_buys_fewer_copies() -> None:
    current = Placement.contiguous(num_layers=8, num_experts=64, num_gpus=8, redundant_slots_per_gpu=2)
    rng = random.Random(11)
    tokens = [[int(5000 / (rank + 1) ** 1.2) for rank in rng.sample(range(64), 64)] for _ in range(8)]
    cheap = plan_rebalance(tokens, current, PlannerSettings(min_gain_per_copy=0.0005))
    dear = plan_rebalance(tokens, current, PlannerSettings(min_gain_per_copy=0.02))
    assert len(dear.copies) <= len(cheap.copies)
    assert cheap.balancedness_after is not None and dear.balancedness_after is not None
    assert cheap.balancedness_after >= dear.balancedness_after
    priceless = plan_rebalance(tokens, current, PlannerSettings(min_gain_per_copy=1.0))
    assert not priceless.changed  # a copy would have to buy a whole unit of balancedness


def test_layers_with_the_best_gain_per_copy_are_taken_first_under_a_copy_budget() -> None:
    current = Placement.contiguous(num_layers=3, num_experts=16, num_gpus=4, redundant_slots_per_gpu=2)
    tokens = [[100] * 16 for _ in range(3)]
    tokens[1][0] = 3000  # layer 1: one very hot expert, the best buy
    tokens[2][0] = 400
    tokens[2][1] = 400  # layer 2: mildly skewed
    full = plan_rebalance(tokens, current)
    layer1 = full.layers[1].copies
    budget = plan_rebalance(tokens, current, PlannerSettings(max_copies=layer1))
    assert [layer.layer for layer in budget.layers if layer.copies] == [1]
    assert any("max_copies" in note for note in budget.notes)


# -- refusals ---------------------------------------------------------------------------------


def test_a_plan_that_needs_more_staging_memory_than_any_gpu_has_is_refused_with_the_gpu_named() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4, redundant_slots_per_gpu=2)
    tokens = [[100] * 16]
    tokens[0][5] = 1500
    with pytest.raises(PlanRefused, match=r"GPU \d would need 9.0 MiB to stage 1 expert copies and can spare 4.0 MiB"):
        plan_rebalance(tokens, current, PlannerSettings(expert_bytes=9 * 2**20, staging_bytes=4 * 2**20))
    # Per-GPU figures: GPU 2 can stage one copy, so only one of two such layers fits.
    mib = 2**20
    plan = plan_rebalance(
        tokens * 2,
        Placement.contiguous(2, 16, 4, 2),
        PlannerSettings(expert_bytes=9 * mib, staging_bytes=(90 * mib, 90 * mib, 9 * mib, 90 * mib)),
    )
    assert [layer.policy for layer in plan.layers] == ["rebalance", "keep"]
    assert plan.copies_per_gpu()[2] == 1
    assert any(
        "layer 1: GPU 2 would need 18.0 MiB to stage 2 expert copies and can spare 9.0 MiB" in n for n in plan.notes
    )


def test_a_slot_budget_below_what_the_placement_uses_is_refused() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4, redundant_slots_per_gpu=2)
    with pytest.raises(PlanRefused, match=r"GPU 0 has 6 slots \(4 in use\), more than the budget of 5 slots per GPU"):
        plan_rebalance([[1] * 16], current, PlannerSettings(redundant_slots_per_gpu=1))


def test_a_slot_budget_above_the_placement_adds_empty_slots_the_plan_can_fill() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4)  # no spare slot at all
    tokens = [[100] * 16]
    tokens[0][0] = 2000
    stuck = plan_rebalance(tokens, current)
    assert stuck.balancedness_after is not None and stuck.balancedness_after < 0.5  # moves alone cannot split expert 0
    plan = plan_rebalance(tokens, current, PlannerSettings(redundant_slots_per_gpu=2))
    assert plan.placement.slots_per_gpu == (6, 6, 6, 6)
    assert plan.placement.replicas(0)[0] >= 3
    assert plan.balancedness_after is not None and plan.balancedness_after > 0.9


def test_a_token_table_of_the_wrong_shape_and_bad_settings_are_errors_not_tracebacks() -> None:
    current = Placement.contiguous(num_layers=2, num_experts=8, num_gpus=2)
    with pytest.raises(PlacementError, match=r"tokens\[1\]: 7 experts, the placement has 8"):
        plan_rebalance([[1] * 8, [1] * 7], current)
    with pytest.raises(ValueError, match="min_gain_per_copy: expected a number >= 0"):
        PlannerSettings(min_gain_per_copy=-1)
    with pytest.raises(ValueError, match="staging_bytes: needs expert_bytes"):
        PlannerSettings(staging_bytes=1000)
    with pytest.raises(PlanRefused, match="gpus_per_node 3 does not divide the 2 GPUs"):
        plan_rebalance([[1] * 8] * 2, current, PlannerSettings(gpus_per_node=3))
    with pytest.raises(PlanRefused, match="staging_bytes gives 3 GPUs, the placement has 2"):
        plan_rebalance([[1] * 8] * 2, current, PlannerSettings(expert_bytes=1, staging_bytes=(1, 2, 3)))


def test_groups_that_do_not_split_over_the_nodes_fall_back_to_the_global_policy_with_a_note() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=12, num_gpus=4, redundant_slots_per_gpu=1)
    tokens = [[10] * 12]
    tokens[0][0] = 500
    plan = plan_rebalance(tokens, current, PlannerSettings(gpus_per_node=2, expert_groups=3))
    assert any("global policy used" in note for note in plan.notes)
    assert plan.balancedness_after is not None and plan.balancedness_before is not None
    assert plan.balancedness_after > plan.balancedness_before


def test_plan_json_carries_the_summary_the_placement_and_the_moves() -> None:
    current = Placement.contiguous(num_layers=1, num_experts=8, num_gpus=2, redundant_slots_per_gpu=1)
    plan = plan_rebalance([[800, 10, 10, 10, 10, 10, 10, 10]], current, PlannerSettings(expert_bytes=2**20))
    body = plan.to_json()
    assert body["copies"] == len(plan.copies) >= 1
    assert body["copy_bytes"] == len(plan.copies) * 2**20
    assert Placement.from_json(body["placement"]) == plan.placement
    assert body["moves"][0] == plan.copies[0].to_json()
    assert "predicted balancedness" in plan.describe() and "MiB" in plan.describe()
