"""Batched sampling: one token per row from fp32 logits, each row with its own `SamplingParams`.

Design note — order of processing (the same as vLLM's sampler):

1. repetition penalty (Hugging Face semantics) over the prompt + output tokens: a seen token's logit is
   divided by the penalty when positive and multiplied by it when negative, so penalty > 1 always makes it
   less likely;
2. presence and frequency penalties (OpenAI semantics) over the output tokens only:
   `logit -= presence * (count > 0) + frequency * count`;
3. bans: tokens the row may not take now are set to -inf — its end of sequence and stop tokens while it has
   fewer than `min_tokens`, the token that would complete one of its `bad_words`, and every token its
   structured-output grammar does not allow (`engine/structured_output.py`). Should the bans leave a row no
   token, the grammar's alone apply: the grammar is the one constraint the output must keep;
4. greedy rows (`temperature` 0) take the argmax of these logits, and stop here;
5. the other rows: divide by temperature, keep the `top_k` largest, keep the smallest prefix of the sorted
   distribution whose mass reaches `top_p`, drop tokens whose probability is below `min_p` times the
   largest, then draw from the softmax of what is left.

Drawing uses the exponential race: `argmax(probs / q)` with `q ~ Exponential(1)` per token picks token i
with probability `probs[i]` (the Gumbel-max trick in another guise). It turns a draw into elementwise math
plus one noise tensor, and that noise is what makes seeding exact: a seeded row draws its V noise values
from its own `torch.Generator` and nothing else does, so its tokens depend only on its seed and its own
logits — not on its position in the batch, the batch size, or what other rows asked. Rows without a
generator share one batched draw from torch's default generator.

Logprobs are those of the model's raw distribution, `log_softmax` of the logits *before* penalties,
temperature and filtering (what vLLM v1 returns by default): they score the token against the model, not
against the sampler's reshaped distribution, and so match a one-pass rescoring of the text.

Shape legend: B rows in the batch, R rows that sample (not greedy), V vocabulary, T scored tokens,
K top logprobs, N tokens of all rows' lists together.
"""

from collections.abc import Sequence
from concurrent.futures import Future
from itertools import chain
from dataclasses import dataclass, replace

import torch

from engine.sampling_params import SamplingParams
from engine.structured_output import Grammar, allowed_tokens


