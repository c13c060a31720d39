"""Tensor <-> bytes: bit-exact for every dtype, including bf16 NaN payloads and -0.0; never aliasing input."""

import pytest
import torch

from memory.serialize import block_from_bytes, block_to_bytes, dtype_from_name, dtype_name

SHAPE = (2, 2, 4, 2, 8)  # [layers, 2 (k/v), block_size, kv_heads, head_dim]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_round_trip_is_bitwise(dtype):
    block = (torch.randn(SHAPE) * 100).to(dtype)
    if dtype.is_floating_point:
        block.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    back = block_from_bytes(block_to_bytes(block), dtype, SHAPE)
    assert back.dtype == dtype and back.shape == SHAPE
    assert torch.equal(back.view(torch.uint8), block.view(torch.uint8))


def test_non_contiguous_input_is_written_in_c_order():
    block = torch.randn(SHAPE[::-1]).permute(4, 3, 2, 1, 0)
    assert not block.is_contiguous()
    assert torch.equal(block_from_bytes(block_to_bytes(block), torch.float32, SHAPE), block)


def test_result_owns_its_memory():
    data = block_to_bytes(torch.ones(SHAPE))
    back = block_from_bytes(data, torch.float32, SHAPE)
    back += 1  # writable: the result does not alias the read-only `bytes`
    assert torch.equal(block_from_bytes(data, torch.float32, SHAPE), torch.ones(SHAPE))


def test_rejects_a_length_that_does_not_fit():
    with pytest.raises(ValueError, match="cannot hold"):
        block_from_bytes(b"\x00" * 10, torch.float32, SHAPE)


def test_dtype_names_round_trip():
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bfloat16"
    for bad in ("nn", "float33", "torch.float32", ""):
        with pytest.raises(ValueError, match="not a torch dtype"):
            dtype_from_name(bad)
