"""Dispatch planning and combine for one MoE layer: pure functions from routing decisions to sends and back.

plan: each token's k slots name global experts; the placement maps experts to groups. A group receives the
rows of the tokens with at least one slot in it, their expert ids with -1 on the slots of other groups, and
the routing weights. Example, k = 2, experts 0-1 in group 0 and 2-3 in group 1:

    token  expert_ids   -> group 0 gets         group 1 gets
    t0     [0, 2]          t0 [0, -1]            t0 [-1, 2]
    t1     [1, 0]          t1 [1, 0]             (t1 not sent)
    t2     [3, 2]          (t2 not sent)         t2 [3, 2]

combine: each group answers its slots' weighted outputs in row-major order; they are scattered into a zeroed
[T, k, H] at their (token, slot) places and summed over k in slot order (`mistral.moe.combine`), exactly as the
local engine sums, so a layout computes the same bits as the single-process engine.

Replica choice: the replica of a group with the fewest outstanding tokens; ties go to the one that was sent the
fewest tokens so far, so equal replicas share the load.

Legend: T tokens, k slots, H hidden, N_g tokens sent to group g, A_g slots it computes.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from experts.expert_group import ExpertBatch
from mistral.moe import combine
from router_service.transport import ReplicaInfo


@dataclass
class GroupSend:
    group_id: int
    slots: torch.Tensor  # [A_g] flat (token * k + slot) indices this group computes, row-major
    batch: ExpertBatch


def plan_layer(layer_id: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               expert_to_group: torch.Tensor) -> list[GroupSend]:
    """hidden [T, H], expert_ids [T, k], weights [T, k], expert_to_group [E] -> one send per group with work."""
    t, k = expert_ids.shape
    groups = expert_to_group[expert_ids]  # [T, k]
    sends = []
    for g in torch.unique(groups).tolist():
        mine = groups == g  # [T, k]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [N_g]
        ids = torch.where(mine, expert_ids, -1)[rows]  # [N_g, k]
        slots = mine.reshape(-1).nonzero().squeeze(1)  # [A_g]
        sends.append(GroupSend(g, slots, ExpertBatch(layer_id, hidden[rows], ids, weights[rows].float())))
    return sends


def combine_results(num_tokens: int, top_k: int, sends: Iterable[GroupSend],
                    results: Iterable[torch.Tensor]) -> torch.Tensor:
    """Scatter each group's [A_g, H] answer to its slots and sum over slots -> [T, H]."""
    out = None
    for send, result in zip(sends, results):
        if out is None:
            out = result.new_zeros(num_tokens * top_k, result.shape[1])  # [T*k, H]
        out[send.slots] = result.to(out.device)
    return combine(out.view(num_tokens, top_k, -1))


def choose_replica(replicas: Iterable[ReplicaInfo], outstanding: dict[str, int],
                   sent: dict[str, int]) -> ReplicaInfo | None:
    """The replica with the fewest outstanding tokens (then fewest sent, then id); None if there is none."""
    return min(replicas, key=lambda r: (outstanding.get(r.replica_id, 0), sent.get(r.replica_id, 0), r.replica_id),
               default=None)
