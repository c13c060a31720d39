"""Per-sequence block tables over the shared `BlockPool`: allocation, prefix-cache hits, window release.

Worked example (block_size 4, sliding window 6). A sequence has computed 9 tokens (positions 0..8) in blocks
[b0, b1, b2]. Its next query is position 9, which sees keys 4..9 (a window of 6 covers itself and the 5
before). Block 0 (positions 0..3) can never be read again, so `release_out_of_window` frees it and the table
becomes [None, b1, b2]; at position 12, block 1 goes too. A sequence thus holds at most
ceil((window - 1) / block_size) + 1 blocks plus those of the chunk being computed: O(window), not O(length).

Prefix caching: every full block gets a sha256 name chained over all tokens up to its end
(`memory.block_hash`); on admission the longest run of leading blocks whose names are cached is taken instead
of recomputed: first from the pool, then (with `tiers`) from host RAM, where blocks the pool evicted went. At
least one token is always left to compute, because the step that computes it produces the logits to sample
from. With a sliding window, blocks loaded from host RAM that the request can no longer see are not loaded
at all: only the window becomes resident.
"""

from engine.block_pool import BlockPool
from engine.kv_tiers import KVTiers
from engine.request import Request
from memory.block_hash import hash_block


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None,
                 enable_prefix_caching: bool = True, keyspace_root: bytes = b"", tiers: KVTiers | None = None):
        self.tiers = tiers if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, on_evict=self.tiers.evicted if self.tiers is not None else None)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.keyspace_root = keyspace_root
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache, since start
        self.num_prefix_hits = 0  # of those, tokens found cached (in any tier)

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def match_prefix(self, req: Request) -> int:
        """Take cached blocks for the request's longest cached prefix; returns the tokens they cover."""
        assert req.num_computed_tokens == 0 and not req.block_ids
        if not self.enable_prefix_caching or req.wants_prompt_logprobs:
            return 0
        hashes = self.prefix_hashes(req)
        for block_hash in hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            self.pool.touch(block_id)
            req.block_ids.append(block_id)
            req.block_hashes.append(block_hash)
        if self.tiers is not None:
            self._load_from_host(req, hashes[len(req.block_hashes):])
        req.num_computed_tokens = len(req.block_hashes) * self.block_size
        self.num_prefix_queries += req.num_tokens
        self.num_prefix_hits += req.num_computed_tokens
        return req.num_computed_tokens

    def prefix_hashes(self, req: Request) -> list[bytes]:
        """Names of the request's full blocks that a prefix hit may cover (all but the last token's)."""
        bs, parent, hashes = self.block_size, None, []
        for i in range((req.num_tokens - 1) // bs):
            parent = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs), self.keyspace_root)
            hashes.append(parent)
        return hashes

    def prefetch(self, req: Request) -> None:
        """Ask the shared store, off the engine thread, for the blocks of `req` that neither the pool nor host
        RAM holds; the scheduler admits `req` once that is done."""
        if self.tiers is None or self.tiers.store is None or req.wants_prompt_logprobs:
            return
        hashes = self.prefix_hashes(req)
        held = 0
        while held < len(hashes) and (self.pool.lookup(hashes[held]) is not None or hashes[held] in self.tiers.host):
            held += 1
        self.tiers.prefetch(req, hashes[held:])

    def _load_from_host(self, req: Request, hashes: list[bytes]) -> None:
        blocks = self.tiers.take_from_host(hashes)
        # leave room in the pool for the rest of the prompt's first chunk: a load never starves admission
        blocks = blocks[:max(0, self.pool.num_free - 1)]
        if not blocks:
            return
        first = len(req.block_ids)
        visible_from = 0 if self.sliding_window is None else \
            max(0, (first + len(blocks)) * self.block_size - self.sliding_window + 1) // self.block_size
        resident = [(i, blk) for i, blk in enumerate(blocks, start=first) if i >= visible_from]
        block_ids = self.pool.allocate(len(resident))  # may evict others down to host RAM first
        self.tiers.load(block_ids, [blk for _, blk in resident])
        by_index = dict(zip((i for i, _ in resident), block_ids))
        for i, block_hash in enumerate(hashes[:len(blocks)], start=first):
            block_id = by_index.get(i)
            req.block_ids.append(block_id)
            req.block_hashes.append(block_hash)
            if block_id is not None:
                self.pool.cache(block_id, block_hash)

    def release_out_of_window(self, req: Request) -> None:
        """Free blocks that no query from position `num_computed_tokens` on can attend to."""
        if self.sliding_window is None:
            return
        first_visible = max(0, req.num_computed_tokens - self.sliding_window + 1)
        for i in range(min(first_visible // self.block_size, len(req.block_ids))):
            if req.block_ids[i] is not None:
                self.pool.free([req.block_ids[i]])
                req.block_ids[i] = None

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens; False (nothing changed) if the pool is short."""
        total = req.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register blocks that became full in the last step under their prefix hashes."""
        if not self.enable_prefix_caching:
            return
        bs, computed = self.block_size, []
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            block_hash = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs), self.keyspace_root)
            req.block_hashes.append(block_hash)
            if req.block_ids[i] is not None:
                self.pool.cache(req.block_ids[i], block_hash)
                computed.append((req.block_ids[i], block_hash))
        if computed and self.tiers is not None:
            self.tiers.computed(computed)

    def free(self, req: Request) -> None:
        """Return all of a request's blocks, tail first so its prefix stays cached longest."""
        self.pool.free([b for b in reversed(req.block_ids) if b is not None])
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0


def max_blocks_per_sequence(max_model_len: int, max_chunk_tokens: int, block_size: int,
                            sliding_window: int | None) -> int:
    """Blocks one sequence can hold at once: bounded by the window when the model has one."""
    span = max_model_len
    if sliding_window is not None:
        span = min(max_model_len, sliding_window - 1 + max_chunk_tokens)
    return -(-span // block_size) + 1
