"""`ServeConfig`: everything a deployment of msem needs, validated once, loaded from YAML.

A config file is either a plain `ServeConfig` mapping or a Ray Serve config file (the `configs/*.yaml` that
`serve run` / `serve deploy` take), whose first application's `args` hold the `ServeConfig`:

    applications:
      - name: msem
        import_path: cluster.app:app_builder
        args: {model: tiny, expert_groups: {num_groups: 2}}

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mistral.errors import ConfigError

HEAD = "node:__internal_head__"  # a resource only the head node has (Ray's)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replicas(_Strict):
    """Replica bounds of one deployment: fixed when min == max, autoscaled between them otherwise."""

    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)
    initial: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) exceeds replicas.max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"replicas.initial ({self.initial}) must lie in [min {self.min}, max {self.max}]")
        return self

    @property
    def start(self) -> int:
        return self.initial if self.initial is not None else max(self.min, 1)


class Autoscaling(_Strict):
    """How quickly Serve follows the load of an autoscaled deployment (replicas.min < replicas.max): the load
    signal is averaged over `look_back_period_s`, and a change of replica count must be wanted for the whole
    delay before Serve makes it, so a short burst neither adds nor removes replicas."""

    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=10)  # Serve wants it above its 10 s metrics push interval


class HealthCheck(_Strict):
    """How often Serve calls a replica's health check, and how long one may take before the replica is
    replaced (an expert replica's check runs a token through its experts; a shard's asks whether its engine
    runs)."""

    period_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)


# Serve notices a crashed replica only when a health check it sent fails, so the period bounds how long a group
# whose replicas all died waits before Serve starts new ones (every layer needing it stalls meanwhile); a
# group's check is one token through its experts, cheap enough to run every second.
GROUP_HEALTH_CHECK = HealthCheck(period_s=1.0)


class RoutingConfig(_Strict):
    """How the Ingress picks an attention shard per request (`cluster/kv_routing.py`)."""

    # "kv-aware": the shard that was sent the request's longest prefix, unless it is busier than the least busy
    # by more than max_imbalance requests; "power-of-two": Serve's default (two at random, the less busy)
    policy: Literal["kv-aware", "power-of-two"] = "kv-aware"
    max_imbalance: int = Field(1, ge=0)
    index_blocks: int = Field(65_536, ge=1)  # prefix blocks each Ingress replica remembers (LRU)
    max_prefix_blocks: int = Field(256, ge=1)  # the longest prefix, in 16-token blocks, that is looked at
    stats_period_s: float = Field(2.0, gt=0)  # how often each shard reports the blocks it holds


class AttentionConfig(_Strict):
    """The AttentionShard deployment: each replica owns requests, KV cache and the attention layers."""

    replicas: Replicas = Replicas()
    autoscaling: Autoscaling = Autoscaling()  # used when replicas.min < replicas.max
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    resources: dict[str, float] = {}  # Ray custom resources per replica, e.g. {"msem_attention": 1}: node types
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    kv_cache_memory: int | None = Field(None, ge=1)  # bytes; engine default when None
    target_ongoing_requests: float = Field(16.0, gt=0)  # autoscaling target per replica
    health_check: HealthCheck = HealthCheck()
    routing: RoutingConfig = RoutingConfig()


class RebalanceConfig(_Strict):
    """Live rebalancing of the expert placement from the routed-token load (see router_service/service.py)."""

    interval_s: float | None = Field(None, gt=0)  # rebalance periodically; None: only on request
    window_s: float = Field(60.0, gt=0)  # the load window that balancedness and the planner read
    min_gain: float = Field(0.05, ge=0, le=1)  # periodic: least gain in mean balancedness worth a move
    switch_timeout_s: float = Field(120.0, gt=0)  # replicas must load a new placement within this
    settle_timeout_s: float = Field(30.0, gt=0)  # replicas drop moved-away experts at most this long after
    # When a group's last replica dies, the other groups load its experts and serve them until it is back
    # (seconds, instead of waiting for a new process). Survivors need room for the extra experts meanwhile.
    cover_lost_groups: bool = True


class ExpertGroupsConfig(_Strict):
    """One Serve deployment per expert group; a group's replicas register with the router."""

    num_groups: int = Field(2, ge=1)
    # The per-layer hop between shards and group replicas. "auto" picks by device, from measurements
    # (docs/PERFORMANCE.md, benchmarks/expert_parallel.py): torch (NCCL all_to_all, tensors stay on the GPU)
    # where the groups have GPUs; on CPU, grpc, which measured faster than torch's gloo there (gloo runs four
    # collectives per layer in lockstep over every member, grpc one unary call per group replica).
    transport: Literal["auto", "grpc", "torch"] = "auto"
    placement: Literal["linear", "round_robin"] | tuple[int, ...] = "linear"
    redundant_slots: int = Field(0, ge=0)  # extra expert slots per group and layer, for copies of hot experts
    initial_placement: str | None = None  # JSON file: a recorded load ({"load": [[...]]}) or a placement
    rebalance: RebalanceConfig = RebalanceConfig()
    replicas: Replicas = Replicas()  # every group's bounds ...
    group_replicas: dict[int, Replicas] = {}  # ... unless overridden here, by group id
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # per replica; None: 1 when the cluster has GPUs, else 0
    resources: dict[str, float] = {}  # Ray custom resources per replica, e.g. {"msem_experts": 1}: node types
    target_tokens_per_replica: float = Field(4096.0, gt=0)  # autoscaling: routed tokens/s one replica takes
    autoscaling: Autoscaling = Autoscaling()  # for the groups whose bounds have min < max
    failover_timeout: float = Field(30.0, gt=0)
    # How long a starting shard waits for every group to have a replica: the groups' nodes may still be booting
    # (an autoscaled cloud node, or an on-prem worker `ray up` starts after the head). It logs the wait.
    startup_timeout: float = Field(900.0, gt=0)
    call_timeout: float = Field(10.0, gt=0)
    health_check: HealthCheck = GROUP_HEALTH_CHECK

    @model_validator(mode="after")
    def _known_groups(self):
        unknown = sorted(g for g in self.group_replicas if not 0 <= g < self.num_groups)
        if unknown:
            raise ValueError(f"group_replicas names groups {unknown}, but groups are 0..{self.num_groups - 1}")
        return self

    def bounds(self, group: int) -> Replicas:
        return self.group_replicas.get(group, self.replicas)

    def resolved_transport(self, group_gpus: float, shard_gpus: float) -> str:
        """The transport in use: the configured one, or for "auto" torch when the groups and the shards have
        whole GPUs and grpc otherwise. NCCL refuses two ranks of one communicator on one GPU, so the torch
        transport on GPUs needs whole ones (fractions could put a shard and a group on the same GPU)."""
        whole = group_gpus >= 1 and shard_gpus >= 1 and group_gpus == int(group_gpus) and shard_gpus == int(shard_gpus)
        if self.transport == "auto":
            return "torch" if whole else "grpc"
        if self.transport == "torch" and (group_gpus or shard_gpus) and not whole:
            raise ConfigError(f"expert_groups.transport torch on GPUs needs whole GPUs per replica (NCCL refuses two "
                              f"ranks on one GPU); got {group_gpus} per group replica and {shard_gpus} per shard: "
                              "use whole numbers, or transport grpc")
        return self.transport


