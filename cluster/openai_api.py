"""OpenAI's completions and chat completions APIs as data: request JSON in, response JSON out (no ASGI).

`parse_completion_request` / `parse_chat_request` turn a decoded request body into an `ApiRequest`; every
mistake is an `InvalidRequestError` whose `param` names the offending field (the HTTP edge answers 400, never
FastAPI's 422). Sampling fields are handed to `SamplingParams` as given, so its strict checks (an int field
takes only a real int, a float field no bool or string) are the one source of truth for types and ranges.
Fields:

- both: `model` (optional; null means the served model), `stream`, `stream_options.include_usage` (only with
  `stream`), `n`, `temperature`, `top_p`, `stop` (string or list), `seed`, `presence_penalty`,
  `frequency_penalty`, `user` (accepted, ignored), and vLLM's extensions `top_k`, `min_p`,
  `repetition_penalty`, `stop_token_ids`, `ignore_eos`. A null field means "not given" (OpenAI's reading).
- completions: `prompt` (a string, a list of token ids, or a list holding one of those: one prompt per
  request), `max_tokens` (default 16, like OpenAI), `logprobs` (top-k count).
- chat: `messages`, `max_completion_tokens` or its older name `max_tokens` (default: the rest of the
  context, `max_model_len` minus the prompt, as vLLM does; the engine stops there anyway), `logprobs` (bool)
  with `top_logprobs` (count).
- Fields OpenAI defines but this server cannot honour (`echo`, `best_of`, `suffix`, `logit_bias`, `tools`,
  `functions`, `response_format`) are refused unless they hold their no-op value; other unknown fields are
  ignored, as vLLM does.

`ResponseBuilder` turns the engine's `RequestOutput`s into OpenAI objects: `response` for a whole answer (the
deltas merged), `chunks` for the stream chunks of one delta (one chunk per choice it touches; a choice's first
chat chunk carries `role`), `usage_chunk` for the final chunk of `stream_options.include_usage`. Logprobs follow
each API's shape: completions `{tokens, token_logprobs, top_logprobs, text_offset}` (the top-k dict also
holds the sampled token, as OpenAI documents), chat `{content: [{token, logprob, bytes, top_logprobs}]}`.
`text_offset` counts characters of the completion from its start; `bytes` is the UTF-8 of the decoded token
(a lone byte-fallback piece decodes to U+FFFD). Logprobs are clamped to -9999 so that JSON never holds -inf.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cluster.frontend import usage
from engine.errors import InvalidRequestError, SamplingParamsError
from engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
MIN_LOGPROB = -9999.0

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                    "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos")
# Fields OpenAI defines that this server cannot honour, with the values that ask for nothing.
_UNSUPPORTED = {"echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},), "tools": ([],),
                "functions": ([],), "response_format": ({"type": "text"},)}


@dataclass(frozen=True)
class ApiRequest:
    """A parsed completions or chat request: what to complete, how to sample, how to answer."""

    is_chat: bool
    model: str | None  # None: the served model
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict] | None  # chat
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]  # SamplingParams fields as the request gave them; no max_tokens: rest of context
    param_names: dict[str, str]  # SamplingParams field -> the request's name for it, where they differ

    def sampling_params(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """The validated `SamplingParams`; errors name the request's own field."""
        fields = {"max_tokens": max(1, max_model_len - num_prompt_tokens), **self.sampling}
        try:
            return SamplingParams(**fields)
        except SamplingParamsError as error:
            name = self.param_names.get(error.param or "")
            if name is None:
                raise
            raise SamplingParamsError(str(error).replace(error.param, name, 1), param=name) from None


def parse_completion_request(body: Any) -> ApiRequest:
    """A `/v1/completions` body (decoded JSON) as an `ApiRequest`; raises `InvalidRequestError`."""
    fields = _fields(body)
    prompt = fields.get("prompt")
    if prompt is None:
        raise InvalidRequestError("prompt is required: a string or a list of token ids", param="prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError(f"prompt holds {len(prompt)} prompts; this server takes one prompt per "
                                      "request (send them as separate requests, or use n for more samples)",
                                      param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(_is_int(t) for t in prompt)):
        raise InvalidRequestError("prompt must be a string or a list of integer token ids", param="prompt")
    sampling = _sampling(fields)
    sampling["max_tokens"] = fields.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
    if "logprobs" in fields:
        sampling["logprobs"] = fields["logprobs"]
    return _request(fields, False, prompt, None, sampling, {})


