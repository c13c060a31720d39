"""The Serve deployment graph: `build_app(config) -> serve.Application`.

    Ingress ──► AttentionShard ×A ──(per MoE layer, gRPC)──► ExpertGroup0 ×r0, ExpertGroup1 ×r1, ...
       │              │                                          │ register, heartbeat
       └──────────────┴──────────────► Router ◄──────────────────┘

- **Ingress**: the HTTP (OpenAI-compatible, through Serve's proxy) and gRPC (its own server) edge over one
  `Frontend`: validation, admission limits, and resuming a request on another shard when its shard dies.
- **AttentionShard**: an `AsyncLLM` (requests, KV cache, attention); its MoE layers call `RemoteExperts`,
  which reads the routing table from the Router and sends each layer's tokens to expert group replicas.
- **ExpertGroup{g}**: one deployment per group, each with its own replica bounds, so a hot group scales
  without touching the others (autoscaled on routed tokens/s by `RoutedTokensPolicy`). A replica loads only
  its experts, serves them over an ExpertService, registers with the Router, and heartbeats it.
- **Router**: the `RouterService` (routing table, per-expert load) as a single replica.

Serve handles are the control plane; the per-layer hop goes straight to the replicas' gRPC endpoints (a
Serve call per layer would cost ~10 ms). That hop binds loopback when the config's `host` is loopback, and
the node's address otherwise.
"""

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import ray
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from cluster.autoscaling import RoutedTokensPolicy
from cluster.config import (Autoscaling, ExpertGroupsConfig, HealthCheck, RebalanceConfig, Replicas, ServeConfig,
                            parse_config)
from cluster.frontend import Frontend, OverloadedError, ShardLost, ShardRequest
from cluster.metrics import (BusyClock, EngineMetrics, ExpertGroupMetrics, ExpertMetrics, RouterMetrics,
                             publish_every)
from engine.async_llm import AsyncLLM
from engine.errors import EngineDeadError
from engine.llm import LLM, resolve_device_dtype
from engine.outputs import RequestOutput
from engine.tokenizer import Tokenizer
from experts.expert_group import ExpertGroup
from experts.parallel_config import LAYER_PATH_ENV
from experts import eplb
from experts.placement import Placement, PlacementError, make_placement
from experts.probe import ExpertProbe
from mistral.checkpoint import CheckpointReader
from mistral.errors import ConfigError
from mistral.presets import resolve_model
from router_service.grpc_transport import GrpcTransport, is_serving, message_limit_bytes, serve_expert_group
from router_service.placement_follower import PlacementFollower
from router_service.remote_experts import RemoteExperts, RouterClient
from router_service.service import RebalancePolicy, RouterService
from router_service.transport import ReplicaInfo

logger = logging.getLogger(__name__)
APP_NAME = "msem"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEARTBEAT_S = 1.0
METRICS_S = 1.0  # how often replicas publish their engine's or expert group's load
TICK_S = 1.0  # how often the Router advances rebalancing and publishes balancedness
RETRY_AFTER_S = 1


def app_builder(args: dict) -> serve.Application:
    """The `import_path` target of `configs/*.yaml`: Serve passes the application's `args`."""
    return build_app(parse_config(args, source="application args"))


def plan(config: ServeConfig) -> tuple[Path, Placement | None]:
    """The checkpoint directory and the expert placement (None without expert groups); raises on a config
    that cannot work, so callers can check one before deploying it."""
    model_dir = resolve_model(config.model)  # materialises a preset once, before any replica starts
    model = CheckpointReader(model_dir).config
    if config.expert_groups is None:
        return model_dir, None
    if not model.is_moe:
        raise ConfigError(f"{config.model} is a dense model, which has no experts to place: set expert_groups "
                          "to null in the config (msem serve: --expert-groups 0)")
    eg = config.expert_groups
    # Replica counts live in each deployment's options, not in the placement: scaling stays per group.
    placement = make_placement(model.num_experts, model.num_layers, eg.num_groups, eg.placement, 1,
                               redundant_slots=eg.redundant_slots)
    if eg.initial_placement is not None:
        placement = initial_placement(Path(eg.initial_placement), placement)
    return model_dir, placement


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
    model_dir, placement = plan(config)
    gpus = _cluster_has_gpus()
    router, groups = None, []
    if placement is not None:
        eg = config.expert_groups
        router = Router.options(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}).bind(
            placement, config.host, eg.rebalance)
        groups = [ExpertGroupReplica.options(name=f"ExpertGroup{g}", **_group_options(eg, g, gpus))
                  .bind(str(model_dir), config, g, router) for g in range(eg.num_groups)]
    attention = config.attention
    shard = AttentionShard.options(
        **_shard_scaling(config), **_health_options(attention.health_check),
        ray_actor_options={"num_cpus": attention.num_cpus, "num_gpus": _gpus(attention.num_gpus, gpus),
                           **({"runtime_env": {"env_vars": LAYER_PATH_ENV}} if placement is not None else {})},
    ).bind(str(model_dir), config, router)
    return Ingress.options(max_ongoing_requests=config.limits.max_requests + 64,
                           ray_actor_options={"num_cpus": 0}).bind(
        str(model_dir), config, shard, router, groups)


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


