"""The on-disk format of one KV block: a fixed 135-byte header, then the raw payload.

Design note. A disk cache is only worth having if it can never hand back wrong KV: a torn write after a
power cut, a truncated copy, a flipped bit or a file renamed by hand must all read as "not there". So the
header names the block and describes the payload, and one checksum covers header and payload together:

    offset  size  field
         0     8  magic b"MSEMKVB\\0"
         8     2  format version (1)
        10     1  ndim (at most 8)
        11    16  dtype name, ASCII, NUL-padded ("bfloat16")
        27    32  the block's sha256 name (guards against misnamed files)
        59    64  shape, 8 x uint64 (unused dims 0)
       123     8  payload length in bytes
       131     4  crc32 of bytes [0, 131) followed by the payload
       135     -  payload: `serialize.block_to_bytes(block)`

All integers little-endian. The checksum is zlib's crc32, not blake2b: it only has to catch accidents (torn
writes, bit rot), not tampering, it is 4 bytes, and it runs at ~2 GB/s against blake2b's ~0.6 GB/s, so
verifying a 2 MiB Mixtral-8x7B bf16 block costs about 1 ms. (sha256 is fast only on CPUs with SHA
instructions.)
"""

import struct
import zlib

import torch

from memory.serialize import Buffer, block_from_bytes, block_nbytes, block_to_bytes, dtype_from_name, dtype_name

MAGIC = b"MSEMKVB\x00"
VERSION = 1
MAX_NDIM = 8
_FIELDS = struct.Struct(f"<8sHB16s32s{MAX_NDIM}QQ")  # everything the checksum covers before the payload
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 135


class CorruptBlockFileError(ValueError):
    """A block file that must not be trusted; the message says which check failed."""


def encode_block_file(block_hash: bytes, block: torch.Tensor) -> bytes:
    """Header plus payload for `block`, named `block_hash` (a 32-byte digest)."""
    if len(block_hash) != 32:
        raise ValueError(f"a block is named by a 32-byte sha256 digest, got {len(block_hash)} bytes")
    if block.dim() > MAX_NDIM:
        raise ValueError(f"block files hold at most {MAX_NDIM} dims, got shape {list(block.shape)}")
    name = dtype_name(block.dtype).encode("ascii")
    if len(name) > 16:
        raise ValueError(f"dtype name {name!r} does not fit the 16-byte header field")
    payload = block_to_bytes(block)
    shape = list(block.shape) + [0] * (MAX_NDIM - block.dim())
    fields = _FIELDS.pack(MAGIC, VERSION, block.dim(), name, block_hash, *shape, len(payload))
    checksum = zlib.crc32(payload, zlib.crc32(fields))
    return b"".join((fields, _CRC.pack(checksum), payload))


def decode_block_file(data: Buffer, block_hash: bytes) -> torch.Tensor:
    """The block stored in `data`, a whole file expected to name `block_hash`.

    Raises CorruptBlockFileError on anything short of a byte-perfect file; never returns wrong data.
    """
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise CorruptBlockFileError(f"{len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, ndim, name, stored_hash, *rest = _FIELDS.unpack_from(view)
    shape, payload_len = rest[:MAX_NDIM], rest[MAX_NDIM]
    if magic != MAGIC:
        raise CorruptBlockFileError(f"bad magic {magic!r}; not a block file")
    if version != VERSION:
        raise CorruptBlockFileError(f"format version {version}; this reader understands {VERSION}")
    if payload_len != len(view) - HEADER_SIZE:
        raise CorruptBlockFileError(f"header promises {payload_len} payload bytes, file has "
                                    f"{len(view) - HEADER_SIZE} (truncated or overwritten)")
    (checksum,) = _CRC.unpack_from(view, _FIELDS.size)
    payload = view[HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(view[:_FIELDS.size])) != checksum:
        raise CorruptBlockFileError("checksum mismatch")
    if stored_hash != block_hash:
        raise CorruptBlockFileError(f"file holds block {stored_hash.hex()}, expected {block_hash.hex()}")
    if ndim > MAX_NDIM:
        raise CorruptBlockFileError(f"ndim {ndim} exceeds {MAX_NDIM}")
    try:
        dtype = dtype_from_name(name.rstrip(b"\x00").decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptBlockFileError(f"unreadable dtype {name!r}") from e
    shape = shape[:ndim]
    if block_nbytes(dtype, shape) != payload_len:
        raise CorruptBlockFileError(f"{payload_len} payload bytes do not match dtype {dtype} shape {shape}")
    return block_from_bytes(payload, dtype, shape)
