"""The OpenAI completion and chat requests as pydantic models, and their one mapping to `SamplingParams`.

Every edge reads requests through these models: the HTTP API validates the decoded JSON body, the gRPC API
turns its protobuf message into the same fields, and the Python client validates its keyword arguments before
sending. So all three accept the same fields, with the same defaults, and refuse the same mistakes with the
same messages.

    request = parse_request(body, chat=True)            # InvalidRequestError naming the field, never a 422
    ids = request.truncate(tokenizer.encode_chat(request.messages))
    params = request.sampling_params(len(ids), max_model_len, max_n)

Fields (a null field means "not given", OpenAI's reading; `model` may be left out and means the served model,
as in vLLM):

- both: `model`, `stream`, `stream_options.include_usage` (only with `stream`), `n`, `temperature`, `top_p`,
  `stop` (a string or a list), `seed`, `presence_penalty`, `frequency_penalty`, `user` (accepted, unused), and
  vLLM's `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `min_tokens`,
  `include_stop_str_in_output`, `bad_words`, `prompt_logprobs` (not with `stream`), `truncate_prompt_tokens`
  (keep the prompt's last N tokens).
- structured output, one way per request: OpenAI's `response_format` (`json_object`, or `json_schema` with
  `strict`), vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older
  names `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
- completions: `prompt` (a string or a list of token ids, or a list of up to `MAX_PROMPTS` of either: a batch
  whose choices are numbered prompt by prompt), `max_tokens` (default 16, like OpenAI), `logprobs` (top-k).
- chat: `messages`, `max_completion_tokens` or its older name `max_tokens` (default: the rest of the context,
  as in vLLM), `logprobs` (bool) with `top_logprobs` (count), `tools` with `tool_choice` ("auto" by default with
  tools; "none", "required" or a named function) and `parallel_tool_calls` (cluster/tool_calls.py), and
  `include_reasoning` (false: the response leaves out a reasoning model's thinking).
- msem's `self_verification` (`candidates`, `method`): the best of several candidates, scored by the model
  (cluster/self_verification.py).
- reasoning models: a thinking budget, OpenAI's `reasoning_effort` (`REASONING_EFFORT_TOKENS`) or msem's
  `max_thinking_tokens`: at the budget the engine writes `[/THINK]` and the answer follows.

Ranges are `SamplingParams`' to check (one source of truth); this module checks types and shapes, strictly: a
JSON `true` is no integer and `"16"` no number. A field this server does not implement is refused by name
(`UNSUPPORTED` says which; each may still hold its no-op value), and so is any field it does not know.
"""

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from engine.errors import InvalidRequestError, PromptTooLongError, SamplingParamsError
from engine.sampling_params import SamplingParams, StructuredOutputs

COMPLETION_DEFAULT_MAX_TOKENS = 16
REASONING_EFFORT_TOKENS = {"low": 256, "medium": 1024, "high": 4096}
"""The thinking budget (`max_thinking_tokens`) each OpenAI `reasoning_effort` stands for."""
MAX_PROMPTS = 128
"""Most prompts in one completions request; each is its own request on the shards."""

# Fields of OpenAI's or vLLM's requests that this server does not implement, with the values that ask for
# nothing (a client that sends those is served).
UNSUPPORTED: dict[str, tuple] = {
    "echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},), "functions": ([],),
    "function_call": ("none",), "use_beam_search": (False,), "length_penalty": (1, 1.0), "chat_template": (),
    "chat_template_kwargs": ({},),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "logits_processors": ([],),
    "allowed_token_ids": (), "guided_decoding_backend": (), "structural_tag": (),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Model):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


class SelfVerification(_Model):
    """msem's extension (cluster/self_verification.py): answer with the best of several candidates."""

    candidates: int = 4
    method: Literal["mean_logprob", "verifier", "majority"] = "mean_logprob"


