"""Grammar engines for constrained decoding, xgrammar vs llguidance: token-mask cost on CPU, Mistral tokenizers.

    python benchmarks/grammar_engines.py [--tokenizer v3|tekken|both] [--requests 32] [--steps 64]
                                         [--repeats 3] [--threads N] [--seed 0]

Neither engine is a project dependency: run it from a venv with `xgrammar` and/or `llguidance` (plus
torch, numpy, mistral-common); an engine that is not importable is skipped with a message.

Tokenizers are those mistral-common ships: v3 (SentencePiece, 32768 tokens, byte fallback) and tekken
(131072 tokens, 1000 control tokens first). Control tokens ([INST], <s>, <unk>, [TOOL_CALLS], ...) are
given to both engines as special, so no mask may allow one except EOS, and EOS only on a complete output.

Cases: a JSON schema (compact, no free whitespace) and a regex (a choice, then free text). Per case and
engine, two identical sets of `--requests` matchers decode `--steps` steps: each step fills the first
set's bitmask with one batched call (xgrammar BatchGrammarMatcher, llguidance LLExecutor) and the second
set's row by row, then every request takes a random allowed token (seeded) in both sets. Two sets, as
llguidance caches a matcher's mask: a second fill of the same state would be nearly free. A request
that samples EOS is decoded with the Mistral tokenizer, checked (json.loads + the schema, or
re.fullmatch) and reset. Engines run interleaved (A, B, A, B) `--repeats` times; printed are medians:

- first / again ms: compile + new matcher + first mask, on a cold cache, then again (xgrammar's
  GrammarCompiler caches compiled grammars; llguidance has no such cache: each LLMatcher compiles);
- matcher us: one more matcher from the compiled grammar (llguidance: from the grammar string);
- row mean / p99 us: one request's mask, per-row loop: the mask time per token per request;
- step mean / p99 ms: one batched fill of all requests; step/row us: step mean / requests;
- accept us: accepting one token;
- valid: finished requests whose text is valid / finished; leaks: allowed control tokens other than
  EOS; diff: rows where the batched and the per-row mask differ. Expected: n/n, 0, 0.
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REGEX = r"(positive|negative|neutral): [a-z ,]{10,80}\."
TOKENIZER_FILES = {"v3": "mistral_instruct_tokenizer_240323.model.v3", "tekken": "tekken_240911.json"}


def schema_holds(text: str) -> bool:
    try:
        obj = json.loads(text)  # strict: a raw control character inside a string is invalid JSON
    except ValueError:
        return False
    return (list(obj) == ["name", "age", "tags"] and isinstance(obj["name"], str) and len(obj["name"]) <= 20
            and type(obj["age"]) is int and 0 <= obj["age"] <= 150 and isinstance(obj["tags"], list)
            and len(obj["tags"]) <= 3 and all(tag in ("a", "b", "c") for tag in obj["tags"]))


@dataclass(frozen=True)
class Case:
    name: str
    schema: dict[str, Any] | None  # None: the regex case
    check: Callable[[str], bool]


CASES = [Case("json", SCHEMA, schema_holds), Case("regex", None, lambda text: bool(re.fullmatch(REGEX, text)))]


@dataclass(frozen=True)
class Vocab:
    size: int
    eos: int
    special: dict[int, str]  # control tokens (EOS included) by id: their names, e.g. "[TOOL_CALLS]"
    token_bytes: list[bytes]  # what each token spells; b"" for control tokens
    sp_pieces: list[str] | None  # v3 only: SentencePiece pieces, "▁" for a space, "<0xAB>" for a byte
    encode: Callable[[str], list[int]]  # no BOS, no SentencePiece dummy prefix
    decode: Callable[[list[int]], str]


def load_vocab(name: str) -> Vocab:
    import mistral_common
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILES[name]
    tok = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    if isinstance(tok, Tekkenizer):
        special = {i: tok.id_to_piece(i) for i in range(tok.num_special_tokens)}
        spelled = [b"" if i in special else tok.id_to_byte_piece(i) for i in range(tok.n_words)]
        return Vocab(tok.n_words, tok.eos_id, special, spelled, None,
                     lambda text: tok.encode(text, bos=False, eos=False), tok.decode)
    pieces = [tok.id_to_piece(i) for i in range(tok.n_words)]
    special = {i: pieces[i] for i in sorted({*tok.special_ids, tok.unk_id})}
    byte_piece = re.compile(r"<0x([0-9A-F]{2})>")
    spelled = [b"" if i in special else bytes([int(byte[1], 16)]) if (byte := byte_piece.fullmatch(piece))
               else piece.replace("\u2581", " ").encode() for i, piece in enumerate(pieces)]
    prefix = tok.encode("\x02", bos=False, eos=False)  # "▁" <0x02>: takes the dummy prefix away

    def encode(text: str) -> list[int]:
        ids = tok.encode("\x02" + text, bos=False, eos=False)
        assert ids[: len(prefix)] == prefix, text
        return ids[len(prefix):]

    return Vocab(tok.n_words, tok.eos_id, special, spelled, pieces, encode, tok.decode)


class XGrammar:
    def __init__(self, vocab: Vocab, threads: int) -> None:
        import xgrammar as xgr

        self.xgr, self.threads = xgr, threads
        if vocab.sp_pieces is None:
            encoded: list[Any] = vocab.token_bytes  # empty tokens are what xgrammar takes as special
            kind, prefix_space = xgr.VocabType.RAW, False
        else:
            encoded = ["" if i in vocab.special else piece for i, piece in enumerate(vocab.sp_pieces)]
            kind, prefix_space = xgr.VocabType.BYTE_FALLBACK, True
        self.info = xgr.TokenizerInfo(encoded, kind, vocab_size=vocab.size, stop_token_ids=[vocab.eos],
                                      add_prefix_space=prefix_space)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def new_cache(self) -> Any:
        return self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile(self, cache: Any, case: Case) -> Any:
        if case.schema is None:
            return cache.compile_regex(REGEX)
        return cache.compile_json_schema(case.schema, any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class LLGuidanceVocab:
    """What llguidance.TokenizerWrapper reads: bytes per token, a control token as 0xFF + its name."""

    def __init__(self, vocab: Vocab) -> None:
        self.eos_token_id, self.bos_token_id = vocab.eos, None
        self.tokens = [b"\xff" + vocab.special[i].encode() if i in vocab.special else spelled
                       for i, spelled in enumerate(vocab.token_bytes)]
        self.encode = vocab.encode

    def __call__(self, text: str) -> list[int]:  # llguidance tokenizes forced text with it
        return self.encode(text)


class LLGuidance:
    def __init__(self, vocab: Vocab, threads: int) -> None:
        import llguidance
        import llguidance.numpy  # llguidance.torch works too, but its import costs seconds (torch.compile)

        self.llg, self.masks = llguidance, llguidance.numpy
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(LLGuidanceVocab(vocab)))
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def new_cache(self) -> None:
        return None

    def compile(self, cache: None, case: Case) -> str:  # a grammar string: each LLMatcher compiles it
        if case.schema is None:
            return str(self.llg.LLMatcher.grammar_from_regex(REGEX))
        return str(self.llg.LLMatcher.grammar_from_json_schema(
            case.schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}))

    def matcher(self, compiled: str) -> Any:
        matcher = self.llg.LLMatcher(self.tokenizer, compiled)
        if matcher.is_error():  # LLMatcher never raises; LLMatcher.validate_grammar() would compile once more
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.masks.fill_next_token_bitmask(matcher, bitmask.numpy(), row)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        rows = [(matcher, row) for row, matcher in enumerate(matchers)]
        self.masks.fill_next_token_bitmask_par(self.executor, rows, bitmask.numpy())

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


ENGINES: dict[str, type[XGrammar | LLGuidance]] = {"xgrammar": XGrammar, "llguidance": LLGuidance}


def timed(fn: Callable[[], Any], into: list[float]) -> Any:
    start = time.perf_counter()
    result = fn()
    into.append(time.perf_counter() - start)
    return result


def run(engine: XGrammar | LLGuidance, vocab: Vocab, case: Case, args: argparse.Namespace) -> dict[str, float]:
    batch_mask, loop_mask = (torch.full((args.requests, (vocab.size + 31) // 32), -1, dtype=torch.int32)
                             for _ in range(2))
    control = np.zeros(loop_mask.shape[1] * 32, dtype=np.uint8)
    control[[i for i in vocab.special if i != vocab.eos]] = 1
    control_words = np.packbits(control, bitorder="little").view(np.int32)

    cache = engine.new_cache()
    first: list[float] = []
    made: list[float] = []
    for _ in range(2):  # first on a cold cache, then again
        timed(lambda: engine.fill(engine.matcher(engine.compile(cache, case)), loop_mask, 0), first)
    compiled = engine.compile(cache, case)
    batched = [timed(lambda: engine.matcher(compiled), made) for _ in range(args.requests)]
    looped = [engine.matcher(compiled) for _ in range(args.requests)]

    rng = random.Random(args.seed)
    outputs: list[list[int]] = [[] for _ in looped]
    rows: list[float] = []
    steps: list[float] = []
    accepts: list[float] = []
    finished = valid = leaks = diff = 0
    for _ in range(args.steps):
        timed(lambda: engine.fill_batch(batched, batch_mask), steps)
        for row, matcher in enumerate(looped):
            start = time.perf_counter()
            engine.fill(matcher, loop_mask, row)
            rows.append(time.perf_counter() - start)
        diff += int((batch_mask != loop_mask).any(dim=1).sum())
        words = loop_mask.numpy()
        leaks += int(np.count_nonzero(words & control_words))
        for row, (matcher, twin) in enumerate(zip(looped, batched, strict=True)):
            allowed = np.flatnonzero(np.unpackbits(words[row].view(np.uint8), bitorder="little")[: vocab.size])
            token = int(allowed[rng.randrange(len(allowed))])  # an empty mask raises here
            start = time.perf_counter()
            accepted = engine.accept(matcher, token)
            accepts.append(time.perf_counter() - start)
            if not (accepted and engine.accept(twin, token)):
                raise RuntimeError(f"{type(engine).__name__} rejected token {token}, which its mask allowed")
            if token != vocab.eos:
                outputs[row].append(token)
                continue
            finished += 1
            valid += case.check(vocab.decode(outputs[row]))
            outputs[row] = []
            matcher.reset()
            twin.reset()
    return {
        "first ms": first[0] * 1e3, "again ms": first[1] * 1e3, "matcher us": statistics.fmean(made) * 1e6,
        "row mean us": statistics.fmean(rows) * 1e6, "row p99 us": statistics.quantiles(rows, n=100)[98] * 1e6,
        "step mean ms": statistics.fmean(steps) * 1e3, "step p99 ms": statistics.quantiles(steps, n=100)[98] * 1e3,
        "step/row us": statistics.fmean(steps) / args.requests * 1e6, "accept us": statistics.fmean(accepts) * 1e6,
        "valid": valid, "finished": finished, "leaks": leaks, "diff": diff,
    }


def print_table(title: str, results: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    keys = [key for key in next(iter(results.values()))[0] if key != "finished"]
    print(f"\n{title}\n{'case':<6}{'engine':<11}" + "".join(f"{key:>13}" for key in keys))
    for (case, engine), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        cells = [f"{median['valid']:.0f}/{median['finished']:.0f}" if key == "valid" else f"{median[key]:.1f}"
                 for key in keys]
        print(f"{case:<6}{engine:<11}" + "".join(f"{cell:>13}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=["v3", "tekken", "both"], default="both")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the batched fills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    names = [name for name in ENGINES if importlib.util.find_spec(name)]
    for name in ENGINES.keys() - set(names):
        print(f"skipping {name}: not installed (pip install {name})")
    if not names:
        raise SystemExit("no grammar engine is installed")
    for name in names:
        start = time.perf_counter()
        importlib.import_module(name)
        print(f"{name} imported in {time.perf_counter() - start:.1f} s")
    print(", ".join(f"{name} {importlib.metadata.version(name)}" for name in [*names, "torch"]),
          f"| {args.threads} threads for batched fills")
    for tokenizer in ["v3", "tekken"] if args.tokenizer == "both" else [args.tokenizer]:
        vocab = load_vocab(tokenizer)
        engines: dict[str, XGrammar | LLGuidance] = {}
        for name in names:
            start = time.perf_counter()
            engines[name] = ENGINES[name](vocab, args.threads)
            print(f"{tokenizer}: {name} tokenizer info built in {(time.perf_counter() - start) * 1e3:.0f} ms")
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for case in CASES:
                for name, engine in engines.items():
                    results.setdefault((case.name, name), []).append(run(engine, vocab, case, args))
        print_table(f"{tokenizer} (vocab {vocab.size}), {args.requests} requests x {args.steps} steps, "
                    f"median of {args.repeats}", results)


if __name__ == "__main__":
    main()
