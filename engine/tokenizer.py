"""`Tokenizer`: the engine's one handle on Mistral tokenizers (sentencepiece v1-v7 and tekken).

A thin wrapper over mistral-common's `MistralTokenizer`, so that prompts are encoded exactly as Mistral's
instruct models were trained (mistral-common *is* the reference implementation of the chat format), while
the rest of the engine sees a small surface: ids in, text out, typed errors.

Design note — the leading space of a continuation. Sentencepiece encodes text with a "dummy prefix": "Hi"
becomes `▁Hi`, and decoding drops the `▁` of the first text piece of a sequence. That is right for a whole
sequence, but wrong for a *piece* of one: the output `▁Paris` after the prompt "The capital of France is"
must read " Paris", not "Paris". `decode(ids, continues_text=True)` says "text comes before these ids": it
decodes them after a one-character anchor piece and cuts the anchor off, so the first `▁` stays a space and
byte-fallback pieces start a fresh UTF-8 sequence. Worked example with the bundled v3 tokenizer::

    decode([23325])                       -> "Hello"     (23325 is `▁Hello`)
    decode([23325], continues_text=True)  -> " Hello"

Tekken has no dummy prefix and its decoding needs no context, so the flag changes nothing there.
"""

import hashlib
import importlib.resources
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.utils import get_one_valid_tokenizer_file

from engine.errors import ChatTemplateError

# Files shipped inside the mistral_common package (mistral_common/data/), by the name users pass.
BUNDLED_TOKENIZERS: dict[str, str] = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240911.json",
}

# What `from_model_dir` accepts, in mistral-common's own rule (`get_one_valid_tokenizer_file`).
MODEL_DIR_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v<N> (e.g. tokenizer.model.v3, *.model.v7m1)",
                             "tokenizer.model")

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_BASE62 = string.digits + string.ascii_letters
_SEPARATOR = "\x02"  # a control character: byte-fallback pieces of its own in every sentencepiece vocabulary
# OpenAI roles mistral-common converts ("developer" is OpenAI's new name for "system").
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# v1 ends a user turn with the text "[/INST]" (4 pieces); later versions with a control token.
_END_OF_TURN, _END_OF_TURN_TOKENS = "[/INST]", 8
_CHAT_FORMAT_HINT = ("a conversation is: optional system messages, then a user message, then assistant and "
                     "user turns, ending with a user (or tool) message")


class TokenizerNotFoundError(FileNotFoundError):
    """A model directory holds no tokenizer file mistral-common can load."""


class UnknownTokenizerError(ValueError):
    """A bundled tokenizer name that mistral-common does not ship."""


