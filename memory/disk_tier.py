"""The disk tier: one file per KV block in a directory, an LRU index over them, a hard byte budget.

Design note. Layout: `<dir>/<2 hex>/<64 hex>.kvb`, the block's sha256 name in hex, sharded by its first byte
so no directory grows past a few thousand entries. Each file is a `block_file` (header, checksum, payload).

* Atomic writes: a block is written to `.<name>.<random>.tmp` in its shard directory and renamed over the
  final name with `os.replace`, so a reader sees the old file, the new file or none -- never half of one.
  No fsync: a crash can still leave a short or zeroed file, and the checksum turns that into a miss.
* Restart: the index is rebuilt by scanning the directory, LRU order from file mtimes (a hit touches the
  file so the order survives); stray temp files of an interrupted write are removed; if the files exceed
  the capacity (it was lowered), the oldest go.
* Never wrong data: a missing, truncated or corrupt file is a miss, never an exception; a corrupt one is
  deleted and counted in `stats()["corrupt"]`. A failed write (disk full) is a refused put, counted in
  `stats()["write_errors"]`, never an exception either: losing a cache entry only costs recompute.
* Capacity is a hard limit on the sum of file sizes (header included); `put` evicts least recently used
  files until the new one fits, and refuses a block bigger than the whole budget.

One `DiskTier` owns a directory (two processes sharing one would delete each other's temp files). One lock
is held across file I/O: that keeps the index and the directory in step without cleverness, and disk is the
slow path, reached only on a RAM miss or eviction.
"""

import contextlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from memory.block_file import CorruptBlockFileError, decode_block_file, encode_block_file

_SUFFIX = ".kvb"
_SHARD = re.compile(r"[0-9a-f]{2}")
_BLOCK_FILE = re.compile(r"[0-9a-f]{64}\.kvb")
_TEMP_SUFFIX = ".tmp"


class DiskTier:
    def __init__(self, directory: str | os.PathLike, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._files: OrderedDict[bytes, int] = OrderedDict()  # block name -> file size; LRU first
        self._used_bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._bytes_in = self._bytes_out = 0
        self._corrupt = self._write_errors = 0
        self._scan()

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        with self._lock:
            return block_hash in self._files

    def __len__(self) -> int:
        return len(self._files)

    def path(self, block_hash: bytes) -> Path:
        """Where the block named `block_hash` lives (whether or not it is stored)."""
        name = block_hash.hex()
        return self.directory / name[:2] / (name + _SUFFIX)

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        """The stored block as a fresh CPU tensor (marked most recently used), or None."""
        with self._lock:
            if block_hash not in self._files:
                self._misses += 1
                return None
            path = self.path(block_hash)
            try:
                data = path.read_bytes()
                block = decode_block_file(data, block_hash)
            except (CorruptBlockFileError, OSError) as e:  # corrupt, or removed/unreadable behind our back
                self._remove(block_hash)
                self._corrupt += isinstance(e, CorruptBlockFileError)
                self._misses += 1
                return None
            self._mark_used(block_hash)
            self._hits += 1
            self._bytes_out += len(data)
            return block

    def put(self, block_hash: bytes, block: torch.Tensor) -> bool:
        """Write `block` unless it is already stored (then only mark it used). False if it was not stored:
        bigger than the whole capacity, or the write failed (counted in `stats()["write_errors"]`)."""
        with self._lock:
            if block_hash in self._files:
                self._mark_used(block_hash)
                return True
        data = encode_block_file(block_hash, block)
        if len(data) > self.capacity_bytes:
            return False
        path = self.path(block_hash)
        with self._lock:
            if block_hash in self._files:  # another thread wrote it while we encoded
                return True
            self._evict_until(self.capacity_bytes - len(data))
            temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
            try:
                path.parent.mkdir(exist_ok=True)
                temp.write_bytes(data)
                os.replace(temp, path)
            except OSError:  # e.g. the disk is full: a cache degrades to a miss rather than failing the caller
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
                self._write_errors += 1
                return False
            self._files[block_hash] = len(data)
            self._used_bytes += len(data)
            self._bytes_in += len(data)
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"capacity_bytes": self.capacity_bytes, "used_bytes": self._used_bytes,
                    "num_blocks": len(self._files), "hits": self._hits, "misses": self._misses,
                    "evictions": self._evictions, "bytes_in": self._bytes_in, "bytes_out": self._bytes_out,
                    "corrupt": self._corrupt, "write_errors": self._write_errors}

    def _mark_used(self, block_hash: bytes) -> None:
        """Most recently used, in the index and in the file's mtime (the order a restart reads back)."""
        self._files.move_to_end(block_hash)
        with contextlib.suppress(OSError):
            os.utime(self.path(block_hash))

    def _remove(self, block_hash: bytes) -> None:
        self._used_bytes -= self._files.pop(block_hash)
        with contextlib.suppress(OSError):
            self.path(block_hash).unlink(missing_ok=True)

    def _evict_until(self, limit_bytes: int) -> None:
        """Delete least recently used files until at most `limit_bytes` are in use."""
        while self._used_bytes > limit_bytes:
            self._remove(next(iter(self._files)))
            self._evictions += 1

    def _scan(self) -> None:
        """Rebuild the index from the directory: LRU by mtime, temp files removed, capacity enforced."""
        found = []  # (mtime_ns, block name, size)
        for shard in self.directory.iterdir():
            if not (shard.is_dir() and _SHARD.fullmatch(shard.name)):
                continue
            for entry in os.scandir(shard):
                if entry.name.endswith(_TEMP_SUFFIX):
                    os.unlink(entry.path)
                elif _BLOCK_FILE.fullmatch(entry.name) and entry.name.startswith(shard.name):
                    stat = entry.stat()
                    found.append((stat.st_mtime_ns, bytes.fromhex(entry.name[:64]), stat.st_size))
        for _, block_hash, size in sorted(found):
            self._files[block_hash] = size
            self._used_bytes += size
        self._evict_until(self.capacity_bytes)