def _shard_scaling(config: ServeConfig) -> dict:
    attention = config.attention
    return _scaling(attention.replicas, config.limits.max_requests,
                    target_ongoing=attention.target_ongoing_requests, timing=attention.autoscaling)


def _group_scaling(eg: ExpertGroupsConfig, group: int) -> dict:
    return _scaling(eg.bounds(group), 100, eg.target_tokens_per_replica, timing=eg.autoscaling)


def _group_options(eg: ExpertGroupsConfig, group: int, cluster_has_gpus: bool) -> dict:
    gpus = _gpus(eg.num_gpus, cluster_has_gpus)
    options = _group_scaling(eg, group)
    if gpus > 1:  # one replica spans several GPUs: reserve them together
        options["placement_group_bundles"] = [{"CPU": eg.num_cpus, "GPU": 1.0}] + [{"GPU": 1.0}] * (int(gpus) - 1)
        options["placement_group_strategy"] = "STRICT_PACK"
        gpus = 1.0
    return {**options, **_health_options(eg.health_check),
            "ray_actor_options": {"num_cpus": eg.num_cpus, "num_gpus": gpus,
                                  "runtime_env": {"env_vars": LAYER_PATH_ENV}}}


def _health_options(check: HealthCheck) -> dict:
    return {"health_check_period_s": check.period_s, "health_check_timeout_s": check.timeout_s}


def _local_model_dir(model_dir: str, config: ServeConfig) -> Path:
    """The checkpoint on this node: the driver's path when it is here, else the preset materialised here."""
    return Path(model_dir) if Path(model_dir).is_dir() else resolve_model(config.model)


def _layer_host(config: ServeConfig) -> str:
    return "127.0.0.1" if config.host in LOOPBACK else ray.util.get_node_ip_address()


@serve.deployment(num_replicas=1)
class Router:
    """The routing table, load statistics and rebalancing; a replica is dead when its ExpertService stops
    answering. A background thread ticks the service (pending switches, periodic rebalancing) and publishes
    balancedness and live replicas once a second."""

    def __init__(self, placement: Placement, host: str, rebalance: RebalanceConfig = RebalanceConfig()):
        policy = RebalancePolicy(**rebalance.model_dump())
        self.service = RouterService(placement, host="127.0.0.1" if host in LOOPBACK else "0.0.0.0",
                                     is_alive=lambda info: is_serving(info.endpoints["grpc"]), policy=policy,
                                     heartbeat_timeout_s=3 * HEARTBEAT_S)
        self.metrics = RouterMetrics()
        self._stop = publish_every(TICK_S, self._tick, "msem-router-tick")

    def _tick(self) -> None:
        self.service.tick()
        self.metrics.update(self.service.describe())

    def register(self, info: ReplicaInfo, placement_version: int | None = None) -> int:
        return self.service.register(info, placement_version)

    def deregister(self, replica_id: str) -> int:
        return self.service.deregister(replica_id)

    def heartbeat(self, info: ReplicaInfo, tokens_served: int, placement_version: int | None = None) -> dict:
        return self.service.heartbeat(info, tokens_served, placement_version)

    def placements(self) -> list[Placement]:
        return self.service.placements()

    def get_table(self, known_version: int, shard_id: str | None = None):
        return self.service.get_table(known_version, shard_id)

    async def rebalance(self, wait_s: float = 60.0) -> dict:
        """Plan and start a rebalance; wait (at most `wait_s`) until the switch is applied or given up."""
        result = await asyncio.to_thread(self.service.rebalance)
        deadline = time.monotonic() + wait_s
        while result["status"] == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            last = self.service.last_rebalance or {}
            if last.get("placement_version") == result["placement_version"] and last["status"] != "pending":
                result = {**result, "status": last["status"]}
        return result

    def report_failure(self, replica_id: str) -> None:
        self.service.report_failure(replica_id)

    def record_load(self, counts: list[list[int]]) -> None:
        self.service.record_load(counts)

    def describe(self) -> dict:
        return self.service.describe()

    def missing_groups(self) -> list[int]:
        """Groups with no replica that heartbeated within the last 3 heartbeats (for `/health`)."""
        return self.service.missing_groups()

    def __del__(self):
        self._stop.set()


