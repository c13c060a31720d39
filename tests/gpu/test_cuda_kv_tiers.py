"""The host-RAM tier (T1) under a GPU's pool: blocks in pinned host RAM, copied back on the engine thread or on a
CUDA stream of the copier's own, give the answers of the same GPU engine without tiers."""

import pytest
import torch

from tests.conftest import small_llm
from tests.unit.engine.test_kv_tiers import GREEDY, SHARED, evict_device_pool, same, tiered

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mode", ["inline", "async"])
def test_blocks_copied_from_pinned_host_ram_give_the_engine_without_tiers_answers(mixtral_full_dir, mode):
    llm = tiered(mixtral_full_dir, device="cuda")
    tiers = llm.engine.tiers
    tiers.host_loads = mode
    assert tiers.kv_cache.is_cuda and tiers.host.is_pinned and tiers._stream is not None
    batch = [SHARED + [7, 8, 9], SHARED + [10]]
    llm.generate(prompt_token_ids=[SHARED + [5]], sampling_params=GREEDY)
    evict_device_pool(llm)
    got = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert [o.num_cached_tokens for o in got] == [64, 64]
    assert tiers.num_loaded["host"] >= 4
    cold = small_llm(mixtral_full_dir, device="cuda", enable_prefix_caching=False)
    same(got, cold.generate(prompt_token_ids=batch, sampling_params=GREEDY))
