import pytest

from experts.placement import PlacementError, make_placement


def test_linear_and_round_robin_maps():
    assert make_placement(8, 2, 3, "linear").expert_to_group == (0, 0, 0, 1, 1, 1, 2, 2)
    assert make_placement(8, 2, 3, "round_robin").expert_to_group == (0, 1, 2, 0, 1, 2, 0, 1)
    p = make_placement(8, 2, 4, "linear", replicas=[1, 2, 1, 3])
    assert p.replicas == (1, 2, 1, 3) and p.num_groups == 4
    assert p.experts_of(1) == (2, 3)
    assert p.layer_experts_of(1) == [(0, 2), (0, 3), (1, 2), (1, 3)]


@pytest.mark.parametrize("num_experts,num_groups", [(8, 1), (8, 8), (7, 3), (16, 5)])
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_every_expert_is_placed_once_and_groups_are_balanced(num_experts, num_groups, strategy):
    p = make_placement(num_experts, 4, num_groups, strategy)
    placed = sorted(e for g in range(num_groups) for e in p.experts_of(g))
    assert placed == list(range(num_experts))
    sizes = [len(p.experts_of(g)) for g in range(num_groups)]
    assert max(sizes) - min(sizes) <= 1


def test_explicit_map():
    p = make_placement(4, 2, 2, [1, 1, 0, 1])
    assert p.experts_of(0) == (2,) and p.experts_of(1) == (0, 1, 3)


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
])
def test_bad_placements_are_rejected_with_the_reason(kwargs, match):
    with pytest.raises(PlacementError, match=match):
        make_placement(4, 2, **kwargs)
