"""A sample's output text in channels: the answer, the reasoning and the tool calls, split at control tokens.

Reasoning models (Mistral's Magistral format) write `[THINK]thinking[/THINK]answer`; tool calls start with
`[TOOL_CALLS]` (then a JSON list up to tokenizer v7, `name[ARGS]{...}` from v11). Control tokens decode to no
text, so the engine routes each token's text to its channel as it decodes, instead of the edge finding the
boundaries again:

- "content": the answer; stop strings are looked for here only;
- "reasoning": from `[THINK]` to `[/THINK]` (the tags themselves add no text); its tokens, tags included, are
  counted, and a thinking budget is spent on them;
- "tools": everything after `[TOOL_CALLS]`, with the tool-call control tokens written out (`[TOOL_CALLS]`,
  `[ARGS]`, `[CALL_ID]`) so that `cluster/tool_calls.py` can find the calls in it.

A tokenizer without these tokens (v1) has only the content channel.
"""

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

THINK, END_THINK, TOOL_CALLS = "[THINK]", "[/THINK]", "[TOOL_CALLS]"
_TOOL_MARKS = (TOOL_CALLS, "[ARGS]", "[CALL_ID]")


@dataclass(frozen=True)
class Markers:
    """The control token ids that switch channels, for one tokenizer (None: it has no such token)."""

    think: int | None
    end_think: int | None
    tool_marks: dict[int, str]  # [TOOL_CALLS], [ARGS], [CALL_ID] by id: written out in the tools channel

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "Markers":
        marks = {token_id: name for name in _TOOL_MARKS if (token_id := tokenizer.control_token_id(name)) is not None}
        return cls(tokenizer.control_token_id(THINK), tokenizer.control_token_id(END_THINK), marks)

    @property
    def tool_calls(self) -> int | None:
        return next((token_id for token_id, name in self.tool_marks.items() if name == TOOL_CALLS), None)


@dataclass
class ChannelText:
    """One sample's text so far, by channel; `add` each generated token, `flush` at the end."""

    markers: Markers
    detok: IncrementalDetokenizer
    content: str = ""
    reasoning: str = ""
    tools: str = ""
    channel: str = "content"
    num_reasoning_tokens: int = 0

    def add(self, token_id: int) -> str:
        """Route a token's text; returns what it added to the content channel (where stop strings are found)."""
        piece = self.detok.add(token_id)  # a control token releases held bytes, which belong to the old channel
        added = self._write(piece)
        markers = self.markers
        if token_id == markers.think and self.channel == "content":
            self.channel = "reasoning"
        elif token_id in markers.tool_marks:
            self.channel = "tools"
            self.tools += markers.tool_marks[token_id]
        if self.channel == "reasoning":
            self.num_reasoning_tokens += 1
        if token_id == markers.end_think and self.channel == "reasoning":
            self.channel = "content"
        return added

    def flush(self) -> None:
        self._write(self.detok.flush())

    @property
    def in_reasoning(self) -> bool:
        return self.channel == "reasoning"

    def _write(self, piece: str) -> str:
        if self.channel == "content":
            self.content += piece
            return piece
        if self.channel == "reasoning":
            self.reasoning += piece
        else:
            self.tools += piece
        return ""
