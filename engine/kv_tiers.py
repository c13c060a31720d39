"""The device block pool's (T0) link to the tiers below it: this shard's host RAM (T1) and the shared
MemoryStore (T2).

Design note (after SGLang's HiCache and vLLM's KV connector). Blocks move down when they would otherwise be
lost and up when a request can use them:

* down: a cached block the pool is about to reuse (`BlockPool.on_evict`) is copied to T1 first, while its
  content is intact, so a preempted request or a returning chat finds it there instead of recomputing it.
  With T2, blocks reach the shared store by the write policy: "write-through" and "hit-twice" offer each
  block when it is computed (the store keeps only twice-offered blocks under "hit-twice"), so other shards
  can reuse it at once; "write-back" offers a block only when T1 evicts it.
* up, T1: at admission the prefix may use T1's blocks where the pool lacks them; those blocks are copied into
  fresh pool blocks (host to device). A long copy runs on a copier thread (a side CUDA stream on GPUs) while
  the engine steps the other requests: the request waits (`Request.is_loading_kv`) holding its blocks, which
  are named in the prefix cache only once the copy is done (`HostLoad`), so no other request can read them
  half-written; freeing the request (an abort) first waits for its copy. Waiting costs the request the rest
  of a step, so a short copy runs inline instead. `host_loads` "auto" decides per load: async when the copy,
  predicted from the fitted host line (`FetchCost`), takes longer than half the engine's mean step; inline
  when it is shorter or not measured yet. On CPU a copy is a memcpy (32 MiB in about 7 ms here) that also
  competes with the step for the same cores, so it is nearly always inline (benchmarks/host_load_overlap.py).
* up, T2: when a request arrives, a loader thread asks the store for the chain's blocks past T0 and T1 and
  puts them in T1; the request waits (`Request.is_loading_kv`) while other requests keep stepping, then is
  admitted through the T1 path above. A store that is down or slow costs a miss (see `StoreClient`).

Every read is decided by `FetchCost`: a tier is used only when loading the blocks is measured to be faster
than recomputing their tokens.

Legend: L layers, B block_size, g kv heads, d head_dim; a block is [L, 2, B, g, d].
"""

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from memory.fetch_cost import FetchCost
from memory.host_tier import HostTier
from memory.store_client import StoreClient
from memory.tiered_store import WritePolicy

logger = logging.getLogger(__name__)
HostLoads = Literal["auto", "inline", "async"]


@dataclass
class HostLoad:
    """A copy from host RAM into a request's pool blocks, in flight: `blocks` are (pool block, name) pairs to
    name in the prefix cache once `done` has finished."""

    done: Future
    blocks: list[tuple[int, bytes]]


