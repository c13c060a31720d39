"""The OpenAI-compatible HTTP API: a plain Starlette ASGI app over a `Frontend`.

    app = build_http_app(frontend, api_keys=("sk-...",))
    uvicorn.run(app, host="127.0.0.1", port=8000)     # or return it from `__serve_build_asgi_app__`

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/experts` (the expert
placement, load and balancedness, 404 for a model without expert groups), `POST /v1/experts/rebalance` (plan
and apply a new placement from the load window now), `GET /v1/memory` (the KV tiers: the memory store's RAM
and disk, each shard's device pool and host RAM; 404 without a memory store, 503 when it does not answer),
`GET /health` (200 `{"status": "ok"}` when a request could
be served now, else 503 whose message names what is missing, e.g. "expert group 0 has no live replica"; always
within 1 s). With `api_keys`, every `/v1/` route needs `Authorization: Bearer <key>`; `/health` stays open
for load balancers.

Every error is OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`:

    400 invalid_request_error   malformed JSON or UTF-8, wrong types, bad values (`InvalidRequestError`)
    401 invalid_request_error   missing or wrong API key (code invalid_api_key)
    404 invalid_request_error   unknown model (code model_not_found), unknown route, no expert groups
    405 invalid_request_error   wrong method on a route
    413 invalid_request_error   body over `max_body_bytes`, by Content-Length or by the bytes actually read
    429 rate_limit_error        admission limits reached (`OverloadedError`), with a Retry-After header
    503 server_error            nothing can take the request now (code service_unavailable): no shard continued
                                it within the resume timeout, the engine stopped, Ray or Serve could not reach
                                a replica (`as_unavailable`); with a Retry-After header (`limits.retry_after_s`)
    500 server_error            anything else, logged; the message says nothing of the cause

Bodies are read and decoded here, never by a framework, so no 422 can ever be answered. A stream's status
line goes out with its first byte, so the handler awaits the request's first delta before the response starts:
validation and admission errors, which the frontend raises before any delta, still get their own status (and
so does a request that no shard can take: 503). A failure after that is sent as a last `data: {"error": ...}`
event, the body the status would have had, before `data: [DONE]` (the official clients raise it as an
`APIError`). Refusals (the 4xx above and 503) are counted in msem_requests_rejected, by status; `/health`'s
503 is not a refusal and is not counted.

A client that goes away stops its request: the event generator owns the frontend's delta iterator and closes
it however the response ends — finished, the client disconnected (Starlette cancels the sender when uvicorn
reports `http.disconnect`), or the task cancelled by Ray Serve's proxy — and closing it aborts the request on
its shard, which frees its KV blocks. A non-streamed request races generation against `http.disconnect`.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

from importlib.metadata import version as package_version
from typing import TypeVar

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cluster.api_request import ChatRequest, CompletionRequest, parse_detokenize, parse_request, parse_tokenize
from cluster.errors import OverloadedError, UnknownModelError, as_unavailable
from cluster.frontend import Frontend
from cluster.openai_api import ResponseBuilder
from cluster.self_verification import verify
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, merge
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
Run = tuple[list[int], SamplingParams]  # one prompt's token ids and how to sample them
VERSION = package_version("msem")
PING_S = 15  # a comment line this often keeps proxies from closing a quiet stream (a long prefill)
REJECTED = (400, 401, 404, 413, 429, 503)  # refusals counted in msem_requests_rejected, by status
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as it is: HTTP status, OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def build_http_app(frontend: Frontend, *, api_keys: Sequence[str] = (), max_body_bytes: int | None = None,
                   cors_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app; `max_body_bytes` defaults to `frontend.limits.max_body_bytes`; `cors_origins` (none: CORS
    off) are the browser origins allowed to call it ("*": any)."""
    api = _Api(frontend, tuple(api_keys), max_body_bytes or frontend.limits.max_body_bytes)
    routes = [api.route("/v1/models", "GET", api.models), api.route("/v1/models/{model_id:path}", "GET", api.model),
              api.route("/v1/completions", "POST", api.completions),
              api.route("/v1/chat/completions", "POST", api.chat), api.route("/v1/experts", "GET", api.experts),
              api.route("/v1/experts/rebalance", "POST", api.rebalance),
              api.route("/v1/memory", "GET", api.memory),
              api.route("/tokenize", "POST", api.tokenize), api.route("/detokenize", "POST", api.detokenize),
              api.route("/version", "GET", api.version, needs_key=False),
              api.route("/health", "GET", api.health, needs_key=False)]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"])] if cors_origins else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _route_error})


