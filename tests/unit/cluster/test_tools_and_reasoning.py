"""Tool calls (Mistral's way) and reasoning (hidden thinking) through the official `openai` client and the gRPC
client: the tiny preset's v7 tokenizer for tools, a v13 tekken test checkpoint for reasoning and for tools in
the newer wire format, and a v1 checkpoint that cannot express tools."""

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from cluster import tool_calls
from cluster.api_request import parse_request
from cluster.config import Limits
from cluster.frontend import Frontend, LocalShards
from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer, is_mistral_call_id
from tests.tekken_tokenizers import write_checkpoint
from tests.unit.cluster.conftest import make_frontend, serve_http

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                            "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names=("get_weather", "get_time")) -> None:
    assert calls
    for call in calls:
        assert is_mistral_call_id(call.id) and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- tools, v7 (the tiny preset) ----

def test_required_and_named_tool_choice_make_valid_calls(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=3,
                                         parallel_tool_calls=False, temperature=1.0, seed=1, max_completion_tokens=80)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)
    named = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, temperature=1.0, seed=2, max_completion_tokens=80)
    (call,) = named.choices[0].message.tool_calls
    _check_calls([call], names=("get_time",))


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    """A chat stream's tool calls, merged as the openai client's users merge them, and its finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                assert (delta.id is not None) == (call["id"] is None)  # the id comes once, first
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return calls, finish


def test_streamed_tool_calls_arrive_as_openai_sends_them(client):
    calls, finish = _streamed_calls(client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.8,
        seed=3, max_completion_tokens=80, stream=True))
    assert finish == "tool_calls" and calls
    for call in calls.values():
        assert is_mistral_call_id(call["id"])
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_call_cut_by_max_tokens_comes_back_as_a_call(client):
    """As OpenAI answers: the call begun, its arguments cut short, finish_reason "length"; streamed alike."""
    request = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   temperature=1.0, seed=5, max_completion_tokens=16)
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "length" and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.function.name in SCHEMAS and call.function.arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)
    streamed, finish = _streamed_calls(client.chat.completions.create(**request, stream=True))
    assert finish == "length"
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [(call.function.name, call.function.arguments)]


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS] [{"name": "f", "arguments": {"a": [1, -2.5e3, "x\\"y", true, null], "b": {}}, "id": "abcDEF123"}, '
    '{"name": "g", "arguments": {}}]',
    '[TOOL_CALLS]f[CALL_ID]xyz987ABC[ARGS]{"a": [1, "b"], "c": false}[TOOL_CALLS]g[ARGS]{}'])
def test_a_stream_sends_each_call_as_it_is_written(text):
    """Fed the tools channel a character at a time, a stream sends each call's id and name once, then pieces of
    its arguments that add up to the whole answer's, each piece sent as soon as it is written."""
    stream, sent = tool_calls.CallStream(), {}
    for end in range(len(text) + 1):
        for entry in stream.deltas(text[:end]):
            call = sent.setdefault(entry["index"], {"id": entry.get("id"), "name": "", "pieces": []})
            call["name"] += entry["function"].get("name", "")
            call["pieces"].append(entry["function"]["arguments"])
        for k, partial in enumerate(tool_calls.scan(text[:end])):  # nothing written is held back
            assert "".join(sent[k]["pieces"]) == partial.arguments
    whole = tool_calls.parse(text)
    assert [(c["name"], "".join(c["pieces"])) for c in sent.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole]
    assert all(is_mistral_call_id(c["id"]) for c in sent.values()) and len(sent[0]["pieces"]) > 10


def test_auto_puts_the_tools_in_the_prompt_and_a_conversation_with_results_continues(client):
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=1)
    auto = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_completion_tokens=1)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_completion_tokens=1)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens == none.usage.prompt_tokens
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_8f3a2b1c9d0e4f5a6b7c", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_8f3a2b1c9d0e4f5a6b7c", "content": "18 C, sunny"}]
    out = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_completion_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_reads_the_call_a_model_writes(client):
    """Under "auto" the model decides whether to call; the random tiny model is made to write a call by a grammar
    of the request's own (the one "required" would apply), and the call comes back parsed."""
    lark = tool_calls.grammar(Tokenizer.from_bundled("v7"), [TOOLS[0]["function"]], parallel=False).spec
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto", temperature=1.0,
                                         seed=4, max_completion_tokens=80,
                                         extra_body={"structured_outputs": {"grammar": lark}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, names=("get_weather",))


