import json

import pytest
import torch

from experts.placement import Placement, PlacementError, make_placement


def group_map(p: Placement, layer: int = 0) -> tuple[int, ...]:
    """expert -> group, for a placement where every expert has one copy."""
    return tuple(p.groups_of(layer, e)[0] for e in range(p.num_experts))


def test_linear_and_round_robin_maps():
    assert group_map(make_placement(8, 2, 3, "linear")) == (0, 0, 0, 1, 1, 1, 2, 2)
    assert group_map(make_placement(8, 2, 3, "round_robin")) == (0, 1, 2, 0, 1, 2, 0, 1)
    p = make_placement(8, 2, 4, "linear", replicas=[1, 2, 1, 3])
    assert p.replicas == (1, 2, 1, 3) and p.num_groups == 4 and p.slots_per_group == 2 and p.version == 0
    assert p.experts_of(1, 0) == p.experts_of(1, 1) == (2, 3)
    assert p.layer_experts_of(1) == [(0, 2), (0, 3), (1, 2), (1, 3)]


def test_redundant_slots_start_empty():
    p = make_placement(8, 2, 3, "linear", redundant_slots=2)
    assert p.slots_per_group == 5 and p.experts_of(0, 1) == (0, 1, 2)
    assert p.num_copies() == [[1] * 8] * 2


@pytest.mark.parametrize("num_experts,num_groups", [(8, 1), (8, 8), (7, 3), (16, 5)])
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_every_expert_is_placed_once_and_groups_are_balanced(num_experts, num_groups, strategy):
    p = make_placement(num_experts, 4, num_groups, strategy)
    for layer in range(4):
        placed = sorted(e for g in range(num_groups) for e in p.experts_of(g, layer))
        assert placed == list(range(num_experts))
    sizes = [len(p.experts_of(g, 0)) for g in range(num_groups)]
    assert max(sizes) - min(sizes) <= 1 and p.slots_per_group == max(sizes)


def test_explicit_map():
    p = make_placement(4, 2, 2, [1, 1, 0, 1])
    assert p.experts_of(0, 0) == (2,) and p.experts_of(1, 1) == (0, 1, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=2, strategy=[0, 1, 0]), r"experts \[3\] are unplaced"),
    (dict(num_groups=2, strategy=[0, 1, 0, 1, 0]), "only 4 experts"),
    (dict(num_groups=2, strategy=[0, 1, 2, 0]), "expert 2 is mapped to group 2; groups are 0..1"),
    (dict(num_groups=3, strategy=[0, 0, 1, 1]), r"groups \[2\] hold no expert"),
    (dict(num_groups=2, strategy=[0, 0, 0, 1], max_experts_per_group=2), r"groups \[0\] hold \[3\] experts"),
    (dict(num_groups=5), "between 1 and the number of experts"),
    (dict(num_groups=2, strategy="random"), "unknown placement strategy 'random'"),
    (dict(num_groups=2, replicas=0), "at least one replica"),
    (dict(num_groups=2, replicas=[1, 1, 1]), "3 replica counts for 2 groups"),
    (dict(num_groups=2, redundant_slots=-1), "redundant_slots must be a whole number >= 0"),
])
def test_bad_placements_are_rejected_with_the_reason(kwargs, match):
    with pytest.raises(PlacementError, match=match):
        make_placement(4, 2, **kwargs)


# Per-layer slots: layer 0 of the module docstring's example (8 experts, 4 groups of 3 slots).
HOT = ((0, 2, 6), (0, 3, 7), (1, 4), (1, 5))


def test_copies_per_layer():
    p = Placement(8, 2, (HOT, ((0, 1), (2, 3), (4, 5), (6, 7))), (1, 1, 1, 1), 3, version=1)
    assert p.groups_of(0, 0) == (0, 1) and p.groups_of(0, 4) == (2,) and p.groups_of(1, 0) == (0,)
    assert p.layer_experts_of(2) == [(0, 1), (0, 4), (1, 4), (1, 5)]
    copies, num_copies = p.copy_table()
    assert copies.shape == (2, 8, 2) and copies.dtype == num_copies.dtype == torch.long
    assert copies[0, 0].tolist() == [0, 1] and copies[0, 1].tolist() == [2, 3] and copies[0, 2].tolist() == [0, -1]
    assert copies[1, :, 1].tolist() == [-1] * 8
    assert num_copies.tolist() == [[2, 2, 1, 1, 1, 1, 1, 1], [1] * 8]


def test_group_loads_split_an_expert_over_its_copies():
    p = Placement(8, 1, (HOT,), (1, 1, 1, 1), 3)
    load = [[100, 100, 1, 1, 1, 1, 1, 1]]
    assert p.group_loads(load) == [[52.0, 52.0, 51.0, 51.0]]
    assert p.group_loads(torch.tensor(load)) == p.group_loads(load)
    assert p.balancedness(load) == [pytest.approx(51.5 / 52)]
    assert p.balancedness([[0] * 8]) == [1.0]  # no load: nothing is unbalanced


def test_to_dict_round_trips_through_json():
    p = Placement(8, 2, (HOT, HOT), (1, 2, 1, 1), 3, version=4)
    assert Placement.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("change,match", [
    (dict(layers=(((0, 2, 6, 7), (0, 3), (1, 4), (1, 5)),)), "group 0 holds 4 experts in layer 0, more than its 3"),
    (dict(layers=(((0, 2, 2), (0, 3, 7), (1, 4, 6), (1, 5)),)),
     r"group 0 holds two copies of experts \[2\] in layer 0"),
    (dict(layers=(((0, 2), (0, 3, 7), (1, 4), (1, 5)),)), r"experts \[6\] have no copy in layer 0"),
    (dict(layers=(((0, 2, 6), (0, 3, 9), (1, 4, 7), (1, 5)),)), "group 1 names expert 9 in layer 0"),
    (dict(layers=(HOT[:3],)), "layer 0 lists 3 groups, but replica counts are given for 4"),
    (dict(layers=(HOT, HOT)), "lists 2 layers for a model of 1"),
    (dict(replicas=(1, 0, 1, 1)), r"at least one replica; got \[\(1, 0\)\]"),
    (dict(slots_per_group=0), "slots_per_group must be at least 1"),
])
def test_invalid_slots_are_rejected_naming_the_culprit(change, match):
    fields = dict(num_experts=8, num_layers=1, layers=(HOT,), replicas=(1, 1, 1, 1), slots_per_group=3)
    with pytest.raises(PlacementError, match=match):
        Placement(**(fields | change))
    with pytest.raises(PlacementError, match=match):  # a dict from outside goes through the same checks
        Placement.from_dict(Placement(**fields).to_dict() | change)
