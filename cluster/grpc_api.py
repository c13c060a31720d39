"""The gRPC API: `msem.inference.v1.Inference` (protos/inference.proto) over a `Frontend`.

It is the HTTP API's twin on the same edge: its messages are read into the HTTP API's request model
(`cluster/grpc_messages.py`) and the `Frontend` tokenizes, validates and admits every request, so both APIs
refuse the same requests with the same messages. This module only translates — engine deltas to `Choice`
messages, and errors to status codes (`_status`):
INVALID_ARGUMENT for an `InvalidRequestError`, NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED when admission
refuses, UNAVAILABLE when nothing can take the request now (no shard continued it within the resume timeout,
the engine stopped, Ray or Serve could not reach a replica: `as_unavailable`; gRPC clients retry that code),
INTERNAL (logged) for anything else. A stream that has sent messages ends with the same status.

Every generation is read inside `aclosing(frontend.generate(...))`. When the client cancels or its deadline
passes, gRPC cancels the handler's task; the cancellation leaves through that block, which closes the
frontend's iterator and so aborts the request on its shard and frees its KV blocks at once.

With `api_keys`, every Inference call needs metadata `authorization: Bearer <key>` (UNAUTHENTICATED
otherwise). The standard grpc.health.v1 service and server reflection stay open, so load balancers, probes and
grpcurl work without a key; reflection answers as `grpc.reflection.v1` and `v1alpha`. Health follows
`frontend.healthy()`, re-read every `health_interval_s` seconds by a task that ends with the server.
"""

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cluster.errors import OverloadedError, UnknownModelError, as_unavailable
from cluster import tool_calls
from cluster.api_request import ChatRequest, CompletionRequest
from cluster.frontend import Frontend, usage
from cluster.grpc_messages import read_request
from cluster.self_verification import verify
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, Logprob, PositionLogprobs, merge, ranked
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "msem.inference.v1.Inference"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

