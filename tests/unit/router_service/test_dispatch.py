"""`dispatch.plan_layer` with redundant copies: the split of an expert's slots over its copies, against a plain
per-slot reference, and the module docstring's example."""

import pytest
import torch

from experts.placement import Placement
from router_service.dispatch import plan_layer, slot_groups


def reference_groups(expert_ids: torch.Tensor, placement: Placement, layer: int) -> list[list[int]]:
    """The rule spelled out one slot at a time: the r-th slot routed to expert e goes to copy r % copies."""
    seen: dict[int, int] = {}
    out = []
    for row in expert_ids.tolist():
        out.append([])
        for e in row:
            holders = placement.groups_of(layer, e)
            out[-1].append(holders[seen.get(e, 0) % len(holders)])
            seen[e] = seen.get(e, 0) + 1
    return out


def test_the_docstring_example():
    placement = Placement(4, 1, (((0, 1), (0, 2, 3)),), (1, 1), 3)  # expert 0 has copies in groups 0 and 1
    copies, num_copies = placement.copy_table()
    ids = torch.tensor([[0, 2], [1, 0], [3, 0]])
    sends = plan_layer(0, torch.randn(3, 8), ids, torch.rand(3, 2), copies[0], num_copies[0])
    assert [s.group_id for s in sends] == [0, 1]
    assert sends[0].batch.expert_ids.tolist() == [[0, -1], [1, -1], [-1, 0]]
    assert sends[1].batch.expert_ids.tolist() == [[-1, 2], [-1, 0], [3, -1]]
    assert sends[0].slots.tolist() == [0, 2, 5] and sends[1].slots.tolist() == [1, 3, 4]


@pytest.mark.parametrize("seed", range(5))
def test_the_split_follows_the_rule_and_shares_an_expert_evenly(seed):
    gen = torch.Generator().manual_seed(seed)
    placement = Placement(6, 1, (((0, 1, 5), (0, 2), (0, 3, 1), (4, 1)),), (1, 1, 1, 1), 3)
    copies, num_copies = placement.copy_table()
    ids = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(50)])  # [T, k]
    groups = slot_groups(ids, copies[0], num_copies[0])
    assert groups.tolist() == reference_groups(ids, placement, 0)
    for e in range(6):  # each copy gets its expert's slots within one of each other
        per_copy = torch.bincount(groups[ids == e], minlength=4)[list(placement.groups_of(0, e))]
        assert int(per_copy.max() - per_copy.min()) <= 1
    assert torch.equal(slot_groups(ids, copies[0], num_copies[0]), groups)  # deterministic
