"""Tensors on the wire: torch tensors <-> the `Tensor` message of protos/expert_service.proto.

The layout is the simplest one every language can read: the raw bytes of a contiguous row-major tensor in
little-endian order, its dtype by name and its shape. No pickle ever crosses the wire, so decoding a message is
a length check and one copy, and a malformed message is refused before it becomes a tensor.

bfloat16 has no numpy dtype; it travels as its 16-bit pattern (a view as int16), which round-trips exactly.

    >>> from_proto(to_proto(torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)))
    tensor([[ 1.5000, -2.0000]], dtype=torch.bfloat16)
"""

import math

import numpy as np
import torch

from protos import expert_service_pb2 as pb

# wire name -> (torch dtype, little-endian numpy dtype of the bytes). bfloat16's bytes are read as int16.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "float16": (torch.float16, np.dtype("<f2")),
    "int64": (torch.int64, np.dtype("<i8")),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


class WireError(ValueError):
    """A `Tensor` message that does not describe a tensor we accept; the message says which field is wrong."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype, e.g. torch.bfloat16 -> "bfloat16"."""
    if dtype not in _NAMES:
        raise WireError(f"dtype {dtype} cannot travel on the wire; use one of {', '.join(DTYPES)}")
    return _NAMES[dtype]


def to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encode any tensor (any device, any strides) as little-endian bytes + dtype + shape."""
    name = dtype_name(t.dtype)
    cpu = t.detach().to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:
        cpu = cpu.view(torch.int16)  # same bits, a dtype numpy knows
    data = cpu.numpy().astype(DTYPES[name][1], copy=False).tobytes()  # a no-op cast on little-endian hosts
    return pb.Tensor(data=data, dtype=name, shape=list(t.shape))


def from_proto(msg: pb.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decode and validate a `Tensor` message into a new CPU tensor that owns its memory.

    Checks, in order: the dtype is known, every dimension is >= 0, the element count is within
    `max_elements` (when given, so an absurd shape is refused before any allocation) and the byte count is
    exactly prod(shape) * itemsize. Any failure raises `WireError`.
    """
    if msg.dtype not in DTYPES:
        raise WireError(f"unknown dtype {msg.dtype!r}: the wire carries {', '.join(DTYPES)}")
    torch_dtype, wire_dtype = DTYPES[msg.dtype]
    shape = [int(d) for d in msg.shape]
    if any(d < 0 for d in shape):
        raise WireError(f"shape {shape} has a negative dimension")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise WireError(f"tensor of shape {shape} has {numel} elements; at most {max_elements} are accepted")
    expected = numel * wire_dtype.itemsize
    if len(msg.data) != expected:
        raise WireError(f"{msg.dtype} tensor of shape {shape} needs {expected} bytes, got {len(msg.data)}")
    array = np.frombuffer(msg.data, dtype=wire_dtype).astype(wire_dtype.newbyteorder("="))  # writable copy
    return torch.from_numpy(array).view(torch_dtype).reshape(shape)