class _Request(_Model):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_thinking_tokens: int | None = None
    self_verification: SelfVerification | None = None

    is_chat: ClassVar[bool] = False
    _constraint: StructuredOutputs | None = PrivateAttr(None)  # from whichever field asked, set by parse_request

    # ---- what the edges ask ----

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_top_logprobs(self) -> int:
        """Alternatives per generated token that the response shows."""
        return self._logprobs() or 0

    def truncate(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt as the request runs it: its last `truncate_prompt_tokens` tokens, when that is set."""
        keep = self.truncate_prompt_tokens
        return prompt_token_ids if keep is None else prompt_token_ids[-keep:]

    def sampling_params(self, num_prompt_tokens: int, max_model_len: int, max_n: int) -> SamplingParams:
        """The validated `SamplingParams`; errors name the request's own fields."""
        n = 1 if self.n is None else self.n
        if not 1 <= n <= max_n:
            raise InvalidRequestError(f"n must be between 1 and {max_n} on this server, got {n}", param="n")
        if self.self_verification is not None and not 2 <= self.self_verification.candidates <= max_n:
            raise InvalidRequestError(f"self_verification.candidates must be between 2 and {max_n} on this server, "
                                      f"got {self.self_verification.candidates}", param="self_verification.candidates")
        name, max_tokens = self._max_tokens()
        fields = {field: value for field in _SAMPLING_FIELDS if (value := getattr(self, field)) is not None}
        fields["max_tokens"] = max(1, max_model_len - num_prompt_tokens) if max_tokens is None else max_tokens
        if (logprobs := self._logprobs()) is not None:
            fields["logprobs"] = logprobs
        fields["structured_outputs"] = self._constraint
        if self.reasoning_effort is not None:
            fields["max_thinking_tokens"] = REASONING_EFFORT_TOKENS[self.reasoning_effort]
        try:
            params = SamplingParams(**fields)
        except SamplingParamsError as error:
            if error.param == "max_tokens" and name != "max_tokens":
                raise SamplingParamsError(str(error).replace("max_tokens", name, 1), param=name) from None
            raise
        if max_tokens is not None and num_prompt_tokens < max_model_len < num_prompt_tokens + max_tokens:
            raise PromptTooLongError(
                f"this model's context is {max_model_len} tokens, but the request needs "
                f"{num_prompt_tokens + max_tokens}: {num_prompt_tokens} in the prompt and {max_tokens} to generate "
                f"({name}); shorten the prompt or lower {name}", param=name)
        return params

    # ---- the fields' meaning ----

    def _max_tokens(self) -> tuple[str, int | None]:
        """The request's name for the output bound and its value (None: the rest of the context)."""
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        """Top logprobs per generated token (None: no logprobs)."""
        raise NotImplementedError

    def _structured_outputs(self) -> StructuredOutputs | None:
        """The one structured-output constraint the request asks for, from whichever field it used."""
        asked: list[tuple[str, StructuredOutputs]] = []
        if self.response_format is not None and self.response_format.type != "text":
            asked.append(("response_format", _response_format(self.response_format)))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", _vllm_constraint(self.structured_outputs)))
        for field, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if (value := getattr(self, field)) is not None:
                asked.append((field, _constraint(kind, value, field)))
        if len(asked) > 1:
            raise InvalidRequestError(f"{' and '.join(name for name, _ in asked)} each constrain the output; "
                                      "send one of them", param=asked[1][0])
        return asked[0][1] if asked else None


_SAMPLING_FIELDS = ("n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
                    "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
                    "include_stop_str_in_output", "bad_words", "prompt_logprobs", "max_thinking_tokens")


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: int | None = None

    def _max_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or the batch it holds."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    def _logprobs(self) -> int | None:
        return self.logprobs


class ChatRequest(_Request):
    is_chat: ClassVar[bool] = True
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    include_reasoning: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def uses_tools(self) -> bool:
        """Whether the tools go in the prompt and calls are read from the output (not with `tool_choice` none)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_functions(self) -> list[dict[str, Any]] | None:
        """The functions the output must call ("required": any of the tools; a named one: that one), else None."""
        if not self.tools or self.tool_choice in (None, "auto", "none"):
            return None
        functions = [tool.function.model_dump(exclude_none=True) for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in functions if f["name"] == self.tool_choice.function.name]
        return functions

    def _max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Model):
    """vLLM's `/tokenize`: a prompt's token ids, or a conversation's as chat encodes it."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Model):
    """vLLM's `/detokenize`: the text of token ids."""

    model: str | None = None
    tokens: list[int]


def parse_request(body: Any, chat: bool) -> CompletionRequest | ChatRequest:
    """A request body (decoded JSON) as its model; raises `InvalidRequestError` naming the field at fault."""
    fields = _fields(body)
    for name, allowed in UNSUPPORTED.items():
        if name in fields and fields[name] not in allowed:
            raise InvalidRequestError(f"{name} is not supported by this server; leave it out", param=name)
        fields.pop(name, None)
    request = _validate(ChatRequest if chat else CompletionRequest, fields)
    _check(request)
    return request


def parse_tokenize(body: Any) -> TokenizeRequest:
    request = _validate(TokenizeRequest, _fields(body))
    if (request.prompt is None) == (request.messages is None):
        raise InvalidRequestError("send either prompt (text) or messages (a conversation)", param="prompt")
    return request


def parse_detokenize(body: Any) -> DetokenizeRequest:
    return _validate(DetokenizeRequest, _fields(body))


def _fields(body: Any) -> dict[str, Any]:
    """A body's fields without its nulls (a null field is not given)."""
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got a JSON {_json_type(body)}")
    return {name: value for name, value in body.items() if value is not None}


def _validate(kind: type[_Model], fields: dict[str, Any]):
    try:
        return kind.model_validate(fields)
    except ValidationError as error:
        raise _invalid(error, kind) from None


def _check(request: _Request) -> None:
    """What the types alone cannot say."""
    request._constraint = request._structured_outputs()
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError("stream_options is only allowed with stream set to true", param="stream_options")
    if request.reasoning_effort is not None and request.max_thinking_tokens is not None:
        raise InvalidRequestError("reasoning_effort and max_thinking_tokens both set a thinking budget; send one",
                                  param="max_thinking_tokens")
    if request.self_verification is not None and (request.stream or (request.n or 1) > 1):
        raise InvalidRequestError("self_verification answers once, with the best of its candidates: it takes neither "
                                  "stream nor n > 1", param="self_verification")
    if request.prompt_logprobs is not None and request.stream:
        raise InvalidRequestError("prompt_logprobs is not available with stream set to true",
                                  param="prompt_logprobs")
    if isinstance(request, CompletionRequest):
        prompts = request.prompts
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise InvalidRequestError(f"prompt holds {len(prompts)} prompts; send between 1 and {MAX_PROMPTS}",
                                      param="prompt")
        if len(prompts) > 1 and request.self_verification is not None:
            raise InvalidRequestError("self_verification takes one prompt per request", param="self_verification")
    else:
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        _check_tools(request)


def _check_tools(request: ChatRequest) -> None:
    choice = request.tool_choice
    if choice not in (None, "none", "auto") and not request.tools:
        raise InvalidRequestError("tool_choice asks for a tool call, but the request has no tools",
                                  param="tool_choice")
    if isinstance(choice, NamedToolChoice) and not request.forced_functions:
        names = ", ".join(tool.function.name for tool in request.tools or ())
        raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not among "
                                  f"the tools ({names})", param="tool_choice")
    if request.forced_functions and request._constraint is not None:
        raise InvalidRequestError("tool_choice forces a tool call, so the output cannot also follow "
                                  "response_format or structured_outputs; send one of them", param="tool_choice")


