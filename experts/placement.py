"""`Placement`: which experts each expert group holds in each MoE layer, and how many replicas each group runs.

A group has `slots_per_group` physical slots per layer. Each slot holds one copy of a logical expert, so a hot
expert can have copies in several groups (redundant experts) and every layer can differ. Example: 8 experts,
4 groups of 3 slots (2 experts + 1 redundant slot), layer 0 after a rebalance where experts 0 and 1 are hot:

    group 0: [0, 2, 6]      expert 0 has copies in groups 0 and 1, expert 1 in groups 2 and 3;
    group 1: [0, 3, 7]      dispatch splits an expert's tokens evenly over its copies, so each group
    group 2: [1, 4]         computes a quarter of the hot tokens. Group 2 and 3 leave a slot empty.
    group 3: [1, 5]

The config's placement (`make_placement`) puts the same map in every layer and leaves the redundant slots
empty; `experts.eplb.rebalance` fills them from the measured load and bumps `version`. Strategies, for 8
experts in 3 groups:

    linear       contiguous ranges, the remainder to the first groups   [0 0 0 1 1 1 2 2]
    round_robin  expert e -> group e % num_groups                       [0 1 2 0 1 2 0 1]
    explicit     a list, expert -> group, given by the user             e.g. [0 0 1 1 1 1 2 2]

Every placement is checked when it is built (from a strategy, a rebalance or a dict): every expert has at least
one copy in each layer, no group holds more than `slots_per_group` experts in a layer or two copies of one
expert, every group has at least one replica. A placement that breaks a rule raises `PlacementError` naming
the expert or group at fault.

Legend: L layers, E experts, G groups, C the most copies any expert has.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

STRATEGIES = ("linear", "round_robin")


class PlacementError(ValueError):
    """A placement that cannot work; the message names the expert or group at fault."""


@dataclass(frozen=True)
class Placement:
    num_experts: int
    num_layers: int
    layers: tuple[tuple[tuple[int, ...], ...], ...]  # [L][G]: global expert ids in group g's slots of layer l
    replicas: tuple[int, ...]  # [G] replicas of each group
    slots_per_group: int  # slots per group per layer: its experts plus the redundant slots
    version: int = 0  # 0 for the config's placement; each rebalance adds 1

    def __post_init__(self):
        _check_slots(self)

    @property
    def num_groups(self) -> int:
        return len(self.replicas)

    def experts_of(self, group_id: int, layer: int) -> tuple[int, ...]:
        """Global expert ids in the group's slots of `layer`, in slot order."""
        return self.layers[layer][group_id]

    def layer_experts_of(self, group_id: int) -> list[tuple[int, int]]:
        """Every (layer, global expert) pair the group holds."""
        return [(layer, e) for layer in range(self.num_layers) for e in self.layers[layer][group_id]]

    def groups_of(self, layer: int, expert: int) -> tuple[int, ...]:
        """Groups holding a copy of `expert` in `layer`, ascending."""
        return tuple(g for g, slots in enumerate(self.layers[layer]) if expert in slots)

    def num_copies(self) -> list[list[int]]:
        """[L][E] copies of each expert."""
        counts = [[0] * self.num_experts for _ in range(self.num_layers)]
        for layer, groups in enumerate(self.layers):
            for slots in groups:
                for e in slots:
                    counts[layer][e] += 1
        return counts

    def copy_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (copies [L, E, C] long: the groups of each expert's copies, ascending, -1 padded;
        num_copies [L, E] long), what dispatch indexes."""
        holders = [[self.groups_of(layer, e) for e in range(self.num_experts)] for layer in range(self.num_layers)]
        width = max(len(h) for row in holders for h in row)
        copies = torch.tensor([[list(h) + [-1] * (width - len(h)) for h in row] for row in holders])
        return copies, torch.tensor(self.num_copies())

    def group_loads(self, load) -> list[list[float]]:
        """load [L][E] tokens (list or tensor) -> [L][G]; an expert's tokens split evenly over its copies."""
        load = torch.as_tensor(load, dtype=torch.float64).tolist()
        return [layer_group_loads(row, groups) for row, groups in zip(load, self.layers)]

    def balancedness(self, load) -> list[float]:
        """Per layer: mean over max of the group loads (1.0 is perfect; 1.0 when the layer saw no tokens)."""
        return [sum(row) / len(row) / max(row) if max(row) > 0 else 1.0 for row in self.group_loads(load)]

    def to_dict(self) -> dict:
        """JSON-safe; `from_dict` rebuilds the same placement."""
        return {"num_experts": self.num_experts, "num_layers": self.num_layers,
                "slots_per_group": self.slots_per_group, "version": self.version,
                "replicas": list(self.replicas), "layers": [[list(slots) for slots in row] for row in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        """Raises `PlacementError` (or KeyError for a missing field) for a dict that is not a valid placement."""
        return cls(num_experts=data["num_experts"], num_layers=data["num_layers"],
                   layers=tuple(tuple(tuple(slots) for slots in row) for row in data["layers"]),
                   replicas=tuple(data["replicas"]), slots_per_group=data["slots_per_group"],
                   version=data.get("version", 0))


def layer_group_loads(load: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """One layer: load [E] tokens, groups [G] slot lists -> [G] tokens, each expert's split over its copies."""
    counts = [0] * len(load)
    for slots in groups:
        for e in slots:
            counts[e] += 1
    return [sum(load[e] / counts[e] for e in slots) for slots in groups]


def make_placement(num_experts: int, num_layers: int, num_groups: int,
                   strategy: str | Sequence[int] = "linear", replicas: int | Sequence[int] = 1,
                   max_experts_per_group: int | None = None, redundant_slots: int = 0) -> Placement:
    """Build and check the config's placement. `strategy` is "linear", "round_robin" or an explicit
    expert -> group list; `replicas` is one count for every group or a list of per-group counts;
    `redundant_slots` are slots per group per layer left empty for a rebalance to fill with copies."""
    if num_experts < 1 or num_layers < 1:
        raise PlacementError(f"a placement needs at least one expert and one layer, got {num_experts} experts "
                             f"and {num_layers} layers")
    if not 1 <= num_groups <= num_experts:
        raise PlacementError(f"num_groups must be between 1 and the number of experts ({num_experts}), "
                             f"got {num_groups}")
    if not isinstance(redundant_slots, int) or redundant_slots < 0:
        raise PlacementError(f"redundant_slots must be a whole number >= 0, got {redundant_slots!r}")
    if isinstance(strategy, str):
        if strategy == "linear":
            base, extra = divmod(num_experts, num_groups)
            mapping = [g for g in range(num_groups) for _ in range(base + (g < extra))]
        elif strategy == "round_robin":
            mapping = [e % num_groups for e in range(num_experts)]
        else:
            raise PlacementError(f"unknown placement strategy {strategy!r}: use one of {', '.join(STRATEGIES)} "
                                 "or an explicit list of group ids, one per expert")
    else:
        mapping = list(strategy)
    per_group = [replicas] * num_groups if isinstance(replicas, int) else list(replicas)
    _check_map(num_experts, num_groups, mapping, max_experts_per_group)
    if len(per_group) != num_groups:
        raise PlacementError(f"got {len(per_group)} replica counts for {num_groups} groups")
    groups = tuple(tuple(e for e, owner in enumerate(mapping) if owner == g) for g in range(num_groups))
    slots = max(len(experts) for experts in groups) + redundant_slots
    return Placement(num_experts, num_layers, (groups,) * num_layers, tuple(per_group), slots)


def _check_map(num_experts: int, num_groups: int, mapping: list, max_experts_per_group: int | None) -> None:
    if len(mapping) < num_experts:
        raise PlacementError(f"experts {list(range(len(mapping), num_experts))} are unplaced: the map has "
                             f"{len(mapping)} entries for {num_experts} experts")
    if len(mapping) > num_experts:
        raise PlacementError(f"the map has {len(mapping)} entries but the model has only {num_experts} experts")
    for e, g in enumerate(mapping):
        if not _is_int(g) or not 0 <= g < num_groups:
            raise PlacementError(f"expert {e} is mapped to group {g!r}; groups are 0..{num_groups - 1}")
    sizes = [mapping.count(g) for g in range(num_groups)]
    empty = [g for g, n in enumerate(sizes) if n == 0]
    if empty:
        raise PlacementError(f"groups {empty} hold no expert; use fewer groups or another map")
    if max_experts_per_group is not None:
        over = {g: n for g, n in enumerate(sizes) if n > max_experts_per_group}
        if over:
            raise PlacementError(f"groups {sorted(over)} hold {sorted(over.values())} experts, more than the "
                                 f"{max_experts_per_group} a group may hold")


def _check_slots(p: Placement) -> None:
    if not _is_int(p.num_experts) or not _is_int(p.num_layers) or p.num_experts < 1 or p.num_layers < 1:
        raise PlacementError(f"a placement needs at least one expert and one layer, got {p.num_experts!r} "
                             f"experts and {p.num_layers!r} layers")
    if not _is_int(p.slots_per_group) or p.slots_per_group < 1:
        raise PlacementError(f"slots_per_group must be at least 1, got {p.slots_per_group!r}")
    if not _is_int(p.version) or p.version < 0:
        raise PlacementError(f"version must be a whole number >= 0, got {p.version!r}")
    bad = [(g, r) for g, r in enumerate(p.replicas) if not _is_int(r) or r < 1]
    if not p.replicas or bad:
        raise PlacementError(f"every group needs at least one replica; got {bad or 'no groups'} (group, replicas)")
    if len(p.layers) != p.num_layers:
        raise PlacementError(f"the placement lists {len(p.layers)} layers for a model of {p.num_layers}")
    for layer, groups in enumerate(p.layers):
        if len(groups) != p.num_groups:
            raise PlacementError(f"layer {layer} lists {len(groups)} groups, but replica counts are given for "
                                 f"{p.num_groups}")
        for g, slots in enumerate(groups):
            if len(slots) > p.slots_per_group:
                raise PlacementError(f"group {g} holds {len(slots)} experts in layer {layer}, more than its "
                                     f"{p.slots_per_group} slots")
            for e in slots:
                if not _is_int(e) or not 0 <= e < p.num_experts:
                    raise PlacementError(f"group {g} names expert {e!r} in layer {layer}; experts are "
                                         f"0..{p.num_experts - 1}")
            if len(set(slots)) != len(slots):
                twice = sorted({e for e in slots if slots.count(e) > 1})
                raise PlacementError(f"group {g} holds two copies of experts {twice} in layer {layer}")
        held = {e for slots in groups for e in slots}
        missing = [e for e in range(p.num_experts) if e not in held]
        if missing:
            raise PlacementError(f"experts {missing} have no copy in layer {layer}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
