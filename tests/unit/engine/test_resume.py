"""Resuming a request on another engine (the ingress does this when a shard dies) continues it exactly."""

import pytest

from engine.admission import Resume
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from tests.conftest import small_llm


@pytest.fixture(scope="module")
def llm(mixtral_dir):
    return small_llm(mixtral_dir)


def _run(llm, request_id, ids, params, resume=None):
    """Step one request to the end; returns (text of its deltas, all its token ids, finish reason)."""
    llm.engine.add_request(request_id, ids, params, resume=resume)
    text, tokens, finish = "", [], None
    while llm.engine.has_unfinished_requests():
        for delta in llm.engine.step():
            out = delta.outputs[0]
            text, tokens, finish = text + out.text, tokens + out.token_ids, out.finish_reason
    return text, tokens, finish


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.5,
                   ignore_eos=True),
], ids=["greedy", "seeded", "penalties"])
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_resumed_request_continues_exactly(llm, params, cut):
    ids = [1, 415, 2936 % 512, 9060 % 512, 285]
    full_text, full_tokens, finish = _run(llm, f"full-{cut}", ids, params)
    assert len(full_tokens) == 24 and finish == "length"
    head = tuple(full_tokens[:cut])
    # The client may have received less text than the tokens spell (held back for stop strings).
    sent = len(llm.tokenizer.decode(list(head))) // 2
    rest_text, rest_tokens, rest_finish = _run(llm, f"resumed-{cut}", ids, params, Resume(head, sent))
    assert list(head) + rest_tokens == full_tokens
    assert full_text[:sent] + rest_text == full_text
    assert rest_finish == finish


def test_resume_refuses_what_cannot_continue(llm):
    ids = [1, 22557 % 512]
    with pytest.raises(InvalidRequestError, match="single sample"):
        llm.engine.validate(ids, SamplingParams(n=2, max_tokens=4), Resume((1,), 0))
    with pytest.raises(InvalidRequestError, match="leave nothing to generate"):
        llm.engine.validate(ids, SamplingParams(max_tokens=2), Resume((5, 6), 0))
    with pytest.raises(InvalidRequestError, match="resumed token ids"):
        llm.engine.validate(ids, SamplingParams(max_tokens=8), Resume((10**9,), 0))
