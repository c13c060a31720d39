"""The Serve deployment graph: `build_app(config) -> serve.Application`. Composition only: every Ray role is a
component of actors/, deployed here with its options and bound to the handles of the others (as Ray Serve LLM
deploys its `LLMServer`).

    Ingress ×2 ──► AttentionShard ×A ──(per MoE layer: grpc or torch)──► ExpertGroup0 ×r0, ExpertGroup1 ×r1
       │               │                                                   │ register, heartbeat
       └───────────────┴─────────────────► Router ◄───────────────────────┘

- **Ingress** (`cluster.ingress`): the HTTP (OpenAI-compatible, through Serve's proxy) and gRPC (its own
  server) edge over one `Frontend`: validation, admission limits, and resuming a request on another shard when
  its shard dies. Two replicas by default, so that new requests go through a live one at once when one dies.
  It loads no torch.
- **AttentionShard** (`actors.attention_shard`): an `AsyncLLM` whose MoE layers call `RemoteExperts`.
- **ExpertGroup{g}** (`actors.expert_group_server`): one deployment per group, each with its own replica
  bounds, so a hot group scales without touching the others (autoscaled on routed tokens/s by
  `RoutedTokensPolicy`).
- **Router** (`actors.router`): routing table, per-expert load, rebalancing, the torch transport's store.
- **MemoryStore** (`actors.memory_store`): the shared KV tier (T2) under every shard's device pool and host
  RAM; shards read it on a miss, write to it by the write policy, and recompute while it is down.

Device and dtype are decided here, once per role (`compute_for`), and handed to the components. Serve handles
are the control plane; the per-layer hop goes straight to the replicas (a Serve call per layer would cost
~10 ms). It binds loopback when the config's `host` is loopback, and each node's address otherwise.
"""

import json
import logging
import os
from pathlib import Path

import ray
from ray import serve

from actors.attention_shard import AttentionShard, ExpertLink
from actors.compute import compute_for
from actors.expert_group_server import ExpertGroupServer
from actors.memory_store import MemoryStore
from actors.router import Router
from cluster import capacity
from cluster.autoscaling import RoutedTokensPolicy
from cluster.config import (Autoscaling, ExpertGroupsConfig, HealthCheck, Replicas, RoutingConfig, ServeConfig,
                            parse_config)
from cluster.ingress import Ingress
from cluster.kv_routing import KVAwareRouter
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.kv_cache_manager import max_blocks_per_sequence
from experts import eplb
from experts.parallel_config import LAYER_PATH_ENV
from experts.placement import Placement, PlacementError, make_placement
from mistral.config import ModelConfig
from mistral.errors import ConfigError
from mistral.presets import resolve_model
from router_service.service import ExpectedReplicas

logger = logging.getLogger(__name__)
APP_NAME = "msem"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BLOCK_SIZE = EngineConfig.block_size  # the shards' KV block size (the engine's default)
# Ray Serve's throughput-optimized mode, as Ray documents it: a replica runs its user code on its own event loop
# (no hand-off to a thread of its own), handles and the proxy call replicas over gRPC, and the garbage collector is
# frozen after start-up. The request path (proxy -> Ingress -> AttentionShard, one streaming item per coalesced
# delta) gets it through each deployment's runtime_env; Serve's proxy and controller read it when they start, so
# Ray must be started with it (`init_local_ray`, the `ray start` commands of cluster*.yaml). Two of the mode's
# settings stay off: direct ingress (it serves from each replica's own port and needs HAProxy or a load balancer),
# and the handles' router on the caller's loop (handles are then usable only from that loop, and shards call the
# Router and the MemoryStore from their engine's threads). One is set explicitly: Ray 2.60 decides whether the
# proxy calls replicas over gRPC before the mode turns gRPC on, so without it the proxy keeps Ray's actor calls
# (which cost it about 1.6x the CPU per streamed request: docs/PERFORMANCE.md).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_PROXY_USE_GRPC": "1"}


def init_local_ray(**options) -> "ray.RayContext":
    """Start a Ray of this process's own (never one that `ray start` left on this machine), every process of
    which has `SERVE_ENV`."""
    os.environ.update(SERVE_ENV)
    return ray.init(address="local", namespace="msem", **options)


def app_builder(args: dict) -> serve.Application:
    """The `import_path` target of `configs/*.yaml`: Serve passes the application's `args`."""
    return build_app(parse_config(args, source="application args"))


