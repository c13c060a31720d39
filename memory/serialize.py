"""A KV block tensor as raw bytes and back, bit for bit, for every dtype torch has (bfloat16 included).

Design note. numpy has no bfloat16, so `tensor.numpy()` cannot carry a bf16 block. Instead the tensor is
reinterpreted as bytes (`view(torch.uint8)`, no conversion, so NaN payloads and -0.0 survive) and rebuilt
by the reverse view. The dtype and shape are not in the bytes; the caller keeps them (the disk tier writes
them in its file header, by the names `dtype_name` gives).

`block_from_bytes` always copies into a fresh `bytearray`: the result must never alias the caller's buffer,
which may be read-only (`bytes`, an mmap) or reused for the next read.
"""

import math
from collections.abc import Sequence

import torch

Buffer = bytes | bytearray | memoryview


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a dtype, e.g. "bfloat16" (what `dtype_from_name` reads back)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name (expected e.g. 'bfloat16', 'float32')")
    return dtype


def block_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """How many payload bytes a block of this dtype and shape has."""
    return math.prod(shape) * dtype.itemsize


def block_to_bytes(block: torch.Tensor) -> bytes:
    """The block's elements in C order as raw bytes (host byte order), wherever the tensor lives."""
    flat = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [numel * itemsize]
    return flat.numpy().tobytes()


def block_from_bytes(data: Buffer, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Rebuild a CPU tensor from `block_to_bytes` output; raises ValueError if the length does not fit."""
    expected = block_nbytes(dtype, shape)
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes cannot hold a {dtype_name(dtype)} block of shape {list(shape)} "
                         f"({expected} bytes)")
    if expected == 0:  # torch.frombuffer rejects empty buffers
        return torch.empty(tuple(shape), dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [nbytes], owns a private copy
    return raw.view(dtype).reshape(tuple(shape))
