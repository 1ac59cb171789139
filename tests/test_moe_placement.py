"""The placement model: shape checks, JSON, predicted load and balancedness, weight copies."""

from __future__ import annotations

import json

import pytest

from sentinel.moe import EMPTY, Copy, Placement, PlacementError, copies_between


def test_contiguous_layout_puts_equal_blocks_on_each_gpu_and_leaves_redundant_slots_empty() -> None:
    placement = Placement.contiguous(num_layers=2, num_experts=8, num_gpus=4, redundant_slots_per_gpu=1)
    assert placement.layers[0] == ((0, 1, EMPTY), (2, 3, EMPTY), (4, 5, EMPTY), (6, 7, EMPTY))
    assert placement.layers[1] == placement.layers[0]
    assert placement.slots_per_gpu == (3, 3, 3, 3)
    assert placement.replicas(0) == [1] * 8
    placement.validate()


def test_load_splits_an_expert_evenly_over_its_replicas() -> None:
    # Expert 0 on GPUs 0 and 1; expert 1 on GPU 1; expert 2 on GPU 2.
    placement = Placement.from_lists(3, [[[0], [0, 1], [2]]])
    assert placement.gpu_loads([[100, 30, 50]]) == [[50.0, 80.0, 50.0]]
    assert placement.balancedness([[100, 30, 50]]) == pytest.approx(60 / 80)


def test_balancedness_sums_means_and_maxima_over_layers_and_skips_idle_layers() -> None:
    placement = Placement.contiguous(num_layers=3, num_experts=4, num_gpus=2)
    tokens = [[10, 0, 0, 0], [5, 5, 5, 5], [0, 0, 0, 0]]
    # layer 0: loads 10 / 0 -> mean 5, max 10; layer 1: 10 / 10; layer 2: no tokens.
    assert placement.balancedness(tokens) == pytest.approx((5 + 10) / (10 + 10))
    assert placement.layer_balancedness(tokens) == [pytest.approx(0.5), pytest.approx(1.0), None]


def test_all_tokens_on_one_of_four_gpus_is_a_quarter() -> None:
    placement = Placement.contiguous(num_layers=1, num_experts=16, num_gpus=4)
    assert placement.balancedness([[100, 100] + [0] * 14]) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([[[0, 1], [2, EMPTY]], [[0, 1], [2, 3]]], "layers[0]: experts 3 have no replica"),
        ([[[0, 1], [2, 3]], [[0, 1, 2], [3]]], "layers[1][0]: 3 slots, GPU 0 has 2 in layer 0"),
        ([[[0, 1], [2, 3]], [[0, 1], [2, 3], []]], "layers[1]: 3 GPUs, layer 0 has 2"),
        ([[[0, 1], [2, 9]]], "layers[0][1][1]: expert 9 out of range 0..3"),
        ([[[0, 1], [2, -5]]], "layers[0][1][1]: expert -5 out of range"),
        ([[[0], [1]]], "4 experts do not fit in 2 slots"),
    ],
)
def test_a_malformed_placement_is_refused_with_the_place_named(layers: list[list[list[int]]], message: str) -> None:
    with pytest.raises(PlacementError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Placement.from_lists(4, layers)


def test_json_round_trip_and_errors_name_the_field() -> None:
    placement = Placement.contiguous(num_layers=2, num_experts=6, num_gpus=3, redundant_slots_per_gpu=1)
    assert Placement.from_json(json.loads(json.dumps(placement.to_json()))) == placement
    with pytest.raises(PlacementError, match=r"plan.placement.num_experts: expected a positive integer"):
        Placement.from_json({"num_experts": "6", "layers": []}, "plan.placement")
    with pytest.raises(PlacementError, match=r"placement.layers\[0\]\[1\]\[0\]: expected an integer, got 2.5"):
        Placement.from_json({"num_experts": 6, "layers": [[[0, 1, 2], [2.5, 3, 4]]]})
    with pytest.raises(PlacementError, match=r"placement.layers: expected a list"):
        Placement.from_json({"num_experts": 6, "layers": "all"})
    with pytest.raises(PlacementError, match=r"placement: expected an object"):
        Placement.from_json([1, 2])


def test_padding_grows_every_gpu_and_refuses_to_shrink() -> None:
    placement = Placement.contiguous(num_layers=1, num_experts=4, num_gpus=2)
    assert placement.padded(3).layers[0] == ((0, 1, EMPTY), (2, 3, EMPTY))
    with pytest.raises(PlacementError, match=r"GPU 0 has 2 slots \(2 in use\), more than the budget of 1"):
        placement.padded(1)


def test_token_table_of_the_wrong_shape_or_with_bad_counts_is_refused() -> None:
    placement = Placement.contiguous(num_layers=2, num_experts=4, num_gpus=2)
    with pytest.raises(PlacementError, match="tokens: 1 layers, the placement has 2"):
        placement.balancedness([[1, 2, 3, 4]])
    with pytest.raises(PlacementError, match=r"tokens\[1\]: 3 experts"):
        placement.balancedness([[1, 2, 3, 4], [1, 2, 3]])
    with pytest.raises(PlacementError, match=r"tokens\[1\]\[2\]: expected a finite count >= 0, got -3"):
        placement.balancedness([[1, 2, 3, 4], [1, 2, -3, 4]])
    with pytest.raises(PlacementError, match=r"tokens\[0\]\[0\]: expected a finite count >= 0, got nan"):
        placement.balancedness([[float("nan"), 2, 3, 4], [1, 2, 3, 4]])
    with pytest.raises(PlacementError, match=r"tokens\[0\]\[3\]: .* got 'x'"):
        placement.balancedness([[1, 2, 3, "x"], [1, 2, 3, 4]])  # type: ignore[list-item]


def test_copies_are_the_slots_that_get_a_new_expert_from_a_current_holder() -> None:
    current = Placement.from_lists(4, [[[0, 1, EMPTY], [2, 3, EMPTY]]])
    # GPU 0 gets a replica of 2, GPU 1 loses 3 to GPU 0's old slot... written out:
    target = Placement.from_lists(4, [[[0, 3, 2], [2, 1, EMPTY]]])
    assert copies_between(current, target) == [
        Copy(layer=0, gpu=0, slot=1, expert=3, source_gpu=1),
        Copy(layer=0, gpu=0, slot=2, expert=2, source_gpu=1),
        Copy(layer=0, gpu=1, slot=1, expert=1, source_gpu=0),
    ]
    assert copies_between(current, current) == []


def test_a_copy_reads_from_the_same_node_when_it_can() -> None:
    # Expert 0 on GPU 0 (node 0) and GPU 2 (node 1); GPU 3 (node 1) needs it.
    current = Placement.from_lists(4, [[[0, 1], [2, EMPTY], [0, 3], [EMPTY, EMPTY]]])
    target = Placement.from_lists(4, [[[0, 1], [2, EMPTY], [0, 3], [0, EMPTY]]])
    assert copies_between(current, target, gpus_per_node=2) == [Copy(0, 3, 0, 0, 2)]
    assert copies_between(current, target) == [Copy(0, 3, 0, 0, 0)]  # no nodes: the lowest index
