"""The one request model: HTTP bodies, gRPC messages and client arguments read into the same `SamplingParams`,
with the same defaults and the same refusals."""

import json

import pytest

from cluster.api_request import UNSUPPORTED, parse_request
from cluster.grpc_messages import build_message, read_request
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, StructuredOutputs

MESSAGES = [{"role": "user", "content": "Hi"}]


def _params(request, num_prompt_tokens: int = 10) -> SamplingParams:
    return request.sampling_params(num_prompt_tokens, max_model_len=100, max_n=16)


@pytest.mark.parametrize("sampling", [
    {},
    {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "n": 2, "seed": 3, "stop": ["x", "y"]},
    {"min_tokens": 2, "max_tokens": 5, "include_stop_str_in_output": True, "bad_words": ["no"],
     "stop_token_ids": [5], "ignore_eos": True, "repetition_penalty": 1.2, "prompt_logprobs": 1},
    {"structured_outputs": {"json": {"type": "object"}}},
    {"structured_outputs": {"choice": ["a", "b"]}},
], ids=["defaults", "sampling", "vllm-extensions", "json", "choice"])
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_http_and_grpc_read_the_same_params(sampling, chat):
    prompt = {"messages": MESSAGES} if chat else {"prompt": "Hi"}
    over_http = _params(parse_request({**prompt, **sampling}, chat))
    message = build_message(MESSAGES if chat else "Hi", None, chat, sampling)
    over_grpc = _params(read_request(message, stream=False))
    assert over_http == over_grpc
    if not sampling:  # one set of defaults: completions 16 tokens (OpenAI), chat the rest of the context (vLLM)
        assert over_http.max_tokens == (90 if chat else 16)


def test_every_constraint_field_maps_to_the_engines():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    expected = StructuredOutputs("json", json.dumps(schema, sort_keys=True, separators=(",", ":")))
    bodies = [{"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
              {"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}]
    for body in bodies:
        constraint = _params(parse_request({"messages": MESSAGES, **body}, chat=True)).structured_outputs
        assert (constraint.kind, constraint.spec) == (expected.kind, expected.spec)
    json_object = parse_request({"prompt": "x", "response_format": {"type": "json_object"}}, chat=False)
    assert _params(json_object).structured_outputs.kind == "json_object"
    assert _params(parse_request({"prompt": "x", "response_format": {"type": "text"}}, chat=False)) \
        .structured_outputs is None


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "x", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "not supported"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
     "response_format.json_schema.x", "unknown field"),
    ({"prompt": True}, "prompt", "a string, a list of token ids"),
    ({"prompt": "x", "n": True}, "n", "integer"),
    ({"prompt": "x", "max_tokens": 16.0}, "max_tokens", "integer"),
    ({"prompt": "x", "temperature": "0"}, "temperature", "number"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"prompt": "x", "guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"prompt": "x", "guided_choice": ["a", ""]}, "guided_choice", "non-empty"),
], ids=lambda value: str(value)[:40])
def test_refusals_name_the_field(body, param, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        parse_request(body, chat=False)
    assert error.value.param == param


def test_no_op_values_of_unsupported_fields_are_served():
    body = {name: allowed[0] for name, allowed in UNSUPPORTED.items() if allowed}
    assert _params(parse_request({"prompt": "x", **body}, chat=False)).max_tokens == 16


def test_the_context_check_names_both_lengths():
    with pytest.raises(InvalidRequestError, match="needs 110: 100 in the prompt and 10 to generate") as error:
        parse_request({"messages": MESSAGES, "max_completion_tokens": 10}, chat=True).sampling_params(
            100, max_model_len=105, max_n=16)
    assert error.value.param == "max_completion_tokens"
    request = parse_request({"prompt": "x", "n": 17}, chat=False)
    with pytest.raises(InvalidRequestError, match="between 1 and 16 on this server, got 17"):
        _params(request)