def plan(config: ServeConfig) -> tuple[Path, Placement | None]:
    """The checkpoint directory and the expert placement (None without expert groups); raises on a config
    that cannot work, so callers can check one before deploying it."""
    model_dir = resolve_model(config.model)  # materialises a preset once, before any replica starts
    model = ModelConfig.from_dir(model_dir)  # the config alone: the head need not hold the weights
    _check_memory(config, model)
    _check_capacity(config, capacity.AUTOSCALER_CONFIG.expanduser())
    if config.expert_groups is None:
        return model_dir, None
    if not model.is_moe:
        raise ConfigError(f"{config.model} is a dense model, which has no experts to place: set expert_groups "
                          "to null in the config (msem serve: --expert-groups 0)")
    eg = config.expert_groups
    gpus = _cluster_has_gpus()
    eg.resolved_transport(_gpus(eg.num_gpus, gpus), _gpus(config.attention.num_gpus, gpus))  # refuses misfits
    # Replica counts live in each deployment's options, not in the placement: scaling stays per group.
    placement = make_placement(model.num_experts, model.num_layers, eg.num_groups, eg.placement, 1,
                               redundant_slots=eg.redundant_slots)
    if eg.initial_placement is not None:
        placement = initial_placement(Path(eg.initial_placement), placement)
    return model_dir, placement


def _check_memory(config: ServeConfig, model: ModelConfig) -> None:
    """Refuse a host tier too small to stage one sequence's blocks from the memory store (each shard would fail
    at start). Counted at 2 bytes a value, the least a shard's dtype takes: the shards check the exact need."""
    memory = config.memory
    if memory is None or memory.store is None or not memory.host_bytes:
        return
    max_len = config.max_model_len or model.max_position_embeddings
    blocks = max_blocks_per_sequence(max_len, config.attention.max_num_batched_tokens, BLOCK_SIZE,
                                     model.sliding_window)
    needed = blocks * BLOCK_SIZE * model.kv_bytes_per_token(2)
    if memory.host_bytes < needed:
        raise ConfigError(f"memory.host_bytes is {memory.host_bytes}; staging one sequence of max_model_len "
                          f"{max_len} from the memory store takes {needed} bytes of host RAM per shard at least: "
                          "raise memory.host_bytes, lower max_model_len, or set memory.store to null")


def _check_capacity(config: ServeConfig, launcher_config: Path) -> None:
    """On a cluster `ray up` started (its launcher config is on the head), refuse replica bounds that its node
    types cannot hold: Serve would wait for them forever."""
    if launcher_config.is_file() and (found := capacity.check_file(config, launcher_config)):
        raise ConfigError(f"the replica bounds do not fit the cluster's node types ({launcher_config}): "
                          + "; ".join(found) + ". Lower the bounds, or raise the node types' max_workers")


def initial_placement(path: Path, base: Placement) -> Placement:
    """The start-up placement from a file: a recorded load `{"load": [[tokens per expert] per layer]}` (planned
    with EPLB onto `base`'s groups and slots), a placement (`Placement.to_dict()`), or a saved `/v1/experts`
    document (its placement)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"expert_groups.initial_placement: {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"expert_groups.initial_placement: {path} is not readable JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("placement"), dict):
        data = data["placement"]
    try:
        if isinstance(data, dict) and "load" in data:
            load = data["load"]
            if not (isinstance(load, list) and len(load) == base.num_layers
                    and all(isinstance(row, list) and len(row) == base.num_experts for row in load)):
                raise PlacementError(f"load must be {base.num_layers} lists (layers) of {base.num_experts} "
                                     "token counts (experts)")
            return eplb.rebalance(load, base)
        placement = Placement.from_dict(data)
    except (PlacementError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"expert_groups.initial_placement: {path}: {err}") from None
    shape = (placement.num_experts, placement.num_layers, placement.num_groups, placement.slots_per_group)
    wanted = (base.num_experts, base.num_layers, base.num_groups, base.slots_per_group)
    if shape != wanted:
        raise ConfigError(f"expert_groups.initial_placement: {path} places {shape[0]} experts x {shape[1]} layers "
                          f"in {shape[2]} groups of {shape[3]} slots; this deployment has {wanted[0]} x {wanted[1]} "
                          f"in {wanted[2]} groups of {wanted[3]} slots")
    return placement


def build_app(config: ServeConfig) -> serve.Application:
    """The graph: each component of actors/ as a deployment with its options, bound to the others' handles."""
    model_dir, placement = plan(config)
    gpus = _cluster_has_gpus()
    attention, router, groups, link = config.attention, None, [], ExpertLink()
    shard_gpus = _gpus(attention.num_gpus, gpus)
    if placement is not None:
        eg, model = config.expert_groups, ModelConfig.from_dir(model_dir)
        group_gpus = _gpus(eg.num_gpus, gpus)
        group_compute = compute_for(config.dtype, group_gpus)
        link = ExpertLink(eg.resolved_transport(group_gpus, shard_gpus), _layer_host(config), eg.call_timeout,
                          eg.failover_timeout, eg.startup_timeout)
        router = RouterDeployment.options(max_ongoing_requests=1000, ray_actor_options=_control(config)).bind(
            placement, eg.rebalance.model_dump(), ExpectedReplicas(model.hidden_size, (group_compute.dtype,)))
        groups = [ExpertGroupDeployment.options(name=f"ExpertGroup{g}", **_group_options(eg, g, gpus)).bind(
            config.model, g, router, group_compute, transport=link.transport, host=_layer_host(config),
            max_batch_tokens=attention.max_num_batched_tokens, num_gpus=max(1, int(group_gpus)))
            for g in range(eg.num_groups)]
    engine_kwargs = {"model": config.model, "tokenizer": config.tokenizer, "max_model_len": config.max_model_len,
                     "max_num_seqs": attention.max_num_seqs, "max_num_batched_tokens": attention.max_num_batched_tokens,
                     "kv_cache_memory": attention.kv_cache_memory}
    memory, store = config.memory, None
    if memory is not None:
        engine_kwargs |= {"host_kv_cache_memory": memory.host_bytes, "kv_write_policy": memory.write_policy}
    if memory is not None and memory.store is not None:
        ms = memory.store
        store = MemoryStoreDeployment.options(
            max_ongoing_requests=1000, **_health_options(HealthCheck(period_s=2.0)),
            ray_actor_options={"num_cpus": ms.num_cpus, "resources": ms.resources},
        ).bind(ms.ram_bytes, ms.directory, ms.disk_bytes, memory.write_policy, config.model_name)
    shard = AttentionShardDeployment.options(
        **_shard_scaling(config), **_health_options(attention.health_check),
        **_routing_options(attention.routing),
        ray_actor_options={"num_cpus": attention.num_cpus, "num_gpus": shard_gpus, "resources": attention.resources,
                           "runtime_env": {"env_vars": SERVE_ENV | (LAYER_PATH_ENV if placement is not None else {})}},
    ).bind(AsyncLLM, engine_kwargs, compute_for(config.dtype, shard_gpus), router, link,
           model_name=config.model_name, memory_store=store,
           memory_timeout_s=memory.store.timeout_s if store is not None else 2.0)
    return IngressDeployment.options(num_replicas=config.ingress_replicas, max_ongoing_requests=config.limits.max_requests + 64,
                           ray_actor_options=_control(config) | {"runtime_env": {"env_vars": SERVE_ENV}},
                           ).bind(config, shard, router, groups, store)


