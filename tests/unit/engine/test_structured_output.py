"""Structured output in the engine: even the random-weight tiny model writes text that parses and validates,
with n > 1, seeds, stop strings, logprobs, preemption and resume; and the sampler's other bans (min_tokens,
bad_words) hold."""

import json
import re

import jsonschema
import pytest

from engine import LLM
from engine.admission import Resume
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
JSON = StructuredOutputs("json", json.dumps(SCHEMA))
PROMPT = "Describe a person as JSON:"


def _texts(outputs) -> list[str]:
    return [c.text for out in outputs for c in out.outputs]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=120, temperature=0, structured_outputs=JSON),
    SamplingParams(n=4, max_tokens=120, temperature=1.0, seed=3, structured_outputs=JSON),
    SamplingParams(n=3, max_tokens=120, temperature=1.3, top_k=50, logprobs=2, structured_outputs=JSON),
    SamplingParams(max_tokens=120, temperature=1.0, ignore_eos=True, min_tokens=5, structured_outputs=JSON),
], ids=["greedy", "n4-seeded", "logprobs", "ignore-eos-min-tokens"])
def test_every_sample_validates_against_the_schema(tiny_llm, params):
    outputs = tiny_llm.generate([PROMPT, "Another one:"], params)
    for out in outputs:
        for choice in out.outputs:
            jsonschema.validate(json.loads(choice.text), SCHEMA)
            assert choice.finish_reason == "stop"
            if params.logprobs is not None:
                assert len(choice.logprobs) == len(choice.token_ids)


def test_seeded_structured_samples_are_reproducible(tiny_llm):
    params = SamplingParams(n=2, max_tokens=120, temperature=1.0, seed=11, structured_outputs=JSON)
    assert _texts(tiny_llm.generate(PROMPT, params)) == _texts(tiny_llm.generate(PROMPT, params))


@pytest.mark.parametrize("constraint, check", [
    (StructuredOutputs("regex", r"(yes|no), because [a-z ]{5,20}\."),
     lambda text: re.fullmatch(r"(yes|no), because [a-z ]{5,20}\.", text)),
    (StructuredOutputs("choice", json.dumps(["Paris", "Lyon", "Marseille"])),
     lambda text: text in ("Paris", "Lyon", "Marseille")),
    (StructuredOutputs("grammar", 'start: "(" expr ")"\nexpr: NUMBER ("+" NUMBER){0,3}\nNUMBER: /[0-9]{1,3}/'),
     lambda text: re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)", text)),
    (StructuredOutputs("grammar", 'root ::= "<" [a-c]{2,4} ">"'),  # GBNF is converted
     lambda text: re.fullmatch(r"<[a-c]{2,4}>", text)),
    (StructuredOutputs("json_object", ""), lambda text: text.startswith("{")),  # unbounded: may outlast max_tokens
], ids=["regex", "choice", "lark", "gbnf", "json-object"])
def test_regex_choice_and_grammars_hold(tiny_llm, constraint, check):
    params = SamplingParams(n=3, max_tokens=60, temperature=0.7, seed=5, structured_outputs=constraint)
    for out in tiny_llm.generate(PROMPT, params)[0].outputs:
        assert check(out.text), out.text
        if out.finish_reason == "stop" and constraint.kind == "json_object":
            assert isinstance(json.loads(out.text), dict)


