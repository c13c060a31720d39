"""Per-sequence block tables over the shared `BlockPool`: allocation, prefix-cache hits, window release.

Worked example (block_size 4, sliding window 6). A sequence has computed 9 tokens (positions 0..8) in blocks
[b0, b1, b2]. Its next query is position 9, which sees keys 4..9 (a window of 6 covers itself and the 5
before). Block 0 (positions 0..3) can never be read again, so `release_out_of_window` frees it and the table
becomes [None, b1, b2]; at position 12, block 1 goes too. A sequence thus holds at most
ceil((window - 1) / block_size) + 1 blocks plus those of the chunk being computed: O(window), not O(length).

Prefix caching: every full block gets a sha256 name chained over all tokens up to its end
(`memory.block_hash`); on admission the longest run of leading blocks whose names are cached is taken instead
of recomputed: from the pool and (with `tiers`) from host RAM, where blocks the pool evicted went. At least
one token is always left to compute, because the step that computes it produces the logits to sample from.
With a sliding window only the blocks the next query can see need to be at hand: a prefix whose early blocks
are gone everywhere still hits, and only its window becomes resident.
"""

import concurrent.futures

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
        self.spilled_bytes = 0  # host RAM held by running requests' spilled blocks (long contexts)
        self.num_spilled_blocks = 0  # blocks spilled since start

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def match_prefix(self, req: Request) -> int:
        """Take cached blocks for the request's longest cached prefix; returns the tokens they cover.

        A prefix of n blocks is usable when the blocks its next query can see are all at hand, in the pool or
        in host RAM: all n without a sliding window, the last few with one (`_first_visible`). Host blocks are
        copied into fresh pool blocks, when `FetchCost` says that beats recomputing them and the pool has room
        left for the first chunk of the rest; the copy runs off the engine thread, and the request waits for it
        (`req.is_loading_kv`, then `finish_load`).
        """
        assert req.num_computed_tokens == 0 and not req.block_ids
        if not self.enable_prefix_caching or req.wants_prompt_logprobs:
            return 0
        hashes = self.prefix_hashes(req)
        pool_ids = [self.pool.lookup(h) for h in hashes]
        host = self.tiers.host_blocks(hashes, pool_ids) if self.tiers is not None else {}
        n = len(hashes)
        while True:  # each round shortens the prefix or stops using host RAM, so it ends
            n = self._longest_match(n, lambda i: pool_ids[i] is not None or i in host)
            first = self._first_visible(n)
            loads = [i for i in range(first, n) if pool_ids[i] is None]
            if not loads:
                break
            if not self.tiers.worth_loading(len(loads)):
                host, n = {}, len(hashes)
                continue
            reused = sum(1 for i in range(first, n) if pool_ids[i] is not None and self.pool.refcount(pool_ids[i]) == 0)
            room = self.pool.num_free - reused - self._chunk_blocks(req.num_tokens - n * self.block_size)
            if len(loads) <= room:
                break
            n -= max(1, len(loads) - max(room, 0))  # a shorter prefix: fewer blocks to load
        for i in range(first, n):  # take the pool's blocks before allocating, so no allocation evicts them
            if pool_ids[i] is not None:
                self.pool.touch(pool_ids[i])
        fresh = dict(zip(loads, self.pool.allocate(len(loads))))  # evictions go down to host RAM first
        if fresh:  # copied while others step; named in the cache once done (`finish_load`)
            self.tiers.load(req, list(fresh.values()), [host[i] for i in fresh], [hashes[i] for i in fresh])
        for i in range(n):
            req.block_ids.append(None if i < first else fresh.get(i, pool_ids[i]))
            req.block_hashes.append(hashes[i])
        req.num_computed_tokens = n * self.block_size
        self.num_prefix_queries += req.num_tokens
        self.num_prefix_hits += req.num_computed_tokens
        return req.num_computed_tokens

    def finish_load(self, req: Request) -> None:
        """After a copy from host RAM into the request's blocks has ended: name the blocks in the prefix cache.
        A failed copy raises here, on the engine thread."""
        load, req.host_load = req.host_load, None
        if load is not None:
            load.done.result()
            for block_id, block_hash in load.blocks:
                self.pool.cache(block_id, block_hash)

    def _chunk_blocks(self, num_tokens: int) -> int:
        """Blocks the first chunk of `num_tokens` uncomputed tokens takes (loads leave room for it)."""
        return -(-min(num_tokens, self.max_chunk_tokens or num_tokens) // self.block_size) + 1

    def prefix_hashes(self, req: Request) -> list[bytes]:
        """Names of the request's full blocks that a prefix hit may cover (all but the last token's)."""
        bs, parent, hashes = self.block_size, None, []
        for i in range((req.num_tokens - 1) // bs):
            parent = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs), self.keyspace_root)
            hashes.append(parent)
        return hashes

    def prefetch(self, req: Request) -> None:
        """Ask the shared store, off the engine thread, for the blocks of `req` that neither the pool nor host
        RAM holds (those its next query would see); the scheduler admits `req` once that is done."""
        if self.tiers is None or self.tiers.store is None or req.wants_prompt_logprobs:
            return
        hashes = self.prefix_hashes(req)
        missing = [h for h in hashes[self._first_visible(len(hashes)):]
                   if self.pool.lookup(h) is None and not self.tiers.host_has(h)]
        self.tiers.prefetch(req, missing)

    def _first_visible(self, num_blocks: int) -> int:
        """The first of `num_blocks` leading blocks that the query after them can see (the window's start)."""
        if self.sliding_window is None:
            return 0
        return max(0, num_blocks * self.block_size - self.sliding_window + 1) // self.block_size

    def _longest_match(self, n: int, present) -> int:
        """The most leading blocks, at most `n`, whose visible part is all `present`."""
        while n > 0:
            missing = next((i for i in range(n - 1, self._first_visible(n) - 1, -1) if not present(i)), None)
            if missing is None:
                return n
            n = missing
        return 0

    def release_out_of_window(self, req: Request) -> None:
        """Free blocks (in the pool or spilled to host RAM) that no query from position `num_computed_tokens`
        on can attend to."""
        if self.sliding_window is None:
            return
        first_visible = max(0, req.num_computed_tokens - self.sliding_window + 1)
        for i in range(min(first_visible // self.block_size, len(req.block_ids))):
            if req.block_ids[i] is not None:
                self.pool.free([req.block_ids[i]])
                req.block_ids[i] = None
            if i in req.host_blocks:
                self.spilled_bytes -= req.host_blocks.pop(i).nbytes

    @property
    def max_chunk_tokens(self) -> int | None:
        """With long contexts (a host tier), a chunk takes at most half the pool, so that spilling a request's
        older blocks can always make room for it; None: no limit beyond the step's budget."""
        return None if self.tiers is None else max(1, self.pool.num_blocks // 2) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, spill: bool = False) -> bool:
        """Make room for `num_new_tokens` more tokens; with `spill`, by moving the request's own older blocks to
        host RAM when the pool is short (long contexts). False if there is no room (spilled blocks stay so)."""
        total = req.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free and spill:
            self._spill(req, needed)
        if needed > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def _spill(self, req: Request, needed: int) -> None:
        """Copy the request's oldest full blocks to host RAM and give their pool blocks back, until `needed` are
        free or the spill budget (the host tier's size) is spent. Attention then streams them back per layer."""
        if self.tiers is None:
            return
        for i in range(min(req.num_computed_tokens // self.block_size, len(req.block_ids))):
            if self.pool.num_free >= needed:
                return
            block_id = req.block_ids[i]
            if block_id is None:
                continue
            block = self.tiers.block(block_id)
            if self.spilled_bytes + block.nbytes > self.tiers.host.capacity_bytes:
                return
            req.host_blocks[i] = block.to("cpu", copy=True)
            self.spilled_bytes += block.nbytes
            self.num_spilled_blocks += 1
            self.pool.free([block_id])
            req.block_ids[i] = None

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
        """Return all of a request's blocks, tail first so its prefix stays cached longest; blocks it spilled
        go to host RAM's cache (a preempted long request resumes from there). A copy into its blocks still in
        flight (an abort while it loads) is waited for first, and its blocks are not named in the cache."""
        if req.host_load is not None:
            concurrent.futures.wait([req.host_load.done])
            req.host_load, req.is_loading_kv = None, False
        for i, block in req.host_blocks.items():
            self.spilled_bytes -= block.nbytes
            if i < len(req.block_hashes):
                self.tiers.host.put(req.block_hashes[i], block)
        req.host_blocks = {}
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
