"""The HTTP API at vLLM's parity, through the official `openai` client where it has the call: structured output,
vLLM's sampling extensions, batches of prompts, model lookup, tokenize/detokenize/version, CORS, and an event loop
that keeps answering while large bodies are tokenized."""

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx2
import jsonschema
import openai
import pytest

from cluster.frontend import Frontend
from engine.sampling_params import SamplingParams
from tests.unit.cluster.conftest import make_frontend, serve_http

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "rivers": {"type": "array", "items": {"enum": ["Seine", "Loire", "Rhone"]}, "maxItems": 3},
    },
    "required": ["city", "population", "rivers"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a French city as JSON."}]
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def frontend(async_llm) -> Frontend:
    return make_frontend(async_llm)


@pytest.fixture(scope="module")
def base(frontend) -> Iterator[str]:
    with serve_http(frontend) as url:
        yield url


@pytest.fixture
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _schema_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": strict}}


# ---- structured output ----

def test_response_format_json_schema_validates_every_choice(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, n=3, temperature=1.0, seed=4,
                                         max_completion_tokens=150, response_format=_schema_format())
    assert len(out.choices) == 3
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"


def test_a_streamed_json_schema_answer_parses_whole(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0.8, seed=1, stream=True,
                                            max_completion_tokens=150, response_format=_schema_format(False))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_vllm_constraints(client):
    out = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=20, n=4, temperature=1.2, seed=2,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert {c.text for c in out.choices} <= {"yes", "no", "maybe"}
    out = client.completions.create(model="tiny", prompt="A date:", max_tokens=30, temperature=1.0, seed=3,
                                    extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
    assert len(out.choices[0].text) == 10 and out.choices[0].text.startswith("20")
    out = client.completions.create(model="tiny", prompt="JSON:", max_tokens=150, temperature=0.7, seed=5,
                                    extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)


def test_constrained_samples_keep_their_logprobs_stop_and_seed(client):
    kwargs = dict(model="tiny", messages=CHAT, n=2, temperature=1.0, seed=8, max_completion_tokens=150,
                  logprobs=True, top_logprobs=2, response_format=_schema_format())
    first, again = (client.chat.completions.create(**kwargs) for _ in range(2))
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    for choice in first.choices:
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    cut = client.chat.completions.create(**{**kwargs, "n": 1, "stop": ['"population"']})
    assert cut.choices[0].message.content.startswith('{"city": "') and cut.choices[0].finish_reason == "stop"


# ---- vLLM's sampling extensions ----

def test_min_tokens_include_stop_str_and_bad_words(client):
    free = client.completions.create(prompt="Once upon a time", max_tokens=20, **GREEDY).choices[0].text
    stop = free[6:9]
    kept = client.completions.create(prompt="Once upon a time", max_tokens=20, stop=[stop], **{
        **GREEDY, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}).choices[0]
    assert kept.text == free[:free.index(stop) + len(stop)] and kept.finish_reason == "stop"
    long = client.completions.create(prompt="Once upon a time", max_tokens=20, stop=[free[:3]], **{
        **GREEDY, "extra_body": {"ignore_eos": True, "min_tokens": 8}}).choices[0]
    assert long.text == free  # the stop string came before the 8th token
    word = next(w for w in free.split() if w.isalpha() and len(w) > 2)
    banned = client.completions.create(prompt="Once upon a time", max_tokens=20, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "bad_words": [word]}}).choices[0].text
    assert word not in banned.split()


def test_prompt_logprobs_and_truncation(client, async_llm):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = async_llm.tokenizer.encode(prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 1})
    positions = out.choices[0].model_extra["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    assert all(str(token) in position for token, position in zip(ids[1:], positions[1:]))
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 5
    short = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"truncate_prompt_tokens": 4})
    assert short.usage.prompt_tokens == 4
    alone = client.completions.create(model="tiny", prompt=ids[-4:], max_tokens=2, temperature=0)
    assert short.choices[0].text == alone.choices[0].text


def test_chat_logprob_tokens_spell_the_content(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert not choice.message.content.startswith(" ")


# ---- batches, models, tokens, version, CORS ----

def test_a_batch_of_prompts_numbers_its_choices_prompt_by_prompt(client):
    prompts = ["Hello", "The capital of France is", "The sky is"]
    batch = client.completions.create(prompt=prompts, n=2, max_tokens=5, **GREEDY)
    assert [c.index for c in batch.choices] == list(range(6))
    total_prompt = 0
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, max_tokens=5, **GREEDY)
        assert [batch.choices[2 * p + j].text for j in range(2)] == [alone.choices[0].text] * 2
        total_prompt += alone.usage.prompt_tokens
    assert batch.usage.prompt_tokens == total_prompt and batch.usage.completion_tokens == 30
    stream = client.completions.create(prompt=prompts, max_tokens=5, stream=True, **GREEDY)
    texts = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(3)] == [batch.choices[2 * p].text for p in range(3)]
    ids = client.completions.create(prompt=[[1, 415, 2936], [1, 9060]], max_tokens=3, **GREEDY)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5


