"""`LLMEngine`: one attention shard's engine. A step reads as three calls: schedule, run, apply.

It owns the scheduler (which requests advance), the model runner (tensors) and, per user request, the output
side: incremental detokenization, stop conditions and the deltas it returns. It is synchronous and single-
threaded; `AsyncLLM` drives it from a background thread for servers, `LLM` from a loop for batch use.
"""

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.admission import Resume, check_request
from engine.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_GPU_MEMORY_UTILIZATION, CacheInfo, EngineConfig
from engine.channels import ChannelText, Markers
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineConfigError, InvalidRequestError
from engine.kv_cache_manager import KVCacheManager, max_blocks_per_sequence
from engine.kv_tiers import KVTiers
from engine.model_runner import ModelRunner, RunnerOutput
from engine.outputs import CompletionOutput, EngineStats, Logprob, PositionLogprobs, RequestOutput
from engine.request import Request
from engine.sampler import Logprobs, SamplingState
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer
from memory.block_hash import BlockKeyspace
from memory.host_tier import HostTier
from memory.serialize import dtype_name
from memory.store_client import StoreClient
from mistral.model import Transformer


@dataclass
class _Sample:
    """Output side of one sample: its text so far and how much of it was already returned."""

    seq: Request
    out: ChannelText
    sent_chars: int = 0  # of the answer (content channel)
    sent_reasoning_chars: int = 0
    sent_tool_chars: int = 0
    sent_reasoning_tokens: int = 0
    sent_tokens: int = 0
    sent_finished: bool = False


@dataclass
class _UserRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.samples)


