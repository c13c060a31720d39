"""Scheduler: budget, chunked prefill, admission, preemption, prefix cache, sliding window — no model, no tensors.

Requests are built by hand and a `FakeModel` pretends to run each step: it records the chunk as computed
(`Scheduler.update`), appends a made-up token where a chunk samples, and retires a request at `max_tokens`,
as the engine does. It also keeps a fake KV cache — for every slot, the identity of the token prefix whose
key/value it would hold — and checks that every position a query attends to holds the right prefix. That is
the equivalence that matters: whatever the scheduler shares, evicts, releases or recomputes, attention reads
exactly what a one-sequence, no-cache run would have written. After every `schedule()` it also checks the
bookkeeping invariants (budget, seat limit, block ownership and refcounts, free count).
"""

import math
import random

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampler import Logprobs, SamplingState
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

BS = 4  # block size in every test


def make_request(prompt, *, max_tokens=8, request_id="r", sample_index=0, n=1, arrival=0,
                 prompt_logprobs=None, first_sibling=None) -> Request:
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, prompt_logprobs=prompt_logprobs)
    parent_id = request_id.split("#")[0]
    return Request(request_id, parent_id, sample_index, list(prompt), params,
                   SamplingState.from_params(params, prompt, sample_index), arrival, first_sibling=first_sibling)


def make_siblings(prompt, n, *, request_id="s", max_tokens=8) -> list[Request]:
    first = make_request(prompt, max_tokens=max_tokens, request_id=f"{request_id}#0", n=n)
    return [first] + [make_request(prompt, max_tokens=max_tokens, request_id=f"{request_id}#{i}", sample_index=i,
                                   n=n, first_sibling=first) for i in range(1, n)]


def make_scheduler(num_blocks=64, *, sliding_window=None, prefix_caching=True, max_num_seqs=8,
                   max_num_batched_tokens=32) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, sliding_window, enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens)


def fake_token(req: Request) -> int:
    """A made-up next token; small vocabulary so that outputs of different requests collide sometimes."""
    return (7 * len(req.output_token_ids) + 3 * req.sample_index + req.num_prompt_tokens) % 11


def prefix_ids(req: Request, end: int) -> list[int]:
    """ids[p] names the token prefix [0, p]: what the key/value at position p depends on."""
    ids, h = [], None
    for token in req.token_ids(0, end):
        h = hash((h, token))
        ids.append(h)
    return ids


