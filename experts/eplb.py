"""Expert-parallel load balancing: a new placement, with redundant copies of hot experts, from measured load.

The method is the global policy of DeepSeek's EPLB (github.com/deepseek-ai/EPLB: `replicate_experts` followed
by `balanced_packing`), applied to each layer on its own:

1. Replicate. The G groups have G*S physical slots; every expert starts with one copy. Repeatedly give one more
   copy to the expert with the highest load per copy (ties: the lowest id), never more copies than groups.
2. Pack. Take the copies by load per copy, heaviest first (ties: the lowest expert id), and put each in the
   least-loaded group that has a free slot and no copy of that expert yet (ties: the lowest group id). A
   surplus copy that fits nowhere is dropped and its slot stays empty.

Filling every slot is not always best: two hot experts with three copies each cannot spread evenly over four
groups (two groups get two hot copies), with two copies each they can. So the packing is tried after each
added copy, and the copies that give the lowest maximum group load win (the fewest on a tie, which also leaves
copies of idle experts out). Then:

3. Relabel. Packing yields unnamed bins; each is given the group id of the current group it shares the most
   experts with (greedy, largest overlap first), so that few (layer, expert) pairs move and few weights load.
4. Keep what works. A layer whose new maximum group load is not lower than the current placement's on the same
   load keeps its current slots. So a rebalance never makes a layer worse, and a layer without load never
   moves.

Example, 8 experts, 4 groups of 3 slots, layer load [100, 100, 1, 1, 1, 1, 1, 1]: experts 0 and 1 get two copies
each (50 tokens per copy), one per group, and the six cold experts fill one more slot per group; group loads
[52, 52, 51, 51], balancedness 0.99 (before, placed round_robin: [101, 101, 2, 2], balancedness 0.51).

A pure function: the same load and placement always give the same result, so the router can plan and every
replica can check. Legend: L layers, E experts, G groups, S slots per group.
"""

import torch

from experts.placement import Placement, layer_group_loads


def rebalance(load, current: Placement) -> Placement:
    """load [L][E] tokens routed per (layer, expert) (list or tensor) -> the placement to switch to, with
    `current`'s groups, slots and replicas and version `current.version + 1`."""
    table = torch.as_tensor(load, dtype=torch.float64)
    if tuple(table.shape) != (current.num_layers, current.num_experts):
        raise ValueError(f"load must be [layers, experts] = [{current.num_layers}, {current.num_experts}], "
                         f"got {list(table.shape)}")
    if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ValueError("load must hold finite token counts >= 0")
    layers = []
    for row, slots in zip(table.tolist(), current.layers):
        planned = _relabel(_plan_layer(row, current.num_groups, current.slots_per_group), slots)
        better = max(layer_group_loads(row, planned)) < max(layer_group_loads(row, slots))
        layers.append(planned if better else slots)
    return Placement(current.num_experts, current.num_layers, tuple(layers), current.replicas,
                     current.slots_per_group, current.version + 1)


def _plan_layer(load: list[float], num_groups: int, slots: int) -> list[tuple[int, ...]]:
    """Steps 1 and 2 for one layer: load [E] -> [G] unnamed bins of expert ids (ascending)."""
    copies = [1] * len(load)
    best = _pack(load, copies, num_groups, slots)
    best_peak = max(layer_group_loads(load, best))
    for _ in range(num_groups * slots - len(load)):
        open_experts = [e for e, n in enumerate(copies) if n < num_groups]
        if not open_experts:
            break
        copies[min(open_experts, key=lambda e: (-load[e] / copies[e], e))] += 1
        bins = _pack(load, copies, num_groups, slots)
        peak = max(layer_group_loads(load, bins))
        if peak < best_peak:
            best, best_peak = bins, peak
    return best


def _pack(load: list[float], copies: list[int], num_groups: int, slots: int) -> list[tuple[int, ...]]:
    items = sorted(((load[e] / n, e) for e, n in enumerate(copies) for _ in range(n)), key=lambda c: (-c[0], c[1]))
    bins: list[list[int]] = [[] for _ in range(num_groups)]
    totals = [0.0] * num_groups
    for weight, e in items:
        fits = [g for g in range(num_groups) if len(bins[g]) < slots and e not in bins[g]]
        if fits:  # the first copy of an expert always fits: no group holds it yet and a slot is free
            g = min(fits, key=lambda g: (totals[g], g))
            bins[g].append(e)
            totals[g] += weight
    return [tuple(sorted(b)) for b in bins]


def _relabel(bins: list[tuple[int, ...]], current: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Step 3: name each bin after the current group it overlaps most (greedy)."""
    pairs = sorted(((len(set(b) & set(c)), i, g) for i, b in enumerate(bins) for g, c in enumerate(current)),
                   key=lambda p: (-p[0], p[1], p[2]))
    named: dict[int, tuple[int, ...]] = {}
    taken = set()
    for _, i, g in pairs:
        if i not in taken and g not in named:
            named[g] = bins[i]
            taken.add(i)
    return tuple(named[g] for g in range(len(current)))
