"""The gRPC API's request messages as the one request model (`cluster/api_request.py`), both ways.

The server reads a `GenerateRequest` or `ChatRequest` message into the same `CompletionRequest` / `ChatRequest`
the HTTP API validates, so both APIs share fields, defaults and error messages. The Python client builds its
messages from keyword arguments and reads them back through the same function before sending, so a mistake is
refused on the client with the server's own message.

The proto's `SamplingParams` names its fields as the engine does; for chat, `logprobs` is the number of top
alternatives (OpenAI's chat `logprobs: true` with `top_logprobs`). Tools, tool calls and a tool message's call id
map onto OpenAI's chat JSON (a tool's parameters and a call's arguments travel as JSON text); the client takes
them in OpenAI's shapes (`tools=[{"type": "function", "function": {...}}]`, `tool_choice="required"` or
`{"type": "function", "function": {"name": ...}}`).
"""

import json
from collections.abc import Sequence
from typing import Any

from cluster.api_request import ChatRequest, CompletionRequest, parse_request
from engine.errors import InvalidRequestError
from protos import inference_pb2 as pb

# Fields declared `optional` in the proto: absent means the request model's default.
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "logprobs", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "min_tokens", "prompt_logprobs", "truncate_prompt_tokens",
             "max_thinking_tokens", "reasoning_effort")
_LISTS = ("stop", "stop_token_ids", "bad_words")
_FLAGS = ("ignore_eos", "include_stop_str_in_output")


def read_request(message: pb.GenerateRequest | pb.ChatRequest, stream: bool) -> CompletionRequest | ChatRequest:
    """The request a message asks for; raises `InvalidRequestError` as the HTTP API would."""
    chat = isinstance(message, pb.ChatRequest)
    fields: dict[str, Any] = _sampling_fields(message.sampling, chat)
    if message.HasField("model"):
        fields["model"] = message.model
    if message.HasField("self_verification"):
        spec = message.self_verification
        fields["self_verification"] = {name: getattr(spec, name) for name in ("candidates", "method")
                                       if spec.HasField(name)}
    if chat:
        fields["messages"] = [_message_fields(m) for m in message.messages]
        fields.update(_tool_fields(message))
    else:
        form = message.WhichOneof("prompt")
        if form is not None:
            fields["prompt"] = message.text if form == "text" else list(message.token_ids.ids)
    return parse_request({**fields, "stream": stream}, chat)


def build_message(prompt: str | Sequence[int] | Sequence[dict[str, str]], model: str | None, chat: bool,
                  sampling: dict[str, Any]) -> pb.GenerateRequest | pb.ChatRequest:
    """A request message from the client's keyword arguments (named as the proto's `SamplingParams` fields;
    `stop` may be one string, `structured_outputs` a dict with a schema as a dict). Raises `ValueError` for a
    field the proto does not have and `InvalidRequestError` for what the server would refuse."""
    sampling = dict(sampling)
    if isinstance(sampling.get("stop"), str):  # one stop string, as the engine takes it (not its characters)
        sampling["stop"] = [sampling["stop"]]
    if isinstance(constraint := sampling.get("structured_outputs"), dict):
        sampling["structured_outputs"] = _constraint_message(constraint)
    chat_fields = {name: sampling.pop(name) for name in _CHAT_FIELDS if name in sampling}
    request_fields = {name: sampling.pop(name) for name in _REQUEST_FIELDS if name in sampling}
    params = pb.SamplingParams(**sampling)
    if chat:
        message = pb.ChatRequest(model=model, messages=[_message_proto(m) for m in prompt], sampling=params,
                                 **_tools_proto(chat_fields), **request_fields)
    else:
        form = {"text": prompt} if isinstance(prompt, str) else {"token_ids": pb.TokenIds(ids=prompt)}
        message = pb.GenerateRequest(model=model, sampling=params, **form, **request_fields)
    read_request(message, stream=False)
    return message


_CHAT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "include_reasoning")
_REQUEST_FIELDS = ("self_verification",)


def _message_fields(message: pb.ChatMessage) -> dict[str, Any]:
    """A chat message as OpenAI's JSON has it."""
    fields: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        fields["tool_calls"] = [{"id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": call.arguments}}
                                for call in message.tool_calls]
        fields["content"] = message.content or None
    if message.tool_call_id:
        fields["tool_call_id"] = message.tool_call_id
    if message.reasoning:
        fields["reasoning_content"] = message.reasoning
    return fields


def _message_proto(message: dict[str, Any]) -> pb.ChatMessage:
    calls = [pb.ToolCall(id=call.get("id", ""), name=call["function"]["name"],
                         arguments=call["function"].get("arguments", "{}")) for call in message.get("tool_calls") or ()]
    return pb.ChatMessage(role=message["role"], content=message.get("content") or "", tool_calls=calls,
                          tool_call_id=message.get("tool_call_id", ""),
                          reasoning=message.get("reasoning_content") or message.get("reasoning") or "")


def _tool_fields(message: pb.ChatRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if message.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": tool.name, **({"description": tool.description} if tool.description else {}),
            **({"parameters": _json(tool.parameters, "tools.parameters")} if tool.parameters else {})}}
            for tool in message.tools]
    if message.HasField("tool_choice"):
        choice = message.tool_choice
        fields["tool_choice"] = choice if choice in ("none", "auto", "required") else \
            {"type": "function", "function": {"name": choice}}
    for name in ("parallel_tool_calls", "include_reasoning"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    return fields


def _tools_proto(fields: dict[str, Any]) -> dict[str, Any]:
    """The client's OpenAI-style `tools` and `tool_choice` as the proto's."""
    fields = dict(fields)
    if "tools" in fields:
        fields["tools"] = [pb.Tool(name=t["function"]["name"], description=t["function"].get("description", ""),
                                   parameters=json.dumps(t["function"].get("parameters") or {}))
                           for t in fields["tools"]]
    if isinstance(fields.get("tool_choice"), dict):
        fields["tool_choice"] = fields["tool_choice"]["function"]["name"]
    return fields


def _json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise InvalidRequestError(f"{param} is not valid JSON: {error}", param=param) from None


def _sampling_fields(sampling: pb.SamplingParams, chat: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {name: getattr(sampling, name) for name in _OPTIONAL if sampling.HasField(name)}
    fields.update({name: list(getattr(sampling, name)) for name in _LISTS if getattr(sampling, name)})
    fields.update({name: True for name in _FLAGS if getattr(sampling, name)})
    if chat and "logprobs" in fields:
        fields["logprobs"], fields["top_logprobs"] = True, fields["logprobs"]
    if sampling.HasField("structured_outputs"):
        constraint = sampling.structured_outputs
        kind = constraint.WhichOneof("kind")
        value = getattr(constraint, kind) if kind is not None else None
        fields["structured_outputs"] = {kind: list(value.choices) if kind == "choice" else value} if kind else {}
    return fields


def _constraint_message(constraint: dict[str, Any]) -> pb.StructuredOutputs:
    fields = dict(constraint)
    if isinstance(fields.get("json"), dict):
        fields["json"] = json.dumps(fields["json"])
    if isinstance(fields.get("choice"), list):
        fields["choice"] = pb.Choices(choices=fields["choice"])
    return pb.StructuredOutputs(**fields)