class MemoryStoreConfig(_Strict):
    """The shared KV tier (T2): one `MemoryStore` replica with an LRU in RAM over an optional directory on disk.
    Serve replaces it when it dies; shards recompute while it is gone."""

    ram_bytes: int = Field(4 << 30, ge=0)
    directory: str | None = None  # the disk tier (`~` expands); None: RAM only. It survives a restart
    disk_bytes: int = Field(64 << 30, ge=0)  # hard limit on the directory's block files
    timeout_s: float = Field(2.0, gt=0)  # a shard's read that takes longer is a miss (it recomputes)
    num_cpus: float = Field(0.5, ge=0)
    # On the head by default (as Ingress and Router): the autoscaler never removes it, and a store on a worker
    # would lose its blocks with that node.
    resources: dict[str, float] = {HEAD: 0.001}


class MemoryConfig(_Strict):
    """Tiers below each attention shard's device KV pool (T0): see `engine/kv_tiers.py` and the README."""

    host_bytes: int = Field(1 << 30, ge=0)  # T1: this much host RAM per shard for blocks the pool evicts; 0: none
    # When blocks go to the store (and, inside it, from RAM to disk): "write-back" when evicted from the tier
    # above (least traffic); "write-through" as soon as they are computed (another shard can reuse them at
    # once); "hit-twice" offered when computed, kept only once offered twice (one-off prompts stay out).
    write_policy: Literal["write-through", "write-back", "hit-twice"] = "write-back"
    store: MemoryStoreConfig | None = MemoryStoreConfig()  # T2; None: no shared tier


