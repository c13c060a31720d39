"""The pool of KV-cache blocks: free list, reference counts and the prefix-cache index.

Design note (after vLLM v1's block pool). A block holds the keys/values of `block_size` consecutive tokens of
one sequence. A *full* block can be named by a hash chained over every token before and in it, so two
sequences with the same prefix can share the block (automatic prefix caching). A block is in one of three
states:

* in use (refcount > 0): owned by one or more running sequences;
* free and cached (refcount 0, hash set): its content is still valid; a later sequence with the same prefix
  may pick it up again (`touch`), until it is evicted;
* free (refcount 0, no hash).

Free blocks, cached or not, sit in one LRU queue. `allocate` takes from its head, dropping the hash of a
cached block it reuses, so recently freed prefixes survive longest. No tensors here: the pool only does the
bookkeeping; the model runner owns the memory.
"""

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when asked for more blocks than are free; callers check `num_free` first."""


class BlockPool:
    """`on_evict(pairs)` hears of the cached blocks an `allocate` is about to reuse, as (block id, hash) pairs,
    while their content is still intact: the hierarchical cache copies them down a tier there."""

    def __init__(self, num_blocks: int, on_evict: Callable[[list[tuple[int, bytes]]], None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict
        self._refcount = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: head evicts first

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (free ones plus evictable cached ones)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks, evicted = [], []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            old = self._hash_of[block_id]
            if old is not None:  # evict: its content is about to be overwritten
                del self._cached[old]
                self._hash_of[block_id] = None
                evicted.append((block_id, old))
            self._refcount[block_id] = 1
            blocks.append(block_id)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return blocks

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks tail first: the tail is evicted first."""
        for block_id in block_ids:
            assert self._refcount[block_id] > 0, f"block {block_id} freed twice"
            self._refcount[block_id] -= 1
            if self._refcount[block_id] == 0:
                self._free[block_id] = None

    def cached_hashes(self, limit: int) -> list[bytes]:
        """The names of up to `limit` cached blocks, most recently cached first."""
        return list(itertools.islice(reversed(self._cached), limit))

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Take a reference to a cached block found by `lookup` (reviving it if it was free)."""
        if self._refcount[block_id] == 0:
            del self._free[block_id]
        self._refcount[block_id] += 1

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Record that a full block holds the prefix named `block_hash`. First writer wins on duplicates."""
        if self._hash_of[block_id] is not None or block_hash in self._cached:
            return
        self._hash_of[block_id] = block_hash
        self._cached[block_hash] = block_id

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]