def test_a_stop_string_still_stops_a_constrained_sample(tiny_llm):
    params = SamplingParams(max_tokens=120, temperature=0, structured_outputs=JSON, stop=['"age"'])
    out = tiny_llm.generate(PROMPT, params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == '"age"' and out.text.startswith('{"name": "')


def test_preempted_structured_requests_stay_valid(tiny_llm):
    # 5 blocks of 16 tokens (one sequence of max_model_len) for 4 samples of ~30 tokens: some are preempted
    small = LLM("tiny", dtype="float32", progress=False, max_model_len=64, kv_cache_memory=2048 * 16 * 5,
                enable_prefix_caching=False)
    preemptions, original = [], small.engine.scheduler._preempt
    small.engine.scheduler._preempt = lambda req: (preemptions.append(req.request_id), original(req))
    params = SamplingParams(n=4, max_tokens=100, temperature=1.0, seed=2, structured_outputs=JSON)
    texts = _texts(small.generate(PROMPT, params))
    assert preemptions, "the KV budget was meant to force preemption"
    assert texts == _texts(tiny_llm.generate(PROMPT, params))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_resumed_request_continues_inside_its_grammar(tiny_llm):
    engine = tiny_llm.engine
    ids = tiny_llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=9, structured_outputs=JSON)
    full = tiny_llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].outputs[0]
    head = tuple(full.token_ids[:7])
    engine.add_request("resumed", ids, params, resume=Resume(head, 0))
    rest = []
    while engine.has_unfinished_requests():
        rest += [t for delta in engine.step() for t in delta.outputs[0].token_ids]
    assert list(head) + rest == full.token_ids


def test_the_engine_refuses_what_llguidance_cannot_build(tiny_llm):
    for constraint, message in [
        (StructuredOutputs("json", '{"type": "object", "properties": {"a": {"$ref": "#/missing"}}}'), "missing"),
        (StructuredOutputs("regex", "(a", "guided_regex"), "guided_regex"),
        (StructuredOutputs("grammar", "start: undefined_rule"), "undefined_rule"),
    ]:
        with pytest.raises(InvalidRequestError, match=message) as error:
            tiny_llm.engine.validate([1, 2], SamplingParams(structured_outputs=constraint))
        assert error.value.param == constraint.param


def test_an_oversized_specification_is_refused():
    with pytest.raises(InvalidRequestError, match="at most 65,536") as error:
        StructuredOutputs("json", json.dumps({"enum": ["x" * 70_000]}), "response_format.json_schema.schema")
    assert error.value.param == "response_format.json_schema.schema"


def test_min_tokens_holds_back_the_end(tiny_llm):
    greedy = dict(max_tokens=30, temperature=0, ignore_eos=True)
    free = tiny_llm.generate(PROMPT, SamplingParams(**greedy))[0].outputs[0]
    token, stop = free.token_ids[2], free.text[:4]
    early = tiny_llm.generate(PROMPT, SamplingParams(**greedy, stop_token_ids=[token]))[0].outputs[0]
    assert early.token_ids == free.token_ids[:3] and early.stop_reason == token
    held = tiny_llm.generate(PROMPT, SamplingParams(**greedy, stop_token_ids=[token], min_tokens=10))[0].outputs[0]
    assert token not in held.token_ids[:10] and len(held.token_ids) > 10
    late = tiny_llm.generate(PROMPT, SamplingParams(**greedy, stop=[stop], min_tokens=10))[0].outputs[0]
    assert late.text == free.text  # the stop string came before the 10th token: it is not looked for there


def test_bad_words_are_never_generated(tiny_llm):
    tokenizer, greedy = tiny_llm.tokenizer, dict(max_tokens=30, temperature=0, ignore_eos=True)
    free = tiny_llm.generate(PROMPT, SamplingParams(**greedy))[0].outputs[0]
    # a word the model wrote as one token, the word's own encoding (bad words ban their encodings)
    token = next(t for t in free.token_ids if (piece := tokenizer.decode([t], continues_text=True)).startswith(" ")
                 and piece[1:].isalpha() and tokenizer.encode(piece[1:], add_bos=False) == [t])
    word = tokenizer.decode([token])
    banned = tiny_llm.generate(PROMPT, SamplingParams(**greedy, bad_words=[word]))[0].outputs[0]
    assert token not in banned.token_ids and banned.token_ids != free.token_ids


def test_include_stop_str_in_output_keeps_the_stop_string(tiny_llm):
    text = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0].text
    stop = text[10:13]
    cut = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    kept = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop],
                                                    include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == cut[0].outputs[0].text + stop
    assert kept[0].outputs[0].text == text[:text.index(stop) + len(stop)]
