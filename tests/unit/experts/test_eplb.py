"""`eplb.rebalance`: properties over random loads and layouts (hypothesis), and the skewed case it is for."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.eplb import rebalance
from experts.placement import Placement, make_placement


@st.composite
def cases(draw):
    """(load [L][E], current placement): any shape with G*S >= E, from the config or from an earlier rebalance."""
    num_experts = draw(st.integers(1, 10))
    num_groups = draw(st.integers(1, num_experts))
    num_layers = draw(st.integers(1, 3))
    strategy = draw(st.sampled_from(["linear", "round_robin"]))
    current = make_placement(num_experts, num_layers, num_groups, strategy, redundant_slots=draw(st.integers(0, 3)))
    tokens = st.one_of(st.integers(0, 1000), st.floats(0, 1e4, allow_nan=False))
    load = draw(st.lists(st.lists(tokens, min_size=num_experts, max_size=num_experts),
                         min_size=num_layers, max_size=num_layers))
    if draw(st.booleans()):  # start from a placement that already has copies
        current = rebalance(draw(st.lists(st.lists(st.integers(0, 1000), min_size=num_experts,
                                                   max_size=num_experts), min_size=num_layers,
                                          max_size=num_layers)), current)
    return load, current


@settings(max_examples=100, deadline=None)
@given(cases())
def test_rebalance_properties(case):
    load, current = case
    new = rebalance(load, current)  # the Placement constructor checks slots, copies and duplicates
    assert (new.num_groups, new.slots_per_group, new.replicas) == (current.num_groups, current.slots_per_group,
                                                                    current.replicas)
    assert new.version == current.version + 1
    for layer in range(new.num_layers):
        groups = new.layers[layer]
        assert {e for slots in groups for e in slots} == set(range(new.num_experts))  # every expert has a copy
        assert all(len(slots) <= new.slots_per_group for slots in groups)  # slot capacities hold
        assert all(len(set(slots)) == len(slots) for slots in groups)  # no two copies in one group
    before, after = current.group_loads(load), new.group_loads(load)
    assert all(max(a) <= max(b) for a, b in zip(after, before))  # never worse, layer by layer
    assert rebalance(load, current) == new  # deterministic
    assert rebalance(torch.tensor(load, dtype=torch.float64), current) == new  # list or tensor alike
    assert Placement.from_dict(new.to_dict()) == new


def test_two_hot_experts_get_copies_and_the_layer_balances():
    current = make_placement(8, 2, 4, "linear", redundant_slots=1)
    load = [[5000, 4000, 100, 80, 120, 90, 110, 100],  # layer 0: experts 0 and 1 take most tokens
            [90, 100, 110, 100, 6000, 100, 5000, 95]]  # layer 1: experts 4 and 6
    new = rebalance(load, current)
    assert [round(b, 2) for b in current.balancedness(load)] == [0.27, 0.48]
    assert min(new.balancedness(load)) >= 0.9
    assert len(new.groups_of(0, 0)) > 1 and len(new.groups_of(1, 4)) > 1  # the hot experts were copied


def test_the_docstring_example_and_few_moves():
    current = make_placement(8, 1, 4, "round_robin", redundant_slots=1)  # [0 4] [1 5] [2 6] [3 7]
    new = rebalance([[100, 100, 1, 1, 1, 1, 1, 1]], current)
    assert new.group_loads([[100, 100, 1, 1, 1, 1, 1, 1]]) == [[51.0, 51.0, 52.0, 52.0]]
    kept = sum(len(set(a) & set(b)) for a, b in zip(new.layers[0], current.layers[0]))
    assert new.layers[0] == ((1, 4), (1, 5), (0, 2, 6), (0, 3, 7)) and kept == 7  # only expert 0 moves


def test_a_layer_that_would_not_improve_keeps_its_slots():
    current = make_placement(4, 2, 2, "linear", redundant_slots=1)
    load = [[10, 10, 10, 10], [0, 0, 0, 0]]  # already balanced; no load at all
    new = rebalance(load, current)
    assert new.layers == current.layers and new.version == 1


@pytest.mark.parametrize("load,match", [
    ([[1, 2, 3, 4]], r"load must be \[layers, experts\] = \[2, 4\], got \[1, 4\]"),
    ([[1, 2, 3], [1, 2, 3]], r"got \[2, 3\]"),
    ([[1, 2, 3, -4], [1, 2, 3, 4]], "finite token counts >= 0"),
    ([[1, 2, 3, float("nan")], [1, 2, 3, 4]], "finite token counts >= 0"),
])
def test_bad_load_is_refused(load, match):
    with pytest.raises(ValueError, match=match):
        rebalance(load, make_placement(4, 2, 2))
