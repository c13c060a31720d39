"""Start the expert-parallel runtime for one attention shard: router, expert group replicas, transport.

`start_expert_parallel` joins the Ray cluster at RAY_ADDRESS or starts a local one, runs the `Router` and
every `ExpertGroupServer` replica (actors/: the same components the Serve app deploys) as Ray actors, one GPU
per replica when the cluster has GPUs, waits until each group has a registered replica, and returns the
`RemoteExperts` backend (`connect_experts`) the calling process's engine plugs into its MoE layers. More shards
can join the same groups: an `AttentionShard` actor given `runtime.router`. The `local`
transport skips Ray entirely: the groups live in this process (the single-process layout, through the same
dispatch and combine code), with the router's live rebalancing: `runtime.service.rebalance()`, then
`runtime.sync()` until the replicas follow.
"""

import logging
import os
import uuid
from dataclasses import dataclass, field

import torch

from experts.expert_group import ExpertGroup
from experts.parallel_config import LAYER_PATH_ENV, ExpertParallelConfig
from experts.placement import Placement, make_placement
from mistral.checkpoint import CheckpointReader
from router_service.placement_follower import PlacementFollower
from router_service.remote_experts import RemoteExperts, RouterClient
from router_service.service import RouterService
from router_service.transport import LocalTransport, ReplicaInfo

logger = logging.getLogger(__name__)


@dataclass
class ExpertParallelRuntime:
    backend: RemoteExperts
    placement: Placement
    router: object = None  # the router actor handle (None for the local transport)
    replicas: dict[str, object] = field(default_factory=dict)  # replica id -> actor handle
    started_ray: bool = False
    session: object = None  # the torch transport's `TorchSession` (see actors/attention_shard.py)
    service: RouterService | None = None  # the local transport's in-process router
    followers: dict[str, PlacementFollower] = field(default_factory=dict)  # local: replica id -> follower

    def sync(self) -> None:
        """Local transport: one heartbeat round of the in-process replicas, which load a pending placement
        (waited for) and drop moved-away experts once the switch has settled."""
        for replica_id, follower in self.followers.items():
            info = self.service.table.get(replica_id) or ReplicaInfo(replica_id, follower.group.group_id)
            follower.follow(self.service.heartbeat(info, follower.group.tokens_served, follower.version))
            follower.wait()

    def shutdown(self) -> None:
        self.backend.close()
        if self.session is not None:
            self.session.close()
        if self.router is None:
            return
        import ray

        for handle in [*self.replicas.values(), self.router]:
            ray.kill(handle, no_restart=True)
        if self.started_ray:
            ray.shutdown()


def start_expert_parallel(model_dir: str, config: ExpertParallelConfig, dtype: str, wire_dtype: torch.dtype,
                          max_batch_tokens: int) -> ExpertParallelRuntime:
    """`dtype`: the user's choice ("auto" or a name), from which each group decides its compute (`compute_for`);
    `wire_dtype`: the calling shard's compute dtype, in which its batches travel."""
    model = CheckpointReader(model_dir).config
    if not model.is_moe:
        raise ValueError(f"{model_dir} is a dense model: expert parallelism needs a Mixture-of-Experts checkpoint")
    placement = make_placement(model.num_experts, model.num_layers, config.num_groups, config.placement,
                               config.replicas, redundant_slots=config.redundant_slots)
    if config.transport == "local":
        return _start_local(model_dir, placement, wire_dtype, config)
    return _start_ray(model_dir, placement, dtype, wire_dtype, config, max_batch_tokens)


def _start_local(model_dir: str, placement: Placement, dtype: torch.dtype,
                 config: ExpertParallelConfig) -> ExpertParallelRuntime:
    service = RouterService(placement)
    groups, followers = {}, {}
    for g, count in enumerate(placement.replicas):
        for r in range(count):
            replica_id = f"g{g}-r{r}"
            reader = CheckpointReader(model_dir)
            groups[replica_id] = ExpertGroup.load(reader, placement, g, dtype)
            followers[replica_id] = PlacementFollower(groups[replica_id], reader, placement, replica_id)
            service.register(ReplicaInfo(replica_id, g))
    client = RouterClient(lambda version: service.get_table(version, "local"), service.report_failure,
                          service.record_load)
    backend = RemoteExperts(LocalTransport(groups), client, failover_timeout=config.failover_timeout)
    return ExpertParallelRuntime(backend, placement, service=service, followers=followers)


def _start_ray(model_dir: str, placement: Placement, dtype: str, wire_dtype: torch.dtype,
               config: ExpertParallelConfig, max_batch_tokens: int) -> ExpertParallelRuntime:
    import ray

    from actors.attention_shard import RAY_NAMESPACE, ExpertLink, connect_experts
    from actors.compute import compute_for
    from actors.expert_group_server import ExpertGroupServer
    from actors.router import Router

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        # "local": a Ray of its own, never one that `ray start` left on this machine (ray.init would join it)
        ray.init(address=address or "local", namespace=RAY_NAMESPACE, include_dashboard=False,
                 log_to_driver=False, **({} if address else {"num_cpus": max(2, os.cpu_count() or 1)}))
    host = "127.0.0.1" if not os.environ.get("RAY_ADDRESS") else ray.util.get_node_ip_address()
    gpus = config.num_gpus_per_group
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    compute = compute_for(dtype, gpus)
    uid = uuid.uuid4().hex[:8]
    router = ray.remote(Router).options(name=f"msem-{uid}-router", namespace=RAY_NAMESPACE, num_cpus=0,
                                        max_concurrency=64).remote(placement)
    replicas = {}
    for g, count in enumerate(placement.replicas):
        for r in range(count):
            replica_id = f"g{g}-r{r}"
            replicas[replica_id] = ray.remote(ExpertGroupServer).options(
                name=f"msem-{uid}-{replica_id}", namespace=RAY_NAMESPACE, num_cpus=0, num_gpus=gpus,
                max_restarts=config.max_restarts, max_task_retries=0, max_concurrency=64,
                runtime_env={"env_vars": LAYER_PATH_ENV},
            ).remote(model_dir, g, router, compute, transport=config.transport, host=host,
                     max_batch_tokens=max_batch_tokens, num_gpus=max(1, int(gpus)), replica_id=replica_id)
    link = ExpertLink(config.transport, host, config.call_timeout, config.failover_timeout)
    backend, session = connect_experts(router, link, f"shard-{uid}", model_dir, wire_dtype, max_batch_tokens)
    logger.info("expert parallelism: %d groups, %s transport, table v%d", placement.num_groups,
                config.transport, backend.table.version)
    return ExpertParallelRuntime(backend, placement, router, replicas, started, session=session)
