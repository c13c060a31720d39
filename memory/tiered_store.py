"""The block store a MemoryStore server wraps: host RAM in front of an optional disk, under a write policy.

Design note. Reads go down the tiers: RAM, then disk; a disk hit is promoted into RAM, since a block read
once is likely read again (the next request with the same system prompt). Writes follow the policy:

* "write-through": a put goes to RAM and to disk at once. Disk holds everything RAM holds, so a crash or a
  RAM eviction loses nothing; the cost is a disk write per put.
* "write-back": a put goes to RAM only; a block is written to disk when RAM evicts it. Disk writes happen
  only for blocks that were worth keeping until RAM filled up.
* "hit-twice": a block is stored only the second time it is offered, then as write-back. One-off prompts
  never displace shared prefixes. The names offered once are remembered in a bounded LRU set, so a flood
  of unique blocks costs bounded memory (and only delays admission of a block whose first offer fell out).

Under every policy one rule moves blocks down: a block evicted from RAM is written to disk unless disk
already holds it (after write-through it usually does).

Prefix semantics: a block's KV is only usable when every block before it in the sequence is present too
(the hash chain in `block_hash`), so `get_many` and `contains_prefix` walk a chain from its start and stop
at the first miss.
"""

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

from memory.disk_tier import DiskTier
from memory.host_tier import HostTier

WritePolicy = Literal["write-through", "write-back", "hit-twice"]


class TieredStore:
    def __init__(self, ram: HostTier, disk: DiskTier | None = None, policy: WritePolicy = "write-back",
                 max_offered_once: int = 65_536):
        if policy not in get_args(WritePolicy):
            raise ValueError(f"unknown write policy {policy!r}; choose one of {', '.join(get_args(WritePolicy))}")
        if max_offered_once < 1:
            raise ValueError(f"max_offered_once must be >= 1, got {max_offered_once}")
        self.ram = ram
        self.disk = disk
        self.policy = policy
        self.max_offered_once = max_offered_once
        self._offered_once: OrderedDict[bytes, None] = OrderedDict()  # hit-twice only; LRU first
        self._lock = threading.Lock()  # guards _offered_once; each tier locks itself

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.ram or (self.disk is not None and block_hash in self.disk)

    def contains_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain are stored (in any tier), without loading any."""
        for i, block_hash in enumerate(hashes):
            if block_hash not in self:
                return i
        return len(hashes)

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        """The block from RAM, else from disk (promoted into RAM), else None."""
        block = self.ram.get(block_hash)
        if block is not None or self.disk is None:
            return block
        block = self.disk.get(block_hash)
        if block is not None:
            self._spill(self.ram.put(block_hash, block))
        return block

    def get_many(self, hashes: Sequence[bytes]) -> list[torch.Tensor | None]:
        """One entry per hash; from the first miss on every entry is None and is not looked up.

        Example: [a, b, c, d] with c missing -> [A, B, None, None]; d is not read even if stored, because
        without c its KV is unusable.
        """
        blocks: list[torch.Tensor | None] = [None] * len(hashes)
        for i, block_hash in enumerate(hashes):
            blocks[i] = self.get(block_hash)
            if blocks[i] is None:
                break
        return blocks

    def put(self, block_hash: bytes, block: torch.Tensor) -> None:
        """Offer a block to the store; the policy decides whether and where it is kept."""
        if self.policy == "hit-twice" and block_hash not in self and not self._offered_before(block_hash):
            return
        if self.policy == "write-through" and self.disk is not None:
            self.disk.put(block_hash, block)
        self._spill(self.ram.put(block_hash, block))

    def put_many(self, items: Iterable[tuple[bytes, torch.Tensor]]) -> None:
        for block_hash, block in items:
            self.put(block_hash, block)

    def stats(self) -> dict:
        return {"policy": self.policy, "ram": self.ram.stats(),
                "disk": self.disk.stats() if self.disk is not None else None,
                "offered_once": len(self._offered_once)}

    def _offered_before(self, block_hash: bytes) -> bool:
        """Record an offer; True if this name was offered before (and is still remembered)."""
        with self._lock:
            if block_hash in self._offered_once:
                del self._offered_once[block_hash]
                return True
            self._offered_once[block_hash] = None
            if len(self._offered_once) > self.max_offered_once:
                self._offered_once.popitem(last=False)
            return False

    def _spill(self, evicted: list[tuple[bytes, torch.Tensor]]) -> None:
        """Write blocks RAM let go of down to disk, unless disk already holds them."""
        if self.disk is None:
            return
        for block_hash, block in evicted:
            if block_hash not in self.disk:
                self.disk.put(block_hash, block)
