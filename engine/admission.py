"""What an engine admits, checked from settings alone and free of torch, so that an edge (the Ingress
replicas, which load no model) refuses a bad request before any shard sees it: `check_request`, and `Resume`,
where a request stopped on another shard."""

from dataclasses import dataclass

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Resume:
    """Where a request stopped on another shard: the tokens generated so far and how many characters of their
    answer text the client has received (the rest, held back for stop strings, is sent again), and of their
    reasoning and tool-call text (see `engine/channels.py`)."""

    token_ids: tuple[int, ...]
    num_chars: int
    num_reasoning_chars: int = 0
    num_tool_chars: int = 0


def check_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int,
                  resume: Resume | None = None) -> None:
    """What every engine refuses, checked from settings alone (an ingress checks it before any shard does)."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty: send at least one token of text", param="prompt")
    bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})",
                                  param="prompt")
    if len(prompt_token_ids) >= max_model_len:
        raise PromptTooLongError(
            f"the prompt has {len(prompt_token_ids)} tokens; this model's context (max_model_len) is "
            f"{max_model_len}, which leaves no room to generate — shorten the prompt or raise "
            "max_model_len", param="prompt")
    if resume is None:
        return
    if params.n != 1:
        raise InvalidRequestError(f"only a single sample can be resumed; resume each of the n={params.n} "
                                  "samples as its own request", param="n")
    if len(resume.token_ids) >= params.max_tokens or len(prompt_token_ids) + len(resume.token_ids) >= max_model_len:
        raise InvalidRequestError(f"{len(resume.token_ids)} resumed tokens leave nothing to generate "
                                  f"(max_tokens {params.max_tokens}, max_model_len {max_model_len})")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in resume.token_ids):
        raise InvalidRequestError(f"resumed token ids must be in [0, {vocab_size})")
    if resume.num_chars < 0:
        raise InvalidRequestError(f"resume.num_chars must be >= 0, got {resume.num_chars}")
