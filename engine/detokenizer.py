"""`IncrementalDetokenizer`: turn one sequence's generated ids into text deltas as they arrive.

Contract. For output ids `ids` fed one by one through `add`, followed by `flush()`::

    "".join(deltas) == tokenizer.decode(ids, continues_text=continues_prompt)

`continues_prompt` says whether the output continues the prompt's text (a completion: sentencepiece's
`▁Paris` after "The capital of France is" reads " Paris") or starts a new piece of text (a chat answer after
`[/INST]`: Mistral's instruct format encodes each message on its own, so its leading `▁` is the dummy prefix
and the answer reads "Paris"). By default `Tokenizer.output_continues_prompt` infers it: the output
continues the prompt unless the prompt is empty or ends a user turn (`[/INST]`). Tekken decodes the same
either way. Bytes of a character split between prompt and output are not joined (they only arise from
prompts given as raw ids).

Design note — why no re-decode of the whole output. Decoding is *local*: once the text decoded so far
ends on a whole character, the text of later ids does not depend on earlier ones, except for the
sentencepiece leading space, which `decode(..., continues_text=True)` restores. So the detokenizer keeps
only the ids since the last whole character ("pending", usually one) and decodes them alone. This plays the
role of vLLM's prefix/read offsets, with a one-character anchor instead of a few prefix tokens as context.

Held-back text. While the decoded pending ids end with U+FFFD they may be a multi-byte character whose
remaining bytes are still to come (byte-fallback `<0xE4>` pieces in sentencepiece, byte tokens in tekken),
so nothing is emitted. Worked example with the bundled v1 tokenizer and "🦙" (4 byte pieces)::

    add(<0xF0>) -> ""    pending [<0xF0>]                    decodes to "\ufffd"
    add(<0x9F>) -> ""    pending [<0xF0>, <0x9F>]            decodes to "\ufffd\ufffd"
    add(<0xA6>) -> ""    ...
    add(<0x99>) -> "🦙"  pending [] again

A control token ends a held character for good (both decoders restart UTF-8 decoding after one), so it
releases the held text, U+FFFD included. Garbage bytes that never form a character would hold forever; once
more than `_LOOKAHEAD_TOKENS` ids are pending, the head is released if it is settled — see `_release_head`.
That bounds the window, so each `add` costs O(1).
"""

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"

# A UTF-8 character is at most 4 bytes, so an unfinished one spans at most 3 bytes, hence at most 3 ids
# (every non-control id decodes to at least one byte). Bytes 3 ids back are therefore already settled.
_LOOKAHEAD_TOKENS = 3


class IncrementalDetokenizer:
    """Per-sequence text state: `add` each generated id, `flush` when the sequence ends."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 continues_prompt: bool | None = None):
        if continues_prompt is None:
            continues_prompt = tokenizer.output_continues_prompt(prompt_token_ids)
        self._tokenizer = tokenizer
        self.continues_prompt = continues_prompt
        self._continues_text = continues_prompt  # becomes True once any text piece was emitted
        self._pending: list[int] = []
        self._deltas: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes excluded until they complete or are flushed)."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def add(self, token_id: int) -> str:
        """Feed the next generated id; returns the text it completes (often "", never a premature U+FFFD)."""
        if self._tokenizer.is_special(token_id):
            if not self._pending:
                return ""  # no text, and with no bytes held it cannot cut a character either
            self._pending.append(token_id)
            return self._emit(self._decode(self._pending), len(self._pending))
        self._pending.append(token_id)
        text = self._decode(self._pending)
        if not text.endswith(_REPLACEMENT):
            return self._emit(text, len(self._pending))
        if len(self._pending) > _LOOKAHEAD_TOKENS:
            return self._release_head(text)
        return ""

    def flush(self) -> str:
        """Release held-back text when the sequence ends; an unfinished character becomes U+FFFD."""
        if not self._pending:
            return ""
        return self._emit(self._decode(self._pending), len(self._pending))

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, continues_text=self._continues_text)

    def _emit(self, text: str, num_tokens: int) -> str:
        """`text` is the settled decode of the first `num_tokens` pending ids: hand it out, drop the ids."""
        del self._pending[:num_tokens]
        self._continues_text = True  # the emitted ids held a text piece: what follows continues it
        if text:
            self._deltas.append(text)
        return text

    def _release_head(self, text: str) -> str:
        """Emit all but the last `_LOOKAHEAD_TOKENS` pending ids if no character straddles that split.

        A character (or a run of invalid bytes the decoder replaces as one unit) that straddles the split
        decodes differently when the two sides are decoded apart, so `head + tail == text` proves the
        split is clean for these ids; the 3 ids after it hold at least 3 bytes, enough to finish any
        character begun before it, so no later id can change the head either. If the check fails, keep
        holding: the split moves one id on with the next `add`, and characters are at most 4 bytes long.
        """
        split = len(self._pending) - _LOOKAHEAD_TOKENS
        head = self._decode(self._pending[:split])
        tail = self._tokenizer.decode(self._pending[split:], continues_text=True)
        if head + tail != text:
            return ""
        return self._emit(head, split)
