"""The block file format: decode(encode(x)) == x bit for bit, and every damaged file is refused."""

import struct

import pytest
import torch

from memory.block_file import HEADER_SIZE, CorruptBlockFileError, decode_block_file, encode_block_file

NAME = bytes(range(32))
SHAPE = (2, 2, 4, 2, 8)  # [layers, 2 (k/v), block_size, kv_heads, head_dim]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_bitwise(dtype):
    block = torch.randn(SHAPE).to(dtype)
    data = encode_block_file(NAME, block)
    assert len(data) == HEADER_SIZE + block.nbytes
    back = decode_block_file(data, NAME)
    assert back.dtype == dtype and back.shape == SHAPE
    assert torch.equal(back.view(torch.uint8), block.view(torch.uint8))


def damaged_files() -> dict[str, bytes]:
    good = encode_block_file(NAME, torch.randn(SHAPE))
    flip = lambda at: good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1:]  # noqa: E731
    return {
        "empty": b"",
        "truncated header": good[:HEADER_SIZE - 1],
        "truncated payload": good[:-1],
        "extra byte": good + b"\x00",
        "bad magic": b"X" + good[1:],
        "future version": good[:8] + struct.pack("<H", 2) + good[10:],
        "payload bit flip": flip(HEADER_SIZE + 17),
        "dtype bit flip": flip(12),
        "shape bit flip": flip(59),
        "checksum bit flip": flip(HEADER_SIZE - 1),
        "zeroed": bytes(len(good)),
    }


@pytest.mark.parametrize("damage", list(damaged_files()))
def test_a_damaged_file_is_refused(damage):
    with pytest.raises(CorruptBlockFileError):
        decode_block_file(damaged_files()[damage], NAME)


def test_a_file_under_the_wrong_name_is_refused():
    data = encode_block_file(NAME, torch.randn(SHAPE))
    with pytest.raises(CorruptBlockFileError, match="expected"):
        decode_block_file(data, bytes(32))


def test_rejects_a_name_that_is_not_a_digest():
    with pytest.raises(ValueError, match="32-byte"):
        encode_block_file(b"short", torch.zeros(SHAPE))
