"""What the engine returns, shaped like vLLM's `RequestOutput` / `CompletionOutput`.

`LLM.generate` returns whole outputs. The streaming API yields *deltas*: each `RequestOutput` carries only the
text, token ids and logprobs that are new since the previous one, so a client concatenates them.
"""

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# One position's logprobs: the chosen token and the top-K alternatives, token id -> Logprob.
PositionLogprobs = dict[int, Logprob]


def ranked(position: PositionLogprobs) -> list[tuple[int, Logprob]]:
    """A position's (token id, `Logprob`) pairs, most likely first."""
    return sorted(position.items(), key=lambda item: item[1].rank)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    reasoning: str = ""  # the thinking between [THINK] and [/THINK]; `text` is the answer (engine/channels.py)
    tool_text: str = ""  # what follows [TOOL_CALLS], its control tokens written out
    num_reasoning_tokens: int = 0  # tokens of the reasoning, its tags included

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first entry None, as in vLLM
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine's load (what vLLM's scheduler stats report), read by metrics publishers.

    The prefix-cache figures are cumulative since start, in tokens: `prefix_cache_queries` tokens of
    admitted prompts were looked up, `prefix_cache_hits` of them were found cached.
    """

    num_requests_running: int  # sequences (samples) scheduled in the running batch
    num_requests_waiting: int  # sequences queued for admission or preempted
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_tiers: dict | None = None  # host RAM and memory-store figures (`KVTiers.stats`), when configured


def merge(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta into the accumulated output of the same request."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], None,
                            num_cached_tokens=delta.num_cached_tokens)
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        if c.index not in by_index:
            by_index[c.index] = type(c)(c.index, "", [], logprobs=[] if c.logprobs is not None else None)
        a = by_index[c.index]
        a.text += c.text
        a.reasoning += c.reasoning
        a.tool_text += c.tool_text
        a.num_reasoning_tokens += c.num_reasoning_tokens
        a.token_ids += c.token_ids
        if c.logprobs is not None:
            a.logprobs += c.logprobs
        a.cumulative_logprob, a.finish_reason, a.stop_reason = c.cumulative_logprob, c.finish_reason, c.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.prompt_logprobs = delta.prompt_logprobs or acc.prompt_logprobs
    acc.finished = delta.finished
    return acc
