"""`SamplingParams`: how one request wants its tokens chosen, validated once at the boundary.

The fields and their meaning follow vLLM's `SamplingParams` (and so OpenAI's request fields), so the
serving edge maps a request onto this class field by field. Every check lives in `__post_init__`: a bad
value raises `SamplingParamsError` whose `param` names the field and whose message says what is allowed,
and the rest of the engine (scheduler, sampler) trusts what it receives.

Types are checked strictly because JSON clients get them wrong in ways Python would silently accept:
`True` is an `int`, `16.0` looks like an int, `"16"` is truthy. An int field accepts only a real `int`; a
float field accepts an `int` or a `float` (stored as `float`) but never a `bool`, NaN or infinity.

`stop`, `stop_token_ids` and `bad_words` are normalised to tuples so that the frozen dataclass stays
hashable and consumers can always iterate (`stop=None` becomes `()`).
"""

import math
from dataclasses import dataclass

from engine.errors import SamplingParamsError

MAX_N = 128
"""Most samples one request may ask for; each is a sequence in the batch, so this bounds fan-out."""

MAX_TOKENS_LIMIT = 1_000_000
"""Sanity bound on `max_tokens`; the engine later also checks prompt + max_tokens against the context."""

MAX_LOGPROBS = 20
"""Most top logprobs per token (`logprobs`, `prompt_logprobs`), OpenAI's limit."""

MAX_STOP_STRINGS = 16
"""Most stop strings; each is matched against every detokenised step, so the list is kept short."""

MAX_STOP_TOKEN_IDS = 256
"""Most stop token ids; a bound only so that a request cannot ship an unbounded list."""

MAX_BAD_WORDS = 256
"""Most `bad_words`; each is checked against every row's output tail at every step."""

MAX_GRAMMAR_CHARS = 64 * 1024
"""Longest structured-output specification (a schema, regex, grammar or choice list), in characters."""

STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")

MAX_PENALTY = 2.0
"""Presence/frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)."""

MAX_REPETITION_PENALTY = 10.0
"""Upper bound on `repetition_penalty`; past ~2 every seen token is effectively banned already."""

MAX_SEED = 2**63
"""Seeds lie in [0, MAX_SEED): they seed a `torch.Generator`, which takes a signed 64-bit value."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy: dividing logits by them would overflow fp32 (vLLM
uses the same threshold)."""