def deploy(config: ServeConfig, serve_file: dict | None = None) -> None:
    """Deploy (or update) the application declaratively, as `serve deploy` does with a config file.

    Serve rebuilds the application and restarts every deployment when its `args` change (they are part of
    its code version), and applies a `deployments:` entry to the deployment it names alone. Hence:
    - `serve_file`, the Serve config file `config` was read from, is deployed as written, with only the
      settings `config` changes (msem serve's --model, --host, --http-port, --grpc-port, --expert-groups)
      written over its first application's args: a later `serve deploy` of the same file sends the same
      args, so an edit of its `deployments:` restarts nothing else;
    - a plain config goes to the builder without its replica bounds and autoscaling settings, which become
      per-deployment options instead: deploying it again with other bounds rescales only those deployments.
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    plan(config)  # a config that cannot work fails here, not later inside Serve's build task
    try:
        schema = ServeDeploySchema.model_validate(
            _as_written(serve_file, config) if serve_file is not None else _generated(config))
    except ValueError as err:
        raise ConfigError(f"not a valid Serve config: {err}") from None
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema)


def _as_written(serve_file: dict, config: ServeConfig) -> dict:
    """`serve_file` with the top-level settings in which `config` differs from its first application's args
    written over them (and over `http_options`, which Serve's proxy binds)."""
    app = serve_file["applications"][0]
    written = parse_config(app.get("args") or {}, source="application args").model_dump(mode="json")
    changed = {key: value for key, value in config.model_dump(mode="json").items() if value != written[key]}
    if not changed:
        return serve_file
    http = {**serve_file.get("http_options", {}), **({"host": changed["host"]} if "host" in changed else {}),
            **({"port": changed["http_port"]} if "http_port" in changed else {})}
    return {**serve_file, "http_options": http,
            "applications": [{**app, "args": {**(app.get("args") or {}), **changed}},
                             *serve_file["applications"][1:]]}


def _generated(config: ServeConfig) -> dict:
    """The Serve config of a plain `config`: scaling settings as per-deployment options, not builder args."""
    scaling_free = {"attention": config.attention.model_copy(update={"replicas": Replicas(),
                                                                     "autoscaling": Autoscaling()})}
    overrides = [{"name": "AttentionShard", **_shard_scaling(config)}]
    if config.expert_groups is not None:
        eg = config.expert_groups
        scaling_free["expert_groups"] = eg.model_copy(update={"replicas": Replicas(), "group_replicas": {},
                                                              "autoscaling": Autoscaling()})
        overrides += [{"name": f"ExpertGroup{g}", **_group_scaling(eg, g)} for g in range(eg.num_groups)]
    return {"proxy_location": "HeadOnly", "http_options": {"host": config.host, "port": config.http_port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": f"{__name__}:app_builder",
                              "args": config.model_copy(update=scaling_free).model_dump(mode="json"),
                              "deployments": overrides}]}