REJECTED = {grpc.StatusCode.INVALID_ARGUMENT: "400", grpc.StatusCode.UNAUTHENTICATED: "401",
            grpc.StatusCode.NOT_FOUND: "404", grpc.StatusCode.RESOURCE_EXHAUSTED: "429",
            grpc.StatusCode.UNAVAILABLE: "503"}
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModelError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """The Inference service: each RPC checks the key, builds the request, and runs it on the frontend."""

    def __init__(self, frontend: Frontend, api_keys: Sequence[str] = ()):
        self.frontend = frontend
        self._api_keys = tuple(key.encode() for key in api_keys)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._rpc(context):
            return await self._complete(*await self._prepare(request, stream=False))

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._rpc(context):
            await self._stream(context, *await self._prepare(request, stream=True))

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._rpc(context):
            return await self._complete(*await self._prepare(request, stream=False))

    async def ChatStream(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._rpc(context):
            await self._stream(context, *await self._prepare(request, stream=True))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self._rpc(context):
            f = self.frontend
            return pb.ListModelsResponse(models=[pb.Model(id=f.model_name, max_model_len=f.max_model_len,
                                                          vocab_size=f.vocab_size)])

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async with self._rpc(context):
            self.frontend.check_model(_model(request))
            ids = self.frontend.encode(request.text)
            tokenizer = self.frontend.tokenizer
            return pb.TokenizeResponse(token_ids=ids,
                                       pieces=[tokenizer.decode([i], continues_text=True) for i in ids])

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        async with self._rpc(context):
            self.frontend.check_model(_model(request))
            return pb.DetokenizeResponse(text=self.frontend.decode(request.token_ids, param="token_ids"))

    # ---- request in, deltas out ----

    async def _prepare(self, request: pb.GenerateRequest | pb.ChatRequest, stream: bool
                       ) -> tuple[CompletionRequest | ChatRequest, list[int], SamplingParams]:
        """The request, its prompt's ids and sampling params, read through the HTTP API's request model on a
        worker thread (tokenizing grows with the prompt; the event loop keeps serving meanwhile)."""
        if not isinstance(request, pb.ChatRequest) and request.WhichOneof("prompt") is None:
            raise InvalidRequestError("the request has no prompt: set `text` or `token_ids`", param="prompt")

        def prepare() -> tuple[CompletionRequest | ChatRequest, list[int], SamplingParams]:
            parsed = read_request(request, stream)
            [(ids, params)] = self.frontend.prepare(parsed)
            return parsed, ids, params

        return await self.frontend.off_loop(prepare)

    async def _complete(self, request: CompletionRequest | ChatRequest, ids: list[int],
                        params: SamplingParams) -> pb.GenerateResponse:
        if request.self_verification is not None:
            verified = await verify(self.frontend, request, ids, params, f"cmpl-{uuid.uuid4().hex}")
            output = verified.output
            return pb.GenerateResponse(id=output.request_id, model=self.frontend.model_name,
                                       choices=[_choice(c, request, params.logprobs, c.tool_text)
                                                for c in output.outputs],
                                       usage=pb.Usage(**verified.usage), selected=verified.report["selected"],
                                       candidates=[pb.Candidate(**c) for c in verified.report["candidates"]])
        output = None
        async with contextlib.aclosing(self.frontend.generate(ids, params, every_step=False)) as deltas:
            async for delta in deltas:
                output = merge(output, delta)
        assert output is not None and output.finished, "a request's stream ends with its finished delta"
        prompt_logprobs = [_position(lp, token_id, params.prompt_logprobs or 0)
                           for lp, token_id in zip((output.prompt_logprobs or [None])[1:], ids[1:])]
        return pb.GenerateResponse(id=output.request_id, model=self.frontend.model_name,
                                   choices=[_choice(c, request, params.logprobs, c.tool_text) for c in output.outputs],
                                   usage=_usage(len(ids), output.outputs, output.num_cached_tokens),
                                   prompt_logprobs=prompt_logprobs)

    async def _stream(self, context: grpc.aio.ServicerContext, request: CompletionRequest | ChatRequest,
                      ids: list[int], params: SamplingParams) -> None:
        sent: dict[int, CompletionOutput] = {}  # per choice: its tokens, tool text and reasoning tokens so far
        async with contextlib.aclosing(self.frontend.generate(ids, params)) as deltas:
            async for delta in deltas:
                for c in delta.outputs:
                    acc = sent.setdefault(c.index, CompletionOutput(c.index, "", []))
                    acc.token_ids += c.token_ids
                    acc.tool_text += c.tool_text
                    acc.num_reasoning_tokens += c.num_reasoning_tokens
                choices = [_choice(c, request, params.logprobs,
                                   sent[c.index].tool_text if c.finish_reason is not None else None)
                           for c in delta.outputs]
                message = pb.GenerateStreamResponse(id=delta.request_id, model=self.frontend.model_name,
                                                    choices=choices)
                if delta.finished:
                    message.usage.CopyFrom(_usage(len(ids), list(sent.values()), delta.num_cached_tokens))
                await context.write(message)

    # ---- keys and errors ----

    @contextlib.asynccontextmanager
    async def _rpc(self, context: grpc.aio.ServicerContext):
        """Check the API key, then run the RPC's body, answering its errors with their status codes."""
        if self._api_keys and not self._authorized(context):
            self._rejected(grpc.StatusCode.UNAUTHENTICATED)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata `authorization: Bearer <key>`")
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes a status; cancellation passes
            code, message = _status(error)
            if code is None:
                logger.exception("gRPC request failed")
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"internal server error ({type(error).__name__}); the server logged it")
            self._rejected(code)
            await context.abort(code, message)

    def _rejected(self, code: grpc.StatusCode) -> None:
        """Count a refusal under the HTTP status of the same meaning, as the HTTP edge does."""
        if code in REJECTED and self.frontend.metrics:
            self.frontend.metrics.rejected(REJECTED[code])

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(key.encode(), k) for k in self._api_keys)


def _status(error: Exception) -> tuple[grpc.StatusCode | None, str]:
    """The status code and details for a failed RPC; None for an unexpected error (INTERNAL)."""
    if (unavailable := as_unavailable(error)) is not None:
        return grpc.StatusCode.UNAVAILABLE, str(unavailable)
    return next((code for kind, code in _STATUS if isinstance(error, kind)), None), str(error)


def _model(request: pb.TokenizeRequest | pb.DetokenizeRequest) -> str | None:
    return request.model if request.HasField("model") else None