_MASK_64 = (1 << 64) - 1


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output's text, by `kind`:

    - "json": `spec` is a JSON schema (as JSON text); "json_object": any JSON object (`spec` empty);
    - "regex": `spec` is a regular expression the whole output matches;
    - "choice": `spec` is a JSON list of strings, the output is one of them;
    - "grammar": `spec` is a grammar in Lark syntax (GBNF is accepted too; see engine/structured_output.py).

    `param` is the request field it came from, so that an error in `spec` names that field.
    """

    kind: str
    spec: str
    param: str = "structured_outputs"

    def __post_init__(self):
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise SamplingParamsError(f"structured output kind must be one of {', '.join(STRUCTURED_OUTPUT_KINDS)}"
                                      f", got {self.kind!r}", param=self.param)
        if not isinstance(self.spec, str):
            raise SamplingParamsError(f"{self.param} must be given as text, got {type(self.spec).__name__}",
                                      param=self.param)
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise SamplingParamsError(f"{self.param} is {len(self.spec):,} characters; this server takes at most "
                                      f"{MAX_GRAMMAR_CHARS:,}", param=self.param)
        if not self.spec and self.kind != "json_object":
            raise SamplingParamsError(f"{self.param} is empty", param=self.param)
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (see the module docstring for the validation rules).

    `temperature` 0 means greedy (argmax); `top_k` 0 or -1 and `top_p` 1 and `min_p` 0 switch those
    filters off. `logprobs=k` returns, per generated token, the sampled token's logprob plus the top k
    (0 = the sampled token's only); `prompt_logprobs=k` does the same for every prompt token.
    `min_tokens` holds back the end of sequence, stop tokens and stop strings until that many tokens were
    generated; `include_stop_str_in_output` keeps a matched stop string in the text; `bad_words` are never
    generated (each as a word: the token sequence of the word, with and without a leading space);
    `structured_outputs` constrains the text (see `StructuredOutputs`). `max_thinking_tokens` bounds a
    reasoning model's thinking: past that many tokens after `[THINK]`, the next token is `[/THINK]`.
    `repetition_penalty` follows Hugging Face (over prompt and output tokens, 1 = off); presence and
    frequency penalties follow OpenAI (over output tokens only, 0 = off).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    bad_words: tuple[str, ...] | list[str] = ()
    structured_outputs: StructuredOutputs | None = None
    max_thinking_tokens: int | None = None

    def __post_init__(self):
        self._check_counts()
        self._check_filters()
        self._check_penalties()
        self._check_stops()
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < MAX_SEED:
                raise SamplingParamsError(f"seed must be in [0, 2**63), got {self.seed}", param="seed")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be true or false, got {getattr(self, name)!r}", param=name)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise SamplingParamsError("structured_outputs must be a StructuredOutputs, got "
                                      f"{type(self.structured_outputs).__name__}", param="structured_outputs")
        self._store_floats()

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def sample_seed(self, index: int) -> int | None:
        """Seed of sample `index` of the `n`: `seed` itself for 0, a fixed mix of (seed, index) for others.

        Sample 0 keeps the request's seed so that `n=1` behaves like vLLM's; the others get distinct but
        reproducible seeds. None when the request is unseeded.
        """
        if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < self.n):
            raise ValueError(f"sample index must be an int in [0, {self.n}), got {index!r}")
        if self.seed is None or index == 0:
            return self.seed
        return _splitmix64(self.seed ^ _splitmix64(index)) % MAX_SEED

    def _check_counts(self) -> None:
        _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be at least 1, got {self.max_tokens}",
                                      param="max_tokens")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise SamplingParamsError(f"max_tokens must be at most {MAX_TOKENS_LIMIT:,}, "
                                      f"got {self.max_tokens:,}", param="max_tokens")
        if self.max_thinking_tokens is not None:
            _check_int("max_thinking_tokens", self.max_thinking_tokens)
            if self.max_thinking_tokens < 0:
                raise SamplingParamsError(f"max_thinking_tokens must be >= 0, got {self.max_thinking_tokens}",
                                          param="max_thinking_tokens")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                                      f"got {self.min_tokens}", param="min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value)
            if not 0 <= value <= MAX_LOGPROBS:
                raise SamplingParamsError(f"{name} must be between 0 and {MAX_LOGPROBS} (or null), "
                                          f"got {value}", param=name)

    def _check_filters(self) -> None:
        temperature = self._float("temperature")
        if temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0 (0 means greedy), got {temperature}",
                                      param="temperature")
        top_p = self._float("top_p")
        if not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 or 0 (off) or a positive count, got {self.top_k}",
                                      param="top_k")
        min_p = self._float("min_p")
        if not 0 <= min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = self._float(name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise SamplingParamsError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}",
                                          param=name)
        value = self._float("repetition_penalty")
        if not 0 < value <= MAX_REPETITION_PENALTY:
            raise SamplingParamsError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] "
                                      f"(1 means off), got {value}", param="repetition_penalty")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (list, tuple)):
            raise SamplingParamsError(f"stop must be a string or a list of strings, got {type(stop).__name__}",
                                      param="stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}",
                                      param="stop")
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingParamsError("stop strings must be non-empty strings", param="stop")
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise SamplingParamsError(f"stop_token_ids must be a list of integers, got {type(ids).__name__}",
                                      param="stop_token_ids")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
                                      param="stop_token_ids")
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise SamplingParamsError(f"stop_token_ids must be non-negative integers, got {list(ids)!r}",
                                      param="stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

        words = self.bad_words
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
            raise SamplingParamsError("bad_words must be a list of non-blank strings", param="bad_words")
        if len(words) > MAX_BAD_WORDS:
            raise SamplingParamsError(f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(words)}",
                                      param="bad_words")
        object.__setattr__(self, "bad_words", tuple(words))

    def _float(self, name: str) -> float:
        """Check that field `name` is a finite real number and return it (as given, for the messages)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SamplingParamsError(f"{name} must be a finite number, got {value!r}", param=name)
        return value

    def _store_floats(self) -> None:
        """Store the validated float fields as `float`, so `temperature=0` and `0.0` compare and hash alike."""
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object) -> None:
    if not _is_int(value):
        raise SamplingParamsError(f"{name} must be an integer, got {type(value).__name__} {value!r}",
                                  param=name)


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap bijective mix of 64 bits, so nearby inputs give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)
