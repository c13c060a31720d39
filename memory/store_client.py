"""An attention shard's side of the shared MemoryStore (T2): reads that degrade to misses, writes that never
block the engine.

Design note. The store is an optimisation: when it is down, slow, or answers garbage, the shard recomputes and
no request fails. So every read is bounded by the caller's timeout, and any failure (an exception, a timeout,
a block whose checksum, name, dtype or shape is wrong) is a miss. After a failed call the client stops calling
for `backoff_s` (a circuit breaker), so that a dead store costs one timeout, not one per request. Writes go
through a bounded queue to one sender thread, batched; when the queue is full new blocks are dropped and
counted, never waited for.

Blocks travel in the block-file format (`block_file`): a header naming the block, then the payload, under one
crc32; the receiver checks it and the block's geometry, so a block damaged anywhere between two shards is
caught. (What is not caught: an intact block of the right shape filed under another block's name. Names are
over tokens, not KV values, so only recomputing could tell; the store is trusted not to misfile.)

`call(method, *args)` performs one call on the store and raises on failure; the actor layer builds it from a
Ray or Serve handle with its timeout, so this module never imports Ray.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from memory.block_file import CorruptBlockFileError, decode_block_file, encode_block_file

logger = logging.getLogger(__name__)

_BATCH_BLOCKS = 32  # blocks per write call


class StoreClient:
    def __init__(self, call: Callable, block_shape: Sequence[int], dtype: torch.dtype, backoff_s: float = 5.0,
                 max_queued_blocks: int = 1024):
        self.call = call
        self.block_shape, self.dtype = tuple(block_shape), dtype
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self._queue: queue.Queue = queue.Queue(max_queued_blocks)
        self._counts = {"lookups": 0, "hits": 0, "errors": 0, "corrupt": 0, "dropped": 0, "bytes_in": 0,
                        "bytes_out": 0}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="msem-kv-store-writer", daemon=True)
        self._sender.start()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain the store holds (0 when it is unavailable)."""
        if not hashes:
            return 0
        self._count("lookups")
        found = self._call("contains_prefix", list(hashes))
        return found if isinstance(found, int) and 0 <= found <= len(hashes) else 0

    def get(self, hashes: Sequence[bytes]) -> list[torch.Tensor]:
        """The leading blocks of the chain the store returns intact; stops at the first missing or bad one."""
        answer = self._call("get_blocks", list(hashes)) or []
        blocks = []
        for block_hash, data in zip(hashes, answer):
            block = self._decode(block_hash, data)
            if block is None:
                break
            blocks.append(block)
            self._count("bytes_in", len(data))
        self._count("hits", len(blocks))
        return blocks

    def offer(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        """Queue blocks for the store; drops (and counts) what does not fit. Never blocks."""
        for block_hash, block in items:
            if not self.available:
                self._count("dropped")
                continue
            try:
                self._queue.put_nowait((block_hash, block))
            except queue.Full:
                self._count("dropped")

    def report(self, shard_id: str, stats: dict) -> None:
        """Push the shard's own tier stats, which the store shows in `/v1/memory`."""
        self._call("report_shard", shard_id, stats)

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "available": self.available, "queued": self._queue.qsize()}

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (for at most `timeout_s`), then stop."""
        self._closed.set()
        self._sender.join(timeout=timeout_s)

    def _decode(self, block_hash: bytes, data) -> torch.Tensor | None:
        if data is None:
            return None
        try:
            block = decode_block_file(data, block_hash)
        except (CorruptBlockFileError, TypeError, ValueError) as error:
            self._count("corrupt")
            logger.warning("memory store sent a bad block (%s): computing it instead", error)
            return None
        if tuple(block.shape) != self.block_shape or block.dtype != self.dtype:
            self._count("corrupt")
            logger.warning("memory store sent a block of %s %s, expected %s %s: computing it instead",
                           block.dtype, list(block.shape), self.dtype, list(self.block_shape))
            return None
        return block

    def _call(self, method: str, *args):
        if not self.available:
            return None
        try:
            return self.call(method, *args)
        except Exception as error:  # any failure of an optional component is a miss
            self._down_until = time.monotonic() + self.backoff_s
            self._count("errors")
            logger.warning("memory store unavailable (%s: %s); recomputing, next try in %.0f s",
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "", self.backoff_s)
            return None

    def _send_loop(self) -> None:
        while not (self._closed.is_set() and self._queue.empty()):
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < _BATCH_BLOCKS and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            payload = [(h, encode_block_file(h, b)) for h, b in batch]
            if self._call("put_blocks", payload) is not None:
                self._count("bytes_out", sum(len(d) for _, d in payload))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n
