"""The gRPC API on 127.0.0.1 over the tiny engine: every RPC, every status code, cancellation, client and CLI.

The server runs on an event loop in a background thread (grpc.aio needs one, and the engine's request streams
belong to it); the tests are synchronous gRPC clients, as a user's program would be.
"""

import json
import socket
import time

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster import cli
from cluster.client import InferenceClient, InvalidRequest, ModelNotFound, Unauthenticated, Unavailable
from cluster.config import Limits
from cluster.frontend import Frontend, LocalShards
from cluster.grpc_api import SERVICE_NAME
from engine.errors import EngineDeadError
from engine.outputs import merge
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc
from tests.unit.cluster.conftest import run_in as _run

PROMPT = "The quick brown fox"
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = pb.SamplingParams(max_tokens=240, ignore_eos=True)  # seconds on a CPU: every test using it cuts it short
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class ControlledShards(LocalShards):
    """The test engine as a shard, with a health flag and a failure to raise instead of running requests.

    `ends` records how each request's stream ended: "finished", or "aborted" when it was closed early (which
    aborts the request in the engine) — so a test tells a stopped generation from one that ran to its end.
    """

    def __init__(self, llm, is_healthy: bool = True, error: BaseException | None = None):
        super().__init__(llm)
        self.is_healthy, self.error, self.ends = is_healthy, error, []

    async def stream(self, request):
        if self.error is not None:
            raise self.error
        finished = False
        try:
            async for delta in super().stream(request):
                finished = delta.finished
                yield delta
        finally:
            self.ends.append("finished" if finished else "aborted")

    async def healthy(self) -> bool:
        return self.is_healthy


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.01)


def _engine_output(loop, async_llm, params: SamplingParams, messages: list[dict] | None = None):
    """What the engine itself answers, all deltas merged."""
    async def run():
        out = None
        deltas = async_llm.chat(messages, params) if messages else async_llm.generate(PROMPT, params)
        async for delta in deltas:
            out = merge(out, delta)
        return out
    return _run(loop, run())


