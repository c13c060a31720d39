"""`RoutingTable`: the versioned map from expert groups to their live replicas.

The router service owns the one mutable table: replicas register when they are ready to serve (after their
weights loaded and their endpoints opened) and deregister when they stop or are found dead; a rebalance swaps
in a new placement once every replica holds its experts. Every change bumps `version`. Shards hold an immutable
`TableSnapshot` and swap in a newer one at a step boundary, or mid-layer while they fail over. Only the snapshot
crosses processes: plain frozen data, no handles.
"""

from dataclasses import dataclass

from experts.placement import Placement
from router_service.transport import ReplicaInfo


@dataclass(frozen=True)
class TableSnapshot:
    version: int
    placement: Placement
    replicas: dict[int, tuple[ReplicaInfo, ...]]  # group id -> live replicas, in registration order

    def replicas_of(self, group_id: int) -> tuple[ReplicaInfo, ...]:
        return self.replicas.get(group_id, ())

    @property
    def needed_groups(self) -> list[int]:
        """Groups that hold experts in this placement (a lost group that others cover holds none)."""
        return [g for g in range(self.placement.num_groups)
                if any(self.placement.experts_of(g, layer) for layer in range(self.placement.num_layers))]

    @property
    def missing_groups(self) -> list[int]:
        """Groups that hold experts and have no live replica: a layer that needs one of them must wait."""
        return [g for g in self.needed_groups if not self.replicas_of(g)]


class RoutingTable:
    def __init__(self, placement: Placement):
        self.placement = placement
        self.version = 0
        self._replicas: dict[str, ReplicaInfo] = {}  # replica id -> info, in registration order

    def register(self, info: ReplicaInfo) -> int:
        """Add a replica, or replace its endpoints when it comes back (a restart keeps its id)."""
        if not 0 <= info.group_id < self.placement.num_groups:
            raise ValueError(f"replica {info.replica_id!r} names group {info.group_id}; the placement has "
                             f"groups 0..{self.placement.num_groups - 1}")
        self._replicas.pop(info.replica_id, None)
        self._replicas[info.replica_id] = info
        self.version += 1
        return self.version

    def deregister(self, replica_id: str) -> int:
        if self._replicas.pop(replica_id, None) is not None:
            self.version += 1
        return self.version

    def set_placement(self, placement: Placement) -> int:
        if (placement.num_experts, placement.num_layers, placement.num_groups) != \
                (self.placement.num_experts, self.placement.num_layers, self.placement.num_groups):
            raise ValueError("a new placement must keep the experts, layers and groups of the current one")
        self.placement = placement
        self.version += 1
        return self.version

    def get(self, replica_id: str) -> ReplicaInfo | None:
        return self._replicas.get(replica_id)

    def snapshot(self) -> TableSnapshot:
        groups: dict[int, list[ReplicaInfo]] = {}
        for info in self._replicas.values():
            groups.setdefault(info.group_id, []).append(info)
        return TableSnapshot(self.version, self.placement, {g: tuple(r) for g, r in groups.items()})