def test_models_retrieve_and_the_token_routes(client, base, async_llm):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    ids = async_llm.tokenizer.encode("Hello world")
    tokens = httpx2.post(f"{base}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    chat = httpx2.post(f"{base}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == async_llm.tokenizer.encode_chat(CHAT)
    assert httpx2.post(f"{base}/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    assert httpx2.post(f"{base}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx2.post(f"{base}/tokenize", json={"prompt": "a", "messages": CHAT}).status_code == 400
    assert httpx2.get(f"{base}/version").json()["version"]


def test_a_request_without_a_model_gets_the_served_one(base):
    out = httpx2.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    assert out["model"] == "tiny"


def test_cors_is_off_by_default_and_configurable(frontend, base):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    assert httpx2.options(f"{base}/v1/completions", headers=preflight).status_code == 405
    with serve_http(frontend, cors_origins=("https://app.example",)) as url:
        reply = httpx2.options(f"{url}/v1/completions", headers=preflight)
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx2.options(f"{url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ---- the event loop stays free ----

class _WatchedTokenizer:
    """A tokenizer that records how many `encode_chat` calls ran at once, on which threads, and when each ran."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lock, self.inside, self.most, self.threads = tokenizer, threading.Lock(), 0, 0, set()
        self.spans: list[tuple[float, float]] = []  # (start, end) of each call, time.monotonic()

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def encode_chat(self, *args):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.threads.add(threading.current_thread().name)
        start = time.monotonic()
        try:
            return self.tokenizer.encode_chat(*args)
        finally:
            with self.lock:
                self.inside -= 1
                self.spans.append((start, time.monotonic()))


def test_health_answers_while_large_bodies_are_tokenized(async_llm):
    """Tokenizing runs off the event loop, on one worker thread (with one thread per body, the loop waited for the
    interpreter lock behind each of them). The proof is not a time bound, which a busy machine breaks, but the
    order of events: /health calls are sent and answered while a tokenization is running, which a loop busy
    tokenizing could not do."""
    frontend = make_frontend(async_llm)
    frontend.tokenizer = watched = _WatchedTokenizer(frontend.tokenizer)
    big = {"model": "tiny", "messages": [{"role": "user", "content": "hello world, a test. " * 40_000}]}
    with serve_http(frontend, max_body_bytes=2 << 20) as url:
        async def run() -> list[tuple[float, float]]:
            async with httpx2.AsyncClient(base_url=url, timeout=120) as http:
                posts = [asyncio.ensure_future(http.post("/v1/chat/completions", json=big)) for _ in range(4)]
                health = []
                while not all(p.done() for p in posts):
                    sent = time.monotonic()
                    assert (await http.get("/health")).status_code == 200
                    health.append((sent, time.monotonic()))
                    await asyncio.sleep(0.01)
                assert all(p.result().status_code == 400 for p in posts)  # far over the context, once tokenized
                return health

        health = asyncio.run(run())
    assert watched.most == 1 and len(watched.threads) == 1 and watched.threads.pop().startswith("msem-prepare")
    assert len(watched.spans) == 4
    within = [(sent, answered) for sent, answered in health
              if any(start < sent and answered < end for start, end in watched.spans)]
    worst = max(answered - sent for sent, answered in health)
    assert within, f"no /health call was answered while a body was tokenized (slowest {worst:.3f} s)"


def test_the_engine_and_the_api_agree_on_a_constrained_greedy_answer(client, async_llm):
    from engine.sampling_params import StructuredOutputs

    async def engine_text() -> str:
        ids = async_llm.tokenizer.encode("JSON:")
        params = SamplingParams(max_tokens=150, temperature=0, structured_outputs=StructuredOutputs(
            "json", json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))))
        return "".join([d.outputs[0].text async for d in async_llm.generate(ids, params) if d.outputs])

    api = client.completions.create(model="tiny", prompt="JSON:", max_tokens=150, temperature=0,
                                    extra_body={"structured_outputs": {"json": SCHEMA}})
    assert api.choices[0].text == asyncio.run(engine_text())