class _Api:
    def __init__(self, frontend: Frontend, api_keys: tuple[str, ...], max_body_bytes: int):
        self.frontend, self.api_keys, self.max_body_bytes = frontend, api_keys, max_body_bytes
        self.created = int(time.time())

    def route(self, path: str, method: str, handler: Handler, needs_key: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if needs_key:
                    self._authorize(request)
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every failure is answered in OpenAI's error JSON
                answer = _api_error(error, self.frontend.limits.retry_after_s)
                if answer.status in REJECTED and self.frontend.metrics:
                    self.frontend.metrics.rejected(str(answer.status))
                return answer.response()

        return Route(path, endpoint, methods=[method])

    # ---- routes ----

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        self.frontend.check_model(request.path_params["model_id"])
        return JSONResponse(self._model())

    async def completions(self, request: Request) -> Response:
        parsed, runs = await self._prepare(request, chat=False)
        return await self._generate(request, parsed, runs)

    async def chat(self, request: Request) -> Response:
        parsed, runs = await self._prepare(request, chat=True)
        return await self._generate(request, parsed, runs)

    async def tokenize(self, request: Request) -> Response:
        parsed = parse_tokenize(_decode(await self._read_body(request)))
        self.frontend.check_model(parsed.model)
        if parsed.messages is not None:
            ids = await self.frontend.off_loop(self.frontend.encode_chat, parsed.messages)
        else:
            ids = await self.frontend.off_loop(self.frontend.tokenizer.encode, parsed.prompt,
                                               parsed.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": self.frontend.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        parsed = parse_detokenize(_decode(await self._read_body(request)))
        self.frontend.check_model(parsed.model)
        return JSONResponse({"prompt": self.frontend.decode(parsed.tokens, param="tokens")})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def experts(self, request: Request) -> Response:
        info = await self.frontend.experts()
        if info is None:
            raise self._no_expert_groups()
        return JSONResponse(info)

    async def rebalance(self, request: Request) -> Response:
        result = await self.frontend.rebalance_experts()
        if result is None:
            raise self._no_expert_groups()
        return JSONResponse(result)

    async def memory(self, request: Request) -> Response:
        info = await self.frontend.memory()
        if info is None:
            raise ApiError(404, "this deployment has no memory store (memory.store is not set)", code="not_found")
        return JSONResponse(info)

    async def health(self, request: Request) -> Response:
        reason = await self.frontend.unavailable_reason()  # bounded: answers within 1 s
        if reason is not None:  # answered, not raised: a probe's 503 is not a refused request
            return _unavailable(reason, self.frontend.limits.retry_after_s).response()
        return JSONResponse({"status": "ok"})

    # ---- helpers ----

    def _model(self) -> dict:
        return {"id": self.frontend.model_name, "object": "model", "created": self.created, "owned_by": "msem",
                "max_model_len": self.frontend.max_model_len}

    async def _prepare(self, request: Request, chat: bool) -> tuple[CompletionRequest | ChatRequest, list[Run]]:
        """The request and what each of its prompts runs; decoding, validation and tokenizing (CPU work that
        grows with the body) run on a worker thread, so the event loop keeps serving meanwhile."""
        body = await self._read_body(request)

        def prepare() -> tuple[CompletionRequest | ChatRequest, list[Run]]:
            parsed = parse_request(_decode(body), chat)
            return parsed, self.frontend.prepare(parsed)

        return await self.frontend.off_loop(prepare)

    def _no_expert_groups(self) -> ApiError:
        return ApiError(404, f"{self.frontend.model_name!r} has no expert groups: its experts (if any) run "
                        "inside the attention shards", code="not_found")

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            message = "missing API key: send the header 'Authorization: Bearer <key>'"
        elif not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.api_keys):
            message = "invalid API key"
        else:
            return
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        too_large = ApiError(413, f"the request body exceeds this server's limit of {self.max_body_bytes:,} "
                             "bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:  # the server rejects malformed lengths
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        return bytes(body)

    async def _generate(self, request: Request, parsed: CompletionRequest | ChatRequest, runs: list[Run]) -> Response:
        frontend = self.frontend
        request_id = f"{'chatcmpl' if parsed.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        builder = ResponseBuilder(parsed, request_id, frontend.model_name)
        if parsed.self_verification is not None:
            [(ids, params)] = runs
            verified = await _unless_disconnected(verify(frontend, parsed, ids, params, request_id), request.receive)
            if verified is None:  # the client is gone: its candidates and verifiers were stopped
                return Response(status_code=499)
            return JSONResponse({**builder.response([verified.output]), "usage": verified.usage,
                                 "self_verification": verified.report})
        streams = [frontend.generate(ids, params, request_id=request_id if len(runs) == 1 else f"{request_id}-{p}",
                                     every_step=parsed.stream) for p, (ids, params) in enumerate(runs)]
        deltas = _interleaved(streams)
        if parsed.stream:
            first = await anext(deltas, None)  # bad input and overload raise here, before the status is sent
            return _EventStream(_events(first, deltas, builder, frontend.limits.retry_after_s))
        outputs = await _unless_disconnected(_collect(deltas, len(runs)), request.receive)
        if outputs is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(builder.response(outputs))


class _EventStream(EventSourceResponse):
    """Server-sent events (sse-starlette: keep-alive pings while a long prompt is prefilled) whose generator is
    closed however the response ends (see the module docstring)."""

    def __init__(self, events: AsyncGenerator[dict, None]):
        super().__init__(events, sep="\n", ping=PING_S, headers={"Cache-Control": "no-cache"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


async def _events(first: tuple[int, RequestOutput] | None, deltas: AsyncGenerator[tuple[int, RequestOutput], None],
                  builder: ResponseBuilder, retry_after_s: int) -> AsyncGenerator[dict, None]:
    try:
        for chunk in builder.chunks(first[1], first[0]) if first is not None else ():
            yield _sse(chunk)
        async for prompt_index, delta in deltas:
            for chunk in builder.chunks(delta, prompt_index):
                yield _sse(chunk)
        if builder.request.include_usage:
            yield _sse(builder.usage_chunk())
    except Exception as error:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield _sse(_api_error(error, retry_after_s).body())
    finally:
        await deltas.aclose()
    yield {"data": "[DONE]"}


async def _interleaved(streams: list[AsyncGenerator[RequestOutput, None]]
                       ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The deltas of several prompts' streams as they come, each with its prompt's index; closing this closes
    them all. One stream is read directly."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        async with contextlib.aclosing(stream):
            async for delta in stream:
                await queue.put((index, delta))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    waiter = asyncio.ensure_future(asyncio.gather(*tasks))
    try:
        while not (waiter.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait((getter, waiter), return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
                waiter.result()  # a failed stream raises here
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()


async def _collect(deltas: AsyncIterator[tuple[int, RequestOutput]], num_prompts: int) -> list[RequestOutput]:
    """Each prompt's deltas merged."""
    outputs: list[RequestOutput | None] = [None] * num_prompts
    async for prompt_index, delta in deltas:
        outputs[prompt_index] = merge(outputs[prompt_index], delta)
    assert all(output is not None for output in outputs), "every prompt's stream ends with a delta"
    return outputs  # type: ignore[return-value]


async def _unless_disconnected(result: Awaitable[T], receive: Receive) -> T | None:
    """`result`, or None when the client disconnects first: then the work is cancelled, which closes its
    streams and so aborts its requests on their shards."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(result), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    return None if work.cancelled() else work.result()


def _decode(body: bytes) -> object:
    """A request body as JSON; 400 when it is not UTF-8 or not JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {error.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


def _sse(data: dict) -> dict:
    return {"data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


def _api_error(error: Exception, retry_after_s: int) -> ApiError:
    """The HTTP answer to an exception raised while serving a request (the table in the module docstring)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequestError):
        return ApiError(400, str(error), param=error.param)
    if isinstance(error, UnknownModelError):
        return ApiError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, OverloadedError):
        return ApiError(429, str(error), "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(error.retry_after)})
    if (unavailable := as_unavailable(error)) is not None:
        return _unavailable(str(unavailable), retry_after_s)
    logger.error("request failed", exc_info=error)
    return ApiError(500, "internal server error", "server_error", code="internal_error")


def _unavailable(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, "server_error", code="service_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


async def _route_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (404 no route, 405 wrong method) in OpenAI's error JSON."""
    assert isinstance(error, HTTPException)
    where = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        message, code = f"no such route: {where}", "not_found"
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message, code = f"method not allowed: {where}; this route takes {allowed}", "method_not_allowed"
    else:
        message, code = str(error.detail), None
    return ApiError(error.status_code, message, code=code, headers=error.headers).response()
