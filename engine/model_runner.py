"""Runs one scheduled step through the model: inputs, paged attention, logits, sampling, prompt logprobs.

Only the rows that need logits are projected to the vocabulary: the last row of each chunk that samples and,
for requests that asked for prompt logprobs, the chunk's prompt rows.

Legend: T tokens this step, V vocab.
"""

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.paged_attention import PagedAttention, build_metadata
from engine.request import Request
from engine.sampler import Logprobs, compute_logprobs, sample
from engine.scheduler import SchedulerOutput
from engine.structured_output import prefetch_allowed
from mistral.model import Transformer


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> next token
    logprobs: dict[str, Logprobs] = field(default_factory=dict)  # for requests that asked
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # new prompt positions


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.sliding_window = cfg.sliding_window
        self.device = device
        # [layers, k/v, slots, kv heads, head_dim]
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=dtype, device=device)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        tokens, positions, spans = [], [], []
        for chunk in batch.chunks:
            end = chunk.start + chunk.num_tokens
            tokens.extend(chunk.request.token_ids(chunk.start, end))
            positions.append(torch.arange(chunk.start, end))
            spans.append((chunk.request.block_ids, chunk.start, chunk.num_tokens, chunk.request.host_blocks))
        meta = build_metadata(spans, self.block_size, self.sliding_window, self.device)
        grammars = [c.request.sampling.grammar for c in batch.chunks if c.samples and c.request.sampling.grammar]
        masks = prefetch_allowed(grammars, self.model.config.vocab_size) if grammars else None
        experts = self.model.experts  # None for a dense model
        if experts is not None:
            experts.begin_step()
        try:
            hidden = self.model(torch.tensor(tokens, device=self.device), torch.cat(positions).to(self.device),
                                PagedAttention(self.kv_cache, meta))  # [T, H]
        finally:
            if experts is not None:
                experts.end_step()
        out = RunnerOutput()
        self._sample(batch, hidden, out, masks)
        self._prompt_logprobs(batch, hidden, out)
        return out

    def _sample(self, batch: SchedulerOutput, hidden: torch.Tensor, out: RunnerOutput, masks: Future | None) -> None:
        rows, reqs, row = [], [], 0
        for chunk in batch.chunks:
            row += chunk.num_tokens
            if chunk.samples:
                rows.append(row - 1)
                reqs.append(chunk.request)
        if not rows:
            return
        logits = self.model.compute_logits(hidden[rows])  # [R, V] fp32
        result = sample(logits, [r.sampling for r in reqs], masks)
        for req, token, lp in zip(reqs, result.token_ids, result.logprobs):
            out.sampled[req.request_id] = token
            if lp is not None:
                out.logprobs[req.request_id] = lp

    def _prompt_logprobs(self, batch: SchedulerOutput, hidden: torch.Tensor, out: RunnerOutput) -> None:
        row = 0
        for chunk in batch.chunks:
            req: Request = chunk.request
            first = max(chunk.start, len(req.prompt_logprobs))  # logits at position j score token j + 1
            last = min(chunk.start + chunk.num_tokens, req.num_prompt_tokens - 1)
            if req.params.prompt_logprobs is not None and first < last:
                rows = hidden[row + first - chunk.start: row + last - chunk.start]
                targets = req.prompt_token_ids[first + 1:last + 1]
                logits = self.model.compute_logits(rows)
                out.prompt_logprobs[req.request_id] = compute_logprobs(logits, targets, req.params.prompt_logprobs)
            row += chunk.num_tokens