def _choice(out: CompletionOutput, request: CompletionRequest | ChatRequest, num_top: int | None,
            tool_text: str | None) -> pb.Choice:
    """One choice (or a stream's delta of it); `tool_text`: the choice's whole tool-call text once it finished,
    None before (a stream holds tool calls back until they are whole)."""
    uses_tools = isinstance(request, ChatRequest) and request.uses_tools
    calls, text = tool_calls.split(tool_text or "", out.text, uses_tools, cut=out.finish_reason == "length") \
        if tool_text is not None else (None, out.text + ("" if uses_tools else tool_calls.plain_text(out.tool_text)))
    show_reasoning = not isinstance(request, ChatRequest) or request.include_reasoning
    choice = pb.Choice(index=out.index, text=text, token_ids=out.token_ids,
                       finish_reason=tool_calls.finish_reason(out.finish_reason, bool(calls)) or "",
                       reasoning=out.reasoning if show_reasoning else "",
                       tool_calls=[pb.ToolCall(id=c["id"], name=c["function"]["name"],
                                               arguments=c["function"]["arguments"]) for c in calls or ()])
    if out.logprobs is not None:
        choice.logprobs.extend(_position(lp, token_id, num_top or 0)
                               for token_id, lp in zip(out.token_ids, out.logprobs, strict=True))
    if isinstance(out.stop_reason, str):
        choice.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        choice.stop_token_id = out.stop_reason
    return choice


def _usage(num_prompt: int, outputs: list[CompletionOutput], num_cached: int) -> pb.Usage:
    return pb.Usage(**usage(num_prompt, sum(len(c.token_ids) for c in outputs), num_cached,
                            sum(c.num_reasoning_tokens for c in outputs)))


def _position(logprobs: PositionLogprobs, token_id: int, num_top: int) -> pb.PositionLogprobs:
    """The sampled (or prompt) token and the `num_top` best; the token is an extra, last entry when it ranks
    below them."""
    def entry(tid: int, lp: Logprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=tid, token=lp.decoded_token or "", logprob=lp.logprob, rank=lp.rank)

    return pb.PositionLogprobs(sampled=entry(token_id, logprobs[token_id]),
                               top=[entry(tid, lp) for tid, lp in ranked(logprobs)[:num_top]])


# ---- the server ----

class _Health(health.aio.HealthServicer):
    """grpc.health.v1 from `frontend.healthy()`, for the whole server ("") and the Inference service."""

    def __init__(self, frontend: Frontend):
        super().__init__()
        self._frontend = frontend
        self._poller: asyncio.Task | None = None

    async def start(self, server: grpc.aio.Server, interval_s: float) -> None:
        await self._refresh()
        self._poller = asyncio.create_task(self._poll(server, interval_s))

    async def _poll(self, server: grpc.aio.Server, interval_s: float) -> None:
        while await server.wait_for_termination(interval_s):  # True: timed out, the server still runs
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            is_healthy = await self._frontend.healthy()
        except Exception as error:  # noqa: BLE001 - a failing check means not serving
            logger.warning("health check failed: %r", error)
            is_healthy = False
        status = health_pb2.HealthCheckResponse.SERVING if is_healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection as `grpc.reflection.v1` (what grpcurl and current clients ask first) and `v1alpha`.

    grpcio-reflection ships only v1alpha; v1 is the same service under a new package, with messages of the same
    fields and numbers, so v1alpha's servicer answers it unchanged, registered under v1's name."""
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(services, server)
    servicer = reflection.ReflectionServicer(services)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1,
                                                                          {"ServerReflectionInfo": handler}),))


async def start_grpc_server(frontend: Frontend, host: str, port: int, *, api_keys: Sequence[str] = (),
                            max_message_bytes: int | None = None,
                            health_interval_s: float = 5.0) -> tuple[grpc.aio.Server, int]:
    """Start the Inference, health and reflection services on `host:port` (0: any free port) in the running
    event loop; returns the started server and the port it bound. Stop it with `await server.stop(grace)`.

    `max_message_bytes` bounds a request message (default: `frontend.limits.max_body_bytes`, as for HTTP).
    """
    limit = max_message_bytes if max_message_bytes is not None else frontend.limits.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(frontend, api_keys), server)
    health_servicer = _Health(frontend)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    await health_servicer.start(server, health_interval_s)
    return server, bound