def _invalid(error: ValidationError, kind: type[_Model]) -> InvalidRequestError:
    """The first problem pydantic found, as an `InvalidRequestError` whose `param` is the field's dotted path."""
    problem = error.errors()[0]
    path = _field_path(problem["loc"], kind)
    if problem["type"] == "extra_forbidden":
        return InvalidRequestError(f"unknown field {path!r}: this server does not know it, so it cannot honour it",
                                   param=path)
    if problem["type"] == "missing":
        return InvalidRequestError(f"{path} is required", param=path)
    if path in _SHAPES:  # a union: pydantic's message names one of its members only
        return InvalidRequestError(f"{path} must be {_SHAPES[path]}", param=path)
    given = problem.get("input")
    got = f", got a JSON {_json_type(given)}" if not isinstance(given, dict) or problem["type"] != "model_type" \
        else ""
    return InvalidRequestError(f"{path}: {problem['msg'][0].lower()}{problem['msg'][1:]}{got}", param=path)


_SHAPES = {"prompt": "a string, a list of token ids, or a list of strings or of token-id lists (a batch)",
           "stop": "a string or a list of strings", "guided_json": "a JSON schema (an object, or its JSON text)",
           "structured_outputs.json": "a JSON schema (an object, or its JSON text)"}


def _field_path(loc: tuple, kind: type[BaseModel]) -> str:
    """The dotted path of the fields in `loc`, without pydantic's union-member and list-index steps."""
    parts: list[str] = []
    model: type[BaseModel] | None = kind
    for step in loc:
        if model is None or not isinstance(step, str):
            break
        field = next((f for name, f in model.model_fields.items() if step in (name, f.alias)), None)
        if field is None:  # a field the model does not have
            parts.append(step)
            break
        parts.append(field.alias or step)
        model = _model_of(field.annotation)
    return ".".join(parts)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _response_format(response_format: ResponseFormat) -> StructuredOutputs:
    if response_format.type == "json_object":
        return StructuredOutputs("json_object", "")
    if response_format.json_schema is None:
        raise InvalidRequestError("response_format of type json_schema needs a json_schema object",
                                  param="response_format.json_schema")
    return _constraint("json", response_format.json_schema.schema_, "response_format.json_schema.schema")


def _vllm_constraint(request: StructuredOutputsRequest) -> StructuredOutputs:
    given = [(field.alias or name, value) for name, field in StructuredOutputsRequest.model_fields.items()
             if (value := getattr(request, name)) not in (None, False)]
    if len(given) != 1:
        names = ", ".join(name for name, _ in given) or "none"
        raise InvalidRequestError(f"structured_outputs takes exactly one of json, regex, choice, grammar and "
                                  f"json_object; got {names}", param="structured_outputs")
    name, value = given[0]
    return _constraint(name, value, f"structured_outputs.{name}")


def _constraint(kind: str, value: Any, param: str) -> StructuredOutputs:
    """A constraint as the engine takes it: the kind and its specification as text."""
    if kind == "json_object":
        return StructuredOutputs("json_object", "")
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise InvalidRequestError(f"{param} is not valid JSON: {error}", param=param) from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
        return StructuredOutputs("json", json.dumps(value, sort_keys=True, separators=(",", ":")), param)
    if kind == "choice":
        if not value or not all(value):
            raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param=param)
        return StructuredOutputs("choice", json.dumps(value), param)
    return StructuredOutputs(kind, value, param)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