class FakeModel:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.slots: dict[tuple[int, int], int] = {}  # (block id, offset) -> prefix id written there
        self.num_steps = 0
        self.first_start: dict[str, int] = {}  # request id -> where its first chunk started

    @property
    def pool(self):
        return self.scheduler.kv.pool

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.check_invariants(out)
        self.run(out)
        self.num_steps += 1
        return out

    def run_until_done(self, max_steps=1_000) -> None:
        while self.scheduler.num_unfinished:
            out = self.step()
            assert out.chunks, "a step with unfinished requests scheduled nothing"
            assert self.num_steps < max_steps, "no progress: the scheduler is live-locked"
        assert self.pool.num_free == self.pool.num_blocks

    def run(self, out: SchedulerOutput) -> None:
        """Pretend the model ran `out`: attention reads, KV writes, sampling, retiring at max_tokens."""
        window = self.scheduler.kv.sliding_window
        sampled = [chunk.samples for chunk in out.chunks]
        for chunk in out.chunks:
            req, end = chunk.request, chunk.start + chunk.num_tokens
            self.first_start.setdefault(req.request_id, chunk.start)
            ids = prefix_ids(req, end)
            first_read = 0 if window is None else max(0, chunk.start - window + 1)
            for q in range(first_read, chunk.start):  # what the chunk's queries see of earlier positions
                block = req.block_ids[q // BS]
                assert block is not None, f"{req.request_id}: position {q} was released while still visible"
                assert self.slots.get((block, q % BS)) == ids[q], f"{req.request_id}: wrong KV at position {q}"
            for p in range(chunk.start, end):
                self.slots[(req.block_ids[p // BS], p % BS)] = ids[p]
            if req.params.prompt_logprobs is not None:
                last = min(end, req.num_prompt_tokens - 1)
                if chunk.start < last:
                    assert chunk.start <= len(req.prompt_logprobs), "prompt logprobs would have a gap"
                req.prompt_logprobs.extend(Logprobs(0, 0.0, 1) for _ in range(last - len(req.prompt_logprobs)))
        self.scheduler.update(out)
        for chunk, samples in zip(out.chunks, sampled):
            req = chunk.request
            if samples:
                req.output_token_ids.append(fake_token(req))
                if len(req.output_token_ids) >= req.params.max_tokens:
                    self.scheduler.finish(req, "length")

    def check_invariants(self, out: SchedulerOutput) -> None:
        sched, pool = self.scheduler, self.pool
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        scheduled = [c.request for c in out.chunks]
        assert len(set(map(id, scheduled))) == len(scheduled), "a request was scheduled twice in one step"
        for chunk in out.chunks:
            req = chunk.request
            assert req.status is RequestStatus.RUNNING and chunk.num_tokens >= 1
            assert chunk.start == req.num_computed_tokens
            assert chunk.start + chunk.num_tokens <= req.num_tokens
            assert all(req.block_ids[p // BS] is not None for p in range(chunk.start, chunk.start + chunk.num_tokens))
        for req in out.preempted:
            assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0 and not req.block_ids
        for req in sched.waiting:
            assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0 and not req.block_ids
        owners: dict[int, list[tuple[Request, int]]] = {}
        for req in sched.running:
            for i, block in enumerate(req.block_ids):
                if block is not None:
                    owners.setdefault(block, []).append((req, i))
        for block, held_by in owners.items():
            assert pool.refcount(block) == len(held_by), f"block {block}: refcount != number of owners"
            if len(held_by) > 1:  # only a cached prefix block may be shared
                for req, i in held_by:
                    assert i < len(req.block_hashes) and pool.lookup(req.block_hashes[i]) == block
        assert all(pool.refcount(b) == 0 for b in range(pool.num_blocks) if b not in owners)
        assert pool.num_free == pool.num_blocks - len(owners)


def chunk_list(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


# --- budget and chunked prefill -------------------------------------------------------------------------

def test_long_prompt_is_chunked_and_running_requests_go_first():
    sched = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(sched)
    a = make_request([1, 2, 3], max_tokens=10, request_id="a")
    sched.add(a)
    assert chunk_list(model.step()) == [("a", 0, 3)]
    b = make_request(range(100, 120), request_id="b")
    sched.add(b)
    assert chunk_list(model.step()) == [("a", 3, 1), ("b", 0, 7)]
    assert chunk_list(model.step()) == [("a", 4, 1), ("b", 7, 7)]
    assert b.output_token_ids == []  # a partial prefill samples nothing
    c = make_request([5, 6], request_id="c")
    sched.add(c)
    assert chunk_list(model.step()) == [("a", 5, 1), ("b", 14, 6), ("c", 0, 1)]
    assert len(b.output_token_ids) == 1
    assert chunk_list(model.step()) == [("a", 6, 1), ("b", 20, 1), ("c", 1, 1)]
    model.run_until_done()


def test_token_budget_is_respected_and_used_every_step():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=200, max_num_seqs=32, max_num_batched_tokens=16)
    model = FakeModel(sched)
    for i in range(12):
        sched.add(make_request([rng.randrange(50) for _ in range(rng.randint(1, 40))],
                               max_tokens=rng.randint(1, 6), request_id=f"r{i}"))
    while sched.num_unfinished:
        pending = sum(r.num_tokens - r.num_computed_tokens for r in [*sched.running, *sched.waiting])
        out = model.step()
        assert out.num_tokens == min(16, pending)  # the step checks <= budget; nothing left unused either
    assert model.pool.num_free == model.pool.num_blocks


def test_max_num_seqs_and_fcfs_admission():
    sched = make_scheduler(max_num_seqs=2)
    model = FakeModel(sched)
    reqs = [make_request([i, i + 1, i + 2], max_tokens=3 + i % 2, request_id=f"r{i}") for i in range(5)]
    for req in reqs:
        sched.add(req)
    first_step = {}
    while sched.num_unfinished:
        out = model.step()
        assert len(out.chunks) <= 2
        for chunk in out.chunks:
            first_step.setdefault(chunk.request.request_id, model.num_steps)
    steps = [first_step[r.request_id] for r in reqs]
    assert steps == sorted(steps) and steps[2] > steps[0]
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)


def test_head_of_line_request_that_does_not_fit_blocks_later_ones():
    sched = make_scheduler(num_blocks=6, prefix_caching=False)
    model = FakeModel(sched)
    a = make_request(range(12), max_tokens=8, request_id="a")  # 3 blocks, growing to 5
    sched.add(a)
    model.step()
    b = make_request(range(100, 116), max_tokens=2, request_id="b")  # needs 4 blocks at once
    c = make_request([7, 8], max_tokens=2, request_id="c")  # would fit in the 1-2 free blocks
    sched.add(b)
    sched.add(c)
    first_step = {}
    while sched.num_unfinished:
        out = model.step()
        for chunk in out.chunks:
            first_step.setdefault(chunk.request.request_id, model.num_steps)
        if not a.is_finished:  # c, which would fit, is not let past b
            assert [ch.request for ch in out.chunks] == [a]
    assert first_step["b"] <= first_step["c"]
    assert model.pool.num_free == 6


# --- preemption -----------------------------------------------------------------------------------------

def test_preemption_evicts_the_latest_admitted_and_it_completes_later():
    sched = make_scheduler(num_blocks=5, prefix_caching=False)
    model = FakeModel(sched)
    a = make_request(range(4), max_tokens=6, request_id="a")  # 1 block, its first output needs a 2nd
    b = make_request(range(10, 15), max_tokens=6, request_id="b")  # 2 blocks
    c = make_request(range(20, 25), max_tokens=6, request_id="c")  # 2 blocks
    for req in (a, b, c):
        sched.add(req)
    model.step()
    assert model.pool.num_free == 0 and sched.running == [a, b, c]
    d = make_request(range(30, 33), max_tokens=2, request_id="d")  # arrives while the pool is full
    sched.add(d)
    kept = list(c.output_token_ids)
    assert len(kept) == 1

    out = sched.schedule()  # a needs a block: c, admitted last, makes room (b is untouched)
    model.check_invariants(out)
    assert out.preempted == [c]
    assert [ch.request for ch in out.chunks] == [a, b]
    assert list(sched.waiting) == [c, d] and c.status is RequestStatus.WAITING  # c goes ahead of d
    assert c.num_computed_tokens == 0 and c.block_ids == [] and c.num_preemptions == 1
    assert c.output_token_ids == kept
    assert model.pool.num_free == 2 - 1  # c's two blocks back, one taken by a
    assert len(b.block_ids) == 2
    model.run(out)

    recompute = []
    while sched.num_unfinished:
        out = model.step()
        assert out.chunks
        recompute += [ch for ch in out.chunks if ch.request is c and c.num_preemptions == 1]
    first = recompute[0]  # prompt and kept output re-prefilled in one pass, which samples the next token
    assert (first.start, first.num_tokens) == (0, 5 + len(kept))
    for req in (a, b, c):
        assert req.finish_reason == "length" and len(req.output_token_ids) == 6
    assert len(d.output_token_ids) == 2
    assert c.output_token_ids[:len(kept)] == kept
    assert model.pool.num_free == 5


def test_preempting_a_running_request_that_is_last_preempts_itself():
    sched = make_scheduler(num_blocks=3, prefix_caching=False)
    model = FakeModel(sched)
    a = make_request(range(4), max_tokens=5, request_id="a")  # 1 block now, 2 later
    b = make_request(range(10, 18), max_tokens=5, request_id="b")  # 2 blocks now, 3 on its first output
    sched.add(a)
    sched.add(b)
    model.step()
    out = model.step()  # a takes the last block; b cannot grow and is the last admitted: b goes
    assert out.preempted == [b] and [ch.request for ch in out.chunks] == [a]
    model.run_until_done()
    assert len(b.output_token_ids) == 5


def test_a_lone_request_that_fits_the_pool_advances_every_step():
    prompt_len, max_tokens = 10, 10
    num_blocks = math.ceil((prompt_len + max_tokens - 1) / BS)  # the last sampled token is never computed
    sched = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=4)
    model = FakeModel(sched)
    req = make_request(range(prompt_len), max_tokens=max_tokens)
    sched.add(req)
    model.run_until_done()
    assert model.num_steps == math.ceil(prompt_len / 4) + max_tokens - 1
    assert len(req.output_token_ids) == max_tokens


def _random_workload(rng: random.Random, num_requests: int):
    """(arrival step, [Request, ...]) pairs: shared prefixes, n > 1 groups, prompt-logprob requests."""
    bases = [[rng.randrange(11) for _ in range(24)] for _ in range(3)]
    workload = []
    for i in range(num_requests):
        prompt = bases[rng.randrange(3)][:rng.randint(0, 20)] + [rng.randrange(11) for _ in range(rng.randint(1, 8))]
        max_tokens = rng.randint(1, 10)
        n = rng.choice([1, 1, 1, 2, 3])
        if n > 1:
            reqs = make_siblings(prompt, n, request_id=f"u{i}", max_tokens=max_tokens)
        else:
            reqs = [make_request(prompt, max_tokens=max_tokens, request_id=f"u{i}",
                                 prompt_logprobs=1 if rng.random() < 0.2 else None)]
        workload.append((rng.randrange(30), reqs))
    return sorted(workload, key=lambda item: item[0])


def _simulate(seed: int, *, prefix_caching: bool, sliding_window: int | None) -> list[Request]:
    rng = random.Random(seed)
    workload = _random_workload(rng, 40)
    sched = make_scheduler(num_blocks=10, sliding_window=sliding_window, prefix_caching=prefix_caching,
                           max_num_seqs=6, max_num_batched_tokens=16)
    model = FakeModel(sched)
    everyone, aborted = [], []
    while workload or sched.num_unfinished:
        while workload and workload[0][0] <= model.num_steps:
            for req in workload.pop(0)[1]:
                sched.add(req)
                everyone.append(req)
        if rng.random() < 0.03 and sched.num_unfinished:  # a client disconnects
            victim = rng.choice([*sched.waiting, *sched.running])
            sched.finish(victim, "abort")
            aborted.append(victim)
        if sched.num_unfinished:
            assert model.step().chunks, "a step with unfinished requests scheduled nothing"
        else:
            model.num_steps += 1
        assert model.num_steps < 2_000, "no progress: the scheduler is live-locked"
    assert model.pool.num_free == model.pool.num_blocks
    assert all(r.is_finished for r in everyone)
    for req in everyone:
        if req not in aborted:
            assert req.finish_reason == "length" and len(req.output_token_ids) == req.params.max_tokens
        assert req.num_cached_prefix_tokens == model.first_start.get(req.request_id, 0)
    return everyone


def test_random_workload_on_a_small_pool_finishes_everything():
    everyone = []
    for seed in range(3):
        for prefix_caching in (True, False):
            for window in (None, 8):
                everyone += _simulate(seed, prefix_caching=prefix_caching, sliding_window=window)
    assert sum(r.num_preemptions for r in everyone) > 0  # the pool really was under pressure
    assert sum(r.num_cached_prefix_tokens for r in everyone) > 0  # and the prefix cache was exercised


# --- prefix cache ---------------------------------------------------------------------------------------

def test_prefix_cache_shares_full_blocks_of_a_common_prefix():
    sched = make_scheduler()
    model = FakeModel(sched)
    a = make_request(range(10), max_tokens=4, request_id="a")
    sched.add(a)
    model.step()
    b = make_request([*range(8), 50, 51, 52], max_tokens=4, request_id="b")
    sched.add(b)
    out = model.step()
    assert chunk_list(out)[1] == ("b", 8, 3)
    assert b.num_cached_prefix_tokens == 2 * BS
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [model.pool.refcount(blk) for blk in a.block_ids[:2]] == [2, 2]
    model.run_until_done()

    same = make_request(range(8), request_id="same")  # two full blocks, but one token must still run
    sched.add(same)
    free_before = model.pool.num_free
    out = model.step()
    assert chunk_list(out) == [("same", 4, 4)]
    assert model.pool.num_free == free_before - 2  # a revived cached block plus a fresh one
    model.run_until_done()


def test_a_finished_request_frees_its_tail_first_so_its_prefix_survives_longest():
    sched = make_scheduler(num_blocks=6)
    model = FakeModel(sched)
    a = make_request(range(12), max_tokens=1, request_id="a")  # 3 full blocks, cached, then freed
    sched.add(a)
    model.run_until_done()
    b = make_request(range(100, 116), max_tokens=1, request_id="b")  # 4 blocks: 3 never used + a's tail
    sched.add(b)
    model.run_until_done()
    c = make_request(range(12), max_tokens=1, request_id="c")
    sched.add(c)
    assert chunk_list(model.step()) == [("c", 8, 4)]  # a's first two blocks were still cached


def test_cached_prefix_tokens_counts_the_first_admission_only():
    """A preempted request that re-hits its own prompt-and-output blocks must not report them as prompt cache hits."""
    sched = make_scheduler(num_blocks=4)
    model = FakeModel(sched)
    a = make_request(range(8), max_tokens=9, request_id="a")  # grows to 4 blocks: the whole pool
    c = make_request([50, 51], max_tokens=12, request_id="c")
    sched.add(a)
    sched.add(c)
    model.run_until_done()  # c is preempted with a full block of prompt + output, which stays cached a while
    assert c.num_preemptions >= 1
    assert c.num_cached_prefix_tokens == 0  # nothing was cached when c was first admitted
    assert len(c.output_token_ids) == 12


def test_prompt_logprob_requests_skip_the_prefix_cache():
    sched = make_scheduler()
    model = FakeModel(sched)
    a = make_request(range(10), max_tokens=4, request_id="a")
    sched.add(a)
    model.step()
    e = make_request(range(10), max_tokens=4, request_id="e", prompt_logprobs=0)
    sched.add(e)
    out = model.step()
    assert chunk_list(out)[1] == ("e", 0, 10)
    assert e.num_cached_prefix_tokens == 0 and not set(e.block_ids) & set(a.block_ids)
    assert len(e.prompt_logprobs) == 9
    model.run_until_done()


# --- sliding window -------------------------------------------------------------------------------------

def test_sliding_window_keeps_a_bounded_number_of_blocks_for_a_long_decode():
    window = 8
    bound = math.ceil((window - 1) / BS) + 1
    sched = make_scheduler(num_blocks=bound + 2, sliding_window=window, max_num_batched_tokens=4)
    model = FakeModel(sched)
    req = make_request(range(5), max_tokens=40)  # 45 tokens: 12 blocks without the window
    sched.add(req)
    max_live = 0
    while sched.num_unfinished:
        out = sched.schedule()  # released and allocated; inspected before the step runs
        model.check_invariants(out)
        (chunk,) = out.chunks
        computed = -(-chunk.start // BS)  # blocks that hold already-computed positions
        first_visible = max(0, chunk.start - window + 1)  # the chunk's first query sees this position on
        assert [b is not None for b in req.block_ids[:computed]] == \
            [i >= first_visible // BS for i in range(computed)]  # exactly the invisible blocks are released
        live = sum(b is not None for b in req.block_ids[:computed])
        assert live <= bound
        max_live = max(max_live, live)
        model.run(out)
    assert max_live == bound  # the bound is tight, so the check above is not vacuous
    assert len(req.output_token_ids) == 40
    assert model.pool.num_free == model.pool.num_blocks


# --- n > 1 siblings -------------------------------------------------------------------------------------

def test_siblings_wait_for_the_first_sample_prompt_then_share_it():
    sched = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(sched)
    s0, s1, s2 = make_siblings(range(12), 3)
    d = make_request([40, 41, 42], request_id="d")
    for req in (s0, s1, s2, d):
        sched.add(req)
    assert chunk_list(model.step()) == [("s#0", 0, 8)]
    assert chunk_list(model.step()) == [("s#0", 8, 4), ("d", 0, 3)]  # budget left, yet s1 and s2 wait
    assert list(sched.waiting) == [s1, s2]
    assert chunk_list(model.step()) == [("s#0", 12, 1), ("d", 3, 1), ("s#1", 8, 4), ("s#2", 8, 2)]
    assert s1.num_cached_prefix_tokens == s2.num_cached_prefix_tokens == 2 * BS
    assert s1.block_ids[:2] == s2.block_ids[:2] == s0.block_ids[:2]
    assert model.pool.refcount(s0.block_ids[0]) == 3
    model.run_until_done()


def test_siblings_do_not_wait_without_prefix_caching():
    sched = make_scheduler(prefix_caching=False)
    model = FakeModel(sched)
    for req in make_siblings(range(12), 3):
        sched.add(req)
    assert chunk_list(model.step()) == [("s#0", 0, 12), ("s#1", 0, 12), ("s#2", 0, 8)]
    model.run_until_done()


# --- finish ---------------------------------------------------------------------------------------------

def test_finishing_a_waiting_request_removes_it():
    sched = make_scheduler(max_num_seqs=1)
    model = FakeModel(sched)
    a = make_request([1, 2, 3], max_tokens=3, request_id="a")
    b = make_request([4, 5, 6], max_tokens=3, request_id="b")
    sched.add(a)
    sched.add(b)
    model.step()
    assert list(sched.waiting) == [b]
    sched.finish(b, "abort")
    assert not sched.waiting and b.is_finished and b.finish_reason == "abort"
    assert sched.num_unfinished == 1
    while sched.num_unfinished:
        assert all(ch.request is a for ch in model.step().chunks)
    assert b.output_token_ids == [] and len(a.output_token_ids) == 3
