"""`Frontend`: what the HTTP and gRPC servers share — validation, admission, shard failover, usage.

It is the edge of DESIGN §4: text is tokenized and every request is checked here, before any shard sees it,
so bad input is answered at once with an `InvalidRequestError` (400 / INVALID_ARGUMENT). Admission is
bounded: past `limits.max_requests` requests or `limits.max_tokens_in_flight` tokens (prompt plus n times
max_tokens) a request is refused with `OverloadedError` (429 / RESOURCE_EXHAUSTED) instead of queued.

A request runs on one attention shard as one stream of deltas. When that shard dies (`ShardLost`), each of
its unfinished samples is resubmitted as its own request (n=1, the sample's own seed) with `Resume`: the
tokens already delivered, so a new shard continues exactly where the old one stopped, and the number of
characters the client already has, so nothing is sent twice. Deltas keep the user's sample indices.

When nothing can take the request, it fails with `UnavailableError` (503 with Retry-After / UNAVAILABLE): no
shard continued it within `limits.resume_timeout_s` of its first loss, the engine stopped, or Ray or Serve
could not reach a replica (`as_unavailable`). A stream that has already sent deltas ends with that error.

The shards are behind the `Shards` protocol: `LocalShards` drives an in-process `AsyncLLM`; the Serve
deployment graph (cluster/app.py) routes to AttentionShard replicas.

Health means "a request could be served now": a shard answers that its engine works and, with expert groups,
every group has a live replica (`expert_health` names the groups that have none). Each part is asked with a
deadline of `HEALTH_TIMEOUT_S` and the parts run together, so `unavailable_reason` answers within about that
time whatever hangs (a dead shard, a stopped router), naming what is missing.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from cluster import tool_calls
from cluster.api_request import ChatRequest, CompletionRequest
from cluster.config import Limits
from cluster.errors import (OverloadedError, ShardLost, UnavailableError, UnknownModelError, as_unavailable,
                            first_line)
from actors.metrics import ServingMetrics
from engine.admission import Resume, check_request
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # the Ingress replicas, which import this, need no engine (nor torch)
    from engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)
T = TypeVar("T")
RESUME_BACKOFF_S = 0.1  # first wait before resubmitting; doubles per loss, at most 2 s
HEALTH_TIMEOUT_S = 0.7  # each part of a health check, so that /health answers within 1 s
MEMORY_TIMEOUT_S = 2.0  # /v1/memory waits this long for the memory store
ExpertInfo = Callable[[], Awaitable[dict | None]]
ExpertHealth = Callable[[], Awaitable[list[int]]]  # the expert groups with no live replica now


@dataclass(frozen=True)
class ShardRequest:
    """One request as a shard runs it: plain data, so it crosses processes."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume: Resume | None = None
    every_step: bool = True  # False: the client reads the request whole, so the shard sends less (see `Shards`)
    stream_interval_s: float = 0.0  # a remote shard merges the deltas of this long into one message (TTFT aside)


class Shards(Protocol):
    def stream(self, request: ShardRequest) -> AsyncIterator[RequestOutput]:
        """The request's deltas; raises `ShardLost` if the shard dies, `EngineDeadError` if no shard can run.
        Without `every_step`, a remote shard may send only the first delta and then the rest merged into one."""

    async def healthy(self) -> bool:
        """True when the shards can take requests."""


class LocalShards:
    """One in-process `AsyncLLM` as the only shard (tests, `msem serve` without Ray)."""

    def __init__(self, llm: "AsyncLLM"):
        self.llm = llm

    async def stream(self, request: ShardRequest) -> AsyncIterator[RequestOutput]:
        async for delta in self.llm.add_request(request.prompt_token_ids, request.params, request.request_id,
                                                resume=request.resume):
            yield delta

    async def healthy(self) -> bool:
        return self.llm.dead is None