@serve.deployment
class ExpertGroupReplica:
    """One replica of one expert group: its experts behind an ExpertService, registered with the Router.

    It loads the placement the Router has now (the config's `placement` is only the first one: a rebalance may
    have replaced it since), and follows rebalances through its heartbeat (`PlacementFollower`).
    """

    async def __init__(self, model_dir: str, config: ServeConfig, group_id: int, router):
        device = torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        _, dtype = resolve_device_dtype(str(device), config.dtype)
        reader = CheckpointReader(_local_model_dir(model_dir, config))
        first, *later = await router.placements.remote()
        self.group = await asyncio.to_thread(ExpertGroup.load, reader, first, group_id, dtype, device)
        for placement in later:  # a rebalance is under way: hold both placements' experts too
            await asyncio.to_thread(self.group.extend, reader, placement)
        replica = serve.get_replica_context().replica_id.unique_id
        host = _layer_host(config)
        self.busy = BusyClock()  # time computing: Serve's utilisation cannot see the per-layer traffic
        self.group.forward = self.busy.timed(self.group.forward)
        self.probe = ExpertProbe(self.group)  # one probe for Serve's check_health and the ExpertService's Health
        self.server, port = serve_expert_group(self.group, f"g{group_id}-{replica}", host=host,
                                               max_batch_tokens=config.attention.max_num_batched_tokens,
                                               probe=self.probe)
        self.info = ReplicaInfo(f"g{group_id}-{replica}", group_id, {"grpc": f"{host}:{port}"})
        self.follower = PlacementFollower(self.group, reader, (later or [first])[-1], self.info.replica_id)
        self.router = router
        await router.register.remote(self.info, self.follower.version)
        self._stop = threading.Event()
        self._last = (time.monotonic(), 0)
        threading.Thread(target=self._heartbeat, name="msem-heartbeat", daemon=True).start()
        work = ExpertGroupMetrics(group_id, self.info.replica_id, lambda: self.group.tokens_served, self.busy)
        publish_every(METRICS_S, work.publish, "msem-group-metrics", stop=self._stop)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                answer = self.router.heartbeat.remote(self.info, self.group.tokens_served,
                                                      self.follower.version).result(timeout_s=10)
            except Exception:  # noqa: BLE001 - the router may be restarting; the next beat re-registers
                logger.warning("heartbeat of %s failed", self.info.replica_id, exc_info=True)
                continue
            self.follower.follow(answer)

    async def check_health(self) -> None:
        """Serve replaces a replica whose experts do not compute a 1-token probe in time (a wedged device)."""
        await asyncio.to_thread(self.probe.check)

    def record_autoscaling_stats(self) -> dict[str, float]:
        now, tokens = time.monotonic(), self.group.tokens_served
        (then, before), self._last = self._last, (now, tokens)
        return {"routed_tokens_per_s": (tokens - before) / max(now - then, 1e-3)}

    def __del__(self):
        self._stop.set()
        try:
            self.router.deregister.remote(self.info.replica_id)
        finally:
            self.server.stop(grace=None)