class Tokenizer:
    """Encode prompts and chats, decode generated ids; wraps one `MistralTokenizer`."""

    def __init__(self, mistral_tokenizer: MistralTokenizer):
        self._mistral = mistral_tokenizer
        self._inner = mistral_tokenizer.instruct_tokenizer.tokenizer
        self._anchor_id, self._anchor_text = _continuation_anchor(self._inner)

    # ---- loading ----

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tekken `.json` or sentencepiece `.model[.vN]` file."""
        return cls(MistralTokenizer.from_file(str(path)))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer a checkpoint directory ships; `tekken.json` wins over sentencepiece files."""
        directory = Path(path)
        files = sorted(str(p) for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
        try:
            chosen = get_one_valid_tokenizer_file(files)
        except ValueError:
            state = "has no tokenizer file" if directory.is_dir() else "is not a directory"
            raise TokenizerNotFoundError(
                f"{str(directory)!r} {state}; looked for {', '.join(MODEL_DIR_TOKENIZER_FILES)}. Copy the "
                "tokenizer file that ships with the checkpoint into it, or name a tokenizer bundled with "
                f"mistral-common ({', '.join(BUNDLED_TOKENIZERS)})") from None
        return cls.from_file(chosen)

    @classmethod
    def from_bundled(cls, name: str) -> "Tokenizer":
        """Load a tokenizer file shipped inside mistral-common (no download): one of `BUNDLED_TOKENIZERS`."""
        if name not in BUNDLED_TOKENIZERS:
            raise UnknownTokenizerError(
                f"unknown bundled tokenizer {name!r}; choose one of {', '.join(BUNDLED_TOKENIZERS)}, "
                "or point at a model directory that holds a tokenizer file")
        resource = importlib.resources.files("mistral_common") / "data" / BUNDLED_TOKENIZERS[name]
        with importlib.resources.as_file(resource) as path:
            return cls.from_file(path)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, name: str | None = None) -> "Tokenizer":
        """A bundled `name` wins (to override a checkpoint's tokenizer); otherwise the model directory's."""
        if name is not None:
            return cls.from_bundled(name)
        if model_dir is None:
            raise ValueError("no tokenizer to load: give a model directory that holds a tokenizer file or a "
                             f"bundled tokenizer name ({', '.join(BUNDLED_TOKENIZERS)})")
        return cls.from_model_dir(model_dir)

    def __reduce__(self):
        # MistralTokenizer pickles as (from_file, path); rebuilding ours from it recomputes the anchor.
        return Tokenizer, (self._mistral,)

    # ---- vocabulary ----

    @property
    def bos_id(self) -> int:
        return self._inner.bos_id

    @property
    def eos_id(self) -> int:
        return self._inner.eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are `0 .. vocab_size - 1`)."""
        return self._inner.n_words

    @property
    def version(self) -> str:
        """The instruct-format version ("v1", "v3", ...) that `encode_chat` follows."""
        return self._inner.version.value

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a control token (`<s>`, `[INST]`, ...): it decodes to no text."""
        return self._inner.is_special(int(token_id))

    def control_token_id(self, name: str) -> int | None:
        """The id of a control token such as "[TOOL_CALLS]" or "[THINK]"; None when this tokenizer has none."""
        try:
            token_id = self._inner.get_special_token(name)
        except (ValueError, KeyError, MistralCommonException):
            return None
        return token_id if self.is_special(token_id) and self.control_token_name(token_id) == name else None

    def control_token_name(self, token_id: int) -> str:
        """A control token's name, e.g. "[INST]" or "</s>"."""
        return self._inner.id_to_piece(int(token_id))

    def token_bytes(self) -> list[bytes | None]:
        """What each id spells inside a text, as bytes; None for control tokens, which spell nothing. A
        sentencepiece `▁` is a space and a byte-fallback piece `<0xAB>` is its byte; tekken's pieces are bytes."""
        inner = self._inner
        spelled: list[bytes | None] = []
        for token_id in range(self.vocab_size):
            if self.is_special(token_id) or (isinstance(inner, SentencePieceTokenizer) and token_id == inner.unk_id):
                spelled.append(None)
            elif not isinstance(inner, SentencePieceTokenizer):
                spelled.append(inner.id_to_byte_piece(token_id))
            elif byte := _BYTE_PIECE.fullmatch(piece := inner.id_to_piece(token_id)):
                spelled.append(bytes([int(byte[1], 16)]))
            else:
                spelled.append(piece.replace("\u2581", " ").encode())
        return spelled

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it would continue a text: no BOS and no sentencepiece dummy prefix (encode("a")
        would read "▁a"), so that the ids spell `text` exactly. Sentencepiece gets the text after a control
        character, which no piece merges with, and its ids are cut off again."""
        if self._anchor_id is None:
            return self.encode(text, add_bos=False)
        head = self.encode(_SEPARATOR, add_bos=False)
        ids = self.encode(_SEPARATOR + text, add_bos=False)
        assert ids[:len(head)] == head, (text, ids[:len(head)], head)
        return ids[len(head):]

    # ---- text ----

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Plain text to ids (no chat format), with the sentencepiece dummy prefix where the model has one."""
        return self._inner.encode(text, bos=add_bos, eos=False)

    def decode(self, token_ids: Sequence[int], *, continues_text: bool = False) -> str:
        """Ids to text; control tokens decode to nothing.

        `continues_text=True` decodes the ids as if text came before them (see the module docstring): a
        sentencepiece leading `▁` stays a space. Bytes of a character cut at the start of `token_ids`
        are not joined with anything before them: they decode to U+FFFD.
        """
        ids = [int(t) for t in token_ids]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary [0, {self.vocab_size}); "
                             "a model whose vocabulary is larger than its tokenizer's must not sample it")
        if not continues_text or self._anchor_id is None:
            return self._inner.decode(ids)
        text = self._inner.decode([self._anchor_id, *ids])
        assert text.startswith(self._anchor_text), (text, self._anchor_text)
        return text[len(self._anchor_text):]

    def output_continues_prompt(self, prompt_token_ids: Sequence[int]) -> bool:
        """Whether text generated after this prompt continues the prompt's text, or starts a message.

        A completion continues its prompt (`▁Paris` after "... France is" reads " Paris"). A chat answer
        starts a message of its own: the instruct format encodes every message separately, so its leading
        `▁` is the dummy prefix. A prompt ends a user turn when it is empty, ends with a control token
        (`[/INST]` from v2 on) or ends with the text "[/INST]" (v1 spells its markers as plain text).
        """
        if not prompt_token_ids or self.is_special(prompt_token_ids[-1]):
            return False
        return not self.decode(prompt_token_ids[-_END_OF_TURN_TOKENS:]).endswith(_END_OF_TURN)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """OpenAI-style messages (`{"role": ..., "content": ...}`) to prompt ids in the model's instruct format;
        `tools` (OpenAI function definitions) go in as the format's available tools.

        The prompt ends where the assistant's answer starts. Tool call ids that are not Mistral's 9 alphanumeric
        characters (OpenAI's `call_...`) are mapped to ones that are, the same way in an assistant's calls and the
        tool results that answer them. Raises `ChatTemplateError` (param "messages") for conversations the
        format cannot express, saying what is wrong.
        """
        _check_chat_shape(messages)
        try:
            request = ChatCompletionRequest.from_openai(_with_mistral_call_ids(messages), tools=tools or None)
            return self._mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, KeyError) as e:
            reason = getattr(e, "message", None) or str(e) or type(e).__name__
            raise ChatTemplateError(f"invalid chat messages: {reason}; {_CHAT_FORMAT_HINT}",
                                    param="messages") from e


