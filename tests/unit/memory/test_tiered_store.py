"""TieredStore: each write policy's placement, promotion on a disk hit, prefix reads, and that what comes
back is always bit-equal to what went in, whichever tier it came from."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.block_file import HEADER_SIZE
from memory.block_hash import BlockKeyspace, hash_block
from memory.disk_tier import DiskTier
from memory.host_tier import HostTier
from memory.tiered_store import TieredStore

SHAPE = (2, 2, 4, 2, 8)  # [layers, 2 (k/v), block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 2 * 4 * 2 * 8 * 2  # bf16
ROOT = BlockKeyspace("tiny", "bfloat16", 4).root


def chain(n: int, seed: int = 0) -> list[bytes]:
    """The names of a sequence's first n blocks."""
    names, parent = [], None
    for i in range(n):
        parent = hash_block(parent, [seed, i, i, i], ROOT)
        names.append(parent)
    return names


def block(h: bytes) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(h[0] * 256 + h[1])).to(torch.bfloat16)


def same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def make_store(tmp_path, policy: str, ram_blocks: int = 2, disk_blocks: int = 100, **kwargs) -> TieredStore:
    disk = DiskTier(tmp_path, disk_blocks * (HEADER_SIZE + BLOCK_BYTES)) if disk_blocks else None
    return TieredStore(HostTier(ram_blocks * BLOCK_BYTES), disk, policy, **kwargs)


def test_write_through_puts_every_block_on_disk_at_once(tmp_path):
    store = make_store(tmp_path, "write-through")
    a, b = chain(2)
    store.put(a, block(a))
    assert a in store.ram and a in store.disk
    store.put_many([(b, block(b))])
    assert b in store.ram and b in store.disk


def test_write_back_writes_to_disk_only_on_eviction(tmp_path):
    store = make_store(tmp_path, "write-back")
    a, b, c = chain(3)
    store.put_many([(a, block(a)), (b, block(b))])
    assert len(store.disk) == 0
    store.put(c, block(c))  # RAM holds two: a, the least recently used, goes down
    assert a not in store.ram and a in store.disk
    assert [h in store.ram for h in (b, c)] == [True, True] and len(store.disk) == 1


def test_hit_twice_stores_only_on_the_second_offer(tmp_path):
    store = make_store(tmp_path, "hit-twice")
    a, b = chain(2)
    store.put(a, block(a))
    assert a not in store and store.stats()["offered_once"] == 1
    store.put(a, block(a))
    assert a in store.ram and a not in store.disk  # then as write-back
    store.put(b, block(b))
    assert b not in store


def test_hit_twice_remembers_a_bounded_number_of_offers(tmp_path):
    store = make_store(tmp_path, "hit-twice", max_offered_once=2)
    a, b, c = chain(3)
    for h in (a, b, c):  # a falls out of the memory of first offers
        store.put(h, block(h))
    assert store.stats()["offered_once"] == 2
    store.put(a, block(a))
    store.put(c, block(c))
    assert a not in store and c in store


def test_a_disk_hit_is_promoted_into_ram(tmp_path):
    store = make_store(tmp_path, "write-back")
    a, b, c = chain(3)
    store.put_many((h, block(h)) for h in (a, b, c))  # a spilled to disk
    assert same(store.get(a), block(a))
    assert a in store.ram and b in store.disk  # promoting a evicted b, which went down too
    assert store.stats()["disk"]["hits"] == 1
    assert same(store.get(a), block(a)) and store.stats()["disk"]["hits"] == 1  # now served from RAM


def test_get_many_stops_at_the_first_miss(tmp_path):
    store = make_store(tmp_path, "write-through", ram_blocks=10)
    a, b, c, d = chain(4)
    store.put_many((h, block(h)) for h in (a, b, d))
    got = store.get_many([a, b, c, d])
    assert same(got[0], block(a)) and same(got[1], block(b)) and got[2:] == [None, None]
    assert store.stats()["ram"]["hits"] == 2  # d was never read
    assert store.get_many([]) == []


def test_contains_prefix_counts_leading_stored_blocks_in_any_tier(tmp_path):
    store = make_store(tmp_path, "write-back")
    names = chain(5)
    store.put_many((h, block(h)) for h in names[:3] + names[4:])
    assert store.contains_prefix(names) == 3
    assert store.contains_prefix(names[:2]) == 2
    assert store.contains_prefix(chain(2, seed=1)) == 0
    assert store.stats()["ram"]["hits"] == store.stats()["disk"]["hits"] == 0  # nothing was loaded


def test_ram_only_store_forgets_what_it_evicts(tmp_path):
    store = make_store(tmp_path, "write-back", disk_blocks=0)
    a, b, c = chain(3)
    store.put_many((h, block(h)) for h in (a, b, c))
    assert store.get(a) is None and same(store.get(c), block(c))
    assert store.stats()["disk"] is None


def test_rejects_an_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="write-through, write-back, hit-twice"):
        make_store(tmp_path, "write-around")


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(["write-through", "write-back", "hit-twice"]),
       ops=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 11)), max_size=40))
def test_whatever_comes_back_is_what_went_in(tmp_path_factory, policy, ops):
    store = make_store(tmp_path_factory.mktemp("disk"), policy, ram_blocks=2, disk_blocks=4)
    names = chain(12)
    for op, i in ops:
        if op == "put":
            store.put(names[i], block(names[i]))
        else:
            got = store.get(names[i])
            assert got is None or same(got, block(names[i]))
        assert store.ram.used_bytes <= store.ram.capacity_bytes
        assert store.disk.used_bytes <= store.disk.capacity_bytes
