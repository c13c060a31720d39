"""The host-RAM tier (T1) under the device pool: every path gives the output of an engine without it."""

import threading
import time

import pytest
import torch

from engine import SamplingParams
from memory.block_hash import hash_block
from tests.conftest import small_llm
from tests.unit.engine.test_engine_equivalence import prompts

BLOCK_BYTES = 512 * 16  # 2 layers * k/v * 2 kv heads * 16 dims * 4 bytes per token, 16 tokens a block
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True, logprobs=0)
SHARED = prompts(1, seed=11, lo=64, hi=64)[0]  # four full blocks


def tiered(path, host_blocks: int = 64, pool_blocks: int = 12, free_reads: bool = True, **kw):
    """An engine with a host tier whose copies into the pool run on the copier thread (the path with more to go
    wrong; "auto" would copy these small prefixes inline). With `free_reads` its reads are measured as free:
    most tests here are about equivalence, so each takes the load paths it means to, whatever a copy costs on a
    busy machine."""
    llm = small_llm(path, kv_cache_memory=BLOCK_BYTES * pool_blocks, max_model_len=128,
                    host_kv_cache_memory=BLOCK_BYTES * host_blocks, **kw)
    llm.engine.tiers.host_loads = "async"
    for n in range(1, 33) if free_reads else ():
        llm.engine.tiers.cost.observe_fetch("host", n, 0.0)
    return llm


