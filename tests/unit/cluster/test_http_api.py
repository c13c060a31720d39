"""The OpenAI-compatible HTTP API on a real uvicorn server: the official client gets what the engine makes,
every bad request gets its status and OpenAI error JSON, overload and disconnects are handled."""

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from cluster.config import Limits
from cluster.frontend import Frontend, LocalShards
from engine.errors import EngineDeadError
from engine.sampling_params import SamplingParams
from tests.unit.cluster.conftest import make_frontend, serve_http as serve, wait_for

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
CHAT = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})  # the tiny model may emit EOS early


@pytest.fixture(scope="module")
def frontend(async_llm) -> Frontend:
    return make_frontend(async_llm)


@pytest.fixture(scope="module")
def base(frontend) -> Iterator[str]:
    with serve(frontend, api_keys=(KEY,), max_body_bytes=MAX_BODY) as url:
        yield url


@pytest.fixture
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def engine_text(llm, prompt, params: SamplingParams) -> str:
    async def run():
        return "".join([d.outputs[0].text async for d in llm.generate(prompt, params) if d.outputs])
    return asyncio.run(run())


def test_greedy_completions_equal_the_engine(async_llm, client):
    reference = engine_text(async_llm, "Hello there", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    out = client.completions.create(prompt="Hello there", max_tokens=10, **GREEDY)
    assert out.object == "text_completion" and out.model == "tiny"
    assert (out.choices[0].text, out.choices[0].finish_reason) == (reference, "length")
    ids = async_llm.tokenizer.encode("Hello there")
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    assert client.completions.create(prompt=ids, max_tokens=10, **GREEDY).choices[0].text == reference
    chunks = list(client.completions.create(prompt="Hello there", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_seeded_chat_n2_is_reproducible_and_streams_the_same(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})
    first, second = client.chat.completions.create(**args), client.chat.completions.create(**args)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and texts == [c.message.content for c in second.choices]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in first.choices)
    assert first.object == "chat.completion" and first.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed, roles = ["", ""], [[], []]
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and len(chunk.choices) == 1
        choice = chunk.choices[0]
        streamed[choice.index] += choice.delta.content or ""
        roles[choice.index].append(choice.delta.role)
    assert streamed == texts
    assert all(r[0] == "assistant" and set(r[1:]) <= {None} for r in roles)  # role in each choice's first chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == first.usage.total_tokens


def test_logprobs(client):
    out = client.completions.create(prompt="Hello", max_tokens=5, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == logprob == max(top.values())  # greedy: the best token

    chat = client.chat.completions.create(messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content and len(content) == 4
    for t in content:
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
    assert client.chat.completions.create(messages=CHAT, max_tokens=4, **GREEDY).choices[0].logprobs is None


def test_stop_strings(async_llm, client):
    reference = engine_text(async_llm, "Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stop = reference[4:7]
    for stops in (stop, [stop, "never-generated"]):
        out = client.completions.create(prompt="Hello", max_tokens=8, stop=stops, **GREEDY)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (reference[:reference.find(stop)], "stop")


def _big_chunks():
    yield b'{"prompt": "'
    for _ in range(MAX_BODY // 512 + 1):
        yield b"x" * 512
    yield b'"}'


COMPLETIONS, CHATS = "/v1/completions", "/v1/chat/completions"
# (what, method, path, request kwargs, status, error type, param)
BAD_REQUESTS = [
    ("malformed JSON", "POST", COMPLETIONS, dict(content=b'{"prompt": '), 400, "invalid_request_error", None),
    ("invalid UTF-8", "POST", COMPLETIONS, dict(content=b'{"prompt": "\xff"}'), 400, "invalid_request_error", None),
    ("not an object", "POST", COMPLETIONS, dict(json=["Hi"]), 400, "invalid_request_error", None),
    ("missing prompt", "POST", COMPLETIONS, dict(json={"model": "tiny"}), 400, "invalid_request_error", "prompt"),
    ("prompt mixes types", "POST", COMPLETIONS, dict(json={"prompt": [1, "a"]}), 400, "invalid_request_error",
     "prompt"),
    ("too many prompts", "POST", COMPLETIONS, dict(json={"prompt": ["a"] * 129}), 400, "invalid_request_error",
     "prompt"),
    ("unknown field", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "temprature": 0}), 400,
     "invalid_request_error", "temprature"),
    ("unknown nested field", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "stream": True,
                                                            "stream_options": {"include_usage": True, "x": 1}}),
     400, "invalid_request_error", "stream_options.x"),
    ("beam search", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "use_beam_search": True}), 400,
     "invalid_request_error", "use_beam_search"),
    ("chat_template", "POST", CHATS, dict(json={"messages": CHAT, "chat_template": "{{ x }}"}), 400,
     "invalid_request_error", "chat_template"),
    ("min_tokens over max_tokens", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "min_tokens": 100,
                                                                  "max_tokens": 3}), 400,
     "invalid_request_error", "min_tokens"),
    ("prompt_logprobs with stream", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "prompt_logprobs": 1,
                                                                   "stream": True}), 400,
     "invalid_request_error", "prompt_logprobs"),
    ("prompt and max_tokens over the context", "POST", COMPLETIONS, dict(json={"prompt": "hello " * 100,
                                                                              "max_tokens": 100}), 400,
     "invalid_request_error", "max_tokens"),
    ("chat over the context", "POST", CHATS, dict(json={"messages": [{"role": "user", "content": "hello " * 100}],
                                                       "max_completion_tokens": 100}), 400,
     "invalid_request_error", "max_completion_tokens"),
    ("bad_words not a list", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "bad_words": "x"}), 400,
     "invalid_request_error", "bad_words"),
    ("truncate_prompt_tokens zero", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "truncate_prompt_tokens": 0}),
     400, "invalid_request_error", "truncate_prompt_tokens"),
    ("invalid JSON schema", "POST", CHATS, dict(json={"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/nowhere"}}}}}}), 400, "invalid_request_error", "response_format.json_schema.schema"),
    ("json_schema without a schema", "POST", CHATS, dict(json={"messages": CHAT, "response_format": {
        "type": "json_schema"}}), 400, "invalid_request_error", "response_format.json_schema"),
    ("unknown response_format", "POST", CHATS, dict(json={"messages": CHAT, "response_format": {"type": "yaml"}}),
     400, "invalid_request_error", "response_format.type"),
    ("bad regex", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "structured_outputs": {"regex": "(a"}}), 400,
     "invalid_request_error", "structured_outputs.regex"),
    ("bad grammar", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "guided_grammar": "start: nothing"}), 400,
     "invalid_request_error", "guided_grammar"),
    ("two constraints", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "guided_regex": "a", "guided_choice": ["b"]}),
     400, "invalid_request_error", "guided_choice"),
    ("empty structured_outputs", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "structured_outputs": {}}), 400,
     "invalid_request_error", "structured_outputs"),
    ("unknown function in tool_choice", "POST", CHATS, dict(json={"messages": CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "g"}}}), 400, "invalid_request_error", "tool_choice"),
    ("tool_choice without tools", "POST", CHATS, dict(json={"messages": CHAT, "tool_choice": "required"}), 400,
     "invalid_request_error", "tool_choice"),
    ("forced call and a response_format", "POST", CHATS, dict(json={"messages": CHAT, "tools": TOOLS,
                                                                    "tool_choice": "required", "response_format": {
                                                                        "type": "json_object"}}), 400,
     "invalid_request_error", "tool_choice"),
    ("tool message without tool_call_id", "POST", CHATS, dict(json={"messages": CHAT + [
        {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "18C"}]}), 400,
     "invalid_request_error", "messages"),
    ("bad function name", "POST", CHATS, dict(json={"messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "has space"}}]}), 400, "invalid_request_error", "tools"),
    ("token outside vocab", "POST", COMPLETIONS, dict(json={"prompt": [1, 10**9]}), 400, "invalid_request_error",
     "prompt"),
    ("max_tokens string", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "max_tokens": "ten"}), 400,
     "invalid_request_error", "max_tokens"),
    ("negative max_tokens", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "max_tokens": -1}), 400,
     "invalid_request_error", "max_tokens"),
    ("n float", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "n": 1.5}), 400, "invalid_request_error", "n"),
    ("huge n", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "n": 10_000}), 400, "invalid_request_error", "n"),
    ("n over the server's max_n", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "n": 17}), 400,
     "invalid_request_error", "n"),
    ("temperature string", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "temperature": "hot"}), 400,
     "invalid_request_error", "temperature"),
    ("stop number", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "stop": 5}), 400, "invalid_request_error",
     "stop"),
    ("stream string", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "stream": "yes"}), 400,
     "invalid_request_error", "stream"),
    ("stream_options without stream", "POST", COMPLETIONS,
     dict(json={"prompt": "Hi", "stream_options": {"include_usage": True}}), 400, "invalid_request_error",
     "stream_options"),
    ("unsupported echo", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "echo": True}), 400,
     "invalid_request_error", "echo"),
    ("prompt over the context", "POST", COMPLETIONS, dict(json={"prompt": "hello " * 300}), 400,
     "invalid_request_error", "prompt"),
    ("unknown model", "POST", COMPLETIONS, dict(json={"prompt": "Hi", "model": "gpt-4"}), 404,
     "invalid_request_error", "model"),
    ("missing messages", "POST", CHATS, dict(json={"model": "tiny"}), 400, "invalid_request_error", "messages"),
    ("messages not a list", "POST", CHATS, dict(json={"messages": "Hi"}), 400, "invalid_request_error", "messages"),
    ("assistant first", "POST", CHATS, dict(json={"messages": [{"role": "assistant", "content": "Hi"}]}), 400,
     "invalid_request_error", "messages"),
    ("top_logprobs without logprobs", "POST", CHATS, dict(json={"messages": CHAT, "top_logprobs": 2}), 400,
     "invalid_request_error", "top_logprobs"),
    ("max_completion_tokens zero", "POST", CHATS, dict(json={"messages": CHAT, "max_completion_tokens": 0}), 400,
     "invalid_request_error", "max_completion_tokens"),
    ("body over the limit", "POST", COMPLETIONS, dict(json={"prompt": "x" * MAX_BODY}), 413,
     "invalid_request_error", None),
    ("chunked body over the limit", "POST", COMPLETIONS, dict(content=_big_chunks), 413, "invalid_request_error",
     None),
    ("missing API key", "POST", COMPLETIONS, dict(json={"prompt": "Hi"}, headers={}), 401, "invalid_request_error",
     None),
    ("wrong API key", "GET", "/v1/models", dict(headers={"Authorization": "Bearer sk-wrong"}), 401,
     "invalid_request_error", None),
    ("unknown route", "GET", "/v1/engines", {}, 404, "invalid_request_error", None),
    ("wrong method", "GET", COMPLETIONS, {}, 405, "invalid_request_error", None),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(async_llm, base, client):
    num_long = len(async_llm.tokenizer.encode("hello " * 300))
    with httpx2.Client(base_url=base, timeout=60) as http:
        for what, method, path, kwargs, status, kind, param in BAD_REQUESTS:
            kwargs = {**kwargs, "headers": kwargs.get("headers", AUTH)}
            if callable(kwargs.get("content")):
                kwargs["content"] = kwargs["content"]()
            reply = http.request(method, path, **kwargs)
            assert reply.status_code == status, (what, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], what
            assert (error["type"], error["param"]) == (kind, param), (what, error)
            if what == "prompt over the context":
                assert "256" in error["message"] and str(num_long) in error["message"]
            if what == "prompt and max_tokens over the context":  # both lengths, as vLLM and OpenAI name them
                assert "context is 256 tokens" in error["message"] and "100 to generate" in error["message"]
            if status == 401:
                assert reply.headers["WWW-Authenticate"] == "Bearer"
    out = client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_health_models_and_experts(async_llm, base, client):
    assert httpx2.get(f"{base}/health").status_code == 200  # open without the key
    [model] = client.models.list().data
    assert model.id == "tiny" and model.model_extra["max_model_len"] == 256
    missing = httpx2.get(f"{base}/v1/experts", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"

    async def expert_info():
        return {"groups": [{"experts": [0, 1], "replicas": ["r0"]}], "load": {"per_expert": [3, 4]}}

    with serve(make_frontend(async_llm, expert_info=expert_info)) as url:
        assert httpx2.get(f"{url}/v1/experts").json() == asyncio.run(expert_info())


def test_rebalance_needs_the_api_key_and_expert_groups(async_llm, base):
    assert httpx2.post(f"{base}/v1/experts/rebalance", headers=AUTH).status_code == 404  # no expert groups
    calls = []

    async def rebalance():
        calls.append(1)
        return {"status": "applied", "placement_version": 1, "moved": 3}

    with serve(make_frontend(async_llm, rebalance=rebalance), api_keys=(KEY,)) as url:
        refused = httpx2.post(f"{url}/v1/experts/rebalance")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key" and not calls
        assert httpx2.get(f"{url}/v1/experts/rebalance", headers=AUTH).status_code == 405
        done = httpx2.post(f"{url}/v1/experts/rebalance", headers=AUTH)
        assert done.status_code == 200 and done.json()["status"] == "applied" and calls == [1]


@pytest.mark.parametrize("shards, groups, status, message", [
    (True, [], 200, None),
    (True, [0], 503, "expert group 0 has no live replica"),
    ("hang", [], 503, "no attention shard answered within 0.7 s"),
    ("hang", "hang", 503, "no attention shard answered within 0.7 s; the expert router did not answer within 0.7 s"),
])
def test_health_tells_what_is_missing_within_its_deadline(async_llm, shards, groups, status, message):
    from tests.unit.cluster.test_frontend import health_frontend

    with serve(health_frontend(async_llm, shards, groups), api_keys=(KEY,)) as url:
        for _ in range(3):  # a hanging part never makes /health hang, however often it is asked
            began = time.monotonic()
            reply = httpx2.get(f"{url}/health", timeout=10)
            assert time.monotonic() - began < 2.5  # each asking waits its own 0.7 s, never a stuck one's
            assert reply.status_code == status
            if status == 200:
                assert reply.json() == {"status": "ok"}
            else:
                assert reply.json() == {"error": {"message": message, "type": "server_error", "param": None,
                                                  "code": "service_unavailable"}}
                assert reply.headers["Retry-After"] == "1"


class FailingShards(LocalShards):
    """The engine's streams, failing with `error` after `after` deltas; never healthy."""

    def __init__(self, llm, error: Exception, after: int):
        super().__init__(llm)
        self.error, self.after = error, after

    async def stream(self, request):
        count = 0
        async with contextlib.aclosing(super().stream(request)) as deltas:
            async for delta in deltas:
                if count == self.after:
                    raise self.error
                count += 1
                yield delta

    async def healthy(self) -> bool:
        return False


def _unreachable() -> Exception:
    """Serve's error for a deployment that has no replica to take a request."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    return DeploymentUnavailableError(DeploymentID("AttentionShard", "msem"))


@pytest.mark.parametrize("error, status, code", [
    (EngineDeadError("the engine stopped"), 503, "service_unavailable"),
    (_unreachable(), 503, "service_unavailable"),
    (RuntimeError("secret detail"), 500, "internal_error"),
], ids=["engine-dead", "no-replica", "bug"])
def test_server_failures(async_llm, monkeypatch, error, status, code):
    shards = FailingShards(async_llm, error, after=0)
    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, shards,
                        Limits(retry_after_s=3))
    rejected = []
    monkeypatch.setattr(frontend.metrics, "rejected", rejected.append)
    body = {"prompt": "Hi", "max_tokens": 4}
    with serve(frontend) as url:
        assert httpx2.get(f"{url}/health").status_code == 503  # a probe, not a refused request: not counted
        for stream in (False, True):  # a stream that fails before its first delta still gets the status
            reply = httpx2.post(f"{url}{COMPLETIONS}", json={**body, "stream": stream})
            assert reply.status_code == status
            assert reply.json()["error"]["type"] == "server_error" and reply.json()["error"]["code"] == code
            assert reply.headers.get("Retry-After") == ("3" if status == 503 else None)
            assert "secret" not in reply.text and "AttentionShard" not in reply.text
    assert rejected == (["503", "503"] if status == 503 else [])


@pytest.mark.parametrize("error, code", [(RuntimeError("boom"), "internal_error"),
                                         (_unreachable(), "service_unavailable")], ids=["bug", "no-replica"])
def test_an_error_after_the_stream_started_is_the_last_event(async_llm, error, code):
    shards = FailingShards(async_llm, error, after=2)
    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, shards)
    with serve(frontend) as url:
        # greedy: a sampled token may decode to no text yet (a partial UTF-8 byte), and its delta to no chunk
        reply = httpx2.post(f"{url}{COMPLETIONS}", json={"prompt": "Hi", "max_tokens": 8, "stream": True,
                                                        "ignore_eos": True, "temperature": 0})
        # The official client raises that event as an error: the stream is not taken for a finished one.
        with pytest.raises(openai.APIError, match="replica" if code == "service_unavailable" else "internal"):
            for _ in openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(
                    model="tiny", prompt="Hi", max_tokens=8, stream=True, temperature=0,
                    extra_body={"ignore_eos": True}):
                pass
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in reply.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert json.loads(events[-2])["error"]["code"] == code
    assert [json.loads(e)["object"] for e in events[:-2]] == ["text_completion"] * 2


def test_overload_is_refused_with_retry_after(async_llm):
    frontend = make_frontend(async_llm, Limits(max_requests=1, retry_after_s=2))
    with serve(frontend) as url, httpx2.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with http.stream("POST", COMPLETIONS, json=body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: dropping the iterator closes the response
            assert next(lines).startswith("data: ")  # admitted and streaming
            refused = http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        wait_for(lambda: frontend.num_requests == 0)
        assert http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("extra", [{"stream": True}, {"stream": False}, {"self_verification": {"candidates": 3}}],
                         ids=["stream", "whole", "self-verification"])
def test_client_disconnect_aborts_the_request(async_llm, frontend, base, monkeypatch, extra):
    aborted = []  # the engine's unfinished requests at each abort: 1 means a running request was cut short
    abort = async_llm._abort
    monkeypatch.setattr(async_llm, "_abort", lambda request_id: (aborted.append(async_llm.num_unfinished_requests),
                                                                 abort(request_id)))
    body = json.dumps({"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, **extra}).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: async_llm.num_unfinished_requests == 1)
    wait_for(lambda: async_llm.num_unfinished_requests == 0 and frontend.num_requests == 0)
    assert aborted == [1]


def test_64_concurrent_requests(base):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*(
                client.completions.create(model="tiny", prompt=f"Count {i}", max_tokens=8, stream=False,
                                          extra_body={"ignore_eos": True}) for i in range(64)))

    for out in asyncio.run(main()):
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8


def test_usage_reports_the_prompt_tokens_served_from_the_cache(client):
    prompt = "A system prompt that every user of this server sends, word for word, before their question. " * 2
    first = client.completions.create(prompt=prompt, max_tokens=2, **GREEDY)
    again = client.completions.create(prompt=prompt, max_tokens=2, **GREEDY)
    streamed = list(client.completions.create(prompt=prompt, max_tokens=2, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))[-1]
    full_blocks = (first.usage.prompt_tokens - 1) // 16 * 16  # block size 16; the last token is always computed
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and full_blocks > 0
    assert again.usage.prompt_tokens_details.cached_tokens == full_blocks
    assert streamed.usage.prompt_tokens_details.cached_tokens == full_blocks


def test_memory_shows_the_store_answers_404_without_one_and_503_when_it_is_down(async_llm):
    async def down():
        raise ConnectionError("the store's replica died")

    async def stalls():
        await asyncio.sleep(30)

    async def store():
        return {"store": {"ram": {"used_bytes": 1}}, "shards": {}}

    for info, status in ((None, 404), (down, 503), (stalls, 503), (store, 200)):
        frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, LocalShards(async_llm),
                            memory_info=info)
        with serve(frontend) as url:
            reply = httpx2.get(f"{url}/v1/memory", timeout=10)
        assert reply.status_code == status, reply.text
        if status == 200:
            assert reply.json()["store"]["ram"]["used_bytes"] == 1
        else:
            assert reply.json()["error"]["message"].startswith(
                "this deployment has no memory store" if status == 404 else "the memory store did not answer")
