"""`EngineConfig`: the knobs of one engine, validated once; values derived at start-up live in `CacheInfo`."""

from dataclasses import dataclass
from typing import get_args

from engine.errors import EngineConfigError
from memory.tiered_store import WritePolicy

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget; prefills longer than this are chunked
    kv_cache_memory: int | None = None  # bytes; None: 1 GiB on CPU, 90% of free memory on GPU
    enable_prefix_caching: bool = True
    host_kv_cache_memory: int = 0  # bytes of host RAM for blocks evicted from the device pool (T1); 0: none
    kv_write_policy: str = "write-back"  # when blocks go to the shared memory store: see `engine.kv_tiers`

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.host_kv_cache_memory < 0:
            raise EngineConfigError(f"host_kv_cache_memory must be >= 0 bytes, got {self.host_kv_cache_memory}")
        if self.kv_write_policy not in get_args(WritePolicy):
            raise EngineConfigError(f"kv_write_policy must be one of {', '.join(get_args(WritePolicy))}, "
                                    f"got {self.kv_write_policy!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise EngineConfigError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class CacheInfo:
    """What start-up derived from the config and the machine."""

    max_model_len: int
    num_blocks: int
    block_size: int
    kv_cache_bytes: int

    @property
    def num_token_slots(self) -> int:
        return self.num_blocks * self.block_size
