"""Our model against Hugging Face transformers on checkpoints transformers wrote (fp32, CPU)."""

import pytest
import torch

from mistral.checkpoint import CheckpointReader
from mistral.model import reference_forward
from mistral.weights import load_model
from tests.conftest import write_hf_checkpoint

CASES = {
    "mixtral-gqa4-window": dict(moe=True, sliding_window=12),
    "mixtral-headdim-theta1e6": dict(moe=True, head_dim=24, rope_theta=1e6),
    "mixtral-tied": dict(moe=True, tie_word_embeddings=True),
    "mixtral-16x-top1": dict(moe=True, num_local_experts=16, num_experts_per_tok=1),
    "mixtral-16x-top4": dict(moe=True, num_local_experts=16, num_experts_per_tok=4),
    "mixtral-4x-top4": dict(moe=True, num_local_experts=4, num_experts_per_tok=4),
    "mistral-dense-window": dict(moe=False, sliding_window=10, num_key_value_heads=4),
    "mistral-dense-mha-tied": dict(moe=False, num_key_value_heads=8, tie_word_embeddings=True),
    "mistral-yarn": dict(moe=False, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 128}),
    "mixtral-linear-rope": dict(moe=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(CheckpointReader(path), torch.float32, progress=False)
    return request.param, path, hf, ours


def test_prompt_logprobs_match_transformers(case):
    _, _, hf, ours = case
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in (37, 5)]
    for ids in prompts:
        with torch.no_grad():
            expected = hf(ids[None]).logits[0].float().log_softmax(-1)
        got = reference_forward(ours, [ids.tolist()])[0].log_softmax(-1)
        assert (got - expected).abs().max().item() < 1e-4


def test_greedy_continuation_matches_transformers(case):
    from engine import LLM, SamplingParams

    name, path, hf, _ = case
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                               attention_mask=torch.ones(1, 20, dtype=torch.long))[0, 20:].tolist()
    llm = LLM(str(path), tokenizer="v1", dtype="float32", progress=False)
    out = llm.generate(prompt_token_ids=[prompt.tolist()],
                       sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected, name
