"""`AsyncLLM`: the engine for servers. Add a request, iterate its deltas asynchronously, abort it.

    llm = AsyncLLM(model="tiny")
    async for delta in llm.generate("Hello", SamplingParams(max_tokens=16)):
        print(delta.outputs[0].text, end="")

One background thread owns the `LLMEngine` (which is single-threaded) and steps it while any request is
unfinished; it sleeps when there is none. Callers talk to it through a command queue, and it hands deltas back
to each request's event loop with `call_soon_threadsafe`. Requests are validated in the caller's thread
(`LLMEngine.validate` is pure), so a bad request raises at once, before any stream starts — a server can answer
400 instead of opening an SSE stream that fails.

A request may ask for its deltas coalesced (`stream_interval_s`, as vLLM's `stream_interval`): the engine
thread then holds a request's deltas back and hands them over merged, the first token at once (the time to
first token), then at most one delta per interval, and the last with the end. Each hand-over wakes the reader's
event loop, so a server that sends each delta on as a message of its own (an attention shard) saves the
wake-ups as well as the messages; the deltas of one step go to each event loop in one call.

Memory stays bounded whatever the reader does: a stream holds at most one pending delta, and a delta that
arrives while the previous one is unread is merged into it (`merge`), so a slow reader gets fewer, larger
deltas rather than a growing queue. A reader that stops early (a client that disconnects) aborts its request,
which frees its KV blocks.
"""

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

from engine.admission import Resume
from engine.errors import EngineDeadError, InvalidRequestError
from engine.llm import LLM, Prompt
from engine.outputs import EngineStats, RequestOutput, merge
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestStream:
    """The deltas of one request, in order; async-iterable once. Created by `AsyncLLM.add_request`."""

    def __init__(self, request_id: str, owner: "AsyncLLM", interval_s: float = 0.0):
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        # the engine thread's side: the deltas held back, when the last went, and whether a token went
        self._interval_s = interval_s
        self._held: RequestOutput | None = None
        self._handed_at = -math.inf
        self._token_handed = False

    # called on the engine thread
    def _due(self, delta: RequestOutput) -> RequestOutput | None:
        """Hold `delta` back with those held; the merged deltas once they are due to the reader, else None."""
        held = merge(self._held, delta) if self._held is not None else delta
        now = time.monotonic()
        if not (delta.finished or not self._token_handed or now - self._handed_at >= self._interval_s):
            self._held = held
            return None
        self._held, self._handed_at = None, now
        self._token_handed = self._token_handed or any(o.token_ids for o in held.outputs)
        return held

    # called on the stream's event loop (scheduled there by the engine thread)
    def _put(self, delta: RequestOutput) -> None:
        self._pending = merge(self._pending, delta) if self._pending is not None else delta
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                if self._pending is not None:
                    delta, self._pending = self._pending, None
                    self.finished = delta.finished
                    yield delta
                elif self._error is not None:
                    raise self._error
                else:
                    self._ready.clear()
                    await self._ready.wait()
        finally:
            if not self.finished:  # the reader stopped early or was cancelled
                self.abort()

    def abort(self) -> None:
        """Stop the request and free its KV cache; a no-op once it finished."""
        if not self.finished:
            self.finished = True
            self._owner._abort(self.request_id)


class AsyncLLM:
    """`LLM`'s engine, stepped by a background thread; many concurrent requests from asyncio code."""

    def __init__(self, **llm_kwargs):
        self._start(LLM(**llm_kwargs))

    @classmethod
    def from_llm(cls, llm: LLM) -> "AsyncLLM":
        """Drive an already loaded `LLM` (which must not be used directly afterwards)."""
        self = cls.__new__(cls)
        self._start(llm)
        return self

    def _start(self, llm: LLM) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.dead: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams and dead
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="msem-engine", daemon=True)
        self._thread.start()

    # ---- requests (any thread with a running event loop) ----

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, *, messages: Sequence[dict] | None = None,
                    resume: Resume | None = None, stream_interval_s: float = 0.0) -> RequestStream:
        """Validate and queue one request (text, token ids, or chat `messages`); raises on bad input.

        `resume` continues a request begun on another shard (see `LLMEngine.add_request`). With
        `stream_interval_s`, its deltas come coalesced (module docstring; `math.inf`: the first token, then the
        rest in one)."""
        params = sampling_params or SamplingParams()
        if messages is not None:
            text, ids = None, self.tokenizer.encode_chat(list(messages))
        else:
            text, ids = self.llm._encode(prompt)
        self.llm.engine.validate(ids, params, resume)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = RequestStream(request_id, self, stream_interval_s)
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"the engine stopped: {self.dead!r}") from self.dead
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, ids, params, text, resume))
        return stream

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The deltas of one completion; leaving the loop early aborts the request."""
        async for delta in self.add_request(prompt, sampling_params, request_id):
            yield delta

    async def chat(self, messages: Sequence[dict], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The deltas of one chat answer ({"role", "content"} messages, mistral-common's instruct format)."""
        async for delta in self.add_request(None, sampling_params, request_id, messages=messages):
            yield delta

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    @property
    def num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    def stats(self) -> EngineStats:
        """The engine's load now (safe from any thread: it reads counters only)."""
        return self.llm.engine.stats()

    def cached_block_names(self, limit: int) -> list[bytes]:
        """See `LLMEngine.cached_block_names` (safe from any thread)."""
        return self.llm.engine.cached_block_names(limit)

    @property
    def keyspace_root(self) -> bytes:
        """The root its block names chain from (weights, dtype, block size): see `memory.block_hash`."""
        return self.llm.engine.keyspace.root

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running fail with `EngineDeadError`."""
        self._commands.put(("stop",))
        self._thread.join(timeout)
        self.llm.engine.close()

    # ---- the engine thread ----

    def _run(self) -> None:
        engine = self.llm.engine
        try:
            while True:
                if not self._drain(block=not engine.has_unfinished_requests()):
                    raise EngineDeadError("the engine was shut down")
                self._deliver(engine.step())
        except BaseException as error:  # noqa: BLE001 - every failure must reach the waiting requests
            if not isinstance(error, EngineDeadError):
                logger.exception("engine loop failed")
            self._die(error)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once asked to stop."""
        engine = self.llm.engine
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "abort":
                engine.abort_request(command[1])
            else:
                _, request_id, ids, params, text, resume = command
                with self._lock:
                    wanted = request_id in self._streams  # not aborted while queued
                if wanted:
                    try:
                        engine.add_request(request_id, ids, params, text, resume)
                    except InvalidRequestError as error:  # fails this request only
                        self._fail(request_id, error)

    def _deliver(self, deltas: list[RequestOutput]) -> None:
        """Hand one step's deltas that are due to their streams: one call into each event loop."""
        due: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None and delta.finished:
                    del self._streams[delta.request_id]
                if stream is not None and (merged := stream._due(delta)) is not None:
                    due.setdefault(stream._loop, []).append((stream, merged))
        for loop, handed in due.items():
            loop.call_soon_threadsafe(_put_each, handed)

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._loop.call_soon_threadsafe(stream._fail, error)

    def _die(self, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"the engine stopped: {error!r}")
        with self._lock:
            self.dead = dead
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            try:
                stream._loop.call_soon_threadsafe(stream._fail, dead)
            except RuntimeError:  # that event loop is already closed
                pass


def _put_each(handed: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, delta in handed:
        stream._put(delta)
