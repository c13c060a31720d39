"""`MemoryStore`: the shared KV tier (T2) as a component, the one definition behind the `MemoryStore`
deployment of the Serve app.

It wraps a `TieredStore` (an LRU in RAM in front of a directory on disk, under a write policy) and speaks in
block files (`memory.block_file`): every block that arrives is decoded, which checks its crc32 and its name,
before it is stored, and leaves as a block file again, which the shard checks in turn. Blocks travel as the
arguments and results of handle calls, so through Ray's object store: `benchmarks/memory_transport.py`
measured it against the alternatives (docs/PERFORMANCE.md).

Shards also push their own tier figures here (`report_shard`), so `describe` is the cluster's whole memory
picture: this store's RAM and disk, and per shard its device pool, host RAM and store traffic.
"""

import asyncio
import logging
import time
from pathlib import Path

from actors.metrics import MemoryStoreMetrics, publish_every
from memory.block_file import CorruptBlockFileError, decode_block_file, encode_block_file
from memory.disk_tier import DiskTier
from memory.host_tier import HostTier
from memory.tiered_store import TieredStore, WritePolicy

logger = logging.getLogger(__name__)
SHARD_REPORT_TTL_S = 30.0  # a shard that has not reported for this long is left out of `describe`
METRICS_S = 1.0


class MemoryStore:
    def __init__(self, ram_bytes: int, directory: str | None = None, disk_bytes: int = 0,
                 write_policy: WritePolicy = "write-back", model_name: str = "msem"):
        disk = None
        if directory is not None and disk_bytes > 0:
            directory = Path(directory).expanduser()
            directory.mkdir(parents=True, exist_ok=True)
            disk = DiskTier(directory, disk_bytes)
        self.store = TieredStore(HostTier(ram_bytes), disk, write_policy)
        self.num_refused = 0  # blocks that arrived damaged
        self._shards: dict[str, tuple[float, dict]] = {}
        logger.info("memory store: %d MiB RAM, %s, write policy %s", ram_bytes >> 20,
                    f"{disk_bytes >> 20} MiB on disk at {directory}" if disk else "no disk tier", write_policy)
        metrics = MemoryStoreMetrics(model_name)
        self._stop = publish_every(METRICS_S, lambda: metrics.publish(self.store.stats()), "msem-store-metrics")

    async def contains_prefix(self, hashes: list[bytes]) -> int:
        return await asyncio.to_thread(self.store.contains_prefix, hashes)

    async def get_blocks(self, hashes: list[bytes]) -> list[bytes]:
        """The chain's leading stored blocks as block files (shorter than `hashes` from the first miss on)."""
        def read() -> list[bytes]:
            found = []
            for block_hash, block in zip(hashes, self.store.get_many(hashes)):
                if block is None:
                    break
                found.append(encode_block_file(block_hash, block))
            return found
        return await asyncio.to_thread(read)

    async def put_blocks(self, items: list[tuple[bytes, bytes]]) -> int:
        """Offer (name, block file) pairs; damaged ones are refused. Returns how many were intact."""
        def write() -> int:
            intact = 0
            for block_hash, data in items:
                try:
                    block = decode_block_file(data, block_hash)
                except CorruptBlockFileError as error:
                    self.num_refused += 1
                    logger.warning("refused a damaged block: %s", error)
                    continue
                self.store.put(block_hash, block)
                intact += 1
            return intact
        return await asyncio.to_thread(write)

    async def report_shard(self, shard_id: str, stats: dict) -> None:
        self._shards[shard_id] = (time.monotonic(), stats)

    async def describe(self) -> dict:
        """The `/v1/memory` document: this store's tiers and, per shard, what it last reported."""
        now = time.monotonic()
        self._shards = {k: v for k, v in self._shards.items() if now - v[0] < SHARD_REPORT_TTL_S}
        return {"store": {**self.store.stats(), "refused": self.num_refused},
                "shards": {shard_id: stats for shard_id, (_, stats) in sorted(self._shards.items())}}

    async def check_health(self) -> None:
        """Serve's health check: the store answers; its disk, if any, is still a directory."""
        if self.store.disk is not None and not self.store.disk.directory.is_dir():
            raise RuntimeError(f"the memory store's directory {self.store.disk.directory} is gone")

    def shutdown(self) -> None:
        self._stop.set()
