"""Start the expert-parallel runtime for one attention shard: router, expert group replicas, transport.

`start_expert_parallel` joins the Ray cluster at RAY_ADDRESS or starts a local one, places the router and
every group replica as actors (one GPU per replica when the cluster has GPUs), waits until each group has a
registered replica, and returns the `RemoteExperts` backend the engine plugs into its MoE layers. The `local`
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
NAMESPACE = "msem"


@dataclass
class ExpertParallelRuntime:
    backend: RemoteExperts
    placement: Placement
    router: object = None  # the router actor handle (None for the local transport)
    replicas: dict[str, object] = field(default_factory=dict)  # replica id -> actor handle
    started_ray: bool = False
    router_name: str | None = None  # what another shard joins through (see AttentionShardActor)
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
        if self.router is None:
            return
        import ray

        for handle in [*self.replicas.values(), self.router]:
            ray.kill(handle, no_restart=True)
        if self.started_ray:
            ray.shutdown()


def start_expert_parallel(model_dir: str, config: ExpertParallelConfig, dtype: torch.dtype,
                          max_batch_tokens: int) -> ExpertParallelRuntime:
    model = CheckpointReader(model_dir).config
    if not model.is_moe:
        raise ValueError(f"{model_dir} is a dense model: expert parallelism needs a Mixture-of-Experts checkpoint")
    placement = make_placement(model.num_experts, model.num_layers, config.num_groups, config.placement,
                               config.replicas, redundant_slots=config.redundant_slots)
    if config.transport == "local":
        return _start_local(model_dir, placement, dtype, config)
    return _start_ray(model_dir, placement, dtype, config, max_batch_tokens)


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


def _start_ray(model_dir: str, placement: Placement, dtype: torch.dtype, config: ExpertParallelConfig,
               max_batch_tokens: int) -> ExpertParallelRuntime:
    import ray

    from actors.expert_group_actor import ExpertGroupActor
    from actors.router_actor import RouterServiceActor

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(2, os.cpu_count() or 1)}))
    local = not os.environ.get("RAY_ADDRESS")
    host = "127.0.0.1" if local else ray.util.get_node_ip_address()
    gpus = config.num_gpus_per_group
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    uid = uuid.uuid4().hex[:8]
    session = f"shard-{uid}"
    router = ray.remote(RouterServiceActor).options(
        name=f"msem-{uid}-router", namespace=NAMESPACE, num_cpus=0, max_concurrency=8,
    ).remote(placement, NAMESPACE, host)
    dtype_name = str(dtype).removeprefix("torch.")
    replicas = {}
    for g, count in enumerate(placement.replicas):
        for r in range(count):
            replica_id = f"g{g}-r{r}"
            replicas[replica_id] = ray.remote(ExpertGroupActor).options(
                name=f"msem-{uid}-{replica_id}", namespace=NAMESPACE, num_cpus=0, num_gpus=gpus,
                max_restarts=config.max_restarts, max_task_retries=0, max_concurrency=4,
                runtime_env={"env_vars": LAYER_PATH_ENV},
            ).remote(model_dir, placement, g, replica_id, dtype_name, f"msem-{uid}-router", NAMESPACE,
                     (config.transport,), host, max_batch_tokens, (session,))
    backend = connect_shard(router, config, session, model_dir, dtype, max_batch_tokens)
    logger.info("expert parallelism: %d groups, %s transport, table v%d", placement.num_groups,
                config.transport, backend.table.version)
    return ExpertParallelRuntime(backend, placement, router, replicas, started, f"msem-{uid}-router")


def connect_shard(router, config: ExpertParallelConfig, session: str, model_dir: str, dtype: torch.dtype,
                  max_batch_tokens: int) -> RemoteExperts:
    """The expert backend of one attention shard, talking to the router actor and the group replicas
    (for the torch transport, `session` names the shard's process group among the replicas)."""
    import ray

    client = RouterClient(
        get_table=lambda version: ray.get(router.get_table.remote(version)),
        report_failure=lambda replica_id: ray.get(router.report_failure.remote(replica_id)),
        record_load=lambda counts: router.record_load.remote(counts),
    )
    backend = None  # the torch transport's member list is the backend's current routing table

    def members() -> list[ReplicaInfo]:
        return [r for reps in backend.table.replicas.values() for r in reps]

    transport = _make_transport(config, router, session, members, model_dir, dtype, max_batch_tokens)
    backend = RemoteExperts(transport, client, failover_timeout=config.failover_timeout)
    return backend


def _make_transport(config: ExpertParallelConfig, router, session: str, members, model_dir: str,
                    dtype: torch.dtype, max_batch_tokens: int):
    import ray

    if config.transport == "ray":
        from router_service.ray_transport import RayTransport

        return RayTransport(namespace=NAMESPACE, timeout=config.call_timeout)
    if config.transport == "grpc":
        from router_service.grpc_transport import GrpcTransport, message_limit_bytes

        model = CheckpointReader(model_dir).config
        limit = message_limit_bytes(max_batch_tokens, model.hidden_size, model.num_experts_per_tok, dtype)
        return GrpcTransport(timeout_s=config.call_timeout, max_message_bytes=limit)
    from router_service.torch_transport import TorchTransport

    store_host, store_port = ray.get(router.store_address.remote())
    return TorchTransport(store_host, store_port, session, members, timeout=config.call_timeout)
