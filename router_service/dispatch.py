"""Dispatch planning and combine for one MoE layer: pure functions from routing decisions to sends and back.

plan: each token's k slots name global experts; the layer's placement gives each expert one or more copies,
each in a different group. The slots routed to an expert take its copies in turn: the r-th such slot, counting
row-major over (token, slot), goes to copy r % num_copies, so a hot expert's tokens split evenly and the same
routing always gives the same split. A group receives the rows of the tokens with at least one slot in it,
their expert ids with -1 on the slots of other groups, and the routing weights. Example, k = 2, experts 0-1 in
group 0 and 2-3 in group 1, and a second copy of expert 0 in group 1:

    token  expert_ids   -> group 0 gets         group 1 gets
    t0     [0, 2]          t0 [0, -1]            t0 [-1, 2]      expert 0's slot 0 -> copy 0 (group 0)
    t1     [1, 0]          t1 [1, -1]            t1 [-1, 0]      expert 0's slot 1 -> copy 1 (group 1)
    t2     [3, 0]          t2 [-1, 0]            t2 [3, -1]      expert 0's slot 2 -> copy 0 (group 0)

combine: each group answers its slots' weighted outputs in row-major order; they are scattered into a zeroed
[T, k, H] at their (token, slot) places and summed over k in slot order (`mistral.moe.combine`), exactly as the
local engine sums.

Replica choice: the replica of a group with the fewest outstanding tokens; ties go to the one that was sent the
fewest tokens so far, so equal replicas share the load.

Legend: T tokens, k slots, H hidden, E experts, C most copies of an expert, N_g tokens sent to group g, A_g
slots it computes.
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
               copies: torch.Tensor, num_copies: torch.Tensor, num_groups: int | None = None) -> list[GroupSend]:
    """hidden [T, H], expert_ids [T, k], weights [T, k]; this layer's copies [E, C] (the groups of each
    expert's copies, -1 padded) and num_copies [E] -> one send per group with work, by ascending group.

    One host sync: the per-group row and slot counts, which every transport needs to size its sends. The rest
    stays on the tensors' device. `num_groups` (default: read from `copies`, one more sync) sizes the counts.
    """
    t, k = expert_ids.shape
    groups = slot_groups(expert_ids, copies, num_copies)  # [T, k]
    num_groups = int(copies.max()) + 1 if num_groups is None else num_groups
    member = torch.zeros(num_groups, t, dtype=torch.bool, device=groups.device)  # [G, T] token t has a slot in g
    member.scatter_(0, groups.T, True)
    flat = groups.reshape(-1)  # [T*k]
    slots_per = torch.zeros(num_groups, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))  # [G]
    rows_per, slots_per = torch.stack([member.sum(1), slots_per]).tolist()  # the host sync
    rows = torch.nonzero_static(member.reshape(-1), size=sum(rows_per)).squeeze(1) % t  # [sum N_g] by group
    slots = torch.argsort(flat, stable=True)  # [T*k] by group, row-major within one
    sends = []
    for g, (rows_g, slots_g) in enumerate(zip(rows.split(rows_per), slots.split(slots_per))):
        if rows_per[g]:
            ids = torch.where(groups[rows_g] == g, expert_ids[rows_g], -1)  # [N_g, k]
            sends.append(GroupSend(g, slots_g, ExpertBatch(layer_id, hidden[rows_g], ids, weights[rows_g].float())))
    return sends


def slot_groups(expert_ids: torch.Tensor, copies: torch.Tensor, num_copies: torch.Tensor) -> torch.Tensor:
    """expert_ids [T, k] -> [T, k] the group computing each slot: the r-th slot (row-major) routed to expert e
    goes to copy r % num_copies[e]. No host sync."""
    flat = expert_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, row-major within an expert
    counts = torch.zeros(copies.shape[0], dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E] where each expert's run begins in `order`
    rank = torch.empty_like(flat)  # [T*k] r: how many earlier slots went to the same expert
    rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return copies[flat, rank % num_copies[flat]].view_as(expert_ids)


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
