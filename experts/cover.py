"""Covering lost expert groups: the placement that serves every expert while some groups have no live replica.

When the last replica of a group dies, its experts cannot compute until Serve (or Ray) has started a new process
and it has loaded them: seconds to tens of seconds, during which every layer that routes a token there waits.
The surviving groups can take those experts instead, in well under a second: loading a few experts' tensors is
far quicker than starting a process. `cover` plans that placement; the router switches to it as it switches to a
rebalance (survivors load the new experts in the background, the table switches once they all hold them), and
switches back to the home placement once the lost group has a replica again.

For each layer, from the home placement (the one in force before any group was lost):
1. Survivors keep their home slots, so no expert moves between them and they only load.
2. Lost groups hold nothing. An expert of theirs that has a copy in a survivor needs nothing more (it loses a
   copy, and the survivors' copies take its tokens).
3. The others ("orphans") go, heaviest first by measured load (ties: the lowest id), to the survivor with the
   lowest load (ties: the fewest slots, then the lowest id), which then carries the orphan's load too. The
   placement's `slots_per_group` grows to fit: survivors hold more experts while the cover lasts.

An orphan computes alone in its new group on the same rows as before, so with no redundant copies the outputs
are bitwise those of the home placement; an expert that only lost a copy splits its tokens over fewer copies,
which changes rounding (within fp32 precision, as after a rebalance).

Example, 8 experts in 4 groups (linear), group 1 lost, load even: experts 2 and 3 go to groups 0 and 2, so layer
slots become [0, 1, 2], [], [4, 5, 3], [6, 7].

A pure function of (home, lost, load), like the rebalance planner. Legend: L layers, E experts, G groups.
"""

import torch

from experts.placement import Placement, layer_group_loads


def cover(home: Placement, lost: set[int], load, version: int) -> Placement | None:
    """home: the placement to cover from; lost: group ids without a live replica; load [L][E] tokens per (layer,
    expert) (list or tensor; zeros are fine) -> the covering placement with `version`, or None when no group
    survives. With nothing lost: home's slots under the new version (the switch back)."""
    table = torch.as_tensor(load, dtype=torch.float64)
    if tuple(table.shape) != (home.num_layers, home.num_experts):
        raise ValueError(f"load must be [layers, experts] = [{home.num_layers}, {home.num_experts}], "
                         f"got {list(table.shape)}")
    unknown = sorted(g for g in lost if not 0 <= g < home.num_groups)
    if unknown:
        raise ValueError(f"lost groups {unknown} are not in the placement, which has groups 0..{home.num_groups - 1}")
    survivors = [g for g in range(home.num_groups) if g not in lost]
    if not survivors:
        return None
    layers = [_cover_layer(row, slots, survivors) for row, slots in zip(table.tolist(), home.layers)]
    width = max([home.slots_per_group] + [len(slots) for layer in layers for slots in layer])
    return Placement(home.num_experts, home.num_layers, tuple(layers), home.replicas, width, version)


def _cover_layer(load: list[float], home: tuple[tuple[int, ...], ...], survivors: list[int]) -> tuple:
    slots = [list(experts) if g in survivors else [] for g, experts in enumerate(home)]
    held = {e for g in survivors for e in home[g]}
    orphans = sorted({e for experts in home for e in experts} - held, key=lambda e: (-load[e], e))
    carried = layer_group_loads(load, [slots[g] for g in survivors])  # each survivor's load now
    for e in orphans:
        i = min(range(len(survivors)), key=lambda i: (carried[i], len(slots[survivors[i]]), survivors[i]))
        slots[survivors[i]].append(e)
        carried[i] += load[e]
    return tuple(tuple(s) for s in slots)
