"""The host-RAM tier: an LRU map from block name to a CPU copy of the block, under a hard byte budget.

Design note. RAM is the fast tier in front of disk, so this class only keeps blocks; it never writes
anything down. Making room is visible instead: `put` returns the blocks it evicted, least recently used
first, and the caller (`TieredStore`) decides whether they go to disk. The budget is a hard limit on the sum
of stored tensors' bytes: `used_bytes <= capacity_bytes` holds after every call. A block larger than the
whole budget is refused and handed straight back in the evicted list, so it too can go down a tier.

Example, capacity 3 blocks: put a, b, c; get a; put d -> evicts [b] (c and a were used more recently).

Stored tensors are private contiguous CPU copies (pinned when asked and CUDA is present, so the copy back to
the GPU can be asynchronous). `get` returns the stored tensor itself: callers copy out of it and must not
write into it. One lock guards the map; the device-to-host copy in `put` runs outside it.
"""

import itertools
import threading
from collections import OrderedDict

import torch


class HostTier:
    def __init__(self, capacity_bytes: int, pin_memory: bool = False):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.is_pinned = pin_memory and torch.cuda.is_available()
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # LRU first, MRU last
        self._used_bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._bytes_in = self._bytes_out = 0

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        with self._lock:
            return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def names(self, limit: int) -> list[bytes]:
        """Up to `limit` stored block names, most recently used first."""
        with self._lock:
            return list(itertools.islice(reversed(self._blocks), limit))

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        """The stored block (marked most recently used), or None. Do not write into the result."""
        with self._lock:
            block = self._blocks.get(block_hash)
            if block is None:
                self._misses += 1
                return None
            self._blocks.move_to_end(block_hash)
            self._hits += 1
            self._bytes_out += block.nbytes
            return block

    def put(self, block_hash: bytes, block: torch.Tensor) -> list[tuple[bytes, torch.Tensor]]:
        """Store a copy of `block`; return the (name, block) pairs evicted to make room, LRU first.

        A name already present is only marked most recently used (same name, same content). A block larger
        than the capacity is not stored and comes back as the only entry of the result.
        """
        if block.nbytes > self.capacity_bytes:
            return [(block_hash, block)]
        if self._touch(block_hash):
            return []
        copy = self._copy(block)
        evicted = []
        with self._lock:
            if block_hash in self._blocks:  # another thread stored it while we copied
                self._blocks.move_to_end(block_hash)
                return []
            while self._used_bytes + copy.nbytes > self.capacity_bytes:
                old_hash, old = self._blocks.popitem(last=False)
                self._used_bytes -= old.nbytes
                evicted.append((old_hash, old))
            self._blocks[block_hash] = copy
            self._used_bytes += copy.nbytes
            self._evictions += len(evicted)
            self._bytes_in += copy.nbytes
        return evicted

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"capacity_bytes": self.capacity_bytes, "used_bytes": self._used_bytes,
                    "num_blocks": len(self._blocks), "hits": self._hits, "misses": self._misses,
                    "evictions": self._evictions, "bytes_in": self._bytes_in, "bytes_out": self._bytes_out}

    def _touch(self, block_hash: bytes) -> bool:
        """Mark a stored block most recently used without counting a hit; False if absent."""
        with self._lock:
            if block_hash not in self._blocks:
                return False
            self._blocks.move_to_end(block_hash)
            return True

    def _copy(self, block: torch.Tensor) -> torch.Tensor:
        if self.is_pinned:
            return torch.empty(block.shape, dtype=block.dtype, pin_memory=True).copy_(block)
        return block.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