@dataclass
class _Progress:
    """What the client has received of one sample."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    num_reasoning_chars: int = 0
    num_tool_chars: int = 0
    finished: bool = False


@dataclass
class _Leg:
    """A shard request and which user sample each of its samples is."""

    request: ShardRequest
    samples: list[int]


class Frontend:
    def __init__(self, model_name: str, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 shards: Shards, limits: Limits = Limits(), expert_info: ExpertInfo | None = None,
                 rebalance_experts: ExpertInfo | None = None, record_metrics: bool = True,
                 expert_health: ExpertHealth | None = None, memory_info: ExpertInfo | None = None,
                 stream_interval_s: float = 0.0):
        self.model_name, self.tokenizer, self.shards, self.limits = model_name, tokenizer, shards, limits
        self.metrics = ServingMetrics(model_name) if record_metrics else None  # see actors/metrics.py
        self._expert_info, self._rebalance = expert_info, rebalance_experts
        self._expert_health = expert_health
        self._memory_info = memory_info
        self.stream_interval_s = stream_interval_s
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.grammars = GrammarCompiler(tokenizer, vocab_size)  # checks structured outputs at the edge
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="msem-prepare")
        self.num_requests = 0
        self.tokens_in_flight = 0
        self.num_resubmits = 0

    # ---- the edge: model names, tokens, validation ----

    async def off_loop(self, work: Callable[..., T], *args) -> T:
        """`work(*args)` on the frontend's one worker thread: CPU work that grows with a request (decoding,
        validating, tokenizing, compiling a grammar), which on the event loop would stall every stream and
        health check. One thread, not a pool: the work holds the interpreter lock, so more threads would not
        finish it sooner, and the loop would wait for the lock behind each of them (four large bodies on
        Python's default pool stalled /health for up to 375 ms, on one thread for up to 71 ms)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(work, *args))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise UnknownModelError(f"the model {name!r} does not exist; this server serves {self.model_name!r}")

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids; token ids are taken as given and range-checked later."""
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def decode(self, token_ids: Sequence[int], param: str) -> str:
        """The text of token ids (vLLM's `/detokenize`); refuses an id outside the vocabulary, naming `param`."""
        if (bad := next((t for t in token_ids if not 0 <= t < self.vocab_size), None)) is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)
        return self.tokenizer.decode(list(token_ids))

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if params.n > self.limits.max_n:
            raise InvalidRequestError(f"n must be between 1 and {self.limits.max_n} on this server, got {params.n}",
                                      param="n")
        check_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)
        if params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)

    def prepare(self, request: CompletionRequest | ChatRequest) -> list[tuple[list[int], SamplingParams]]:
        """What each prompt of an API request runs: its token ids and validated `SamplingParams`. Tokenizing and
        compiling a grammar is CPU work that grows with the request: servers call this off their event loop."""
        self.check_model(request.model)
        if isinstance(request, ChatRequest):
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()] if request.uses_tools else None
            if tools:
                tool_calls.check_support(self.tokenizer)
            prompts = [self.tokenizer.encode_chat(request.messages, tools)]
        else:
            prompts = [self.encode(prompt) for prompt in request.prompts]
        runs = []
        for ids in prompts:
            ids = request.truncate(ids)
            params = request.sampling_params(len(ids), self.max_model_len, self.limits.max_n)
            if isinstance(request, ChatRequest) and (functions := request.forced_functions):
                params = dataclasses.replace(params, structured_outputs=tool_calls.grammar(
                    self.tokenizer, functions, request.parallel_tool_calls))
            self.check(ids, params)
            runs.append((ids, params))
        return runs

    async def healthy(self) -> bool:
        return await self.unavailable_reason() is None

    async def unavailable_reason(self) -> str | None:
        """Why a request could not be served now (None when it could); see the module docstring."""
        checks = [self._shards_problem()] + ([self._experts_problem()] if self._expert_health else [])
        return "; ".join(p for p in await asyncio.gather(*checks) if p) or None

    async def _shards_problem(self) -> str | None:
        try:
            healthy = await asyncio.wait_for(self.shards.healthy(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            return f"no attention shard answered within {HEALTH_TIMEOUT_S:g} s"
        except Exception as error:  # noqa: BLE001 - the reason is the answer
            return f"the attention shards are unreachable: {first_line(error)}"
        return None if healthy else "no attention shard can take requests: the engine stopped"

    async def _experts_problem(self) -> str | None:
        try:
            missing = await asyncio.wait_for(self._expert_health(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            return f"the expert router did not answer within {HEALTH_TIMEOUT_S:g} s"
        except Exception as error:  # noqa: BLE001 - the reason is the answer
            return f"the expert router is unreachable: {first_line(error)}"
        if len(missing) > 1:
            return f"expert groups {', '.join(map(str, missing))} have no live replica"
        return f"expert group {missing[0]} has no live replica" if missing else None

    async def experts(self) -> dict | None:
        """Placement, live replicas and per-expert load (see `RouterService.describe`); None for a model
        whose experts live inside the shards."""
        return await self._expert_info() if self._expert_info is not None else None

    async def rebalance_experts(self) -> dict | None:
        """Rebalance the expert placement now (see `RouterService.rebalance`); None without expert groups."""
        return await self._rebalance() if self._rebalance is not None else None

    async def memory(self) -> dict | None:
        """The KV tiers (`MemoryStore.describe`): the store's RAM and disk, and each shard's device pool and host
        RAM as it last reported them; None without a memory store. Raises `UnavailableError` when the store does
        not answer within `MEMORY_TIMEOUT_S` (requests are served regardless)."""
        if self._memory_info is None:
            return None
        try:
            return await asyncio.wait_for(self._memory_info(), MEMORY_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - down or slow: say so; generation does not depend on it
            reason = "timed out" if isinstance(error, TimeoutError) else first_line(error)
            raise UnavailableError(f"the memory store did not answer ({reason}); requests are served without "
                                   "it, by recomputing") from None

    # ---- generation ----

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       every_step: bool = True) -> AsyncGenerator[RequestOutput, None]:
        """Validate, admit and run one request; yields deltas with the user's sample indices. `every_step`:
        False when the caller only needs the whole output (a request that is not streamed): the deltas may then
        come merged, two per shard leg (its first token, for the time to first token, and the rest).

        Raises `InvalidRequestError` or `OverloadedError` before the first delta. Closing the iterator (a
        client that disconnects, a deadline) aborts the request on its shard.
        """
        self.check(prompt_token_ids, params)
        cost = len(prompt_token_ids) + params.n * params.max_tokens
        with self._admit(cost):
            timer = self.metrics.start(len(prompt_token_ids)) if self.metrics else None
            request_id = request_id or f"cmpl-{uuid.uuid4().hex}"
            first = _Leg(ShardRequest(request_id, prompt_token_ids, params, every_step=every_step,
                                      stream_interval_s=self.stream_interval_s),
                         list(range(params.n)))
            try:
                async with contextlib.aclosing(self._run(first, params.n)) as deltas:  # closing us stops the legs
                    async for delta in deltas:
                        if timer:
                            timer.observe(delta)
                        yield delta
            finally:
                if timer:
                    timer.close(params.n)

    @contextlib.contextmanager
    def _admit(self, cost: int):
        limits = self.limits
        if self.num_requests >= limits.max_requests:
            raise OverloadedError(f"the server is at its limit of {limits.max_requests} requests in flight; "
                                  f"retry in {limits.retry_after_s} s", limits.retry_after_s)
        if self.tokens_in_flight + cost > limits.max_tokens_in_flight and self.num_requests > 0:
            raise OverloadedError(f"the server is at its limit of {limits.max_tokens_in_flight} tokens in flight "
                                  f"(this request needs {cost}); retry in {limits.retry_after_s} s",
                                  limits.retry_after_s)
        self.num_requests += 1
        self.tokens_in_flight += cost
        try:
            yield
        finally:
            self.num_requests -= 1
            self.tokens_in_flight -= cost

    async def _run(self, first: _Leg, n: int) -> AsyncIterator[RequestOutput]:
        """Run legs concurrently, merging their deltas; a lost leg is replaced by one leg per unfinished sample.

        The legs resumed after a loss must deliver within `resume_timeout_s` of the first loss: until then the
        wait for them is bounded (a resumed leg may sit in Serve's queue while no shard is up), and a later
        loss past that time gives up too. Giving up raises `UnavailableError`.
        """
        progress = [_Progress() for _ in range(n)]
        events: asyncio.Queue = asyncio.Queue(maxsize=max(2, n))  # pumps wait while the reader is behind
        tasks: dict[int, asyncio.Task] = {}
        resumed: set[int] = set()  # legs started after a loss that have delivered nothing yet
        keys = itertools.count()
        first_loss, losses = None, 0

        def start(leg: _Leg, delay: float = 0.0) -> int:
            key = next(keys)
            tasks[key] = asyncio.create_task(self._pump(key, leg, events, delay))
            return key

        def gave_up() -> UnavailableError:
            return UnavailableError(f"no attention shard could continue the request within "
                                    f"{self.limits.resume_timeout_s:g} s ({losses} shard losses)")

        start(first)
        try:
            while tasks:
                timeout = first_loss + self.limits.resume_timeout_s - time.monotonic() if resumed else None
                try:
                    key, leg, item = await asyncio.wait_for(events.get(), timeout)
                except TimeoutError:
                    raise gave_up() from None
                if isinstance(item, RequestOutput):
                    resumed.discard(key)
                    delta = self._record(item, leg, progress)
                    if delta is not None:
                        yield delta
                    continue
                tasks.pop(key)
                resumed.discard(key)
                if item is None:  # the leg's stream ended
                    continue
                if not isinstance(item, ShardLost):
                    raise item
                now = time.monotonic()
                first_loss, losses = first_loss or now, losses + 1
                if now - first_loss > self.limits.resume_timeout_s:
                    raise gave_up() from item
                self.num_resubmits += 1
                for leg_new in self._resume_legs(leg, progress):  # back off while Serve replaces the shard
                    resumed.add(start(leg_new, delay=min(RESUME_BACKOFF_S * 2 ** (losses - 1), 2.0)))
        finally:
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _pump(self, key: int, leg: _Leg, events: asyncio.Queue, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            async for delta in self.shards.stream(leg.request):
                await events.put((key, leg, delta))
        except asyncio.CancelledError:
            raise
        except ShardLost as lost:
            logger.warning("request %s lost its shard (%s); resuming it elsewhere", leg.request.request_id, lost)
            await events.put((key, leg, lost))
            return
        except BaseException as error:  # noqa: BLE001 - handed to the reader, which raises it
            await events.put((key, leg, as_unavailable(error) or error))
            return
        await events.put((key, leg, None))

    def _record(self, delta: RequestOutput, leg: _Leg, progress: list[_Progress]) -> RequestOutput | None:
        """Map a leg's delta to user sample indices and note what the client now has."""
        outputs = []
        for out in delta.outputs:
            index = leg.samples[out.index]
            p = progress[index]
            if p.finished:
                continue
            p.token_ids += out.token_ids
            p.num_chars += len(out.text)
            p.num_reasoning_chars += len(out.reasoning)
            p.num_tool_chars += len(out.tool_text)
            p.finished = out.finish_reason is not None
            outputs.append(dataclasses.replace(out, index=index))
        if not outputs and delta.prompt_logprobs is None:
            return None
        return dataclasses.replace(delta, prompt_token_ids=leg.request.prompt_token_ids, outputs=outputs,
                                   finished=all(p.finished for p in progress))

    def _resume_legs(self, lost: _Leg, progress: list[_Progress]) -> list[_Leg]:
        request, params = lost.request, lost.request.params
        legs = []
        for leg_index, user_index in enumerate(lost.samples):
            p = progress[user_index]
            if p.finished:
                continue
            one = dataclasses.replace(params, n=1, seed=params.sample_seed(leg_index), prompt_logprobs=None)
            resume = Resume(tuple(p.token_ids), p.num_chars, p.num_reasoning_chars, p.num_tool_chars) \
                if p.token_ids else None
            legs.append(_Leg(ShardRequest(f"{request.request_id}.{user_index}r{self.num_resubmits}",
                                          request.prompt_token_ids, one, resume, request.every_step,
                                          request.stream_interval_s), [user_index]))
        return legs


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """OpenAI's `usage` object, which both APIs answer (gRPC's `Usage` message has the same fields);
    `cached_tokens`: prompt tokens served from a KV cache tier instead of computed; `reasoning_tokens`: completion
    tokens a reasoning model spent thinking."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}
