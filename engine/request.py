"""One sequence being generated, as the scheduler and the engine see it.

A user's request with `n` samples becomes `n` `Request`s (one per sample) that share the prompt; the engine
groups their outputs again. Everything the scheduler needs is plain Python here: token lists, how many tokens
already have keys/values in the cache (`num_computed_tokens`) and the block table.

The block table is indexed by position: `block_ids[i]` holds positions [i * block_size, (i + 1) * block_size).
With a sliding window, blocks that fall out of the window are released and their entries become None.
"""

import enum
from dataclasses import dataclass, field

import torch

from engine.sampler import Logprobs, SamplingState
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str  # unique per sample: "<user id>" for n == 1, "<user id>#<index>" otherwise
    parent_id: str
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    arrival: int  # admission order; earlier requests are preempted last
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int | None] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # names of the leading full blocks
    host_blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # spilled to host RAM, by block index
    is_loading_kv: bool = False  # its prefix is on its way (from the memory store, or host RAM): not admitted yet
    host_load: object | None = None  # `kv_tiers.HostLoad`: a copy from host RAM into its blocks, until taken
    num_cached_prefix_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    first_sibling: "Request | None" = None  # sample 0 of the same user request, for samples 1..n-1
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs] = field(default_factory=list)  # for positions 1..len(prompt)-1
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:min(end, p)] if start < p else []
        return head + self.output_token_ids[max(start - p, 0):max(end - p, 0)]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute (they need every prompt position to run through the model)."""
        return self.params.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
