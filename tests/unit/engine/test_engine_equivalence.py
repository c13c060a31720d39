"""Every cache, chunking, batching and scheduling path against the single-pass reference (DESIGN §4)."""

import random

import pytest
import torch

from engine import LLM, SamplingParams
from mistral.checkpoint import CheckpointReader
from mistral.model import reference_forward
from mistral.weights import load_model

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def make_llm(path, **kw) -> LLM:
    return LLM(str(path), tokenizer="v1", dtype="float32", progress=False, **kw)


def sampled_logprobs(completion) -> list[float]:
    return [pos[tok].logprob for pos, tok in zip(completion.logprobs, completion.token_ids)]


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    return load_model(CheckpointReader(mixtral_dir), torch.float32, progress=False)


@pytest.fixture(scope="module")
def llm(mixtral_dir):
    return make_llm(mixtral_dir)


def test_incremental_decode_equals_one_pass_rescoring(llm, reference):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, logprobs=0)
    for prompt in prompts(3, seed=1):
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
        full = reference_forward(reference, [prompt + out.token_ids])[0].log_softmax(-1)
        rescored = full[len(prompt) - 1:-1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(sampled_logprobs(out)), rescored, atol=1e-4)


def test_prompt_logprobs_equal_reference(llm, reference):
    prompt = prompts(1, seed=2, lo=50, hi=50)[0]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=3))
    got = [pos[tok].logprob for pos, tok in zip(out[0].prompt_logprobs[1:], prompt[1:])]
    full = reference_forward(reference, [prompt])[0].log_softmax(-1)
    expected = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert out[0].prompt_logprobs[0] is None and len(got) == len(prompt) - 1
    assert torch.allclose(torch.tensor(got), expected, atol=1e-4)
    assert all(len(pos) >= 3 for pos in out[0].prompt_logprobs[1:])


@pytest.mark.parametrize("chunk", [7, 16, 33])
def test_chunked_prefill_equals_unchunked(mixtral_dir, llm, chunk):
    batch = prompts(4, seed=3, lo=40, hi=90)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    whole = llm.generate(prompt_token_ids=batch, sampling_params=params)
    chunked = make_llm(mixtral_dir, max_num_batched_tokens=chunk).generate(prompt_token_ids=batch,
                                                                          sampling_params=params)
    for a, b in zip(whole, chunked):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        pa = [p[t].logprob for p, t in zip(a.prompt_logprobs[1:], a.prompt_token_ids[1:])]
        pb = [p[t].logprob for p, t in zip(b.prompt_logprobs[1:], b.prompt_token_ids[1:])]
        assert torch.allclose(torch.tensor(pa), torch.tensor(pb), atol=1e-4)


def test_mixed_batch_equals_each_alone(llm):
    batch = prompts(6, seed=4, lo=3, hi=70)
    together = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    for prompt, joint in zip(batch, together):
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
        assert alone.outputs[0].token_ids == joint.outputs[0].token_ids
        assert torch.allclose(torch.tensor(sampled_logprobs(alone.outputs[0])),
                              torch.tensor(sampled_logprobs(joint.outputs[0])), atol=1e-5)


def test_preempted_and_resumed_equals_uninterrupted(mixtral_dir, llm):
    batch = prompts(6, seed=5, lo=20, hi=40)
    params = [SamplingParams(max_tokens=48, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)]
    expected = llm.generate(prompt_token_ids=batch, sampling_params=params)
    # 2 KV heads * 16 dims * 2 (k, v) * 2 layers * 4 bytes = 512 bytes per token: room for ~170 tokens.
    small = make_llm(mixtral_dir, kv_cache_memory=512 * 176, max_model_len=128, enable_prefix_caching=False)
    preemptions = []
    scheduler = small.engine.scheduler
    original = scheduler._preempt
    scheduler._preempt = lambda req: (preemptions.append(req.request_id), original(req))
    got = small.generate(prompt_token_ids=batch, sampling_params=params)
    assert preemptions, "the KV budget was meant to force preemption"
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_prefix_cache_hit_equals_miss(mixtral_dir, llm):
    shared = prompts(1, seed=6, lo=64, hi=64)[0]
    batch = [shared + [7, 8, 9], shared + [10, 11]]
    cold = make_llm(mixtral_dir, enable_prefix_caching=False).generate(prompt_token_ids=batch,
                                                                       sampling_params=GREEDY)
    llm.generate(prompt_token_ids=[shared + [12]], sampling_params=GREEDY)  # warms the cache
    warm = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert all(o.num_cached_tokens == 64 for o in warm)
    for a, b in zip(cold, warm):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(sampled_logprobs(a.outputs[0])),
                              torch.tensor(sampled_logprobs(b.outputs[0])), atol=1e-4)