class KVTiers:
    def __init__(self, kv_cache: torch.Tensor, block_size: int, host: HostTier,
                 store: StoreClient | None = None, write_policy: WritePolicy = "write-back",
                 host_loads: HostLoads = "auto"):
        """`host_loads`: how T1 blocks are copied into the pool: "auto" (see the module note), "inline" (on the
        engine thread) or "async" (on the copier thread)."""
        self.kv_cache = kv_cache  # [L, 2, S, g, d], S = num_blocks * B
        self.block_size = block_size
        self.host, self.store, self.write_policy = host, store, write_policy
        self.cost = FetchCost(block_size)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="msem-kv-loader") if store is not None else None
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="msem-kv-copier")  # T1 -> pool
        self.host_loads = host_loads
        self.step_s: float | None = None  # the engine's mean step time (an exponential moving average)
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self.num_loaded = {"host": 0, "store": 0}  # blocks brought up per tier, since start
        self._loaded = threading.Event()

    def block(self, block_id: int) -> torch.Tensor:
        """A view of one pool block: [L, 2, B, g, d]."""
        return self.kv_cache[:, :, block_id * self.block_size:(block_id + 1) * self.block_size]

    # ---- down ----

    def computed(self, pairs: Sequence[tuple[int, bytes]]) -> None:
        """Blocks that just became full and cached in the pool."""
        if self.store is not None and self.write_policy != "write-back":
            self.store.offer([(h, self.block(b).to("cpu", copy=True)) for b, h in pairs])

    def evicted(self, pairs: Sequence[tuple[int, bytes]]) -> None:
        """Cached pool blocks about to be overwritten: copy them to T1; T1's own evictions go on to T2."""
        for block_id, block_hash in pairs:
            spilled = self.host.put(block_hash, self.block(block_id))
            if self.store is not None and self.write_policy == "write-back":
                self.store.offer(spilled)

    # ---- up ----

    def host_has(self, block_hash: bytes) -> bool:
        return block_hash in self.host

    def host_blocks(self, hashes: Sequence[bytes], pool_ids: Sequence[int | None]) -> dict[int, torch.Tensor]:
        """index -> block, for the blocks of `hashes` not in the pool (`pool_ids[i]` None) that T1 holds. The
        blocks are taken now: a loader thread may evict them from T1 before they are copied in."""
        found = {}
        for i, (block_hash, pool_id) in enumerate(zip(hashes, pool_ids)):
            if pool_id is None and block_hash in self.host:
                block = self.host.get(block_hash)
                if block is not None:
                    found[i] = block
        return found

    def worth_loading(self, num_blocks: int) -> bool:
        return self.cost.blocks_worth_fetching("host", num_blocks) > 0

    def load(self, req, block_ids: Sequence[int], blocks: Sequence[torch.Tensor], hashes: Sequence[bytes]) -> None:
        """Copy blocks taken from T1 (`host_blocks`) into the request's fresh pool blocks `block_ids`, to be named
        `hashes`, on the copier thread; the request waits (`req.is_loading_kv`) and holds `req.host_load` until
        the engine takes it (`KVCacheManager.finish_load`). The copy is timed for `FetchCost`."""
        after = None
        if self._stream is not None:  # the side stream starts after what the engine queued (e.g. evictions)
            after = torch.cuda.Event()
            after.record()
        req.is_loading_kv = True
        if self._copies_async(len(blocks)):
            done = self._copier.submit(self._copy, req, list(block_ids), list(blocks), after)
        else:
            done = Future()
            self._copy(req, list(block_ids), list(blocks), after)
            done.set_result(None)
        req.host_load = HostLoad(done, list(zip(block_ids, hashes)))

    def _copies_async(self, num_blocks: int) -> bool:
        if self.host_loads != "auto":
            return self.host_loads == "async"
        predicted = self.cost.fetch_seconds("host", num_blocks)
        return predicted is not None and self.step_s is not None and predicted > self.step_s / 2

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else self.step_s + 0.2 * (seconds - self.step_s)

    def _copy(self, req, block_ids: list[int], blocks: list[torch.Tensor], after) -> None:
        try:
            start = time.perf_counter()
            if self._stream is None:
                for block_id, block in zip(block_ids, blocks):
                    self.block(block_id).copy_(block)
            else:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(after)
                    for block_id, block in zip(block_ids, blocks):
                        self.block(block_id).copy_(block, non_blocking=self.host.is_pinned)
                self._stream.synchronize()
            self.cost.observe_fetch("host", len(blocks), time.perf_counter() - start)
            self.num_loaded["host"] += len(blocks)
        finally:
            req.is_loading_kv = False
            self._loaded.set()

    def prefetch(self, req, hashes: Sequence[bytes]) -> None:
        """Bring `hashes` (blocks the request could use that T0 and T1 lack, in order) from T2 into T1 on the
        loader thread; the store returns the leading ones it has. The request waits (`req.is_loading_kv`) until
        that ends, however it ends."""
        if self._loader is None or not hashes or not self.store.available:
            return
        req.is_loading_kv = True
        self._loader.submit(self._fetch, req, list(hashes))

    def _fetch(self, req, hashes: list[bytes]) -> None:
        try:
            hashes = [h for h in hashes if h not in self.host]  # an earlier load (same prefix) got them
            if not hashes:
                return
            start = time.perf_counter()
            present = self.store.lookup(hashes)
            wanted = self.cost.blocks_worth_fetching("store", present)
            if wanted:
                blocks = self.store.get(hashes[:wanted])
                self.cost.observe_fetch("store", len(blocks), time.perf_counter() - start)
                for block_hash, block in zip(hashes, blocks):
                    self.host.put(block_hash, block)
                self.num_loaded["store"] += len(blocks)
        except Exception:  # never leave a request waiting on a failed load: it recomputes
            logger.exception("loading KV blocks from the memory store failed; recomputing them")
        finally:
            req.is_loading_kv = False
            self._loaded.set()

    def wait_for_load(self, timeout_s: float) -> None:
        """Block until a load ends or `timeout_s` passes (the engine has nothing else to run)."""
        self._loaded.wait(timeout_s)
        self._loaded.clear()

    def observe_compute(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe_compute(num_tokens, seconds)

    def stats(self) -> dict:
        return {"host": self.host.stats(), "store": None if self.store is None else self.store.stats(),
                "loaded_blocks": dict(self.num_loaded), "write_policy": self.write_policy,
                "cost": self.cost.describe()}

    def close(self) -> None:
        self._copier.shutdown(wait=True)  # a copy writes into the pool: let it end
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()
