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


class AttentionConfig(_Strict):
    """The AttentionShard deployment: each replica owns requests, KV cache and the attention layers."""

    replicas: Replicas = Replicas()
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    kv_cache_memory: int | None = Field(None, ge=1)  # bytes; engine default when None
    target_ongoing_requests: float = Field(16.0, gt=0)  # autoscaling target per replica


class ExpertGroupsConfig(_Strict):
    """One Serve deployment per expert group; a group's replicas register with the router."""

    num_groups: int = Field(2, ge=1)
    transport: Literal["grpc"] = "grpc"  # the per-layer hop between Serve replicas (see README)
    placement: Literal["linear", "round_robin"] | tuple[int, ...] = "linear"
    replicas: Replicas = Replicas()  # every group's bounds ...
    group_replicas: dict[int, Replicas] = {}  # ... unless overridden here, by group id
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # per replica; None: 1 when the cluster has GPUs, else 0
    target_tokens_per_replica: float = Field(4096.0, gt=0)  # autoscaling: routed tokens/s one replica takes
    failover_timeout: float = Field(30.0, gt=0)
    call_timeout: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _known_groups(self):
        unknown = sorted(g for g in self.group_replicas if not 0 <= g < self.num_groups)
        if unknown:
            raise ValueError(f"group_replicas names groups {unknown}, but groups are 0..{self.num_groups - 1}")
        return self

    def bounds(self, group: int) -> Replicas:
        return self.group_replicas.get(group, self.replicas)


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
    limits: Limits = Limits()
    host: str = "127.0.0.1"  # HTTP and gRPC bind here; loopback unless told otherwise
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(50051, ge=1, le=65535)  # None: no gRPC server
    api_keys: tuple[str, ...] = ()  # when set, every API call needs `Authorization: Bearer <key>`

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def load_config(path: str | Path) -> ServeConfig:
    """Read a `ServeConfig` (plain, or the args of a Serve config file's first application)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and "applications" in data:
        apps = data["applications"] or [{}]
        data = apps[0].get("args") or {}
    return parse_config(data, source=str(path))


def parse_config(data: dict, source: str = "config") -> ServeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None
