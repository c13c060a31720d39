"""Structured output: per sequence, a grammar that says which tokens may come next (llguidance).

    compiler = GrammarCompiler(tokenizer, vocab_size)
    compiler.check(constraint)              # InvalidRequestError naming the request's field, at the edge
    grammar = compiler.grammar(constraint)  # one per sample, in the engine
    allowed = allowed_tokens([grammar, ...], vocab_size)   # [R, V] bool, what the sampler keeps
    pending = prefetch_allowed([grammar, ...], vocab_size) # the same, on a thread, beside the forward pass
    grammar.accept(token_id)                # after each sampled token

Why llguidance: its mask is computed lazily from the grammar's lexer and parser state, so a request starts with
no compile step, and a mask costs tens of microseconds whatever the vocabulary; `benchmarks/grammar_engines.py`
measures it against xgrammar (docs/PERFORMANCE.md has the figures). It is a self-contained wheel.

Kinds (`StructuredOutputs.kind`):

- "json": a JSON schema, compiled by llguidance into a grammar. Whitespace is not free (`", "` between items,
  `": "` after keys): a free-whitespace grammar lets a weak model emit spaces until `max_tokens`, and the text
  would never parse. "json_object" is the schema `{"type": "object"}`.
- "regex": the whole text matches it (Rust regex syntax, as llguidance reads it).
- "choice": the text is one of the strings (a grammar of their alternatives).
- "grammar": Lark syntax, llguidance's dialect (`start: ...`); a GBNF grammar (llama.cpp's, with `::=`) is
  converted to it.

The end of sequence is allowed exactly when the grammar is complete, so a sequence ends with a whole value; the
engine also ends it when the grammar can take nothing more. Control tokens are never allowed otherwise. A grammar
that llguidance cannot build — a schema feature it does not support, a bad regex, a grammar too large for
its limits — is refused at the edge with llguidance's message, naming the request's field. Compiled grammars
are kept in a small LRU cache per compiler, so a schema sent again is checked once.
"""

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.numpy  # not llguidance.torch: importing that compiles kernels for seconds
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputs
from engine.tokenizer import Tokenizer

