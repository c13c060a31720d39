"""The cost of structured output in the engine: tokens/s with a JSON schema against unconstrained, at 1 and 32
concurrent requests, side by side in one run.

    .venv/bin/python benchmarks/structured_output.py [--model tiny] [--concurrency 1 32] [--rounds 3]
                                                      [--json out.json]

One in-process engine (fp32). For each concurrency C, each round runs C requests of each kind, the kinds in
turn (the order rotates from round to round, so drifting machine load touches them alike):

- "json": sampled at temperature 1 under a JSON schema (`structured_outputs`), until the object is complete;
- "free": the same prompts and seeds unconstrained, EOS ignored, each with `max_tokens` set to the length its
  constrained twin reaches (a warm-up run measures them; seeded, every round reaches the same), so both kinds
  generate the same number of tokens.

Reported per C: generated tokens per second of each kind (median over rounds) and their ratio, plus the time spent
building token masks (`allowed_tokens`) per step, on the mask thread while the model computes the step.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.structured_output as structured_output  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.sampling_params import StructuredOutputs  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 32},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
CONSTRAINT = StructuredOutputs("json", json.dumps(SCHEMA))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MaskTimer:
    """Wraps `allowed_tokens` to add up the time spent building masks (on the mask thread, beside the forward)."""

    def __init__(self):
        self.seconds, self.calls, self._inner = 0.0, 0, structured_output.allowed_tokens
        structured_output.allowed_tokens = self

    def __call__(self, grammars, vocab_size):
        began = time.perf_counter()
        try:
            return self._inner(grammars, vocab_size)
        finally:
            self.seconds += time.perf_counter() - began
            self.calls += 1


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[int]]:
    """All requests at once; -> (seconds, generated tokens per request)."""
    began = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return time.perf_counter() - began, [len(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    llm = LLM(args.model, dtype="float32", progress=False, max_num_seqs=max(args.concurrency))
    timer = MaskTimer()
    tokenizer = llm.tokenizer
    results = []
    for c in args.concurrency:
        prompts = [tokenizer.encode(f"Record {i} of the user table, as JSON:") for i in range(c)]
        constrained = [SamplingParams(max_tokens=400, temperature=1.0, seed=i, structured_outputs=CONSTRAINT)
                       for i in range(c)]
        _, lengths = run(llm, prompts, constrained)  # warm-up; seeded, so every round generates these lengths
        free = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True) for i, n in enumerate(lengths)]
        rates: dict[str, list[float]] = {"json": [], "free": []}
        mask_ms = []
        for r in range(args.rounds):
            for kind in (["json", "free"] if r % 2 == 0 else ["free", "json"]):
                timer.seconds, timer.calls = 0.0, 0
                seconds, got = run(llm, prompts, constrained if kind == "json" else free)
                assert got == lengths, "a seeded run generated other lengths"
                rates[kind].append(sum(got) / seconds)
                if kind == "json":
                    mask_ms.append(1000 * timer.seconds / max(timer.calls, 1))
            log(f"C={c} round {r}: json {rates['json'][-1]:.0f} tok/s, free {rates['free'][-1]:.0f} tok/s, "
                f"mask {mask_ms[-1]:.2f} ms/step")
        json_rate, free_rate = statistics.median(rates["json"]), statistics.median(rates["free"])
        results.append({"concurrency": c, "json_tok_s": json_rate, "free_tok_s": free_rate,
                        "ratio": json_rate / free_rate, "mask_ms_per_step": statistics.median(mask_ms)})
    print(f"{'C':>4} {'json tok/s':>11} {'free tok/s':>11} {'json/free':>10} {'mask ms/step':>13}")
    for row in results:
        print(f"{row['concurrency']:>4} {row['json_tok_s']:>11.0f} {row['free_tok_s']:>11.0f} "
              f"{row['ratio']:>10.2f} {row['mask_ms_per_step']:>13.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