def parse_chat_request(body: Any) -> ApiRequest:
    """A `/v1/chat/completions` body (decoded JSON) as an `ApiRequest`; raises `InvalidRequestError`."""
    fields = _fields(body)
    messages = fields.get("messages")
    if not isinstance(messages, list):
        got = "missing" if messages is None else f"a JSON {_json_type(messages)}"
        raise InvalidRequestError(f"messages is {got}; it must be a list of {{role, content}} objects",
                                  param="messages")
    sampling = _sampling(fields)
    names: dict[str, str] = {}
    name = next((name for name in ("max_completion_tokens", "max_tokens") if name in fields), None)
    if name is not None:
        sampling["max_tokens"], names["max_tokens"] = fields[name], name
    top_logprobs = fields.get("top_logprobs")
    if top_logprobs is not None and not (_is_int(top_logprobs) and 0 <= top_logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError(f"top_logprobs must be an integer between 0 and {MAX_LOGPROBS}, "
                                  f"got {top_logprobs!r}", param="top_logprobs")
    if _typed(fields, "logprobs", bool, "true or false", False):
        sampling["logprobs"] = top_logprobs or 0
    elif top_logprobs is not None:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    return _request(fields, True, None, messages, sampling, names)


class ResponseBuilder:
    """The OpenAI objects of one request's answer: whole (`response`) or as stream chunks (`chunks`)."""

    def __init__(self, request: ApiRequest, request_id: str, model: str, created: int | None = None):
        self.request, self.request_id, self.model = request, request_id, model
        self.created = int(time.time()) if created is None else created
        self._object = "chat.completion" if request.is_chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if request.is_chat else "text_completion"
        self._prompt_token_ids: list[int] = []
        self._cached_tokens = 0
        self._sent: dict[int, CompletionOutput] = {}  # per choice: the text and tokens the client has

    def response(self, output: RequestOutput) -> dict:
        """The whole answer, from the merged deltas of a finished request."""
        choices = [self._choice(out, text_offset=0) for out in output.outputs]
        return self._envelope(self._object, choices,
                              usage=usage(output.prompt_token_ids, output.outputs, output.num_cached_tokens))

    def chunks(self, delta: RequestOutput) -> list[dict]:
        """The stream chunks of one delta: one per choice that has something new."""
        self._prompt_token_ids, self._cached_tokens = delta.prompt_token_ids, delta.num_cached_tokens
        extra = {"usage": None} if self.request.include_usage else {}
        chunks = []
        for out in delta.outputs:
            sent = self._sent.get(out.index)
            is_first = sent is None
            if sent is None:
                sent = self._sent[out.index] = CompletionOutput(out.index, "", [])
            if is_first or out.text or out.logprobs or out.finish_reason is not None:
                choice = self._choice(out, text_offset=len(sent.text), stream_first=is_first)
                chunks.append(self._envelope(self._chunk_object, [choice], **extra))
            sent.text += out.text
            sent.token_ids += out.token_ids
        return chunks

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the request's usage."""
        sent = list(self._sent.values())
        return self._envelope(self._chunk_object, [],
                              usage=usage(self._prompt_token_ids, sent, self._cached_tokens))

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, out: CompletionOutput, text_offset: int, stream_first: bool | None = None) -> dict:
        """One choice; `stream_first` is None for a whole answer, else whether the chunk is the choice's first."""
        choice: dict[str, Any] = {"index": out.index}
        if not self.request.is_chat:
            choice["text"] = out.text
            choice["logprobs"] = None if out.logprobs is None else _completion_logprobs(out, text_offset)
        else:
            if stream_first is None:
                choice["message"] = {"role": "assistant", "content": out.text}
            elif stream_first:
                choice["delta"] = {"role": "assistant", "content": out.text}
            else:
                choice["delta"] = {"content": out.text} if out.text else {}
            num_top = self.request.sampling.get("logprobs") or 0
            choice["logprobs"] = None if out.logprobs is None else _chat_logprobs(out, num_top)
        choice["finish_reason"] = out.finish_reason
        return choice


def _fields(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got a JSON {_json_type(body)}")
    fields = {name: value for name, value in body.items() if value is not None}
    for name, allowed in _UNSUPPORTED.items():
        if name in fields and fields[name] not in allowed:
            raise InvalidRequestError(f"{name} is not supported by this server; leave it out", param=name)
    return fields


def _sampling(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: fields[name] for name in _SAMPLING_FIELDS if name in fields}


def _request(fields: dict[str, Any], is_chat: bool, prompt: str | list[int] | None, messages: list[dict] | None,
             sampling: dict[str, Any], names: dict[str, str]) -> ApiRequest:
    model = _typed(fields, "model", str, "a string", None)
    _typed(fields, "user", str, "a string", None)
    stream = _typed(fields, "stream", bool, "true or false", False)
    options = _typed(fields, "stream_options", dict, "an object", None)
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequestError("stream_options is only allowed with stream set to true",
                                      param="stream_options")
        include_usage = _typed(options, "include_usage", bool, "true or false", False, "stream_options.")
    return ApiRequest(is_chat, model, prompt, messages, stream, include_usage, sampling, names)


def _typed(fields: dict[str, Any], name: str, kind: type, what: str, default: Any, prefix: str = "") -> Any:
    """`fields[name]` if it is a `kind` (`what`, for the message), `default` if absent; `bool` is no int here."""
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidRequestError(f"{prefix}{name} must be {what}, got a JSON {_json_type(value)}",
                                  param=prefix + name)
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ranked(position: PositionLogprobs) -> list[tuple[str, float]]:
    """(decoded token, logprob) of a position's tokens, best first."""
    return [_entry(lp) for lp in sorted(position.values(), key=lambda lp: lp.rank)]


def _entry(lp: Logprob) -> tuple[str, float]:
    return lp.decoded_token or "", max(lp.logprob, MIN_LOGPROB)


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
