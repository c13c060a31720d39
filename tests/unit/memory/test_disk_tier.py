"""DiskTier: bit-exact round trips, persistence across instances, damaged files as misses, a hard budget."""

import os

import pytest
import torch

from memory.block_file import HEADER_SIZE
from memory.disk_tier import DiskTier

SHAPE = (2, 2, 4, 2, 8)  # [layers, 2 (k/v), block_size, kv_heads, head_dim]
FILE_BYTES = HEADER_SIZE + 2 * 2 * 4 * 2 * 8 * 4  # one fp32 block on disk


def name(i: int) -> bytes:
    return i.to_bytes(32, "big")


def block(i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).to(dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_bitwise(tmp_path, dtype):
    tier = DiskTier(tmp_path, 10 * FILE_BYTES)
    assert tier.put(name(1), block(1, dtype))
    assert bitwise_equal(tier.get(name(1)), block(1, dtype))
    assert tier.get(name(2)) is None
    assert tier.path(name(1)).parent.name == name(1).hex()[:2]  # sharded by first byte


def test_survives_a_restart(tmp_path):
    first = DiskTier(tmp_path, 10 * FILE_BYTES)
    for i in range(3):
        first.put(name(i), block(i, torch.bfloat16))
    second = DiskTier(tmp_path, 10 * FILE_BYTES)
    assert len(second) == 3 and second.used_bytes == first.used_bytes
    for i in range(3):
        assert bitwise_equal(second.get(name(i)), block(i, torch.bfloat16))


def test_lru_order_survives_a_restart(tmp_path):
    first = DiskTier(tmp_path, 3 * FILE_BYTES)
    for i in range(3):
        first.put(name(i), block(i))
        os.utime(first.path(name(i)), (1000 + i, 1000 + i))  # written long ago, 0 oldest
    first.get(name(0))  # a hit makes 0 the most recently used, on disk too
    second = DiskTier(tmp_path, 3 * FILE_BYTES)
    second.put(name(3), block(3))
    assert [name(i) in second for i in range(4)] == [True, False, True, True]


def test_a_lowered_capacity_drops_the_oldest_at_start(tmp_path):
    first = DiskTier(tmp_path, 3 * FILE_BYTES)
    for i in range(3):
        first.put(name(i), block(i))
        os.utime(first.path(name(i)), (1000 + i, 1000 + i))
    second = DiskTier(tmp_path, 2 * FILE_BYTES)
    assert [name(i) in second for i in range(3)] == [False, True, True]
    assert not first.path(name(0)).exists()


def test_capacity_is_a_hard_limit_on_file_bytes(tmp_path):
    tier = DiskTier(tmp_path, 5 * FILE_BYTES + FILE_BYTES // 2)
    for i in range(40):
        assert tier.put(name(i), block(i))
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.kvb"))
        assert on_disk == tier.used_bytes <= tier.capacity_bytes
    assert [name(i) in tier for i in range(34, 40)] == [False] + [True] * 5
    assert tier.stats()["evictions"] == 35


def test_a_block_bigger_than_the_budget_is_refused(tmp_path):
    tier = DiskTier(tmp_path, FILE_BYTES - 1)
    assert not tier.put(name(0), block(0))
    assert len(tier) == 0 and not any(tmp_path.rglob("*.kvb"))


def flip_payload_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 5] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def misname(path) -> None:
    os.replace(path.parent.parent / name(2).hex()[:2] / (name(2).hex() + ".kvb"), path)


@pytest.mark.parametrize("damage", [flip_payload_byte, truncate, misname])
def test_a_damaged_file_is_a_miss_and_is_deleted(tmp_path, damage):
    tier = DiskTier(tmp_path, 10 * FILE_BYTES)
    tier.put(name(1), block(1))
    tier.put(name(2), block(2))
    damage(tier.path(name(1)))
    restarted = DiskTier(tmp_path, 10 * FILE_BYTES)
    for store in (tier, restarted):
        assert store.get(name(1)) is None
        assert not store.path(name(1)).exists() and name(1) not in store
    assert tier.stats()["corrupt"] == 1 and tier.stats()["misses"] == 1


def test_a_file_removed_behind_its_back_is_a_miss(tmp_path):
    tier = DiskTier(tmp_path, 10 * FILE_BYTES)
    tier.put(name(1), block(1))
    tier.path(name(1)).unlink()
    assert tier.get(name(1)) is None
    assert tier.used_bytes == 0 and tier.stats()["corrupt"] == 0


def test_stray_temp_files_are_removed_at_start(tmp_path):
    tier = DiskTier(tmp_path, 10 * FILE_BYTES)
    tier.put(name(1), block(1))
    stray = tier.path(name(1)).with_name(f".{name(1).hex()}.kvb.0badf00d.tmp")
    stray.write_bytes(b"half a block")
    unrelated = tmp_path / "README"
    unrelated.write_text("not ours")
    restarted = DiskTier(tmp_path, 10 * FILE_BYTES)
    assert not stray.exists() and unrelated.exists()
    assert len(restarted) == 1 and restarted.used_bytes == FILE_BYTES


def test_a_failed_write_is_a_refused_put(tmp_path):
    tier = DiskTier(tmp_path, 10 * FILE_BYTES)
    shard = tier.path(name(1)).parent
    shard.write_text("a file where the shard directory should be")
    assert not tier.put(name(1), block(1))
    assert name(1) not in tier and tier.used_bytes == 0 and tier.stats()["write_errors"] == 1


def test_stats(tmp_path):
    tier = DiskTier(tmp_path, FILE_BYTES)
    tier.put(name(1), block(1))
    tier.get(name(1))
    tier.get(name(2))
    tier.put(name(2), block(2))
    assert tier.stats() == {"capacity_bytes": FILE_BYTES, "used_bytes": FILE_BYTES, "num_blocks": 1, "hits": 1,
                            "misses": 1, "evictions": 1, "bytes_in": 2 * FILE_BYTES, "bytes_out": FILE_BYTES,
                            "corrupt": 0, "write_errors": 0}