class Limits(_Strict):
    """Admission limits of one ingress replica: beyond them a request is refused (429), never queued."""

    max_requests: int = Field(256, ge=1)  # requests in flight (queued or running)
    max_tokens_in_flight: int = Field(1 << 20, ge=1)  # sum of prompt + n * max_tokens over them
    max_n: int = Field(16, ge=1)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    retry_after_s: int = Field(1, ge=1)
    resume_timeout_s: float = Field(60.0, gt=0)  # how long a request whose shard died may wait for another


class ServeConfig(_Strict):
    model: str = "tiny"  # preset name or checkpoint directory
    served_model_name: str | None = None  # the id clients send; default: the preset or directory name
    tokenizer: str | None = None  # a bundled tokenizer (v1, v2, v3, v7, tekken) instead of the model's own
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=2)
    attention: AttentionConfig = AttentionConfig()
    expert_groups: ExpertGroupsConfig | None = ExpertGroupsConfig()  # None: experts inside the shards
    memory: MemoryConfig | None = MemoryConfig()  # None: only each shard's device pool
    ingress_replicas: int = Field(2, ge=1)  # the edge; with two, a dead one costs no new request
    # Ray resources of the Ingress and Router replicas. The default is a resource only the head node has: they
    # ask for no CPU, so Serve would spread them onto any node, where the loss of a GPU node (or its autoscaled
    # removal) would take the edge's streams or the routing table with it.
    control_resources: dict[str, float] = {HEAD: 0.001}
    limits: Limits = Limits()
    host: str = "127.0.0.1"  # HTTP and gRPC bind here; loopback unless told otherwise
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(50051, ge=1, le=65535)  # None: no gRPC server
    api_keys: tuple[str, ...] = ()  # when set, every API call needs `Authorization: Bearer <key>`
    # A shard sends a stream's deltas of this long as one message (the first token at once, the last at the end),
    # so each token does not cross shard, ingress and proxy as its own event; 0: one message per engine step.
    stream_interval_s: float = Field(0.1, ge=0, le=1)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the HTTP API ("*": any); none: CORS off

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def load_config(path: str | Path) -> ServeConfig:
    """Read a `ServeConfig` (plain, or the args of a Serve config file's first application)."""
    data = _read_yaml(Path(path))
    serve_file = _as_serve_file(data)
    if serve_file is not None:
        data = serve_file["applications"][0].get("args") or {}
    return parse_config(data, source=str(path))


def load_serve_file(path: str | Path) -> dict | None:
    """The mapping of a Serve config file (one with `applications:`), as written; None for a plain config."""
    return _as_serve_file(_read_yaml(Path(path)))


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def _as_serve_file(data) -> dict | None:
    if isinstance(data, dict) and "applications" in data:
        return {**data, "applications": data["applications"] or [{}]}
    return None


def parse_config(data: dict, source: str = "config") -> ServeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None
