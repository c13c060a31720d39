"""`spread_experts`: which device of a multi-device group unit holds each of the group's (layer, expert) pairs.

A group unit may reserve several GPUs; every one of them should hold experts and take about the same share of
the compute. The rule: deal the pairs to the devices in turn, in (layer, ascending expert) order, so pair p of
that sequence goes to device p % D. A layer is a run of consecutive pairs, so within every layer the devices'
counts differ by at most one, and so do their totals. Example, 3 devices, layer 0 holds [0, 2, 5, 7] and
layer 1 holds [1, 4]:

    layer 0: expert 0 -> device 0, 2 -> 1, 5 -> 2, 7 -> 0
    layer 1: expert 1 -> device 1, 4 -> 2          (totals: 2, 2, 2)

Where an expert sits changes no bit of its answer: each expert still computes its own tokens in token order.
"""

from collections.abc import Iterable, Mapping


def spread_experts(holdings: Mapping[int, Iterable[int]], num_devices: int) -> dict[int, dict[int, int]]:
    """holdings: layer -> global expert ids held there -> layer -> expert -> device index in [0, num_devices)."""
    if num_devices < 1:
        raise ValueError(f"num_devices is {num_devices}; a group needs at least one device")
    plan: dict[int, dict[int, int]] = {}
    dealt = 0  # pairs dealt so far, over all earlier layers
    for layer in sorted(holdings):
        expert_ids = sorted(holdings[layer])
        if len(set(expert_ids)) != len(expert_ids) or (expert_ids and expert_ids[0] < 0):
            raise ValueError(f"layer {layer} holds {expert_ids}: expert ids must be distinct and non-negative")
        plan[layer] = {e: (dealt + i) % num_devices for i, e in enumerate(expert_ids)}
        dealt += len(expert_ids)
    return plan
