"""The shared KV tier (T2) in-process: two engines reuse each other's blocks through one `MemoryStore`, which
persists across a restart; a store that fails, stalls or answers garbage costs misses, never an answer."""

import asyncio
import threading
import time

import pytest
import torch

from actors.memory_store import MemoryStore
from engine import SamplingParams
from memory.block_file import encode_block_file
from tests.conftest import small_llm
from tests.unit.engine.test_engine_equivalence import prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True, logprobs=0)
SHARED = prompts(1, seed=21, lo=80, hi=80)[0]  # five full blocks
BATCH = [SHARED + [7, 8], SHARED + [9]]


class Caller:
    """`memory_store_call` over an in-process store, on a loop thread of its own (as a handle would be)."""

    def __init__(self, store: MemoryStore, timeout_s: float = 2.0):
        self.store, self.timeout_s = store, timeout_s
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def __call__(self, method: str, *args):
        future = asyncio.run_coroutine_threadsafe(getattr(self.store, method)(*args), self.loop)
        return future.result(self.timeout_s)


def shard(path, store_call, policy="write-through"):
    return small_llm(path, host_kv_cache_memory=1 << 20, kv_write_policy=policy, memory_store_call=store_call)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.01)


def stored_blocks(store: MemoryStore) -> int:
    return store.store.stats()["ram"]["num_blocks"]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def cold(mixtral_full_dir):
    return small_llm(mixtral_full_dir, enable_prefix_caching=False)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_second_shard_reuses_the_first_ones_blocks_through_the_store(mixtral_full_dir, cold, params):
    store = MemoryStore(ram_bytes=1 << 22)
    first, second = shard(mixtral_full_dir, Caller(store)), shard(mixtral_full_dir, Caller(store))
    first.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    wait_until(lambda: stored_blocks(store) >= 5)  # written through, in the background
    got = second.generate(prompt_token_ids=BATCH, sampling_params=params)
    assert [o.num_cached_tokens for o in got] == [80, 80]
    assert second.engine.tiers.num_loaded["store"] == 5
    assert tokens(got) == tokens(cold.generate(prompt_token_ids=BATCH, sampling_params=params))
    for engine in (first, second):
        engine.shutdown()


def test_the_disk_tier_survives_a_restart_of_the_store(mixtral_full_dir, cold, tmp_path):
    store = MemoryStore(ram_bytes=1 << 22, directory=str(tmp_path), disk_bytes=1 << 22, write_policy="write-through")
    writer = shard(mixtral_full_dir, Caller(store))
    writer.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    wait_until(lambda: store.store.stats()["disk"]["num_blocks"] >= 5)
    writer.shutdown()
    store.shutdown()

    restarted = MemoryStore(ram_bytes=1 << 22, directory=str(tmp_path), disk_bytes=1 << 22)
    assert stored_blocks(restarted) == 0  # RAM is empty: every hit below comes from disk
    reader = shard(mixtral_full_dir, Caller(restarted))
    got = reader.generate(prompt_token_ids=BATCH, sampling_params=GREEDY)
    assert [o.num_cached_tokens for o in got] == [80, 80]
    assert tokens(got) == tokens(cold.generate(prompt_token_ids=BATCH, sampling_params=GREEDY))
    reader.shutdown()


class Broken(MemoryStore):
    """A store that fails in one of three ways; "stalls" holds every read until `released` is set."""

    def __init__(self, mode: str):
        super().__init__(ram_bytes=1 << 22)
        self.mode, self.released = mode, threading.Event()

    async def get_blocks(self, hashes):
        blocks = await super().get_blocks(hashes)
        if self.mode == "raises":
            raise ConnectionError("store unreachable")
        while self.mode == "stalls" and not self.released.is_set():
            await asyncio.sleep(0.05)
        if self.mode == "garbage":  # an intact file of the wrong geometry, then damaged ones
            wrong = [encode_block_file(h, torch.ones(2, 2, 8, 2, 16)) for h in hashes[:1]]
            return wrong + [b[:-1] for b in blocks[1:]]
        return blocks


@pytest.mark.parametrize("mode", ["raises", "stalls", "garbage"])
def test_a_failing_store_costs_misses_never_answers(mixtral_full_dir, cold, mode):
    store = Broken(mode)
    call = Caller(store, timeout_s=0.5)
    first, second = shard(mixtral_full_dir, call), shard(mixtral_full_dir, call)
    first.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    wait_until(lambda: stored_blocks(store) >= 5)
    backstop = threading.Timer(60, store.released.set)  # a shard that waited out the stall would see it end here
    backstop.start()
    try:
        got = second.generate(prompt_token_ids=BATCH, sampling_params=GREEDY)
        held = not store.released.is_set()
    finally:
        backstop.cancel()
        store.released.set()
    assert held, "a stalled store must cost the shard its timeout, not the stall"  # an order, not a time bound
    assert tokens(got) == tokens(cold.generate(prompt_token_ids=BATCH, sampling_params=GREEDY))
    counts = second.engine.tiers.store.stats()
    assert counts["corrupt" if mode == "garbage" else "errors"] >= 1
    assert second.engine.tiers.num_loaded["store"] == 0
    for engine in (first, second):
        engine.shutdown()


def test_describe_shows_the_store_and_what_shards_reported(tmp_path):
    async def main():
        store = MemoryStore(ram_bytes=1 << 20, directory=str(tmp_path / "kv"), disk_bytes=1 << 20)
        await store.report_shard("shard-a", {"device": {"usage": 0.5}})
        info = await store.describe()
        assert info["store"]["ram"]["capacity_bytes"] == 1 << 20 and info["store"]["disk"]["capacity_bytes"] == 1 << 20
        assert info["shards"] == {"shard-a": {"device": {"usage": 0.5}}}
        block = torch.zeros(2, 2, 16, 2, 16)
        good = encode_block_file(b"a" * 32, block)
        assert await store.put_blocks([(b"a" * 32, good), (b"b" * 32, good)]) == 1  # misnamed: refused
        assert (await store.describe())["store"]["refused"] == 1
        store.shutdown()
    asyncio.run(main())
