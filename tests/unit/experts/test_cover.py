"""`cover.cover`: properties over random placements, losses and loads (hypothesis), and the docstring's example."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.cover import cover
from experts.eplb import rebalance
from experts.placement import Placement, make_placement

from tests.unit.experts.test_eplb import cases


@st.composite
def losses(draw):
    """(load, home placement, lost groups): any placement of `test_eplb.cases`, losing any subset of groups."""
    load, home = draw(cases())
    lost = draw(st.sets(st.integers(0, home.num_groups - 1), max_size=home.num_groups))
    return load, home, lost


@settings(max_examples=150, deadline=None)
@given(losses())
def test_cover_properties(case):
    load, home, lost = case
    covered = cover(home, lost, load, version=home.version + 7)  # the Placement constructor checks its slots
    if len(lost) == home.num_groups:
        assert covered is None  # nobody is left to cover
        return
    assert covered.version == home.version + 7 and covered.replicas == home.replicas
    for layer in range(home.num_layers):
        now, before = covered.layers[layer], home.layers[layer]
        assert {e for slots in now for e in slots} == set(range(home.num_experts))  # every expert still computes
        for g in range(home.num_groups):
            if g in lost:
                assert now[g] == ()  # a lost group is sent nothing
            else:
                assert now[g][:len(before[g])] == before[g]  # survivors keep their slots: they only load
        added = [len(now[g]) - len(before[g]) for g in range(home.num_groups) if g not in lost]
        orphans = {e for g in lost for e in before[g]} - {e for g in range(home.num_groups) if g not in lost
                                                          for e in before[g]}
        assert sum(added) == len(orphans)  # only experts with no surviving copy are added, each once
    assert cover(home, lost, load, version=home.version + 7) == covered  # deterministic
    assert Placement.from_dict(covered.to_dict()) == covered


def test_nothing_lost_is_home_under_a_new_version():
    home = rebalance([[9, 1, 1, 1]], make_placement(4, 1, 2, redundant_slots=1))
    back = cover(home, set(), [[0, 0, 0, 0]], version=home.version + 1)
    assert back.layers == home.layers and back.slots_per_group == home.slots_per_group
    assert back.version == home.version + 1


def test_the_docstring_example_and_heaviest_orphans_to_the_lightest_survivor():
    home = make_placement(8, 2, 4, "linear")
    covered = cover(home, {1}, [[1] * 8, [0, 0, 50, 40, 30, 30, 1, 1]], version=1)
    assert covered.layers[0] == ((0, 1, 2), (), (4, 5, 3), (6, 7))
    # layer 1: survivors carry 0, 60, 2; expert 2 (50) goes to group 0, then expert 3 (40) to group 3 (2)
    assert covered.layers[1] == ((0, 1, 2), (), (4, 5), (6, 7, 3))
    assert covered.slots_per_group == 3


def test_an_expert_with_a_surviving_copy_is_not_added_again():
    home = Placement(4, 1, (((0, 1), (0, 2), (3,)),), (1, 1, 1), 2)  # expert 0 in groups 0 and 1
    covered = cover(home, {1}, [[10, 1, 1, 1]], version=1)
    assert covered.layers[0] == ((0, 1), (), (3, 2))


def test_bad_input_is_refused():
    home = make_placement(4, 1, 2)
    with pytest.raises(ValueError, match="load must be"):
        cover(home, {0}, [[1, 2, 3]], version=1)
    with pytest.raises(ValueError, match=r"lost groups \[5\]"):
        cover(home, {5}, [[0] * 4], version=1)