def test_seeded_sampling_is_reproducible_in_different_batches(llm):
    target = prompts(1, seed=7)[0]
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[target], sampling_params=params)[0].outputs[0].token_ids
    others = prompts(5, seed=8)
    mixed = others[:2] + [target] + others[2:]
    unseeded = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
    got = llm.generate(prompt_token_ids=mixed, sampling_params=[unseeded] * 2 + [params] + [unseeded] * 3)
    assert got[2].outputs[0].token_ids == alone
    differently_seeded = llm.generate(prompt_token_ids=[target], sampling_params=SamplingParams(
        max_tokens=30, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))
    assert differently_seeded[0].outputs[0].token_ids != alone


def test_n_samples_share_prompt_blocks_and_equal_separate_requests(llm):
    prompt = prompts(1, seed=9, lo=70, hi=70)[0]
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        single = SamplingParams(max_tokens=10, temperature=1.0, seed=params.sample_seed(i), ignore_eos=True)
        assert llm.generate(prompt_token_ids=[prompt], sampling_params=single)[0].outputs[0].token_ids == \
            completion.token_ids


def test_siblings_reuse_the_first_samples_prompt_blocks(mixtral_full_dir):
    llm = make_llm(mixtral_full_dir)
    prompt = prompts(1, seed=10, lo=64, hi=64)[0]
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=4, temperature=1.0, ignore_eos=True))
    engine.step()  # sample 0 prefills alone; its full blocks are now cached
    engine.step()  # the siblings join and hit them
    seqs = [engine._requests["r"].samples[i].seq for i in range(3)]
    shared = [b for b in seqs[0].block_ids[:3]]
    assert all(s.block_ids[:3] == shared for s in seqs)
    assert all(engine.scheduler.kv.pool.refcount(b) == 3 for b in shared)


def test_sliding_window_keeps_block_count_bounded(mixtral_dir):
    llm = make_llm(mixtral_dir, block_size=4)  # window 24
    engine = llm.engine
    engine.add_request("long", prompts(1, seed=11, lo=30, hi=30)[0],
                       SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        if "long" in engine._requests:
            seq = engine._requests["long"].samples[0].seq
            most = max(most, sum(b is not None for b in seq.block_ids))
    assert most <= -(-24 // 4) + 2  # window blocks + the partial block + the one being written
    assert engine.scheduler.kv.pool.num_free == engine.scheduler.kv.pool.num_blocks


def test_stream_deltas_concatenate_to_full_text(tiny_llm):
    llm = tiny_llm
    tok = llm.get_tokenizer()
    prompt = "Grüße, 世界! 🙂 naïve café"
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=8, ignore_eos=True)
    deltas = list(llm.stream(prompt, params))
    streamed = "".join(c.text for d in deltas for c in d.outputs)
    ids = [t for d in deltas for c in d.outputs for t in c.token_ids]
    full = llm.generate(prompt, params)[0].outputs[0]
    assert ids == full.token_ids and streamed == full.text == tok.decode(full.token_ids, continues_text=True)
    assert deltas[-1].finished and "\ufffd" not in streamed or "\ufffd" in full.text


def test_stop_strings_tokens_and_lengths(tiny_llm):
    llm = tiny_llm
    base = llm.generate("Hello there", SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    stop = base.text[5:8]
    cut = llm.generate("Hello there", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[:base.text.index(stop)]
    streamed = "".join(c.text for d in llm.stream("Hello there", SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])) for c in d.outputs)
    assert streamed == cut.text  # the held-back tail never leaks a partial stop string
    token = base.token_ids[4]
    by_token = llm.generate("Hello there", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                          stop_token_ids=[token]))[0].outputs[0]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == token
    assert by_token.token_ids == base.token_ids[:base.token_ids.index(token) + 1]
