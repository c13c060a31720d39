"""Continuous batching with chunked prefill and preemption by recomputation.

Design note (after vLLM v1). There are no separate prefill and decode phases: every request has
`num_computed_tokens` and wants to reach `num_tokens` (prompt + output so far). Each step the scheduler hands
out a token budget: running requests first, in admission order (a decode takes 1 token, an unfinished prefill
takes as many as the budget allows: that is chunked prefill), then waiting requests in FCFS order. When the
KV pool runs dry the most recently admitted running request is preempted: its blocks are freed and it goes
back to the front of the waiting queue with its output kept, to be recomputed later (prompt and output
re-prefilled in one pass; its generator state is untouched, so seeded sampling continues exactly).

The scheduler is plain Python; the engine applies the model's results through `update`.
"""

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Positions [start, start + num_tokens) of `request` run this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last known token, so its logits yield the next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Retire a request (stopped, length, aborted) and return its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        self.kv.free(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.kv.max_chunk_tokens or budget)
            self.kv.release_out_of_window(req)
            if self._make_room(req, n, out):
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
        if not out.preempted:
            budget = self._admit(out, budget)
        return out

    def _make_room(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Blocks for `n` more tokens of a running request: preempt the newest requests until they fit, but when
        the newest is `req` itself, spill its older blocks to host RAM first (long contexts); False when `req`
        was preempted."""
        while not self.kv.allocate_slots(req, n):
            if self.running[-1] is req and self.kv.allocate_slots(req, n, spill=True):
                return True
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not self._sibling_ready(req):
                continue  # it will share the first sample's prompt blocks once they are computed
            if req.is_loading_kv:
                continue  # its prefix is on its way (memory store, host RAM); others run meanwhile
            if req.num_computed_tokens == 0:
                self.kv.match_prefix(req)
                if req.is_loading_kv:
                    continue  # its prefix blocks are being copied from host RAM; admitted once they are in
            self.kv.finish_load(req)  # a copy into its blocks has ended: name them in the prefix cache
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.kv.max_chunk_tokens or budget)
            self.kv.release_out_of_window(req)
            # alone, a long request spills its own prefix blocks: nothing else would ever free a block for it
            if not self.kv.allocate_slots(req, n, spill=not self.running):
                self.kv.free(req)  # give back prefix hits; try again when blocks free up
                break
            if req.num_preemptions == 0:  # a recompute's hits on its own prompt + output are no prompt hits
                req.num_cached_prefix_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        return budget

    def _sibling_ready(self, req: Request) -> bool:
        """Samples 1..n-1 of a request wait until sample 0 has computed the prompt, then hit its cached blocks."""
        first = req.first_sibling
        if first is None or not self.kv.enable_prefix_caching:
            return True
        return first.is_finished or first.num_computed_tokens >= first.num_prompt_tokens or \
            first.status is RequestStatus.WAITING and first.num_preemptions > 0

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput) -> None:
        """Record that the scheduled chunks ran: their keys/values are now in the cache."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(chunk.request)