def is_mistral_call_id(value: Any) -> bool:
    """Whether a tool call id is as Mistral's format requires: 9 alphanumeric ASCII characters."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9]{9}", value) is not None


def _mistral_call_id(call_id: str) -> str:
    if is_mistral_call_id(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_BASE62[(digest // 62 ** i) % 62] for i in range(9))


def _with_mistral_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fixed = []
    for message in messages:
        if message.get("tool_call_id") is not None:
            message = {**message, "tool_call_id": _mistral_call_id(str(message["tool_call_id"]))}
        if isinstance(message.get("tool_calls"), list):
            message = {**message, "tool_calls": [{**call, "id": _mistral_call_id(str(call["id"]))}
                                                 if isinstance(call, dict) and call.get("id") else call
                                                 for call in message["tool_calls"]]}
        fixed.append(message)
    return fixed


def _check_chat_shape(messages: Any) -> None:
    """What mistral-common either lets through (assistant first) or fails on with an unhelpful error."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else f"a {type(messages).__name__}"
        raise ChatTemplateError(f"messages must be a non-empty list of messages, got {got}; {_CHAT_FORMAT_HINT}",
                                param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] is a {type(message).__name__}; each message must be an "
                                    "object with a 'role' and a 'content'", param="messages")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise ChatTemplateError(f"messages[{i}] has role {role!r}; the role must be one of "
                                    f"{', '.join(repr(r) for r in _CHAT_ROLES)}", param="messages")
        if role in ("system", "developer", "user") and message.get("content") is None:
            raise ChatTemplateError(f"messages[{i}] (role {role!r}) has no 'content'", param="messages")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ChatTemplateError(f"messages[{i}] (role 'tool') has no 'tool_call_id': a tool result names the "
                                    "call it answers", param="messages")
    first = next((m["role"] for m in messages if m["role"] not in ("system", "developer")), "user")
    if first != "user":
        raise ChatTemplateError(f"the first message after the system messages has role {first!r}, but the "
                                f"instruct format needs a user turn first; {_CHAT_FORMAT_HINT}", param="messages")


def _continuation_anchor(inner: Any) -> tuple[int | None, str]:
    """A sentencepiece piece that decodes to exactly one ASCII character at the start of a sequence.

    Any text piece before an id makes sentencepiece keep that id's leading `▁`; a bare "a" (no `▁` of its
    own) or the byte piece for "a" is in every Mistral vocabulary. Tekken needs no anchor: None.
    """
    if not isinstance(inner, SentencePieceTokenizer):
        return None, ""
    for piece in ("a", "<0x61>"):
        token_id = inner.get_special_token(piece)  # piece_to_id; unknown pieces map to <unk>
        if token_id != inner.unk_id and inner.decode([token_id]) == "a":
            return token_id, "a"
    raise ValueError(f"sentencepiece model {inner.file_path} has neither an 'a' piece nor a byte piece for it; "
                     "cannot decode continuations")