class LLMEngine:
    """`model_id` names the weights in the KV blocks' keyspace (shards that share a memory store must agree
    on it); `memory_store_call(method, *args)` calls the shared MemoryStore, built by the actor layer from a
    handle with its timeout (None: no shared tier)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 model_id: str = "model", memory_store_call: Callable | None = None):
        param = next(model.parameters())
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.cache_info = _size_cache(model, config, param.dtype, param.device)
        needed = max_blocks_per_sequence(self.cache_info.max_model_len, config.max_num_batched_tokens,
                                         config.block_size, model.config.sliding_window)
        _check_room(self.cache_info, needed, config, mc_bytes_per_block=model.config.kv_bytes_per_token(
            param.element_size()) * config.block_size)
        self.runner = ModelRunner(model, self.cache_info.num_blocks, config.block_size, param.dtype, param.device)
        self.keyspace = BlockKeyspace(model_id, dtype_name(param.dtype), config.block_size)
        self.tiers = _make_tiers(self.runner.kv_cache, config, memory_store_call, needed)
        kv = KVCacheManager(self.cache_info.num_blocks, config.block_size, model.config.sliding_window,
                            config.enable_prefix_caching, self.keyspace.root, self.tiers)
        self.scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)
        self.markers = Markers.of(tokenizer)
        self._requests: dict[str, _UserRequest] = {}
        self._seq_owner: dict[str, _UserRequest] = {}
        self._arrival = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.cache_info.max_model_len

    # ---- requests in ----

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, resume: "Resume | None" = None) -> None:
        """Reject what can never run. Reads only settings (and a cache of compiled grammars, under its lock),
        so other threads may call it."""
        check_request(prompt_token_ids, params, self.max_model_len, self.model.config.vocab_size, resume)
        if params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, resume: "Resume | None" = None) -> None:
        """Queue a request; with `resume`, continue one whose first tokens were generated elsewhere.

        A resumed request (n must be 1) starts with `resume.token_ids` as its output: they are prefilled
        with the prompt, count towards `max_tokens` and the penalties, and its seeded stream is advanced
        past them, so the tokens that follow are the ones the original run would have produced. Its deltas
        start after the first `resume.num_chars` characters of their text (what the client already has).
        """
        self.validate(prompt_token_ids, params, resume)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        user = _UserRequest(request_id, prompt, list(prompt_token_ids), params)
        arrival, first = next(self._arrival), None
        stop_ids = params.stop_token_ids + ((self.tokenizer.eos_id,) if not params.ignore_eos else ())
        bad_words = tuple(ids for word in params.bad_words for ids in _word_token_ids(self.tokenizer, word))
        # With a thinking budget the model may think before a structured answer (the budget bounds the thought, so
        # the answer, which the grammar constrains, always comes); without one the grammar applies from the start.
        think = (self.markers.think, self.markers.end_think) \
            if params.max_thinking_tokens is not None and None not in (self.markers.think, self.markers.end_think) \
            else None
        for i in range(params.n):
            grammar = None if params.structured_outputs is None else \
                self.grammars.grammar(params.structured_outputs, think)
            state = SamplingState.from_params(params, user.prompt_token_ids, i, self.runner.device,
                                              stop_token_ids=stop_ids, bad_words_ids=bad_words, grammar=grammar)
            seq = Request(f"{request_id}#{i}", request_id, i, user.prompt_token_ids, params, state, arrival,
                          first_sibling=first)
            first = first or seq
            sample = _Sample(seq, ChannelText(self.markers, IncrementalDetokenizer(self.tokenizer,
                                                                                   user.prompt_token_ids)))
            if resume is not None:
                seq.sampling.skip(len(resume.token_ids), self.model.config.vocab_size)
                seq.output_token_ids.extend(resume.token_ids)
                for token in resume.token_ids:
                    if grammar is not None:
                        grammar.accept(token)
                    sample.out.add(token)
                self._budget_thinking(sample)
                sample.sent_tokens, sample.sent_chars = len(resume.token_ids), resume.num_chars
                sample.sent_reasoning_chars, sample.sent_tool_chars = resume.num_reasoning_chars, resume.num_tool_chars
                sample.sent_reasoning_tokens = sample.out.num_reasoning_tokens
            user.samples.append(sample)
            self._seq_owner[seq.request_id] = user
            self.scheduler.add(seq)
        self.scheduler.kv.prefetch(user.samples[0].seq)  # its siblings wait for it and hit its blocks
        self._requests[request_id] = user

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already done."""
        user = self._requests.get(request_id)
        if user is None:
            return False
        for sample in user.samples:
            if not sample.seq.is_finished:
                self.scheduler.finish(sample.seq, "abort")
        self._forget(user)
        return True

    def _forget(self, user: _UserRequest) -> None:
        del self._requests[user.request_id]
        for sample in user.samples:
            del self._seq_owner[sample.seq.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        """The scheduler's and KV cache's load now. Reads counters only, so another thread may call it."""
        scheduler, kv = self.scheduler, self.scheduler.kv
        return EngineStats(len(scheduler.running), len(scheduler.waiting), kv.usage, kv.num_prefix_queries,
                           kv.num_prefix_hits, None if self.tiers is None else
                           {**self.tiers.stats(), "long_context": {"spilled_bytes": kv.spilled_bytes,
                                                                   "spilled_blocks": kv.num_spilled_blocks}})

    def cached_block_names(self, limit: int) -> list[bytes]:
        """Names of blocks this engine can serve a prefix from (device pool first, then host RAM), at most
        `limit`, most recent first: what KV-aware routing is told. Safe from another thread (a snapshot)."""
        names = self.scheduler.kv.pool.cached_hashes(limit)
        if self.tiers is not None and len(names) < limit:
            names += self.tiers.host.names(limit - len(names))
        return names

    def close(self) -> None:
        """Stop the KV tiers' threads (the memory store's writer, the loader)."""
        if self.tiers is not None:
            self.tiers.close()

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Advance every scheduled request by one chunk; returns a delta for each request that progressed."""
        batch = self.scheduler.schedule()
        if not batch.chunks:
            if self.tiers is not None:  # only requests whose KV is on its way: wait for it, do not spin
                self.tiers.wait_for_load(0.01)
            return []
        start = time.perf_counter()
        result = self.runner.execute(batch)
        prefill, seconds = sum(c.num_tokens for c in batch.chunks if c.num_tokens > 1), time.perf_counter() - start
        if self.tiers is not None:
            self.tiers.observe_step(seconds)  # what waiting for an asynchronous load costs a request
            if prefill >= max(self.config.block_size, batch.num_tokens // 2):
                self.tiers.observe_compute(batch.num_tokens, seconds)  # what a load saves
        self.scheduler.update(batch)
        return self._apply(batch.chunks, result)

    def _apply(self, chunks, result: RunnerOutput) -> list[RequestOutput]:
        touched: dict[str, _UserRequest] = {}
        for chunk in chunks:
            seq = chunk.request
            user = self._seq_owner[seq.request_id]
            seq.prompt_logprobs.extend(result.prompt_logprobs.get(seq.request_id, ()))
            token = result.sampled.get(seq.request_id)
            if token is not None:
                self._append(user.samples[seq.sample_index], token, result.logprobs.get(seq.request_id))
            touched[user.request_id] = user
        outputs = [self._delta(user) for user in touched.values()]
        for user in touched.values():
            if user.finished:
                self._forget(user)
        return [o for o in outputs if o is not None]

    def _append(self, sample: _Sample, token: int, logprobs: Logprobs | None) -> None:
        self._check_stop(sample, token, logprobs)
        seq = sample.seq
        if seq.is_finished and not isinstance(seq.stop_reason, str):  # a stop string already cut the text
            sample.out.flush()

    def _check_stop(self, sample: _Sample, token: int, logprobs: Logprobs | None) -> None:
        seq, params, grammar = sample.seq, sample.seq.params, sample.seq.sampling.grammar
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if grammar is not None:
            grammar.accept(token)
        may_stop = len(seq.output_token_ids) >= params.min_tokens
        if token == self.tokenizer.eos_id and (not params.ignore_eos or grammar is not None):
            return self.scheduler.finish(seq, "stop")
        if token in params.stop_token_ids and may_stop:
            return self.scheduler.finish(seq, "stop", token)
        out = sample.out
        before = len(out.content)
        added = out.add(token)
        self._budget_thinking(sample)
        stop = _find_stop(out.content, before, params.stop) if may_stop and added else None
        if stop is not None:
            start, string = stop
            out.content = out.content[:start + (len(string) if params.include_stop_str_in_output else 0)]
            return self.scheduler.finish(seq, "stop", string)
        if grammar is not None and grammar.is_terminated:  # the text is complete: only the end could follow
            return self.scheduler.finish(seq, "stop")
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _budget_thinking(self, sample: _Sample) -> None:
        """At the thinking budget, the next token is `[/THINK]` (the answer follows)."""
        budget, out = sample.seq.params.max_thinking_tokens, sample.out
        over = budget is not None and out.in_reasoning and out.num_reasoning_tokens > budget
        sample.seq.sampling.forced_token_id = self.markers.end_think if over else None

    def _delta(self, user: _UserRequest) -> RequestOutput | None:
        holdback = max((len(s) for s in user.params.stop), default=1) - 1
        completions = []
        for i, sample in enumerate(user.samples):
            seq, out = sample.seq, sample.out
            end = len(out.content) if seq.is_finished else max(sample.sent_chars, len(out.content) - holdback)
            new_tokens = seq.output_token_ids[sample.sent_tokens:]
            reasoning, tools = out.reasoning[sample.sent_reasoning_chars:], out.tools[sample.sent_tool_chars:]
            if end == sample.sent_chars and not new_tokens and not reasoning and not tools \
                    and sample.sent_finished == seq.is_finished:
                continue
            logprobs = None
            if user.params.logprobs is not None:
                # the newest entries: a resumed request has none for the tokens it started with
                first = len(seq.logprobs) - len(new_tokens)
                continues = out.detok.continues_prompt
                logprobs = [self._position_logprobs(lp, continues_text=first + k > 0 or continues)
                            for k, lp in enumerate(seq.logprobs[first:])]
            completions.append(CompletionOutput(
                index=i, text=out.content[sample.sent_chars:end], token_ids=new_tokens, logprobs=logprobs,
                cumulative_logprob=sum(lp.logprob for lp in seq.logprobs) if seq.logprobs else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, reasoning=reasoning, tool_text=tools,
                num_reasoning_tokens=out.num_reasoning_tokens - sample.sent_reasoning_tokens))
            sample.sent_chars, sample.sent_tokens, sample.sent_finished = end, len(seq.output_token_ids), \
                seq.is_finished
            sample.sent_reasoning_chars, sample.sent_tool_chars = len(out.reasoning), len(out.tools)
            sample.sent_reasoning_tokens = out.num_reasoning_tokens
        prompt_logprobs = self._prompt_logprobs(user)
        if not completions and prompt_logprobs is None:
            return None
        first = user.samples[0].seq
        return RequestOutput(user.request_id, user.prompt, user.prompt_token_ids, completions, prompt_logprobs,
                             finished=user.finished, num_cached_tokens=first.num_cached_prefix_tokens)

    def _prompt_logprobs(self, user: _UserRequest) -> list[PositionLogprobs | None] | None:
        seq = user.samples[0].seq
        if user.params.prompt_logprobs is None or user.sent_prompt_logprobs or seq.wants_prompt_logprobs:
            return None
        user.sent_prompt_logprobs = True
        return [None] + [self._position_logprobs(lp) for lp in seq.prompt_logprobs]

    def _position_logprobs(self, lp: Logprobs, continues_text: bool = True) -> PositionLogprobs:
        """A position's tokens with their text; `continues_text` False for an answer's first token, whose text
        (as its content's) has no leading space."""
        def piece(token_id: int) -> str:
            return self.tokenizer.decode([token_id], continues_text=continues_text)

        out = {tid: Logprob(value, rank, piece(tid)) for rank, (tid, value) in enumerate(lp.top, start=1)}
        out[lp.token_id] = Logprob(lp.logprob, lp.rank, piece(lp.token_id))
        return out


def _word_token_ids(tokenizer: Tokenizer, word: str) -> list[tuple[int, ...]]:
    """The token sequences a bad word is generated as: the word alone and after a space (as vLLM bans them)."""
    forms = {tuple(tokenizer.encode(text, add_bos=False)) for text in (word, " " + word.lstrip())}
    return sorted(ids for ids in forms if ids)


def _find_stop(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends in the new text: (index where it starts, the string)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, new_from - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def _size_cache(model: Transformer, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> CacheInfo:
    mc = model.config
    max_len = config.max_model_len or mc.max_position_embeddings
    if max_len > mc.max_position_embeddings:
        raise EngineConfigError(f"max_model_len {max_len} exceeds the model's context "
                                f"({mc.max_position_embeddings} positions)")
    budget = config.kv_cache_memory
    if budget is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * DEFAULT_GPU_MEMORY_UTILIZATION)
    budget = budget or DEFAULT_CPU_KV_CACHE_BYTES
    per_block = mc.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * config.block_size
    return CacheInfo(max_len, max(budget // per_block, 0), config.block_size, (budget // per_block) * per_block)


def _make_tiers(kv_cache: torch.Tensor, config: EngineConfig, store_call: Callable | None,
                sequence_blocks: int) -> KVTiers | None:
    """The tiers below the device pool, when any is configured (they need prefix caching: blocks are found by
    their names). `sequence_blocks`: the most blocks one sequence holds at once."""
    if not config.enable_prefix_caching or (not config.host_kv_cache_memory and store_call is None):
        return None
    num_layers, _, _, num_kv_heads, head_dim = kv_cache.shape
    block_shape = (num_layers, 2, config.block_size, num_kv_heads, head_dim)
    # T2's blocks arrive through T1, so a store needs a host tier that holds one sequence's blocks
    block_bytes = kv_cache[:, :, :config.block_size].numel() * kv_cache.element_size()
    host_bytes = config.host_kv_cache_memory or kv_cache.numel() * kv_cache.element_size()
    if store_call is not None and host_bytes < sequence_blocks * block_bytes:
        raise EngineConfigError(
            f"host_kv_cache_memory ({host_bytes} bytes) cannot stage one sequence's blocks from the memory store "
            f"({sequence_blocks} blocks of {block_bytes} bytes): raise it to at least {sequence_blocks * block_bytes}")
    store = None if store_call is None else StoreClient(store_call, block_shape, kv_cache.dtype)
    return KVTiers(kv_cache, config.block_size, HostTier(host_bytes, pin_memory=kv_cache.is_cuda), store,
                   config.kv_write_policy)


def _check_room(cache: CacheInfo, needed: int, config: EngineConfig, mc_bytes_per_block: int) -> None:
    """One sequence of max_model_len must fit: in the device pool, or (long contexts) with its older blocks in
    host RAM, which then bounds the context; the pool must still hold two blocks (a chunk and the block it
    continues)."""
    if needed <= cache.num_blocks:
        return
    host_needed = (needed - cache.num_blocks) * mc_bytes_per_block
    if config.enable_prefix_caching and cache.num_blocks >= 2 and config.host_kv_cache_memory >= host_needed:
        return
    raise EngineConfigError(
        f"the KV cache ({cache.kv_cache_bytes / 2**20:.0f} MiB, {cache.num_token_slots} tokens) cannot hold one "
        f"sequence of max_model_len {cache.max_model_len} ({needed * config.block_size} token slots needed): raise "
        f"kv_cache_memory, lower max_model_len, or give host_kv_cache_memory at least {host_needed} bytes for "
        "the older blocks of long contexts")