def test_parse_reads_every_wire_format():
    v7 = '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}, "id": "abcDEF123"}, {"name": "g", "arguments": {}}]'
    first, second = tool_calls.parse(v7)
    assert (first["id"], first["function"]) == ("abcDEF123", {"name": "f", "arguments": '{"a": 1}'})
    assert second["function"]["name"] == "g" and is_mistral_call_id(second["id"])
    v11 = '[TOOL_CALLS]f[CALL_ID]xyz987ABC[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}'
    first, second = tool_calls.parse(v11)
    assert first["id"] == "xyz987ABC" and first["function"]["arguments"] == '{"a": 1}'
    assert second["function"] == {"name": "g", "arguments": "{}"}
    for broken in ("[TOOL_CALLS] [{\"name\": ", "[TOOL_CALLS]f[ARGS]{not json", "[TOOL_CALLS] [1, 2]", ""):
        assert tool_calls.parse(broken) is None
    calls, content = tool_calls.split("[TOOL_CALLS]f[ARGS]{oops", "Sure. ", uses_tools=True)
    assert calls is None and content == "Sure. f{oops"  # what is not a call stays text
    cut = '[TOOL_CALLS] [{"name": "f", "arguments": {"city": "Pa'
    assert tool_calls.split(cut, "", uses_tools=True) == (None, cut.removeprefix("[TOOL_CALLS]"))
    (call,), content = tool_calls.split(cut, "", uses_tools=True, cut=True)  # cut by max_tokens: the call begun
    assert call["function"] == {"name": "f", "arguments": '{"city": "Pa'} and content == ""
    (call,), _ = tool_calls.split('[TOOL_CALLS] [{"name": "f", "argu', "", uses_tools=True, cut=True)
    assert call["function"] == {"name": "f", "arguments": ""}  # cut before its arguments: named, nothing more


def test_a_tokenizer_without_tool_tokens_refuses_tools():
    tokenizer = Tokenizer.from_bundled("v1")
    frontend = Frontend("v1-model", tokenizer, 256, 32000, LocalShards(None), Limits())
    request = parse_request({"messages": ASK, "tools": TOOLS}, chat=True)
    with pytest.raises(InvalidRequestError, match=r"tokenizer \(v1\) has no tool-call tokens") as error:
        frontend.prepare(request)
    assert error.value.param == "tools"
    frontend.prepare(parse_request({"messages": ASK, "tools": TOOLS, "tool_choice": "none"}, chat=True))


def test_tools_over_grpc(serve):
    from cluster.client import InferenceClient

    with InferenceClient(serve()) as client:
        out = client.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                          temperature=1.0, seed=4)
        (choice,) = out.choices
        assert choice.finish_reason == "tool_calls" and choice.tool_calls
        for call in choice.tool_calls:
            assert is_mistral_call_id(call.id)
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        named = client.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                            max_tokens=80, temperature=0)
        assert [c.name for c in named.choices[0].tool_calls] == ["get_time"]
        streamed = list(client.chat_stream(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=80, temperature=0))
        last = streamed[-1].choices[-1]
        assert last.finish_reason == "tool_calls" and last.tool_calls
        cut = client.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=16,
                          temperature=1.0, seed=5)
        (choice,) = cut.choices
        assert choice.finish_reason == "length" and not choice.text
        (call,) = choice.tool_calls
        assert call.name in SCHEMAS and call.arguments.startswith("{")


# ---- reasoning and tools in the newer format, v13 ----

