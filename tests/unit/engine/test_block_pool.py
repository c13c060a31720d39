"""BlockPool: reference counts, the LRU free queue, the prefix-cache index and eviction notices."""

import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError
from memory.block_hash import hash_block as chained


def hash_block(parent, tokens):
    return chained(parent, tokens, b"test")


def test_rejects_an_empty_pool():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


# --- allocate / free / refcounts ------------------------------------------------------------------------

def test_allocate_hands_out_distinct_blocks_and_free_returns_them():
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and all(0 <= b < 5 for b in blocks)
    assert pool.num_free == 2
    assert [pool.refcount(b) for b in blocks] == [1, 1, 1]
    rest = pool.allocate(2)
    assert set(blocks) | set(rest) == set(range(5))
    assert pool.num_free == 0
    pool.free(blocks)
    assert pool.num_free == 3
    assert [pool.refcount(b) for b in blocks] == [0, 0, 0]
    assert pool.allocate(0) == []


def test_shared_block_is_free_only_when_its_last_owner_lets_go():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch(block)  # a second owner
    assert pool.refcount(block) == 2
    pool.free([block])
    assert pool.refcount(block) == 1 and pool.num_free == 1
    pool.free([block])
    assert pool.refcount(block) == 0 and pool.num_free == 2


def test_double_free_is_caught():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([block])


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(NoFreeBlocksError, match="asked for 2 KV blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert [pool.refcount(b) for b in held] == [1, 1, 1]
    (last,) = pool.allocate(1)
    assert last not in held


# --- LRU eviction ---------------------------------------------------------------------------------------

def test_free_blocks_are_reused_oldest_freed_first():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    for block in order:
        pool.free([block])
    assert pool.allocate(4) == order


def test_within_one_free_call_the_first_listed_is_evicted_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    pool.free(list(reversed(blocks)))  # how KVCacheManager frees a sequence: tail first
    assert pool.allocate(1) == [blocks[2]]


def test_reallocating_a_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache(a, h)
    pool.free([a])
    pool.free([b])
    assert pool.lookup(h) == a and pool.num_cached == 1  # free but still cached
    assert pool.allocate(1) == [a]  # a was freed first, so it is evicted first
    assert pool.lookup(h) is None and pool.num_cached == 0
    pool.free([a])
    assert pool.lookup(h) is None  # freeing again does not bring the old content back


def test_recently_freed_cached_block_outlives_older_free_blocks():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    h = hash_block(None, [7])
    pool.cache(c, h)
    pool.free([a, b])
    pool.free([c])
    pool.allocate(2)  # takes a and b
    assert pool.lookup(h) == c


# --- touch ----------------------------------------------------------------------------------------------

def test_touch_revives_a_free_cached_block():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    h = hash_block(None, [5, 6])
    pool.cache(blocks[0], h)
    pool.free(blocks)
    assert pool.num_free == 3
    found = pool.lookup(h)
    assert found == blocks[0]
    pool.touch(found)
    assert pool.refcount(found) == 1 and pool.num_free == 2
    others = pool.allocate(2)  # the revived block is no longer in the free queue
    assert found not in others
    assert pool.lookup(h) == found
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_touch_of_an_in_use_block_leaves_the_free_queue_alone():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch(block)
    assert pool.num_free == 1 and pool.refcount(block) == 2


# --- cache ----------------------------------------------------------------------------------------------

def test_cache_first_writer_wins():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    h = hash_block(None, [1, 2])
    pool.cache(a, h)
    pool.cache(b, h)  # same content computed twice: the index keeps the first
    assert pool.lookup(h) == a and pool.num_cached == 1
    pool.cache(a, hash_block(None, [3, 4]))  # a block holds one prefix: a second name is ignored
    assert pool.lookup(hash_block(None, [3, 4])) is None
    pool.free([b])
    assert pool.allocate(1) == [b]  # evicting the loser does not drop the winner's entry
    assert pool.lookup(h) == a
    pool.cache(c, hash_block(None, [3, 4]))
    assert pool.lookup(hash_block(None, [3, 4])) == c and pool.num_cached == 2


def test_allocate_tells_of_the_cached_blocks_it_reuses_before_handing_them_out():
    evicted = []
    pool = BlockPool(3, on_evict=evicted.extend)
    a, b, c = pool.allocate(3)
    pool.cache(a, hash_block(None, [1]))
    pool.cache(b, hash_block(None, [2]))
    pool.free([c, b, a])  # c is uncached: reusing it evicts nothing
    assert pool.allocate(1) == [c] and evicted == []
    assert pool.allocate(2) == [b, a]
    assert evicted == [(b, hash_block(None, [2])), (a, hash_block(None, [1]))] and pool.num_cached == 0
