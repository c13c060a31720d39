"""Self-verification, msem's reasoning-layer extension: sample several candidates, let the model score them,
answer with the best.

    {"self_verification": {"candidates": 4, "method": "mean_logprob" | "verifier" | "majority"}}

The candidates are one request with n = `candidates`, so they share the prompt's KV blocks (the engine's samples
of one request prefill the prompt once). Each is then scored, by `method`:

- "mean_logprob": the mean logprob of its tokens under the model (a confidence; no extra generation);
- "verifier": the model is asked whether the candidate is correct: the conversation (or prompt) with the candidate
  as the answer, then `VERIFY_QUESTION`; the score is P(yes) / (P(yes) + P(no)) of the next token, from its top
  logprobs. One more prefill and one token per candidate;
- "majority" (self-consistency): the candidates' final answers are compared, normalised (the answer channel, so
  a reasoning model's thinking is left out; case, surrounding whitespace and final punctuation ignored); a
  candidate's score is the share of candidates that gave its answer.

The best score wins; ties go to the higher mean logprob, then to the first. The response is that candidate as
the only choice, with every candidate's score in the `self_verification` extension field, and its usage counts
every token generated for it (the candidates and the verifier's), since that is the cost.
"""

import asyncio
import contextlib
import dataclasses
import math
import re
from collections import Counter
from typing import Any

from cluster.api_request import ChatRequest, CompletionRequest
from cluster.frontend import Frontend, usage
from engine.outputs import CompletionOutput, RequestOutput, merge
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

VERIFY_QUESTION = "Is the answer above correct? Answer yes or no."
MIN_SCORE = -9999.0  # JSON holds no -inf (a candidate with no tokens has no mean logprob)
_COMPLETION_QUESTION = "\n\nQuestion: is the text above correct? Answer yes or no.\nAnswer:"


@dataclasses.dataclass(frozen=True)
class Verified:
    """The chosen candidate as the request's whole output, the extension field, and the usage of all the work."""

    output: RequestOutput
    report: dict[str, Any]
    usage: dict


async def verify(frontend: Frontend, request: CompletionRequest | ChatRequest, prompt_token_ids: list[int],
                 params: SamplingParams, request_id: str) -> Verified:
    spec = request.self_verification
    assert spec is not None
    wanted_logprobs = params.logprobs
    params = dataclasses.replace(params, n=spec.candidates, logprobs=wanted_logprobs or 0)
    output = await _whole(frontend.generate(prompt_token_ids, params, request_id=request_id, every_step=False))
    candidates = output.outputs
    confidence = [_mean_logprob(c) for c in candidates]
    verifier_prompt_tokens = verifier_tokens = 0
    if spec.method == "mean_logprob":
        scores = confidence
    elif spec.method == "majority":
        answers = [_normalised(c.text) for c in candidates]
        votes = Counter(answers)
        scores = [votes[a] / len(answers) for a in answers]
    else:
        verdicts = await asyncio.gather(*(_verifier_score(frontend, request, prompt_token_ids, c, f"{request_id}-v{i}")
                                          for i, c in enumerate(candidates)))
        scores = [score for score, _, _ in verdicts]
        verifier_prompt_tokens = sum(prompt for _, prompt, _ in verdicts)
        verifier_tokens = sum(tokens for _, _, tokens in verdicts)
    best = max(range(len(candidates)), key=lambda i: (scores[i], confidence[i], -i))
    chosen = dataclasses.replace(candidates[best], index=0, logprobs=candidates[best].logprobs
                                 if wanted_logprobs is not None else None)
    report = {"method": spec.method, "selected": best,
              "candidates": [{"index": i, "text": c.text, "score": max(scores[i], MIN_SCORE),
                              "mean_logprob": max(confidence[i], MIN_SCORE), "num_tokens": len(c.token_ids),
                              "finish_reason": c.finish_reason}
                             for i, c in enumerate(candidates)]}
    completion = sum(len(c.token_ids) for c in candidates) + verifier_tokens
    return Verified(dataclasses.replace(output, outputs=[chosen]), report,
                    usage(len(prompt_token_ids) + verifier_prompt_tokens, completion, output.num_cached_tokens,
                          sum(c.num_reasoning_tokens for c in candidates)))


async def _verifier_score(frontend: Frontend, request: CompletionRequest | ChatRequest, prompt_token_ids: list[int],
                          candidate: CompletionOutput, request_id: str) -> tuple[float, int, int]:
    """P(yes) / (P(yes) + P(no)) for the next token after the verification question, and the prompt and
    completion tokens it cost."""
    if isinstance(request, ChatRequest):
        messages = request.messages + [{"role": "assistant", "content": candidate.text or " "},
                                       {"role": "user", "content": VERIFY_QUESTION}]
        ids = await frontend.off_loop(frontend.tokenizer.encode_chat, messages)
    else:
        ids = prompt_token_ids + candidate.token_ids + frontend.tokenizer.encode_continuation(_COMPLETION_QUESTION)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=MAX_LOGPROBS)
    output = await _whole(frontend.generate(ids, params, request_id=request_id, every_step=False))
    (position,) = output.outputs[0].logprobs or [{}]
    mass = {"yes": 0.0, "no": 0.0}
    for lp in position.values():
        word = (lp.decoded_token or "").strip().lower()
        if word in mass:
            mass[word] += math.exp(lp.logprob)
    total = mass["yes"] + mass["no"]
    return (mass["yes"] / total if total > 0 else 0.5), len(ids), len(output.outputs[0].token_ids)


async def _whole(deltas) -> RequestOutput:
    output = None
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            output = merge(output, delta)
    assert output is not None
    return output


def _mean_logprob(candidate: CompletionOutput) -> float:
    logprobs = [position[token].logprob for position, token in zip(candidate.logprobs or [], candidate.token_ids)
                if token in position]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def _normalised(answer: str) -> str:
    return re.sub(r"\s+", " ", answer).strip().rstrip(".!?").strip().lower()