def _code(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status a failing unary or streaming call answers."""
    with pytest.raises(grpc.RpcError) as error:
        response = call(request, **kwargs)
        if isinstance(response, grpc.Call):  # a stream: its status comes at the end
            list(response)
    return error.value.code(), error.value.details()


def _frontend(async_llm, shards: ControlledShards, limits: Limits = Limits()) -> Frontend:
    return Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, async_llm.llm.engine.model.config.vocab_size,
                    shards, limits)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the RPCs ----

def test_generate_is_the_engines_greedy_output(serve, loop, async_llm):
    reference = _engine_output(loop, async_llm, SamplingParams(**GREEDY)).outputs[0]
    ids = async_llm.tokenizer.encode(PROMPT)
    with InferenceClient(serve()) as client:
        for prompt in (PROMPT, ids):  # text, and the same prompt as token ids
            response = client.generate(prompt, **GREEDY)
            (choice,) = response.choices
            assert (choice.text, list(choice.token_ids), choice.finish_reason) == \
                (reference.text, reference.token_ids, "length")
            assert response.model == "tiny" and response.id.startswith("cmpl-")
            assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
                (len(ids), 12, len(ids) + 12)


def test_stream_deltas_add_up_to_the_unary_answer(serve):
    with InferenceClient(serve()) as client:
        whole = client.generate(PROMPT, n=2, **GREEDY)
        messages = list(client.generate_stream(PROMPT, n=2, **GREEDY))
    assert len(messages) > 2 and all(not m.HasField("usage") for m in messages[:-1])
    assert messages[-1].usage == whole.usage
    for choice in whole.choices:
        deltas = [c for m in messages for c in m.choices if c.index == choice.index]
        assert "".join(c.text for c in deltas) == choice.text
        assert [t for c in deltas for t in c.token_ids] == list(choice.token_ids)
        assert [c.finish_reason for c in deltas] == [""] * (len(deltas) - 1) + ["length"]
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens == 24


def test_chat_and_chat_stream_answer_as_the_engine(serve, loop, async_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reference = _engine_output(loop, async_llm, SamplingParams(**GREEDY), messages=messages).outputs[0]
    with InferenceClient(serve()) as client:
        answer = client.chat(messages, **GREEDY).choices[0]
        streamed = list(client.chat_stream(messages, **GREEDY))
    assert (answer.text, list(answer.token_ids)) == (reference.text, reference.token_ids)
    assert "".join(c.text for m in streamed for c in m.choices) == reference.text
    assert streamed[-1].usage.prompt_tokens == len(async_llm.tokenizer.encode_chat(messages))


def test_logprobs_and_stop_reasons(serve, loop, async_llm):
    reference = _engine_output(loop, async_llm, SamplingParams(**GREEDY, logprobs=2)).outputs[0]
    with InferenceClient(serve()) as client:
        choice = client.generate(PROMPT, logprobs=2, **GREEDY).choices[0]
        first, stop = choice.token_ids[0], reference.text[3:5]
        stopped = client.generate(PROMPT, **GREEDY | {"stop_token_ids": [first]}).choices[0]
        cut = client.generate(PROMPT, **GREEDY | {"stop": stop}).choices[0]  # one string, not a list
    assert len(choice.logprobs) == len(choice.token_ids)
    for token_id, position, expected in zip(choice.token_ids, choice.logprobs, reference.logprobs, strict=True):
        assert position.sampled.token_id == token_id and position.sampled.rank == 1  # greedy
        assert [t.rank for t in position.top] == [1, 2] and position.top[0] == position.sampled
        for entry in (position.sampled, *position.top):
            assert entry.logprob == pytest.approx(expected[entry.token_id].logprob, abs=1e-5)
            assert entry.token == expected[entry.token_id].decoded_token
    assert (stopped.finish_reason, stopped.WhichOneof("stop_reason"), stopped.stop_token_id) == \
        ("stop", "stop_token_id", first)
    assert (cut.text, cut.finish_reason, cut.stop_string) == (reference.text[:reference.text.index(stop)], "stop", stop)


def test_list_models_tokenize_and_detokenize(serve, async_llm):
    with InferenceClient(serve()) as client:
        (model,) = client.list_models()
        tokens = client.tokenize("Hello world")
        text = client.detokenize(tokens.token_ids)
        with pytest.raises(InvalidRequest, match=rf"token id {model.vocab_size} is outside the vocabulary \[0, "):
            client.detokenize([1, model.vocab_size])
    assert (model.id, model.max_model_len, model.vocab_size) == ("tiny", 256, async_llm.tokenizer.vocab_size)
    assert list(tokens.token_ids) == async_llm.tokenizer.encode("Hello world")
    assert len(tokens.pieces) == len(tokens.token_ids) and "".join(tokens.pieces).lstrip() == "Hello world"
    assert text == "Hello world"


def test_health_follows_the_frontend_and_reflection_lists_the_services(serve, async_llm):
    shards = ControlledShards(async_llm, is_healthy=False)
    frontend = _frontend(async_llm, shards)
    with grpc.insecure_channel(serve(frontend, health_interval_s=0.02)) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def statuses():
            return [health.Check(health_pb2.HealthCheckRequest(service=s)).status for s in ("", SERVICE_NAME)]

        assert statuses() == [NOT_SERVING, NOT_SERVING]
        shards.is_healthy = True
        _wait_until(lambda: statuses() == [SERVING, SERVING])

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in reply.list_services_response.service}
        # v1, what grpcurl asks first, answers the same messages (v1 and v1alpha share their fields)
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        (reply,) = v1(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]))
        assert reply.file_descriptor_response.file_descriptor_proto
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= services


SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["word", "count"], "additionalProperties": False}


def test_structured_output_and_vllm_fields(serve, async_llm):
    with InferenceClient(serve()) as client:
        out = client.chat("Answer as JSON", max_tokens=100, temperature=1.0, seed=3, n=2,
                          structured_outputs={"json": SCHEMA})
        for choice in out.choices:
            jsonschema.validate(json.loads(choice.text), SCHEMA)
        stream = client.generate_stream("Answer as JSON", max_tokens=100, temperature=0.7, seed=1,
                                        structured_outputs={"json": SCHEMA})
        jsonschema.validate(json.loads("".join(c.text for m in stream for c in m.choices)), SCHEMA)
        picked = client.generate("Pick:", max_tokens=10, temperature=1.0, seed=2, n=4,
                                 structured_outputs={"choice": ["yes", "no"]})
        assert {c.text for c in picked.choices} <= {"yes", "no"}
        with pytest.raises(InvalidRequest, match="structured_outputs.regex"):
            client.generate("Hi", structured_outputs={"regex": "(a"})
        scored = client.generate(PROMPT, max_tokens=2, prompt_logprobs=1, truncate_prompt_tokens=3)
        assert scored.usage.prompt_tokens == 3 and len(scored.prompt_logprobs) == 2
        assert [p.sampled.token_id for p in scored.prompt_logprobs] == async_llm.tokenizer.encode(PROMPT)[-2:]


def test_the_client_refuses_what_the_server_would_before_sending(serve):
    with InferenceClient(f"127.0.0.1:{_free_port()}") as client:  # no server: nothing is sent
        with pytest.raises(InvalidRequest, match="no \"temprature\" field"):
            client.generate("Hi", temprature=0)
        with pytest.raises(InvalidRequest, match="structured_outputs.choice must be a non-empty list"):
            client.generate("Hi", structured_outputs={"choice": []})
        with pytest.raises(InvalidRequest, match="structured_outputs takes exactly one"):
            client.generate("Hi", structured_outputs={"json_object": False})


# ---- status codes ----

@pytest.mark.parametrize("rpc, request_, message", [
    ("Generate", pb.GenerateRequest(), "no prompt"),
    ("Generate", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    ("GenerateStream", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(n=17)), "between 1 and 16"),
    ("Generate", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(min_tokens=9, max_tokens=3)),
     "min_tokens"),
    ("GenerateStream", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(prompt_logprobs=1)),
     "prompt_logprobs is not available with stream"),
    ("Generate", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
        structured_outputs=pb.StructuredOutputs(json='{"type": "object", "properties": {"a": {"$ref": "#/x"}}}'))),
     "structured_outputs.json"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], sampling=pb.SamplingParams(
        structured_outputs=pb.StructuredOutputs(regex="(a"))), "structured_outputs.regex"),
    ("Generate", pb.GenerateRequest(text="hello " * 100, sampling=pb.SamplingParams(max_tokens=100)),
     "context is 256 tokens"),
    ("Generate", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(seed=2**63)), "seed"),
    ("Generate", pb.GenerateRequest(text="hello " * 300), "max_model_len"),
    ("Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**9])), "outside the vocabulary"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="assistant", content="Hi")]), "user turn first"),
    ("ChatStream", pb.ChatRequest(messages=[pb.ChatMessage(role="pirate", content="Arr")]), "role"),
], ids=["no-prompt", "temperature", "n-over-limit", "min-tokens", "prompt-logprobs-stream", "bad-schema",
        "bad-regex", "over-context", "seed", "too-long", "vocabulary", "chat-order", "chat-role"])
def test_bad_requests_are_invalid_argument(serve, rpc, request_, message):
    with grpc.insecure_channel(serve()) as channel:
        code, details = _code(getattr(inference_pb2_grpc.InferenceStub(channel), rpc), request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_unknown_model_is_not_found(serve):
    with grpc.insecure_channel(serve()) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for call, request in ((stub.Generate, pb.GenerateRequest(model="gpt-4", text="Hi")),
                              (stub.ChatStream, pb.ChatRequest(model="gpt-4", messages=[pb.ChatMessage(
                                  role="user", content="Hi")])),
                              (stub.Tokenize, pb.TokenizeRequest(model="gpt-4", text="Hi")),
                              (stub.Detokenize, pb.DetokenizeRequest(model="gpt-4", token_ids=[1]))):
            code, details = _code(call, request)
            assert code == grpc.StatusCode.NOT_FOUND and "'gpt-4' does not exist" in details and "tiny" in details


def test_admission_limit_is_resource_exhausted_and_cancel_aborts(serve, async_llm):
    shards = ControlledShards(async_llm)
    frontend = _frontend(async_llm, shards, Limits(max_requests=1))
    with grpc.insecure_channel(serve(frontend)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(text=PROMPT, sampling=LONG))
        next(stream)  # admitted and generating
        code, details = _code(stub.Generate, pb.GenerateRequest(text=PROMPT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in 1 s" in details
        stream.cancel()
        _wait_until(lambda: async_llm.num_unfinished_requests == 0 and frontend.num_requests == 0)
        assert shards.ends == ["aborted"] and frontend.tokens_in_flight == 0
        assert stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=2))).choices
        assert shards.ends == ["aborted", "finished"]


def test_passed_deadline_stops_generating(serve, async_llm):
    shards = ControlledShards(async_llm)
    frontend = _frontend(async_llm, shards)
    verified = pb.GenerateRequest(text=PROMPT, sampling=LONG, self_verification=pb.SelfVerification(candidates=3))
    with grpc.insecure_channel(serve(frontend)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for call, request in ((stub.Generate, pb.GenerateRequest(text=PROMPT, sampling=LONG)),
                              (stub.GenerateStream, pb.GenerateRequest(text=PROMPT, sampling=LONG)),
                              (stub.Generate, verified)):  # the candidates stop too
            code, _ = _code(call, request, timeout=0.3)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            _wait_until(lambda: async_llm.num_unfinished_requests == 0 and frontend.num_requests == 0)
    assert shards.ends == ["aborted", "aborted", "aborted"]


def test_api_keys_guard_inference_but_not_health(serve):
    target = serve(api_keys=("secret",))
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "secret"),)):
            code, details = _code(stub.ListModels, pb.ListModelsRequest(), metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        assert stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer secret"),)).models
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
    with InferenceClient(target, api_key="secret") as client:
        assert client.tokenize("Hi").token_ids
    with InferenceClient(target) as client, pytest.raises(Unauthenticated):
        client.list_models()


def _unreachable() -> Exception:
    """Serve's error for a deployment that has no replica to take a request."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    return DeploymentUnavailableError(DeploymentID("AttentionShard", "msem"))


@pytest.mark.parametrize("error, code, counted", [
    (EngineDeadError("the engine stopped"), grpc.StatusCode.UNAVAILABLE, ["503", "503"]),
    (_unreachable(), grpc.StatusCode.UNAVAILABLE, ["503", "503"]),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL, []),
], ids=["engine-dead", "no-replica", "bug"])
def test_shard_failures(serve, async_llm, monkeypatch, error, code, counted):
    frontend = _frontend(async_llm, ControlledShards(async_llm, error=error))
    rejected = []
    monkeypatch.setattr(frontend.metrics, "rejected", rejected.append)
    with grpc.insecure_channel(serve(frontend)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for rpc in (stub.Generate, stub.GenerateStream):
            status, details = _code(rpc, pb.GenerateRequest(text="Hi"))
            assert status == code and "AttentionShard" not in details
        assert frontend.num_requests == 0
    assert rejected == counted


def test_oversized_message_is_refused(serve):
    with grpc.insecure_channel(serve(max_message_bytes=1024)) as channel:
        code, _ = _code(inference_pb2_grpc.InferenceStub(channel).Tokenize, pb.TokenizeRequest(text="x" * 2000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- the client and `msem client` ----

def test_client_errors_and_early_exit(serve, async_llm):
    shards = ControlledShards(async_llm)
    with InferenceClient(serve(_frontend(async_llm, shards))) as client:
        with pytest.raises(ModelNotFound, match="gpt-4"):
            client.generate("Hi", model="gpt-4")
        with pytest.raises(InvalidRequest, match="top_p") as error:
            client.chat("Hi", top_p=0)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        stream = client.generate_stream(PROMPT, max_tokens=240, ignore_eos=True)
        next(stream)
        stream.close()  # the caller stops reading: the call is cancelled, the request aborted
        _wait_until(lambda: shards.ends == ["aborted"])
        assert client.health() == "SERVING"
    with InferenceClient(f"127.0.0.1:{_free_port()}") as client, pytest.raises(Unavailable, match="unavailable"):
        client.list_models()


def test_msem_client_commands(serve, loop, async_llm, capsys):
    target = serve()
    reference = _engine_output(loop, async_llm, SamplingParams(max_tokens=6, temperature=0.0)).outputs[0].text
    for stream in ([], ["--stream"]):
        assert cli.main(["client", "generate", "--target", target, "--prompt", PROMPT, "--max-tokens", "6",
                         *stream]) == 0
        out, err = capsys.readouterr()
        assert out == reference + "\n" and "finish_reason" in err
    assert cli.main(["client", "chat", "--target", target, "--prompt", "Hi", "--max-tokens", "2", "--stream"]) == 0
    assert "2 completion" in capsys.readouterr().err
    assert cli.main(["client", "models", "--target", target]) == 0
    assert capsys.readouterr().out.startswith("tiny\tmax_model_len=256")
    assert cli.main(["client", "tokenize", "Hello", "--target", target]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{async_llm.tokenizer.bos_id}\t''"
    assert cli.main(["client", "detokenize", *map(str, async_llm.tokenizer.encode("Hello")), "--target", target]) == 0
    assert capsys.readouterr().out == "Hello\n"
    assert cli.main(["client", "health", "--target", target]) == 0
    assert capsys.readouterr().out == "SERVING\n"


def test_msem_client_errors_exit_2(serve, capsys):
    for target, args, message in ((serve(), ["--temperature", "-1"], "error: temperature must be >= 0"),
                                  (f"127.0.0.1:{_free_port()}", [], "error: the server at 127.0.0.1:")):
        assert cli.main(["client", "generate", "--target", target, "--prompt", "Hi", *args]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(message) and "Traceback" not in err and out == ""


def test_usage_reports_the_prompt_tokens_served_from_the_cache(serve):
    prompt = "A gRPC client's system prompt, sent word for word with every question it asks of this server. " * 2
    with InferenceClient(serve()) as client:
        first = client.generate(prompt, **GREEDY).usage
        again = client.generate(prompt, **GREEDY).usage
        streamed = list(client.generate_stream(prompt, **GREEDY))[-1].usage
    full_blocks = (first.prompt_tokens - 1) // 16 * 16  # block size 16; the last token is always computed
    assert first.prompt_tokens_details.cached_tokens == 0 and full_blocks > 0
    assert again.prompt_tokens_details.cached_tokens == streamed.prompt_tokens_details.cached_tokens == full_blocks
