"""OpenAI's completions and chat completions responses as data: engine outputs in, response JSON out.

The requests are `cluster/api_request.py`'s. `ResponseBuilder` turns the engine's `RequestOutput`s into OpenAI
objects: `response` for a whole answer (the deltas merged), `chunks` for the stream chunks of one delta (one
chunk per choice it touches; a choice's first chat chunk carries `role`), `usage_chunk` for the final chunk of
`stream_options.include_usage`. A completions request with a batch of prompts numbers its choices prompt by
prompt, as vLLM does: prompt p's sample j is choice p * n + j; its usage sums the prompts'.

Logprobs follow each API's shape: completions `{tokens, token_logprobs, top_logprobs, text_offset}` (the top-k
dict also holds the sampled token, as OpenAI documents), chat `{content: [{token, logprob, bytes,
top_logprobs}]}`. `text_offset` counts characters of the completion from its start; `bytes` is the UTF-8 of the
decoded token (a lone byte-fallback piece decodes to U+FFFD). Prompt logprobs (vLLM's `prompt_logprobs`) go in
each completion choice, and at the top of a chat response: one entry per prompt token, null for the first,
else `{token_id: {logprob, rank, decoded_token}}`. Logprobs are clamped to -9999 so that JSON never holds -inf.
"""

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from cluster import tool_calls
from cluster.api_request import ChatRequest, CompletionRequest
from cluster.frontend import usage
from engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput, ranked

MIN_LOGPROB = -9999.0


class ResponseBuilder:
    """The OpenAI objects of one request's answer: whole (`response`) or as stream chunks (`chunks`)."""

    def __init__(self, request: CompletionRequest | ChatRequest, request_id: str, model: str,
                 created: int | None = None):
        self.request, self.request_id, self.model = request, request_id, model
        self.created = int(time.time()) if created is None else created
        self._n = request.n or 1
        self._object = "chat.completion" if request.is_chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if request.is_chat else "text_completion"
        self._prompts: dict[int, tuple[int, int]] = {}  # per prompt: its token count and cached tokens
        self._sent: dict[int, CompletionOutput] = {}  # per choice: the text and tokens the client has
        self._call_streams: dict[int, tool_calls.CallStream] = {}  # per choice: the tool calls it has

    def response(self, outputs: Sequence[RequestOutput]) -> dict:
        """The whole answer, from each prompt's merged deltas (one prompt unless a completions batch)."""
        choices, extra = [], {}
        for p, output in enumerate(outputs):
            self._prompts[p] = (len(output.prompt_token_ids), output.num_cached_tokens)
            for out in output.outputs:
                choice = self._choice(self._numbered(out, p), text_offset=0)
                if output.prompt_logprobs is not None and not self.request.is_chat:
                    choice["prompt_logprobs"] = _prompt_logprobs(output.prompt_logprobs)
                choices.append(choice)
            if output.prompt_logprobs is not None and self.request.is_chat:
                extra["prompt_logprobs"] = _prompt_logprobs(output.prompt_logprobs)
        merged = [out for output in outputs for out in output.outputs]
        return self._envelope(self._object, sorted(choices, key=lambda c: c["index"]),
                              usage=self._usage(merged), **extra)

    def chunks(self, delta: RequestOutput, prompt_index: int = 0) -> list[dict]:
        """The stream chunks of one delta of prompt `prompt_index`: one per choice that has something new."""
        self._prompts[prompt_index] = (len(delta.prompt_token_ids), delta.num_cached_tokens)
        extra = {"usage": None} if self.request.include_usage else {}
        chunks = []
        for out in delta.outputs:
            out = self._numbered(out, prompt_index)
            sent = self._sent.get(out.index)
            is_first = sent is None
            if sent is None:
                sent = self._sent[out.index] = CompletionOutput(out.index, "", [])
            text_offset = len(sent.text)
            sent.text += out.text
            sent.token_ids += out.token_ids
            sent.tool_text += out.tool_text
            sent.num_reasoning_tokens += out.num_reasoning_tokens
            if not self.request.is_chat:
                if is_first or out.text or out.reasoning or out.tool_text or out.logprobs or out.finish_reason:
                    chunks.append(self._envelope(self._chunk_object, [self._completion_choice(out, text_offset)],
                                                 **extra))
                continue
            chunks += [self._envelope(self._chunk_object, [choice], **extra)
                       for choice in self._chat_deltas(out, sent.tool_text, is_first)]
        return chunks

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the request's usage."""
        return self._envelope(self._chunk_object, [], usage=self._usage(list(self._sent.values())))

    def _numbered(self, out: CompletionOutput, prompt_index: int) -> CompletionOutput:
        return dataclasses.replace(out, index=prompt_index * self._n + out.index) if prompt_index else out

    def _usage(self, outputs: Sequence[CompletionOutput]) -> dict:
        prompts = self._prompts.values()
        return usage(sum(count for count, _ in prompts), sum(len(o.token_ids) for o in outputs),
                     sum(cached for _, cached in prompts), sum(o.num_reasoning_tokens for o in outputs))

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, out: CompletionOutput, text_offset: int) -> dict:
        """One choice of a whole answer."""
        if not self.request.is_chat:
            return self._completion_choice(out, text_offset)
        calls, content = self._tool_calls(out.tool_text, out.text, out.finish_reason)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""),
                                   **self._reasoning(out)}
        if calls:
            message["tool_calls"] = calls
        return self._finish({"index": out.index, "message": message, "logprobs": self._chat_logprobs(out)}, out,
                            bool(calls))

    def _completion_choice(self, out: CompletionOutput, text_offset: int) -> dict:
        """A completion's choice (or a stream's delta of it): all the text, reasoning and tool calls included."""
        text = out.reasoning + out.text + tool_calls.plain_text(out.tool_text)
        choice = {"index": out.index, "text": text,
                  "logprobs": None if out.logprobs is None else _completion_logprobs(out, text_offset)}
        return self._finish(choice, out, False)

    def _chat_deltas(self, out: CompletionOutput, tool_text: str, is_first: bool) -> list[dict]:
        """A chat stream's choice deltas for one engine delta (`tool_text`: all of the choice's so far). Tool
        calls go out as OpenAI streams them (`tool_calls.CallStream`); tool text that has not begun a call is
        held until the choice finishes, and becomes content if it never does."""
        content, entries, made_calls = out.text, [], False
        if not self.request.uses_tools:
            content += tool_calls.plain_text(out.tool_text)
        elif tool_text:
            stream = self._call_streams.setdefault(out.index, tool_calls.CallStream())
            entries = stream.deltas(tool_text)
            if out.finish_reason is not None and not stream.started:
                calls, content = self._tool_calls(tool_text, out.text, out.finish_reason)
                entries = [entry for k, call in enumerate(calls or ()) for entry in _whole_call(k, call)]
            made_calls = stream.started or bool(entries)
        delta: dict[str, Any] = {"role": "assistant"} if is_first else {}
        delta.update(self._reasoning(out))
        if content or is_first:
            delta["content"] = content
        logprobs = self._chat_logprobs(out)
        deltas = [{"index": out.index, "delta": delta, "logprobs": logprobs}] \
            if delta or logprobs or (out.finish_reason and not entries) else []
        deltas += [{"index": out.index, "logprobs": None, "delta": {"tool_calls": [entry]}} for entry in entries]
        for choice in deltas[:-1]:
            choice["finish_reason"] = None
        if deltas:
            self._finish(deltas[-1], out, made_calls)
        return deltas

    def _tool_calls(self, tool_text: str, content: str, reason: str | None) -> tuple[list[dict] | None, str]:
        return tool_calls.split(tool_text, content, self.request.is_chat and self.request.uses_tools,
                                cut=reason == "length")

    def _reasoning(self, out: CompletionOutput) -> dict:
        """A reasoning model's thinking, as `reasoning_content` with vLLM's newer name `reasoning` beside it."""
        if not out.reasoning or not self.request.include_reasoning:
            return {}
        return {"reasoning_content": out.reasoning, "reasoning": out.reasoning}

    def _chat_logprobs(self, out: CompletionOutput) -> dict | None:
        return None if out.logprobs is None else _chat_logprobs(out, self.request.num_top_logprobs)

    @staticmethod
    def _finish(choice: dict, out: CompletionOutput, made_calls: bool) -> dict:
        choice["finish_reason"] = tool_calls.finish_reason(out.finish_reason, made_calls)
        if isinstance(out.stop_reason, (str, int)) and out.finish_reason is not None:
            choice["stop_reason"] = out.stop_reason  # vLLM's extension: the stop string or token that ended it
        return choice