CACHE_SIZE = 256
"""Grammars each compiler remembers (their text and whether llguidance accepted it)."""

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Many rows' masks are filled by llguidance's thread pool where there are cores to spare; on a small machine its
# overhead costs more than it saves (benchmarks/grammar_engines.py), and the rows are filled one by one.
_PARALLEL_ROWS = 8
# One thread builds each step's masks beside the forward pass (one, so a grammar is never filled twice at once).
_masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msem-grammar-masks")
_executor = llguidance.LLExecutor(num_threads=min(8, cpu_count // 2)) if (cpu_count := os.cpu_count() or 1) >= 8 \
    else None


class Grammar:
    """One sequence's place in its grammar. With `think` (the `[THINK]` and `[/THINK]` ids) the sequence may
    think first: `[THINK]` is allowed beside the grammar's first tokens, the thinking is unconstrained, and the
    grammar applies to the answer after `[/THINK]`."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int, think: tuple[int, int] | None = None):
        self._matcher, self._eos_id, self._think = matcher, eos_id, think
        self.phase = "start" if think is not None else "answer"  # "start", "thinking" or "answer"

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. A token the grammar did not allow (only a resumed request's tokens
        could be one) leaves the grammar in error, where it allows only the end of sequence."""
        if self.phase == "start":
            self.phase = "thinking" if token_id == self._think[0] else "answer"
        elif self.phase == "thinking" and token_id == self._think[1]:
            self.phase = "answer"
            return
        if self.phase == "answer":
            self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The text is complete and nothing more may follow (or the grammar is in error)."""
        return self.phase == "answer" and (self._matcher.is_stopped() or self._matcher.is_error())


class GrammarCompiler:
    """Builds `Grammar`s for one tokenizer. Thread-safe: the edge checks requests on worker threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], str | InvalidRequestError] = OrderedDict()
        # llguidance's view of the vocabulary takes seconds for a large one: it is built in the background
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._building = threading.Thread(target=self._tokenizer, name="grammar-vocabulary", daemon=True)
        self._building.start()

    def check(self, constraint: StructuredOutputs) -> None:
        """Raise `InvalidRequestError` (naming `constraint.param`) unless llguidance can build the grammar."""
        self._grammar_text(constraint)

    def grammar(self, constraint: StructuredOutputs, think: tuple[int, int] | None = None) -> Grammar:
        """A new sequence's grammar state, at the start of the text; `think`: see `Grammar` (ignored when the
        grammar itself places the `[THINK]` it would allow)."""
        matcher = llguidance.LLMatcher(self._tokenizer(), self._grammar_text(constraint), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{constraint.param}: {matcher.get_error()}", param=constraint.param)
        if think is not None and matcher.validate_tokens([think[0]]):
            think = None
        return Grammar(matcher, self.tokenizer.eos_id, think)

    def _grammar_text(self, constraint: StructuredOutputs) -> str:
        """llguidance's grammar for a constraint, validated once and then cached (or its cached refusal)."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            known = self._cache.get(key)
            if known is not None:
                self._cache.move_to_end(key)
        if known is None:
            known = self._compile(constraint)
            with self._lock:
                self._cache[key] = known
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(known, InvalidRequestError):
            raise InvalidRequestError(str(known).replace(known.param or "", constraint.param, 1),
                                      param=constraint.param)
        return known

    def _compile(self, constraint: StructuredOutputs) -> str | InvalidRequestError:
        param = constraint.param
        try:
            text = _grammar(constraint)
        except ValueError as error:  # llguidance's own parse errors, and ours
            return InvalidRequestError(f"{param}: {error}", param=param)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self._tokenizer())
        if is_error:
            return InvalidRequestError(f"{param} cannot be used: {messages[0]}", param=param)
        return text

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltokenizer is None:
                vocabulary = _Vocabulary(self.tokenizer, self.vocab_size)
                self._lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary),
                                                           n_vocab=max(self.vocab_size, len(vocabulary.tokens)))
            return self._lltokenizer


def prefetch_allowed(grammars: Sequence[Grammar], vocab_size: int) -> Future:
    """`allowed_tokens` on the mask thread, so that it runs while the model computes the step's logits (the
    grammars' states are settled once the step is scheduled); the sampler takes the result."""
    return _masker.submit(allowed_tokens, list(grammars), vocab_size)


def allowed_tokens(grammars: Sequence[Grammar], vocab_size: int) -> np.ndarray:
    """[R, V] bool: the tokens each grammar allows next (the end of sequence alone for one in error). NumPy,
    not torch: the edges import this module to check constraints, and they load no torch."""
    bitmask = llguidance.numpy.allocate_token_bitmask(len(grammars), vocab_size)  # [R, ceil(V / 32)] int32
    if len(grammars) >= _PARALLEL_ROWS and _executor is not None:
        llguidance.numpy.fill_next_token_bitmask_par(_executor, [(g._matcher, i) for i, g in enumerate(grammars)],
                                                     bitmask)
    else:
        for i, grammar in enumerate(grammars):
            llguidance.numpy.fill_next_token_bitmask(grammar._matcher, bitmask, i)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    allowed = allowed.astype(bool)  # [R, V]; bit j of word w is token 32 w + j
    stuck = ~allowed.any(axis=1)  # [R]
    for i, grammar in enumerate(grammars):
        if grammar.phase == "thinking":
            allowed[i] = True
        elif stuck[i] or grammar._matcher.is_error():
            allowed[i] = False
            allowed[i, grammar._eos_id] = True
        if grammar.phase == "start":
            allowed[i, grammar._think[0]] = True
    return allowed


def _grammar(constraint: StructuredOutputs) -> str:
    kind, spec = constraint.kind, constraint.spec
    if kind in ("json", "json_object"):
        schema = json.loads(spec) if kind == "json" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec) if "::=" in spec else spec)


class _Vocabulary:
    """The tokenizer as `llguidance.TokenizerWrapper` reads it: each token's bytes, a control token as 0xFF and
    its name (llguidance's convention, so grammars can name them), and a way to tokenize forced text. Only the
    ids the model can sample (`vocab_size`) are listed; a model with more ids than its tokenizer never gets the
    extra ones allowed."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        spelled = tokenizer.token_bytes()[:vocab_size]  # a model may sample fewer ids than its tokenizer has
        self.special_token_ids = [i for i, piece in enumerate(spelled) if piece is None]
        self.tokens = [b"\xff" + tokenizer.control_token_name(i).encode() if piece is None else piece
                       for i, piece in enumerate(spelled)]
        self._encode = tokenizer.encode_continuation

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)
