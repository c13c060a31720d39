"""Contexts longer than the device pool: older blocks spilled to host RAM and streamed back per layer give the
logprobs of an engine whose pool holds everything."""

import pytest
import torch

from engine import SamplingParams
from engine.errors import EngineConfigError
from tests.conftest import small_llm
from tests.unit.engine.test_engine_equivalence import prompts

BLOCK_BYTES = 512 * 16  # the test checkpoints: 512 bytes of fp32 KV per token, 16 tokens a block


def logprobs(out) -> torch.Tensor:
    c = out.outputs[0]
    return torch.tensor([pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)])


@pytest.mark.parametrize("fixture", ["mixtral_full_dir", "mixtral_dir"], ids=["full attention", "window 24"])
def test_a_pool_8x_smaller_than_the_kv_gives_the_same_logprobs(request, fixture):
    path = request.getfixturevalue(fixture)
    prompt = prompts(1, seed=31, lo=440, hi=440)[0]  # with 72 new tokens: 512 tokens, 32 blocks of KV
    params = [SamplingParams(max_tokens=72, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0),
              SamplingParams(max_tokens=72, temperature=0.8, seed=5, ignore_eos=True, logprobs=0)]
    full = small_llm(path, max_model_len=512)
    small = small_llm(path, max_model_len=512, kv_cache_memory=4 * BLOCK_BYTES, host_kv_cache_memory=32 * BLOCK_BYTES)
    assert small.engine.cache_info.num_blocks == 4
    for p in params:
        want, got = (llm.generate(prompt_token_ids=[prompt], sampling_params=p)[0] for llm in (full, small))
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert torch.allclose(logprobs(got), logprobs(want), atol=1e-4)
        if p.prompt_logprobs is not None:
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for a, b, t in
                       zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], prompt[1:]))
    kv = small.engine.scheduler.kv
    if fixture == "mixtral_full_dir":  # each run kept at most 4 of its 32 blocks in the pool
        assert kv.num_spilled_blocks >= 2 * 28
    else:  # a window keeps only its own blocks: those before it are dropped, not spilled
        assert kv.num_spilled_blocks < 2 * 28
    assert kv.spilled_bytes == 0 and kv.tiers.host.used_bytes <= 32 * BLOCK_BYTES  # given back at the end


def test_two_long_requests_share_the_spill_budget_by_preemption(mixtral_full_dir):
    batch = prompts(2, seed=32, lo=300, hi=300)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = small_llm(mixtral_full_dir, max_model_len=512).generate(prompt_token_ids=batch, sampling_params=params)
    small = small_llm(mixtral_full_dir, max_model_len=512, kv_cache_memory=4 * BLOCK_BYTES,
                      host_kv_cache_memory=32 * BLOCK_BYTES)  # one long request's spill at a time
    got = small.generate(prompt_token_ids=batch, sampling_params=params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_without_enough_host_ram_a_long_context_is_refused_at_start(mixtral_full_dir):
    with pytest.raises(EngineConfigError, match="host_kv_cache_memory at least"):
        small_llm(mixtral_full_dir, max_model_len=512, kv_cache_memory=4 * BLOCK_BYTES,
                  host_kv_cache_memory=8 * BLOCK_BYTES)


def test_a_long_prompt_again_loads_what_fits_and_still_runs(mixtral_full_dir):
    """Its blocks are in host RAM and loading is cheap: the loads leave the pool room for the first chunk (else
    admission would fail, give the blocks back, and try the same again forever)."""
    prompt = prompts(1, seed=33, lo=440, hi=440)[0]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    want = small_llm(mixtral_full_dir, max_model_len=512).generate(prompt_token_ids=[prompt], sampling_params=params)
    small = small_llm(mixtral_full_dir, max_model_len=512, kv_cache_memory=4 * BLOCK_BYTES,
                      host_kv_cache_memory=64 * BLOCK_BYTES)
    small.generate(prompt_token_ids=[prompt], sampling_params=params)
    for n in (1, 2):
        small.engine.tiers.cost.observe_fetch("host", n, 0.0)  # loading is free
    loaded = small.engine.tiers.num_loaded["host"]
    got = small.generate(prompt_token_ids=[prompt], sampling_params=params)
    assert got[0].num_cached_tokens > 0 and small.engine.tiers.num_loaded["host"] > loaded
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert torch.allclose(logprobs(got[0]), logprobs(want[0]), atol=1e-4)