def _control(config: ServeConfig) -> dict:
    """Ray options of the control plane's replicas (Ingress, Router): no CPU, on the head by default."""
    return {"num_cpus": 0, "resources": config.control_resources}


def _cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _gpus(wanted: float | None, cluster_has_gpus: bool) -> float:
    return wanted if wanted is not None else (1.0 if cluster_has_gpus else 0.0)


def _scaling(bounds: Replicas, max_ongoing: int, target_tokens_per_s: float | None = None,
             target_ongoing: float | None = None, timing: Autoscaling = Autoscaling()) -> dict:
    """Deployment options for replica bounds: a fixed count, or autoscaling between them (on ongoing requests,
    or on routed tokens/s with `RoutedTokensPolicy`) at the pace `timing` sets."""
    options = {"max_ongoing_requests": max_ongoing}
    if bounds.min == bounds.max:
        return {**options, "num_replicas": bounds.max}
    autoscaling = {"min_replicas": bounds.min, "max_replicas": bounds.max, "initial_replicas": bounds.start,
                   **timing.model_dump()}
    if target_tokens_per_s is None:
        autoscaling["target_ongoing_requests"] = target_ongoing
    else:
        autoscaling["policy"] = {"policy_function": f"{RoutedTokensPolicy.__module__}:RoutedTokensPolicy",
                                 "policy_kwargs": {"target_tokens_per_s": target_tokens_per_s}}
    return {**options, "autoscaling_config": autoscaling}


def _routing_options(routing: RoutingConfig) -> dict:
    """The AttentionShard deployment's request router: `KVAwareRouter` (which learns the shards' block keyspace
    from their reports), or Serve's default."""
    if routing.policy == "power-of-two":
        return {}
    kwargs = {**routing.model_dump(exclude={"policy", "stats_period_s"}), "block_size": BLOCK_SIZE}
    return {"request_router_config": {"request_router_class": f"{KVAwareRouter.__module__}:KVAwareRouter",
                                      "request_router_kwargs": kwargs,
                                      "request_routing_stats_period_s": routing.stats_period_s}}


def _shard_scaling(config: ServeConfig) -> dict:
    attention = config.attention
    return _scaling(attention.replicas, config.limits.max_requests,
                    target_ongoing=attention.target_ongoing_requests, timing=attention.autoscaling)


def _group_scaling(eg: ExpertGroupsConfig, group: int) -> dict:
    return _scaling(eg.bounds(group), 100, eg.target_tokens_per_replica, timing=eg.autoscaling)


def _group_options(eg: ExpertGroupsConfig, group: int, cluster_has_gpus: bool) -> dict:
    gpus = _gpus(eg.num_gpus, cluster_has_gpus)
    # A replica of several GPUs asks for all of them (one node's), so Ray makes every one visible to it and the
    # group spreads its experts over them (experts/device_spread.py).
    return {**_group_scaling(eg, group), **_health_options(eg.health_check),
            "ray_actor_options": {"num_cpus": eg.num_cpus, "num_gpus": gpus, "resources": eg.resources,
                                  "runtime_env": {"env_vars": LAYER_PATH_ENV}}}


def _health_options(check: HealthCheck) -> dict:
    return {"health_check_period_s": check.period_s, "health_check_timeout_s": check.timeout_s}


def _layer_host(config: ServeConfig) -> str | None:
    """Where the layer path's endpoints bind: loopback for a loopback config, else each node's own address."""
    return "127.0.0.1" if config.host in LOOPBACK else None


# A stopping replica first waits this long for requests already routed to it to arrive, then polls its ongoing
# requests at this period until they end (or `graceful_shutdown_timeout_s`). Serve's 2 s default made each of
# the app's three shutdown stages (Ingress, shards and groups, Router and store) take 2 s even when idle.
SHUTDOWN_POLL_S = 0.5
RouterDeployment = serve.deployment(Router, name="Router", num_replicas=1,
                                    graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
ExpertGroupDeployment = serve.deployment(ExpertGroupServer, name="ExpertGroup",
                                         graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
AttentionShardDeployment = serve.deployment(AttentionShard, name="AttentionShard",
                                            graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
MemoryStoreDeployment = serve.deployment(MemoryStore, name="MemoryStore", num_replicas=1,
                                         graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
IngressDeployment = serve.deployment(Ingress, name="Ingress", graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
