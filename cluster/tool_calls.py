"""Tool calls, Mistral's way: OpenAI `tools` into the prompt through mistral-common, `[TOOL_CALLS]` output back
into OpenAI `tool_calls`, and `tool_choice` "required" or a named function enforced with a grammar.

The wire format depends on the tokenizer version (the engine routes everything after `[TOOL_CALLS]` to the
"tools" channel, control tokens written out; see engine/channels.py):

- v2 to v7: `[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "a1b2c3d4e"}, ...]` (`id` optional);
- v11 and later: `[TOOL_CALLS]f[ARGS]{...}`, once per call; `[CALL_ID]id` may come before `[ARGS]`.

`parse` reads both; a call without a valid id gets a new one of 9 alphanumeric characters, as Mistral's
validator requires. Text that does not parse as calls stays the answer's text (as vLLM does), so a weak model
loses nothing; but an answer cut by `max_tokens` inside a call returns the calls begun, the last one's
arguments cut short, as OpenAI does. For "required" or a named function the output is constrained to the
version's format with each function's parameters schema (`grammar`), so even the random-weight tiny model emits
a valid call.

A stream (`CallStream`) sends each call as OpenAI does: its id and name once the name is whole, then the
arguments' JSON text as the model writes it. `scan` reads the text so far: the calls begun, each with the
arguments written so far, up to where the text stops being a valid beginning of calls. The arguments are the
model's own JSON text, in a stream and in a whole answer alike.

A tokenizer without `[TOOL_CALLS]` (v1) cannot express tools: a request that carries them is refused by name.
"""

import json
import secrets
import string
from dataclasses import dataclass, replace
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
    calls, whole = _read(tool_text)
    try:
        if not whole or not calls or any(not isinstance(json.loads(c.arguments), dict) for c in calls):
            return None
    except ValueError:
        return None
    return [_call(c.name, c.arguments, c.call_id) for c in calls]


def split(tool_text: str, content: str, uses_tools: bool,
          cut: bool = False) -> tuple[list[dict[str, Any]] | None, str]:
    """A finished choice's calls and the content beside them. Tool text that holds no calls, or any tool text
    when the request gave no tools, stays content; when the choice was `cut` short by its token limit, the calls
    it began are its calls."""
    if not tool_text or not uses_tools:
        return None, content + plain_text(tool_text)
    calls = parse(tool_text)
    if calls is None and cut:
        calls = [_call(c.name, c.arguments, c.call_id) for c in scan(tool_text)] or None
    return (calls, content) if calls else (None, content + plain_text(tool_text))


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" for a choice that ended on its calls."""
    return "tool_calls" if made_calls and reason == "stop" else reason


@dataclass(frozen=True)
class PartialCall:
    """A call begun in the tools channel: its name, its id if the model wrote one, and its arguments' JSON text
    so far ("" before they begin)."""
    name: str
    call_id: str | None
    arguments: str


def scan(tool_text: str) -> list[PartialCall]:
    """The calls begun in the tools channel's text (those whose name is whole), read as far as the text is a valid
    beginning of calls."""
    return _read(tool_text)[0]


def _read(tool_text: str) -> tuple[list[PartialCall], bool]:
    """`scan`'s calls, and whether the text is whole calls and nothing else."""
    calls: list[PartialCall] = []
    for segment in tool_text.split(TOOL_CALLS)[1:]:
        reader = _Reader(segment)
        try:
            if ARGS in segment or CALL_ID in segment:
                reader.named_call(calls)
            else:
                reader.call_list(calls)
            reader.end()
        except _Stop:  # the text ends, or stops being calls, inside this segment: nothing after it counts
            return calls, False
    return calls, True


class CallStream:
    """One streamed choice's calls, sent as OpenAI streams them: a call's id, type and name once the name is
    whole (with empty arguments), then each new piece of its arguments."""

    def __init__(self):
        self._ids: list[str] = []
        self._sent: list[str] = []  # each call's arguments sent so far

    @property
    def started(self) -> bool:
        return bool(self._ids)

    def deltas(self, tool_text: str) -> list[dict[str, Any]]:
        """The `tool_calls` delta entries that the tools channel's text so far adds to those sent."""
        entries = []
        for k, call in enumerate(scan(tool_text)):
            if k == len(self._ids):
                self._ids.append(call.call_id if is_mistral_call_id(call.call_id) else new_call_id())
                self._sent.append("")
                entries.append({"index": k, "id": self._ids[k], "type": "function",
                                "function": {"name": call.name, "arguments": ""}})
            piece = call.arguments[len(self._sent[k]):]
            if piece and call.arguments.startswith(self._sent[k]):  # text that stopped being JSON sends no more
                entries.append({"index": k, "function": {"arguments": piece}})
                self._sent[k] = call.arguments
        return entries


def plain_text(tool_text: str) -> str:
    """The tools channel's text as a completion shows it: the control tokens' names left out."""
    for mark in (TOOL_CALLS, ARGS, CALL_ID):
        tool_text = tool_text.replace(mark, "")
    return tool_text


