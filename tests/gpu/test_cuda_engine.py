"""The CUDA paths (device placement, bf16 default, paged attention on GPU) against the CPU fp32 reference."""

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1, 22557, 1117, 264, 1332], [1, 415, 2936, 9060, 285, 1142, 754, 4705]]


def test_cuda_fp32_equals_cpu_fp32():
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    cpu = LLM("tiny", dtype="float32", device="cpu", progress=False).generate(prompt_token_ids=PROMPTS,
                                                                             sampling_params=params)
    gpu = LLM("tiny", dtype="float32", device="cuda", progress=False).generate(prompt_token_ids=PROMPTS,
                                                                              sampling_params=params)
    for a, b in zip(cpu, gpu):
        la = [p[t].logprob for p, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [p[t].logprob for p, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-3)


def test_cuda_defaults_to_bf16_and_generates():
    llm = LLM("tiny", device="cuda", progress=False)
    assert next(llm.engine.model.parameters()).dtype == torch.bfloat16
    out = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_attention_on_a_gpu_leaves_cudnn_out():
    """cuDNN's SDPA builds a plan per new shape: milliseconds of CPU time in every layer of every decode step."""
    from torch.profiler import ProfilerActivity, profile

    llm = LLM("tiny", device="cuda", progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # a prefill step, then decode steps
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    names = [event.name for event in prof.events()]
    assert any("scaled_dot_product" in name for name in names)
    assert not [name for name in names if "cudnn" in name]
