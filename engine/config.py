"""`EngineConfig`: the knobs of one engine, validated once; values derived at start-up live in `CacheInfo`."""

from dataclasses import dataclass

from engine.errors import EngineConfigError

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

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
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