def _whole_call(k: int, call: dict) -> list[dict]:
    """A whole call as stream delta entries: its id and name, then its arguments."""
    return [{"index": k, "id": call["id"], "type": "function",
             "function": {"name": call["function"]["name"], "arguments": ""}},
            {"index": k, "function": {"arguments": call["function"]["arguments"]}}]


def _ranked(position: PositionLogprobs) -> list[tuple[str, float]]:
    """(decoded token, logprob) of a position's tokens, best first."""
    return [_entry(lp) for _, lp in ranked(position)]


def _entry(lp: Logprob) -> tuple[str, float]:
    return lp.decoded_token or "", max(lp.logprob, MIN_LOGPROB)


def _prompt_logprobs(positions: Sequence[PositionLogprobs | None]) -> list[dict | None]:
    return [None if position is None else
            {str(token_id): {"logprob": max(lp.logprob, MIN_LOGPROB), "rank": lp.rank,
                             "decoded_token": lp.decoded_token} for token_id, lp in ranked(position)}
            for position in positions]


def _positions(out: CompletionOutput) -> Iterable[tuple[PositionLogprobs, int]]:
    """Each position's logprobs with the token sampled there (the newest tokens, when a resumed request
    has no logprobs for the tokens it started with)."""
    positions = out.logprobs or []
    return zip(positions, out.token_ids[len(out.token_ids) - len(positions):])


def _completion_logprobs(out: CompletionOutput, text_offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for position, token_id in _positions(out):
        token, logprob = _entry(position[token_id])
        tokens.append(token)
        token_logprobs.append(logprob)
        tops.append(dict(_ranked(position)))
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(out: CompletionOutput, num_top: int) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [{**entry(*_entry(position[token_id])),
                "top_logprobs": [entry(*top) for top in _ranked(position)[:num_top]]}
               for position, token_id in _positions(out)]
    return {"content": content}
