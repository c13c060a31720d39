"""`ExpertParallelConfig`: how a model's experts are spread over expert-group processes."""

from dataclasses import dataclass

TRANSPORTS = ("local", "ray", "grpc", "torch")

# The environment of processes on the layer path (attention shards with remote experts, expert group
# replicas). OpenMP threads that spin between parallel regions (the default) keep their cores busy while the
# shard waits for its experts, and expert groups on the same cores then compute slower: on a 2-core machine
# passive waiting cut the gRPC hop from 9.3 to 0.5 ms a layer (docs/PERFORMANCE.md). It must be set before the
# process loads OpenMP, so it goes into Ray's runtime_env of those actors, not into a running process.
LAYER_PATH_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class ExpertParallelConfig:
    num_groups: int = 2  # expert groups (one GPU each when the cluster has GPUs)
    transport: str = "ray"  # local (in-process), ray (actor calls), grpc (ExpertService), torch (all_to_all)
    placement: str | tuple[int, ...] = "linear"  # linear, round_robin, or expert -> group ids
    replicas: int | tuple[int, ...] = 1  # replicas per group (one count, or one per group)
    redundant_slots: int = 0  # extra expert slots per group and layer, which a rebalance fills
    failover_timeout: float = 30.0  # seconds a layer may wait for a group to have a live replica again
    call_timeout: float = 10.0  # deadline of one dispatch to one replica, seconds
    max_restarts: int = -1  # restarts of a dead replica process (-1: always)
    num_gpus_per_group: float | None = None  # None: 1 when the cluster has GPUs, else 0

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}: use one of {', '.join(TRANSPORTS)}")
        if self.redundant_slots < 0:
            raise ValueError(f"redundant_slots must be >= 0, got {self.redundant_slots}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be at least 1, got {self.num_groups}")
        if self.failover_timeout <= 0 or self.call_timeout <= 0:
            raise ValueError("failover_timeout and call_timeout must be positive (seconds)")