def evict_device_pool(llm) -> None:
    """Fill the pool with other prompts until none of SHARED's blocks is left in it."""
    llm.generate(prompt_token_ids=prompts(3, seed=12, lo=100, hi=100), sampling_params=GREEDY)
    kv, parent = llm.engine.scheduler.kv, None
    for i in range(len(SHARED) // 16):
        parent = hash_block(parent, SHARED[i * 16:(i + 1) * 16], kv.keyspace_root)
        assert kv.pool.lookup(parent) is None


def same(got, want) -> None:
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp = [[p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in (a, b)]
        assert torch.allclose(torch.tensor(lp[0]), torch.tensor(lp[1]), atol=1e-4)


@pytest.fixture(scope="module")
def cold(mixtral_full_dir):
    return small_llm(mixtral_full_dir, enable_prefix_caching=False)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_blocks_evicted_from_the_pool_are_reloaded_from_host_ram(mixtral_full_dir, cold, params):
    llm = tiered(mixtral_full_dir)
    batch = [SHARED + [7, 8, 9], SHARED + [10]]
    want = cold.generate(prompt_token_ids=batch, sampling_params=params)
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    got = llm.generate(prompt_token_ids=batch, sampling_params=params)
    assert [o.num_cached_tokens for o in got] == [64, 64]
    assert llm.engine.tiers.num_loaded["host"] >= 4
    same(got, want)


def test_a_miss_and_a_partial_hit_match_the_engine_without_tiers(mixtral_full_dir, cold):
    llm = tiered(mixtral_full_dir, host_blocks=64)
    llm.generate(prompt_token_ids=[SHARED[:32] + [5]], sampling_params=GREEDY)  # two blocks of SHARED
    evict_device_pool(llm)
    batch = [SHARED + [7], prompts(1, seed=13, lo=40, hi=40)[0]]
    got = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert [o.num_cached_tokens for o in got] == [32, 0]  # partial hit from host RAM; a miss
    same(got, cold.generate(prompt_token_ids=batch, sampling_params=GREEDY))


def test_a_host_tier_smaller_than_the_evictions_keeps_its_limit_and_its_answers(mixtral_full_dir, cold):
    llm = tiered(mixtral_full_dir, host_blocks=3)
    batch = prompts(6, seed=14, lo=60, hi=90)
    for _ in range(2):
        same(llm.generate(prompt_token_ids=batch, sampling_params=GREEDY),
             cold.generate(prompt_token_ids=batch, sampling_params=GREEDY))
    host = llm.engine.tiers.host.stats()
    assert host["evictions"] > 0 and host["used_bytes"] <= 3 * BLOCK_BYTES


def test_a_preempted_request_resumes_from_host_ram(mixtral_full_dir):
    batch = prompts(6, seed=5, lo=20, hi=40)
    params = [SamplingParams(max_tokens=48, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)]
    expected = small_llm(mixtral_full_dir).generate(prompt_token_ids=batch, sampling_params=params)
    # as test_engine_equivalence's preemption test, plus T1
    small = small_llm(mixtral_full_dir, kv_cache_memory=512 * 176, max_model_len=128, host_kv_cache_memory=1 << 20)
    preemptions, original = [], small.engine.scheduler._preempt
    small.engine.scheduler._preempt = lambda req: (preemptions.append(req.request_id), original(req))
    got = small.generate(prompt_token_ids=batch, sampling_params=params)
    assert preemptions, "the KV budget was meant to force preemption"
    assert small.engine.stats().num_requests_waiting == 0
    assert small.engine.tiers.num_loaded["host"] > 0, "a preempted request was meant to reload its blocks"
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_with_a_sliding_window_only_the_window_is_loaded(mixtral_dir):
    """Window 24: after a 64-token prefix only the last block (and the one before it) can be seen."""
    want = small_llm(mixtral_dir, enable_prefix_caching=False)
    llm = tiered(mixtral_dir)
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    got = llm.generate(prompt_token_ids=[SHARED + [7, 8]], sampling_params=GREEDY)
    assert got[0].num_cached_tokens == 64 and llm.engine.tiers.num_loaded["host"] == 2
    same(got, want.generate(prompt_token_ids=[SHARED + [7, 8]], sampling_params=GREEDY))


def test_a_tier_slower_than_recomputing_is_not_read(mixtral_full_dir):
    llm = tiered(mixtral_full_dir, free_reads=False)
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    cost = llm.engine.tiers.cost
    for n in (1, 4):
        cost.observe_fetch("host", n, 10.0 * n)  # measured: 10 s a block
    loaded = llm.engine.tiers.num_loaded["host"]
    got = llm.generate(prompt_token_ids=[SHARED + [7]], sampling_params=GREEDY)
    assert got[0].num_cached_tokens == 0 and llm.engine.tiers.num_loaded["host"] == loaded


def _held_copy(llm):
    """Make the tiers' copies from host RAM wait for `go.set()`; -> (go, started): set when a copy begins."""
    tiers, go, started = llm.engine.tiers, threading.Event(), threading.Event()
    copy = tiers._copy

    def held(*args):
        started.set()
        assert go.wait(30), "the test never let the copy go"
        copy(*args)

    tiers._copy = held
    return go, started


def test_other_requests_step_while_a_prefix_is_copied_from_host_ram(mixtral_full_dir, cold):
    llm = tiered(mixtral_full_dir)
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    go, started = _held_copy(llm)
    engine, other = llm.engine, prompts(1, seed=21, lo=20, hi=20)[0]
    loaded = engine.tiers.num_loaded["host"]
    engine.add_request("other", other, GREEDY)
    engine.add_request("shared", SHARED + [7], GREEDY)
    outputs: dict[str, list[int]] = {"other": [], "shared": []}
    for _ in range(6):  # the shared prefix's copy is held: the other request decodes meanwhile
        for out in engine.step():
            outputs[out.request_id] += out.outputs[0].token_ids
    assert started.is_set() and len(outputs["other"]) >= 5 and outputs["shared"] == []
    (loading,) = [r for r in engine.scheduler.waiting if r.request_id.startswith("shared")]
    assert loading.is_loading_kv and all(engine.scheduler.kv.pool.lookup(h) is None for h in loading.block_hashes)
    go.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.outputs[0].token_ids
    want = cold.generate(prompt_token_ids=[other, SHARED + [7]], sampling_params=GREEDY)
    assert [outputs["other"], outputs["shared"]] == [w.outputs[0].token_ids for w in want]
    assert engine.tiers.num_loaded["host"] - loaded == 4  # SHARED's four blocks


def test_an_abort_while_the_prefix_is_copied_waits_for_the_copy_and_names_nothing(mixtral_full_dir):
    llm = tiered(mixtral_full_dir)
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    go, started = _held_copy(llm)
    engine, kv = llm.engine, llm.engine.scheduler.kv
    engine.add_request("shared", SHARED + [7], GREEDY)
    engine.step()
    assert started.wait(10)
    (loading,) = engine.scheduler.waiting
    hashes = list(loading.block_hashes)
    threading.Timer(0.2, go.set).start()
    began = time.monotonic()
    assert engine.abort_request("shared")
    assert time.monotonic() - began >= 0.15  # it waited for the copy before giving the blocks back
    assert kv.pool.num_free == kv.pool.num_blocks and all(kv.pool.lookup(h) is None for h in hashes)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("mode", ["inline", "async"])
def test_inline_and_async_copies_give_the_same_answers(mixtral_full_dir, cold, mode):
    llm = tiered(mixtral_full_dir)
    llm.engine.tiers.host_loads = mode
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    got = llm.generate(prompt_token_ids=[SHARED + [7, 8, 9], SHARED + [10]], sampling_params=SEEDED)
    assert [o.num_cached_tokens for o in got] == [64, 64]
    same(got, cold.generate(prompt_token_ids=[SHARED + [7, 8, 9], SHARED + [10]], sampling_params=SEEDED))


def test_auto_copies_async_only_when_the_copy_outlasts_half_a_step(mixtral_full_dir):
    tiers = tiered(mixtral_full_dir, free_reads=False).engine.tiers
    tiers.host_loads = "auto"
    assert not tiers._copies_async(64)  # nothing measured yet: inline
    for n, seconds in ((1, 0.011), (4, 0.014)):  # fitted: 10 ms + 1 ms a block
        tiers.cost.observe_fetch("host", n, seconds)
    tiers.step_s = None
    for _ in range(3):
        tiers.observe_step(0.040)
    assert tiers.step_s == pytest.approx(0.040)
    assert not tiers._copies_async(8)  # 18 ms < 20 ms
    assert tiers._copies_async(16)  # 26 ms > 20 ms