@pytest.fixture(scope="module")
def v13(tmp_path_factory):
    from engine import AsyncLLM

    llm = AsyncLLM(model=str(write_checkpoint(tmp_path_factory.mktemp("v13"), "v13")), dtype="float32", progress=False,
                   max_model_len=512)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def v13_client(v13) -> Iterator[openai.OpenAI]:
    with serve_http(make_frontend(v13)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _thinking_grammar(tokenizer: Tokenizer) -> dict:
    """Makes the random model think: [THINK] lowercase words [/THINK] a capitalised answer. (A real reasoning
    model writes the tags itself.)"""
    think, end = tokenizer.control_token_id("[THINK]"), tokenizer.control_token_id("[/THINK]")
    return {"structured_outputs": {"grammar": f"start: <[{think}]> /[a-z ]{{10,400}}/ <[{end}]> /[A-Z][a-z]{{2,8}}/"}}


def test_reasoning_content_is_apart_from_the_answer(v13, v13_client):
    extra = _thinking_grammar(v13.tokenizer)
    out = v13_client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=300,
                                             temperature=1.0, seed=5, extra_body=extra)
    message = out.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert message.model_extra["reasoning"] == reasoning and len(reasoning) >= 10 and reasoning.islower()
    assert message.content[0].isupper() and message.content.isalpha()
    assert out.usage.completion_tokens_details.reasoning_tokens > 2
    hidden = v13_client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=300,
                                                temperature=1.0, seed=5,
                                                extra_body={**extra, "include_reasoning": False})
    assert "reasoning_content" not in (hidden.choices[0].message.model_extra or {})
    assert hidden.choices[0].message.content == message.content
    stream = v13_client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=300,
                                                temperature=1.0, seed=5, extra_body=extra, stream=True)
    thought, said = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            thought += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            said += choice.delta.content or ""
    assert (thought, said) == (reasoning, message.content)


def test_the_thinking_budget_closes_the_thought(v13, v13_client):
    think, end = v13.tokenizer.control_token_id("[THINK]"), v13.tokenizer.control_token_id("[/THINK]")
    grammar = f"start: <[{think}]> /[a-z ]*/ <[{end}]> /[A-Z][a-z]{{2,8}}/"  # thinks as long as it likes
    free = v13_client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=200, temperature=1.0,
                                              seed=6, extra_body={"structured_outputs": {"grammar": grammar}})
    assert free.choices[0].finish_reason == "length"  # the random model never stops thinking by itself
    for extra, budget in (({"max_thinking_tokens": 12}, 12), ({"reasoning_effort": "low"}, 256)):
        out = v13_client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=300,
                                                 temperature=1.0, seed=6,
                                                 extra_body={**extra, "structured_outputs": {"grammar": grammar}})
        choice = out.choices[0]  # 300 tokens hold the budget, the tags and the short answer
        assert choice.finish_reason == "stop" and choice.message.content[0].isupper()
        assert out.usage.completion_tokens_details.reasoning_tokens == budget + 2  # the tags included


def test_a_structured_answer_may_follow_a_bounded_thought(v13_client):
    """A grammar that does not place [THINK] itself constrains the answer: with a thinking budget the model may
    think first, unconstrained, and the answer after [/THINK] still validates; without one it answers at once."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    thought = {}
    for budget in (None, 6):
        out = v13_client.chat.completions.create(
            model="tiny", messages=ASK, n=16, max_completion_tokens=60, temperature=1.0, seed=1,
            response_format=response_format, extra_body={} if budget is None else {"max_thinking_tokens": budget})
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
        thought[budget] = [c.message.model_extra.get("reasoning_content") for c in out.choices]
    assert not any(thought[None])
    assert any(thought[6]) and all(len(text) > 0 for text in thought[6] if text)


def test_tools_in_the_v11_wire_format(v13_client):
    out = v13_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                             temperature=1.0, seed=7, max_completion_tokens=150)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)


def test_reasoning_over_grpc(v13, serve):
    from cluster.client import InferenceClient

    grammar = _thinking_grammar(v13.tokenizer)["structured_outputs"]["grammar"].replace("{10,400}", "*")
    with InferenceClient(serve(make_frontend(v13))) as client:
        out = client.chat(ASK, max_tokens=200, temperature=1.0, seed=8, max_thinking_tokens=6,
                          structured_outputs={"grammar": grammar})
        (choice,) = out.choices
        assert choice.reasoning and choice.reasoning.islower() and choice.text[0].isupper()
        assert out.usage.completion_tokens_details.reasoning_tokens == 8  # 6 and the two tags
        hidden = client.chat(ASK, max_tokens=200, temperature=1.0, seed=8, max_thinking_tokens=6,
                             structured_outputs={"grammar": grammar}, include_reasoning=False)
        assert hidden.choices[0].reasoning == "" and hidden.choices[0].text == choice.text