@serve.deployment
class AttentionShard:
    """An engine whose MoE layers call the expert groups (or computes its experts itself for a dense or
    expert_groups-less config)."""

    async def __init__(self, model_dir: str, config: ServeConfig, router):
        self.llm, self.experts = await asyncio.to_thread(self._load, _local_model_dir(model_dir, config), config,
                                                         router)
        self.metrics = EngineMetrics(config.model_name, serve.get_replica_context().replica_id.unique_id)
        self._stop_metrics = publish_every(METRICS_S, self._publish, "msem-engine-metrics")

    def _publish(self) -> None:
        """Once a second: the engine's stats; and the expert load and layer-path stats gathered since the last
        step boundary pushed them (steps push only while the engine runs, so an idle shard would keep its last
        second of counts)."""
        self.metrics.publish(self.llm.stats())
        if self.experts is not None:
            self.experts.flush_load()
            self.experts.flush_stats(due_only=True)

    @staticmethod
    def _load(model_dir: Path, config: ServeConfig, router) -> tuple[AsyncLLM, RemoteExperts | None]:
        device, dtype = resolve_device_dtype("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu",
                                             config.dtype)
        attention, experts = config.attention, None
        if router is not None:
            eg, model = config.expert_groups, CheckpointReader(model_dir).config
            shard_id = serve.get_replica_context().replica_id.unique_id
            client = RouterClient(get_table=lambda version: router.get_table.remote(version, shard_id).result(),
                                  report_failure=lambda rid: router.report_failure.remote(rid).result(),
                                  record_load=lambda counts: router.record_load.remote(counts))
            limit = message_limit_bytes(attention.max_num_batched_tokens, model.hidden_size,
                                        model.num_experts_per_tok, dtype)
            experts = RemoteExperts(GrpcTransport(timeout_s=eg.call_timeout, max_message_bytes=limit), client,
                                    failover_timeout=eg.failover_timeout, stats_sink=ExpertMetrics())
        llm = LLM(str(model_dir), tokenizer=config.tokenizer, dtype=str(dtype).removeprefix("torch."),
                  device=str(device), max_model_len=config.max_model_len, max_num_seqs=attention.max_num_seqs,
                  max_num_batched_tokens=attention.max_num_batched_tokens,
                  kv_cache_memory=attention.kv_cache_memory, experts=experts, progress=False)
        return AsyncLLM.from_llm(llm), experts

    async def stream(self, request: ShardRequest) -> AsyncIterator[RequestOutput]:
        async for delta in self.llm.add_request(request.prompt_token_ids, request.params, request.request_id,
                                                resume=request.resume):
            yield dataclasses.replace(delta, prompt_token_ids=[])  # the ingress has them

    def healthy(self) -> bool:
        return self.llm.dead is None

    def check_health(self) -> None:
        """Serve replaces a replica whose engine died (its requests resume on another shard)."""
        if self.llm.dead is not None:
            raise RuntimeError(f"the engine stopped: {self.llm.dead!r}")

    def num_unfinished_requests(self) -> int:
        return self.llm.num_unfinished_requests

    def __del__(self):
        self._stop_metrics.set()
        self.llm.shutdown()


class ServeShards:
    """`Shards` over the AttentionShard deployment: Serve picks a replica per request."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)
        self.health_handle = handle

    async def stream(self, request: ShardRequest) -> AsyncIterator[RequestOutput]:
        response = self.handle.stream.remote(request)
        try:
            async for delta in response:
                yield delta
        except (RayActorError, ActorUnavailableError, EngineDeadError) as error:
            raise ShardLost(str(error)) from error
        except BackPressureError as error:  # every shard's queue is full: refuse, like our own limits
            raise OverloadedError(f"the attention shards are at capacity; retry in {RETRY_AFTER_S} s",
                                  RETRY_AFTER_S) from error
        finally:
            response.cancel()  # a reader that stopped early aborts the request on its shard

    async def healthy(self) -> bool:
        """Whether a shard's engine works; raises when none can be reached (the frontend bounds the wait)."""
        response = self.health_handle.healthy.remote()
        try:
            return await response
        except asyncio.CancelledError:  # the health check's deadline passed: do not leave the call queued
            response.cancel()
            raise


@serve.deployment
@serve.ingress()
class Ingress:
    async def __init__(self, model_dir: str, config: ServeConfig, shard, router, groups: list):
        model_dir = _local_model_dir(model_dir, config)
        model = CheckpointReader(model_dir).config
        self.config, self.router = config, router
        self.frontend = Frontend(config.model_name, Tokenizer.load(model_dir, config.tokenizer),
                                 config.max_model_len or model.max_position_embeddings, model.vocab_size,
                                 ServeShards(shard), config.limits, self._experts if router is not None else None,
                                 self._rebalance if router is not None else None,
                                 expert_health=self._missing_groups if router is not None else None)
        self.grpc_server = None
        if config.grpc_port is not None:
            from cluster.grpc_api import start_grpc_server

            self.grpc_server, _ = await start_grpc_server(self.frontend, config.host, config.grpc_port,
                                                          api_keys=config.api_keys)

    async def _experts(self) -> dict:
        return await self.router.describe.remote()

    async def _rebalance(self) -> dict:
        return await self.router.rebalance.remote()

    async def _missing_groups(self) -> list[int]:
        return await self.router.missing_groups.remote()

    def __serve_build_asgi_app__(self):
        from cluster.http_api import build_http_app

        return build_http_app(self.frontend, api_keys=self.config.api_keys,
                              max_body_bytes=self.config.limits.max_body_bytes)