@dataclass(frozen=True)
class Logprobs:
    """Logprob of one chosen (or prompt) token under the raw distribution, plus the top-K alternatives.

    `rank` is 1 for the most likely token; it counts tokens with a strictly higher logprob, plus one, so
    ties share the better rank. `top` lists (token_id, logprob) from most to least likely.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SamplingState:
    """What the sampler needs of one row: its params, its generator and the tokens seen so far.

    The engine keeps one per sequence and appends to `output_token_ids` after each step; the generator
    carries the seeded stream across steps. Build it with `from_params` so the seed is derived the same
    way everywhere. `stop_token_ids` (the end of sequence and the request's stop tokens) are banned while the
    row has fewer than `params.min_tokens`; `bad_words_ids` are the token sequences of its bad words;
    `grammar` follows its structured output.
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    stop_token_ids: tuple[int, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    grammar: Grammar | None = None
    forced_token_id: int | None = None  # the only token the row may take next (a thinking budget's [/THINK])

    @classmethod
    def from_params(cls, params: SamplingParams, prompt_token_ids: Sequence[int] = (), sample_index: int = 0,
                    device: torch.device | str = "cpu", **constraints) -> "SamplingState":
        """State for sample `sample_index` of a request; seeded with `params.sample_seed(sample_index)`.
        `constraints`: `stop_token_ids`, `bad_words_ids` and `grammar`, as the engine resolved them."""
        seed = params.sample_seed(sample_index)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        return cls(params=params, generator=generator, prompt_token_ids=list(prompt_token_ids),
                   output_token_ids=[], **constraints)

    def banned_token_ids(self) -> list[int]:
        """Tokens this row may not take next (its grammar aside): see step 3 of the module docstring."""
        output = self.output_token_ids
        banned = list(self.stop_token_ids) if len(output) < self.params.min_tokens else []
        for word in self.bad_words_ids:
            head = word[:-1]
            if len(output) >= len(head) and tuple(output[len(output) - len(head):]) == head:
                banned.append(word[-1])
        return banned

    def skip(self, num_tokens: int, vocab_size: int) -> None:
        """Advance the seeded stream past `num_tokens` sampled tokens, as if they had been drawn here.

        A request resumed elsewhere (its shard died) continues exactly where it stopped: each sampled token
        consumed one exponential draw per vocabulary entry (`_sample_rows`), and greedy rows draw nothing.
        """
        if self.generator is None or self.params.is_greedy:
            return
        scratch = torch.empty(vocab_size, device=self.generator.device)
        for _ in range(num_tokens):
            scratch.exponential_(generator=self.generator)


@dataclass(frozen=True)
class SamplerOutput:
    """One step's result: a token per row and, per row, its `Logprobs` or None if it asked for none."""

    token_ids: list[int]
    logprobs: list[Logprobs | None]


def sample(logits: torch.Tensor, requests: Sequence[SamplingState], masks: Future | None = None) -> SamplerOutput:
    """Choose one token per row of `logits` [B, V] (fp32) following each row's params; see module doc. `masks`:
    the grammar rows' allowed tokens, being built on the mask thread (`prefetch_allowed`), in row order."""
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"logits must be [B, V] with B = {len(requests)} rows, got {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 (cast before sampling), got {logits.dtype}")
    work = apply_bans(apply_penalties(logits.clone(), requests), requests, masks)  # [B, V]
    token_ids = work.argmax(dim=-1)  # [B]
    rows = [i for i, state in enumerate(requests) if not state.params.is_greedy]
    if rows:
        chosen = [requests[i] for i in rows]
        sampled = _sample_rows(work[rows], chosen)  # [R]
        token_ids[rows] = sampled
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=_sampled_logprobs(logits, token_ids, requests))


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int],
                     num_top: int) -> list[Logprobs]:
    """Logprob and rank of `token_ids[t]` under `log_softmax(logits[t])` [T, V], plus the `num_top` best.

    Used both for sampled tokens (row t's logits, its sampled token) and for prompt logprobs (position t's
    logits, prompt token t + 1). Computed in fp32 whatever the input dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V], got {tuple(logits.shape)}")
    if num_top < 0:
        raise ValueError(f"num_top must be >= 0, got {num_top}")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).reshape(-1)  # [T]
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(f"need one token id per row of logits: {ids.shape[0]} ids, {logits.shape[0]} rows")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = logprobs.gather(1, ids[:, None])  # [T, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [T]
    top_values, top_ids = logprobs.topk(min(num_top, logits.shape[1]), dim=-1)  # [T, K]
    rows = zip(ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist())
    return [Logprobs(token_id=token_id, logprob=logprob, rank=rank, top=tuple(zip(top_t, top_v)))
            for token_id, logprob, rank, top_t, top_v in rows]


def apply_penalties(logits: torch.Tensor, requests: Sequence[SamplingState]) -> torch.Tensor:
    """Apply repetition, then presence and frequency penalties to `logits` [B, V] in place; return it.

    Worked example, one row, logits [2, -1, 0.5, 3], prompt [0], output [1, 2, 2], repetition 2,
    presence 0.5, frequency 0.25: repetition gives [1, -2, 0.25, 3] (token 3 unseen); then token 1
    (seen once) loses 0.5 + 0.25 and token 2 (twice) loses 0.5 + 0.5: [1, -2.75, -0.75, 3].
    """
    params = [state.params for state in requests]
    vocab_size = logits.shape[1]
    has_repetition = any(p.repetition_penalty != 1.0 for p in params)
    has_additive = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (has_repetition or has_additive):
        return logits
    output_counts = _token_counts([s.output_token_ids for s in requests], vocab_size, logits.device)  # [B, V]
    if has_repetition:
        prompt_counts = _token_counts([s.prompt_token_ids for s in requests], vocab_size, logits.device)
        is_seen = (prompt_counts + output_counts) > 0  # [B, V]
        penalty = _column([p.repetition_penalty for p in params], logits)  # [B, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
        logits = torch.where(is_seen, penalised, logits)
    if has_additive:
        presence = _column([p.presence_penalty for p in params], logits)  # [B, 1]
        frequency = _column([p.frequency_penalty for p in params], logits)  # [B, 1]
        logits -= presence * (output_counts > 0) + frequency * output_counts
    return logits


def apply_bans(logits: torch.Tensor, requests: Sequence[SamplingState], masks: Future | None = None) -> torch.Tensor:
    """Set to -inf in `logits` [B, V] the tokens each row may not take (step 3 of the module docstring); the
    grammar rows' masks come from `masks` when they were prefetched."""
    banned = [(i, ids) for i, state in enumerate(requests) if (ids := state.banned_token_ids())]
    grammars = [(i, state.grammar) for i, state in enumerate(requests) if state.grammar is not None]
    forced = [(i, state.forced_token_id) for i, state in enumerate(requests) if state.forced_token_id is not None]
    for i, token_id in forced:
        logits[i] = torch.where(torch.arange(logits.shape[1], device=logits.device) == token_id, logits[i],
                                float("-inf"))
    if not banned and not grammars:
        return logits
    allowed = torch.ones(logits.shape, dtype=torch.bool)  # [B, V], on the CPU where the grammars write
    if grammars:
        rows = masks.result() if masks is not None else allowed_tokens([g for _, g in grammars], logits.shape[1])
        allowed[[i for i, _ in grammars]] = torch.from_numpy(rows)
    by_grammar = allowed.clone() if grammars and banned else allowed
    for i, ids in banned:
        allowed[i, ids] = False
    emptied = ~allowed.any(dim=-1)  # [B]: the bans left nothing; the grammar's mask alone applies
    if emptied.any():
        allowed[emptied] = by_grammar[emptied]
    return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what `top_k` [R] (<= 0 = off) and then `top_p` [R] (1 = off) drop from `logits` [R, V].

    top_p keeps token i of the descending order while the mass *before* it is below top_p, so the most
    likely token always survives and the kept mass is the smallest that reaches top_p. One stable sort
    serves both filters, so ties are broken by token id, reproducibly.
    """
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V], [R, V]
    positions = torch.arange(vocab_size, device=logits.device)  # [V]
    k = torch.where(top_k <= 0, vocab_size, top_k.clamp(max=vocab_size))  # [R]
    keep = positions[None, :] < k[:, None]  # [R, V]
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens of `logits` [R, V] whose probability is below `min_p` [R] x the largest."""
    probs = logits.softmax(dim=-1)  # [R, V]
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _sample_rows(logits: torch.Tensor, requests: Sequence[SamplingState]) -> torch.Tensor:
    """Temperature, filters, then one exponential-race draw per row of `logits` [R, V]; returns [R]."""
    params = [state.params for state in requests]
    logits = logits / _column([p.temperature for p in params], logits)  # [R, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=logits.device)  # [R]
        top_p = _column([p.top_p for p in params], logits)[:, 0]  # [R]
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, _column([p.min_p for p in params], logits)[:, 0])
    probs = logits.softmax(dim=-1)  # [R, V]
    noise = torch.empty_like(probs)  # [R, V]
    unseeded = [i for i, state in enumerate(requests) if state.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, state in enumerate(requests):
        if state.generator is not None:
            noise[i].exponential_(generator=state.generator)
    # A zero draw would divide to inf (or 0/0 = nan); clamping only touches probability-zero events.
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _sampled_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                      requests: Sequence[SamplingState]) -> list[Logprobs | None]:
    """Raw-distribution `Logprobs` of the chosen tokens for the rows that asked (None for the others)."""
    result: list[Logprobs | None] = [None] * len(requests)
    rows = [i for i, state in enumerate(requests) if state.params.logprobs is not None]
    if not rows:
        return result
    num_top = max(requests[i].params.logprobs for i in rows)
    for i, row_logprobs in zip(rows, compute_logprobs(logits[rows], token_ids[rows], num_top)):
        result[i] = replace(row_logprobs, top=row_logprobs.top[:requests[i].params.logprobs])
    return result


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's list: [B, V] fp32 counts, built with one scatter."""
    lengths = torch.tensor([len(ids) for ids in token_lists], device=device)  # [B]
    flat_ids = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)  # [N]
    flat_rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)  # [N]
    counts = torch.zeros(len(token_lists), vocab_size, device=device)  # [B, V]
    counts.index_put_((flat_rows, flat_ids), torch.ones_like(flat_ids, dtype=counts.dtype), accumulate=True)
    return counts


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars as a [B, 1] fp32 column on `like`'s device, to broadcast against [B, V]."""
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]
