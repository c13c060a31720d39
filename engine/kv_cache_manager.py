"""Per-sequence block tables over the shared `BlockPool`: allocation, prefix-cache hits, window release.

Worked example (block_size 4, sliding window 6). A sequence has computed 9 tokens (positions 0..8) in blocks
[b0, b1, b2]. Its next query is position 9, which sees keys 4..9 (a window of 6 covers itself and the 5
before). Block 0 (positions 0..3) can never be read again, so `release_out_of_window` frees it and the table
becomes [None, b1, b2]; at position 12, block 1 goes too. A sequence thus holds at most
ceil((window - 1) / block_size) + 1 blocks plus those of the chunk being computed: O(window), not O(length).

Prefix caching: every full block gets a hash chained over all tokens up to its end (`block_pool.hash_block`);
on admission the longest run of leading blocks whose hashes are cached is taken instead of recomputed. At
least one token is always left to compute, because the step that computes it produces the logits to sample
from.
"""

from engine.block_pool import BlockPool, hash_block
from engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None,
                 enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache, since start
        self.num_prefix_hits = 0  # of those, tokens found cached

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def match_prefix(self, req: Request) -> int:
        """Take cached blocks for the request's longest cached prefix; returns the tokens they cover."""
        assert req.num_computed_tokens == 0 and not req.block_ids
        if not self.enable_prefix_caching or req.wants_prompt_logprobs:
            return 0
        bs = self.block_size
        parent = None
        for i in range((req.num_tokens - 1) // bs):
            block_hash = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs))
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            self.pool.touch(block_id)
            req.block_ids.append(block_id)
            req.block_hashes.append(block_hash)
            parent = block_hash
        req.num_computed_tokens = len(req.block_ids) * bs
        self.num_prefix_queries += req.num_tokens
        self.num_prefix_hits += req.num_computed_tokens
        return req.num_computed_tokens

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
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            block_hash = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs))
            req.block_hashes.append(block_hash)
            if req.block_ids[i] is not None:
                self.pool.cache(req.block_ids[i], block_hash)

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
