"""HostTier: equal to a reference LRU model under any sequence of puts and gets, never over its budget."""

import threading
from collections import OrderedDict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.host_tier import HostTier

SHAPE = (2, 2, 4, 2, 8)  # [layers, 2 (k/v), block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 2 * 4 * 2 * 8 * 4  # fp32


def name(i: int) -> bytes:
    return i.to_bytes(32, "big")


def block(i: int, numel: int = 256) -> torch.Tensor:
    return torch.full((numel,), float(i))


def test_evicts_least_recently_used_first():
    tier = HostTier(3 * BLOCK_BYTES)
    for i in range(3):
        assert tier.put(name(i), block(i).reshape(SHAPE)) == []
    assert tier.get(name(0)) is not None  # 0 is now most recent; 1 is least
    evicted = tier.put(name(3), block(3).reshape(SHAPE))
    assert [h for h, _ in evicted] == [name(1)]
    assert torch.equal(evicted[0][1], block(1).reshape(SHAPE))
    assert name(1) not in tier and all(name(i) in tier for i in (0, 2, 3))
    assert len(tier) == 3 and tier.used_bytes == 3 * BLOCK_BYTES


def test_re_putting_a_stored_block_only_refreshes_it():
    tier = HostTier(2 * BLOCK_BYTES)
    tier.put(name(0), block(0))
    tier.put(name(1), block(1))
    assert tier.put(name(0), block(0)) == []
    assert [h for h, _ in tier.put(name(2), block(2))] == [name(1)]
    assert tier.stats()["hits"] == 0  # a put is not a hit


def test_a_block_bigger_than_the_budget_is_handed_back():
    tier = HostTier(BLOCK_BYTES - 1)
    big = block(7)
    assert tier.put(name(7), big) == [(name(7), big)]
    assert name(7) not in tier and tier.used_bytes == 0


def test_stores_a_private_bitwise_copy():
    original = torch.randn(SHAPE).to(torch.bfloat16)
    tier = HostTier(BLOCK_BYTES)
    tier.put(name(0), original)
    kept = original.clone()
    original.zero_()
    got = tier.get(name(0))
    assert got.dtype == torch.bfloat16 and got.device.type == "cpu"
    assert torch.equal(got.view(torch.uint8), kept.view(torch.uint8))


def test_stats_count_traffic():
    tier = HostTier(BLOCK_BYTES)
    tier.put(name(0), block(0))
    tier.get(name(0))
    tier.get(name(1))
    tier.put(name(1), block(1))
    assert tier.stats() == {"capacity_bytes": BLOCK_BYTES, "used_bytes": BLOCK_BYTES, "num_blocks": 1,
                            "hits": 1, "misses": 1, "evictions": 1, "bytes_in": 2 * BLOCK_BYTES,
                            "bytes_out": BLOCK_BYTES}


def numel_of(key: int) -> int:
    """Blocks of varied sizes, but one size per name: a name always means the same content."""
    return (key * 37) % 64 + 1


ops = st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 40)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(0, 512), ops=ops)
def test_matches_a_reference_lru_and_never_exceeds_capacity(capacity, ops):
    tier = HostTier(capacity)
    model: OrderedDict[int, int] = OrderedDict()  # key -> nbytes, LRU first
    for op, key in ops:
        if op == "get":
            got = tier.get(name(key))
            assert (got is not None) == (key in model)
            if key in model:
                model.move_to_end(key)
                assert got[0].item() == key
            continue
        nbytes = numel_of(key) * 4
        evicted = [int.from_bytes(h, "big") for h, _ in tier.put(name(key), block(key, numel_of(key)))]
        if key in model:
            model.move_to_end(key)
            expected = []
        elif nbytes > capacity:
            expected = [key]
        else:
            expected = []
            while sum(model.values()) + nbytes > capacity:
                expected.append(model.popitem(last=False)[0])
            model[key] = nbytes
        assert evicted == expected
        assert tier.used_bytes == sum(model.values()) <= capacity
        assert len(tier) == len(model)


def test_concurrent_puts_and_gets_keep_the_budget():
    tier = HostTier(10 * BLOCK_BYTES)

    def worker(offset: int) -> None:
        for i in range(200):
            tier.put(name(offset + i), block(i).reshape(SHAPE))
            tier.get(name(offset + i // 2))

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = tier.stats()
    assert stats["used_bytes"] == 10 * BLOCK_BYTES and stats["num_blocks"] == 10
    assert stats["evictions"] == 4 * 200 - 10
