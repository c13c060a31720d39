"""Tool calls, Mistral's way: OpenAI `tools` into the prompt through mistral-common, `[TOOL_CALLS]` output back
into OpenAI `tool_calls`, and `tool_choice` "required" or a named function enforced with a grammar.

The wire format depends on the tokenizer version (the engine routes everything after `[TOOL_CALLS]` to the
"tools" channel, control tokens written out; see engine/channels.py):

- v2 to v7: `[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "a1b2c3d4e"}, ...]` (`id` optional);
- v11 and later: `[TOOL_CALLS]f[ARGS]{...}`, once per call; `[CALL_ID]id` may come before `[ARGS]`.

`parse` reads both; a call without a valid id gets a new one of 9 alphanumeric characters, as Mistral's
validator requires. Text that does not parse as calls stays the answer's text (as vLLM does), so a weak model
loses nothing. For "required" or a named function the output is constrained to the version's format with each
function's parameters schema (`grammar`), so even the random-weight tiny model emits a valid call.

A tokenizer without `[TOOL_CALLS]` (v1) cannot express tools: a request that carries them is refused by name.
"""

import json
import secrets
import string
from typing import Any

from engine.channels import TOOL_CALLS
from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputs
from engine.tokenizer import Tokenizer, is_mistral_call_id

ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
_ALPHANUMERIC = string.ascii_letters + string.digits
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_call_id() -> str:
    """A tool call id as Mistral's models write them: 9 alphanumeric characters."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def check_support(tokenizer: Tokenizer) -> None:
    """Refuse tools for a tokenizer that has no tool-call tokens."""
    if tokenizer.control_token_id(TOOL_CALLS) is None:
        raise InvalidRequestError(f"this model's tokenizer ({tokenizer.version}) has no tool-call tokens, so it "
                                  "cannot be given tools; send the request without tools", param="tools")


def grammar(tokenizer: Tokenizer, functions: list[dict[str, Any]], parallel: bool) -> StructuredOutputs:
    """A constraint that the output is one call (or, with `parallel`, several) of these functions, in the
    tokenizer's wire format, with arguments that validate against each function's parameters."""
    tool_calls = tokenizer.control_token_id(TOOL_CALLS)
    args = tokenizer.control_token_id(ARGS)
    if args is None:  # v2 to v7: one JSON list
        call = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
        calls = {"x-guidance": _JSON_OPTIONS, "type": "array", "items": {"anyOf": call}, "minItems": 1,
                 **({} if parallel else {"maxItems": 1})}
        lark = f'start: <[{tool_calls}]> " "? calls\ncalls: %json {json.dumps(calls)}'
    else:  # v11 on: [TOOL_CALLS]name[ARGS]{...} per call
        alternatives = "\n    | ".join(f"{json.dumps(f['name'])} <[{args}]> %json "
                                       f"{json.dumps({'x-guidance': _JSON_OPTIONS, **_parameters(f)})}"
                                       for f in functions)
        lark = f"start: call{'+' if parallel else ''}\ncall: <[{tool_calls}]> function\nfunction: {alternatives}"
    return StructuredOutputs("grammar", lark, "tools")


def parse(tool_text: str) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from the tools channel's text; None when it does not hold well-formed calls."""
    calls = []
    for segment in tool_text.split(TOOL_CALLS)[1:]:
        parsed = _segment(segment)
        if parsed is None:
            return None
        calls += parsed
    return calls or None


def split(tool_text: str, content: str, uses_tools: bool) -> tuple[list[dict[str, Any]] | None, str]:
    """A finished choice's calls and the content beside them. Tool text that holds no calls, or any tool text
    when the request gave no tools, stays content."""
    calls = parse(tool_text) if tool_text and uses_tools else None
    return (calls, content) if calls else (None, content + plain_text(tool_text))


def finish_reason(reason: str | None, calls: list[dict[str, Any]] | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" for a choice that ended on its calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def plain_text(tool_text: str) -> str:
    """The tools channel's text as a completion shows it: the control tokens' names left out."""
    for mark in (TOOL_CALLS, ARGS, CALL_ID):
        tool_text = tool_text.replace(mark, "")
    return tool_text


def _segment(segment: str) -> list[dict[str, Any]] | None:
    if ARGS in segment:  # v11 on: name[CALL_ID]id[ARGS]{...}
        head, _, arguments = segment.partition(ARGS)
        name, _, call_id = head.partition(CALL_ID)
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return [_call(name.strip(), arguments.strip(), call_id.strip())] if name.strip() else None
    try:
        items = json.loads(segment)
    except ValueError:
        return None
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) and i["name"]
                                             for i in items):
        return None
    return [_call(i["name"], _arguments(i.get("arguments", {})), i.get("id")) for i in items]


def _call(name: str, arguments: str, call_id: Any) -> dict[str, Any]:
    return {"id": call_id if is_mistral_call_id(call_id) else new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}