class _Stop(Exception):
    """The text ends, or stops being a valid beginning of calls, here."""


class _Reader:
    """Reads one `[TOOL_CALLS]` segment as far as it is a valid beginning of calls."""

    _ESCAPES = set('"\\/bfnrtu')

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def end(self) -> None:
        """Nothing but white space follows the calls."""
        self._space()
        if self.at < len(self.text):
            raise _Stop

    def call_list(self, calls: list[PartialCall]) -> None:
        """v2 to v7: ` [{"name": ..., "arguments": {...}, "id": ...}, ...]`, or one such object."""
        self._space()
        if self._peek() == "{":
            self._call_object(calls)
        else:
            self._expect("[")
            while True:
                self._space()
                self._call_object(calls)
                self._space()
                if self._take() == "]":
                    break
                self.at -= 1
                self._expect(",")

    def named_call(self, calls: list[PartialCall]) -> None:
        """v11 on: `name[CALL_ID]id[ARGS]{...}`."""
        head, args, _ = self.text.partition(ARGS)
        name, _, call_id = head.partition(CALL_ID)
        if not args or not name.strip():
            raise _Stop
        self.at = len(head) + len(ARGS)
        self._space()
        start = self.at
        try:
            self._value()
        except _Stop:
            calls.append(PartialCall(name.strip(), call_id.strip(), self.text[start:self.at].rstrip()))
            raise
        calls.append(PartialCall(name.strip(), call_id.strip(), self.text[start:self.at]))

    def _call_object(self, calls: list[PartialCall]) -> None:
        """One `{"name": ..., "arguments": {...}, "id": ...}`: the call begins once its name is whole (the name
        comes first, as Mistral's models write calls), and takes its arguments as they are written."""
        fields: dict[str, Any] = {}
        self._expect("{")
        self._space()
        if self._peek() == "}":
            raise _Stop  # a call names its function
        while True:
            key = _decoded(self._string())
            self._space()
            self._expect(":")
            self._space()
            start = self.at
            if key == "arguments":
                if "name" not in fields:
                    raise _Stop
                try:
                    self._value()
                finally:  # also when the text stops inside the arguments
                    calls[-1] = replace(calls[-1], arguments=self.text[start:self.at].rstrip())
                fields[key] = True
            else:
                self._value()
                fields[key] = value = _decoded(self.text[start:self.at])
                if key == "name":
                    if not isinstance(value, str) or not value:
                        raise _Stop
                    calls.append(PartialCall(value, fields.get("id") if isinstance(fields.get("id"), str) else None,
                                             ""))
                elif key == "id" and "name" in fields and isinstance(value, str):  # after the name, as v3-v7 write it
                    calls[-1] = replace(calls[-1], call_id=value)
            self._space()
            if self._take() == "}":
                break
            self.at -= 1
            self._expect(",")
            self._space()
        if "arguments" not in fields:
            raise _Stop

    def _value(self) -> None:
        """One JSON value, checked character by character."""
        char = self._peek()
        if char == "{":
            self._container("}", key=True)
        elif char == "[":
            self._container("]", key=False)
        elif char == '"':
            self._string()
        elif char in "-0123456789":
            self._number()
        else:
            for literal in ("true", "false", "null"):
                if self.text.startswith(literal[:len(self.text) - self.at], self.at):
                    if not self.text.startswith(literal, self.at):
                        self.at = len(self.text)
                        raise _Stop
                    self.at += len(literal)
                    return
            raise _Stop

    def _container(self, close: str, key: bool) -> None:
        self.at += 1
        self._space()
        if self._peek() == close:
            self.at += 1
            return
        while True:
            if key:
                self._string()
                self._space()
                self._expect(":")
                self._space()
            self._value()
            self._space()
            char = self._take()
            if char == close:
                return
            if char != ",":
                self.at -= 1
                raise _Stop
            self._space()

    def _string(self) -> str:
        start = self.at
        self._expect('"')
        while True:
            char = self._take()
            if char == '"':
                return self.text[start:self.at]
            if char == "\\" and self._take() not in self._ESCAPES:
                self.at -= 1
                raise _Stop
            if char < " ":
                self.at -= 1
                raise _Stop

    def _number(self) -> None:
        start = self.at
        while self.at < len(self.text) and self.text[self.at] in "-+.eE0123456789":
            self.at += 1
        if self.at == len(self.text):
            raise _Stop  # more digits may follow
        try:
            float(self.text[start:self.at])
        except ValueError:
            self.at = start
            raise _Stop from None

    def _space(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \t\n\r":
            self.at += 1

    def _peek(self) -> str:
        if self.at == len(self.text):
            raise _Stop
        return self.text[self.at]

    def _take(self) -> str:
        char = self._peek()
        self.at += 1
        return char

    def _expect(self, char: str) -> None:
        if self._take() != char:
            self.at -= 1
            raise _Stop


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise _Stop from None


def _call(name: str, arguments: str, call_id: Any) -> dict[str, Any]:
    return {"id": call_id if is_mistral_call_id(call_id) else new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}
