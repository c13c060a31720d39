"""Self-verification (msem's extension): the best of several candidates, scored by the model, over both APIs."""

from collections import Counter

import httpx2
import pytest

from cluster.client import InferenceClient

ASK = [{"role": "user", "content": "Name a colour."}]


def _report(out) -> dict:
    return out.model_extra["self_verification"]


@pytest.mark.parametrize("method", ["mean_logprob", "verifier"])
def test_the_best_scored_candidate_is_the_answer(client, method):
    out = client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=8, temperature=1.2,
                                         seed=3, extra_body={"self_verification": {"candidates": 4,
                                                                                   "method": method}})
    report = _report(out)
    candidates = report["candidates"]
    assert report["method"] == method and len(candidates) == 4 and len(out.choices) == 1
    best = max(candidates, key=lambda c: (c["score"], c["mean_logprob"], -c["index"]))
    assert report["selected"] == best["index"] and out.choices[0].message.content == best["text"]
    if method == "verifier":
        assert all(0 <= c["score"] <= 1 for c in candidates)
        assert out.usage.completion_tokens == sum(c["num_tokens"] for c in candidates) + 4  # a verdict each
    else:
        assert out.usage.completion_tokens == sum(c["num_tokens"] for c in candidates)


def test_majority_vote_picks_the_most_common_answer(client):
    out = client.completions.create(model="tiny", prompt="Pick a letter:", max_tokens=4, temperature=1.5, seed=2,
                                    extra_body={"guided_choice": ["A", "B", "C"],
                                                "self_verification": {"candidates": 7, "method": "majority"}})
    candidates = _report(out)["candidates"]
    votes = Counter(c["text"] for c in candidates)
    winner, count = votes.most_common(1)[0]
    assert out.choices[0].text in {text for text, n in votes.items() if n == count}
    assert all(c["score"] == votes[c["text"]] / 7 for c in candidates) and count / 7 == max(
        c["score"] for c in candidates)


@pytest.mark.parametrize("body, param", [
    ({"stream": True}, "self_verification"),
    ({"n": 2}, "self_verification"),
    ({"self_verification": {"candidates": 1}}, "self_verification.candidates"),
    ({"self_verification": {"candidates": 17}}, "self_verification.candidates"),
    ({"self_verification": {"method": "vibes"}}, "self_verification.method"),
])
def test_refusals(base, body, param):
    body = {"self_verification": {"candidates": 3}, **body}
    reply = httpx2.post(f"{base}/v1/chat/completions", json={"messages": ASK, **body})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_self_verification_over_grpc(serve):
    with InferenceClient(serve()) as client:
        out = client.chat(ASK, max_tokens=6, temperature=1.0, seed=1,
                          self_verification={"candidates": 3, "method": "verifier"})
        assert len(out.candidates) == 3 and len(out.choices) == 1
        assert out.choices[0].text == out.candidates[out.selected].text
        assert out.usage.completion_tokens == sum(c.num_tokens for c in out.candidates) + 3
