"""`Placement`: which experts live in which expert group, and how many replicas each group runs.

A pure function of (num_experts, num_layers, num_groups, strategy, replicas): the same arguments always give
the same map, so every process can rebuild it from the config alone. Every MoE layer uses the same expert ->
group map (expert e of layer 3 lives where expert e of layer 0 does), so a group holds whole columns of the
(layer, expert) grid and a token's dispatch needs one lookup per slot.

Strategies, for 8 experts in 3 groups:

    linear       contiguous ranges, the remainder to the first groups   [0 0 0 1 1 1 2 2]
    round_robin  expert e -> group e % num_groups                       [0 1 2 0 1 2 0 1]
    explicit     a list, expert -> group, given by the user             e.g. [0 0 1 1 1 1 2 2]

A placement that leaves an expert unplaced, names a group outside [0, num_groups), leaves a group empty or
puts more experts in one group than `max_experts_per_group` allows is rejected with a `PlacementError` that
says which.
"""

from collections.abc import Sequence
from dataclasses import dataclass

STRATEGIES = ("linear", "round_robin")


class PlacementError(ValueError):
    """A placement that cannot work; the message names the expert or group at fault."""


@dataclass(frozen=True)
class Placement:
    num_experts: int
    num_layers: int
    expert_to_group: tuple[int, ...]  # [E] global expert id -> group id
    replicas: tuple[int, ...]  # [G] replicas of each group

    @property
    def num_groups(self) -> int:
        return len(self.replicas)

    def experts_of(self, group_id: int) -> tuple[int, ...]:
        """Global expert ids of a group, ascending; their position is the group's local expert id."""
        return tuple(e for e, g in enumerate(self.expert_to_group) if g == group_id)

    def layer_experts_of(self, group_id: int) -> list[tuple[int, int]]:
        """Every (layer, global expert) pair the group holds."""
        return [(layer, e) for layer in range(self.num_layers) for e in self.experts_of(group_id)]


def make_placement(num_experts: int, num_layers: int, num_groups: int,
                   strategy: str | Sequence[int] = "linear", replicas: int | Sequence[int] = 1,
                   max_experts_per_group: int | None = None) -> Placement:
    """Build and check a placement. `strategy` is "linear", "round_robin" or an explicit expert -> group list;
    `replicas` is one count for every group or a list of per-group counts."""
    if num_experts < 1 or num_layers < 1:
        raise PlacementError(f"a placement needs at least one expert and one layer, got {num_experts} experts "
                             f"and {num_layers} layers")
    if not 1 <= num_groups <= num_experts:
        raise PlacementError(f"num_groups must be between 1 and the number of experts ({num_experts}), "
                             f"got {num_groups}")
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
    _check(num_experts, num_groups, mapping, per_group, max_experts_per_group)
    return Placement(num_experts, num_layers, tuple(mapping), tuple(per_group))


def _check(num_experts: int, num_groups: int, mapping: list, replicas: list,
           max_experts_per_group: int | None) -> None:
    if len(mapping) < num_experts:
        raise PlacementError(f"experts {list(range(len(mapping), num_experts))} are unplaced: the map has "
                             f"{len(mapping)} entries for {num_experts} experts")
    if len(mapping) > num_experts:
        raise PlacementError(f"the map has {len(mapping)} entries but the model has only {num_experts} experts")
    for e, g in enumerate(mapping):
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < num_groups:
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
    if len(replicas) != num_groups:
        raise PlacementError(f"got {len(replicas)} replica counts for {num_groups} groups")
    bad = [(g, r) for g, r in enumerate(replicas) if not isinstance(r, int) or r < 1]
    if bad:
        raise PlacementError(f"every group needs at least one replica; got {bad} (group, replicas)")
