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
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cluster.errors import OverloadedError, UnknownModelError, as_unavailable
from cluster.frontend import Frontend
from cluster.openai_api import ApiRequest, ResponseBuilder, parse_chat_request, parse_completion_request
from engine.errors import InvalidRequestError
from engine.llm import merge
from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
REJECTED = (400, 401, 404, 413, 429, 503)  # refusals counted in msem_requests_rejected, by status


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


def build_http_app(frontend: Frontend, *, api_keys: Sequence[str] = (), max_body_bytes: int | None = None
                   ) -> Starlette:
    """The ASGI app; `max_body_bytes` defaults to `frontend.limits.max_body_bytes`."""
    api = _Api(frontend, tuple(api_keys), max_body_bytes or frontend.limits.max_body_bytes)
    routes = [api.route("/v1/models", "GET", api.models), api.route("/v1/completions", "POST", api.completions),
              api.route("/v1/chat/completions", "POST", api.chat), api.route("/v1/experts", "GET", api.experts),
              api.route("/v1/experts/rebalance", "POST", api.rebalance),
              api.route("/v1/memory", "GET", api.memory),
              api.route("/health", "GET", api.health, needs_key=False)]
    return Starlette(routes=routes, exception_handlers={HTTPException: _route_error})


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
        model = {"id": self.frontend.model_name, "object": "model", "created": self.created, "owned_by": "msem",
                 "max_model_len": self.frontend.max_model_len}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        parsed = parse_completion_request(await self._read_json(request))
        self.frontend.check_model(parsed.model)
        assert parsed.prompt is not None
        return await self._generate(request, parsed, self.frontend.encode(parsed.prompt))

    async def chat(self, request: Request) -> Response:
        parsed = parse_chat_request(await self._read_json(request))
        self.frontend.check_model(parsed.model)
        assert parsed.messages is not None
        ids = self.frontend.encode_chat(parsed.messages)
        return await self._generate(request, parsed, ids)

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

    async def _read_json(self, request: Request) -> object:
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
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {error.start})") from None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None

    async def _generate(self, request: Request, parsed: ApiRequest, ids: list[int]) -> Response:
        frontend = self.frontend
        params = parsed.sampling_params(len(ids), frontend.max_model_len)
        request_id = f"{'chatcmpl' if parsed.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        builder = ResponseBuilder(parsed, request_id, frontend.model_name)
        deltas = frontend.generate(ids, params, request_id=request_id, every_step=parsed.stream)
        if parsed.stream:
            first = await anext(deltas, None)  # bad input and overload raise here, before the status is sent
            return _EventStream(_events(first, deltas, builder, frontend.limits.retry_after_s))
        output = await _collect(deltas, request.receive)
        if output is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(builder.response(output))


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (see the module docstring)."""

    def __init__(self, events: AsyncGenerator[bytes, None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


async def _events(first: RequestOutput | None, deltas: AsyncGenerator[RequestOutput, None],
                  builder: ResponseBuilder, retry_after_s: int) -> AsyncGenerator[bytes, None]:
    try:
        for chunk in builder.chunks(first) if first is not None else ():
            yield _sse(chunk)
        async for delta in deltas:
            for chunk in builder.chunks(delta):
                yield _sse(chunk)
        if builder.request.include_usage:
            yield _sse(builder.usage_chunk())
    except Exception as error:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield _sse(_api_error(error, retry_after_s).body())
    finally:
        await deltas.aclose()
    yield b"data: [DONE]\n\n"


async def _collect(deltas: AsyncIterator[RequestOutput], receive: Receive) -> RequestOutput | None:
    """All deltas merged; None when the client disconnects first, which stops the request."""

    async def merged() -> RequestOutput | None:
        output = None
        async for delta in deltas:
            output = merge(output, delta)
        return output

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(merged()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    return None if work.cancelled() else work.result()


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


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
