"""Loading a prefix from host RAM (T1) while other requests decode: the decode stall, copies on the engine thread
vs on the copier thread, side by side in one run.

    .venv/bin/python benchmarks/host_load_overlap.py [--model bench] [--prefix-tokens 4096] [--rounds 3]
                                                      [--device cuda] [--json out.json]

One in-process engine with a host tier: fp32 on the CPU; on a GPU bf16 unless `--dtype` says otherwise, the host
tier in pinned RAM and the copier's copies on a CUDA stream of their own. Each round, for each mode of
`KVTiers.host_loads` ("inline": the copy runs on the engine thread; "async": on the copier thread; "auto", the
default: async only when the copy is predicted to outlast half a step): `--decoders` requests decode; a request
whose `--prefix-tokens` prefix was pushed from the device pool to host RAM arrives; the steps go on until it has its
first token. Recorded: the longest step the decoding requests waited for (their stall) against the median
decode step before the arrival, the arriving request's time to first token, and the copy itself (the host tier's
fitted read time for the blocks it loaded, from `FetchCost`). The order of the modes
rotates from round to round, so drifting machine load touches them alike.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
DECODE = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30_000) for _ in range(n)]


def one_round(llm: LLM, rng: random.Random, args) -> dict:
    """The decoders run; the T1 request arrives; -> stall and TTFT figures."""
    engine = llm.engine
    prefix = ids(rng, args.prefix_tokens)
    llm.generate(prompt_token_ids=[prefix + ids(rng, 8)], sampling_params=ONE)  # the prefix, now in the pool
    for _ in range(2):  # two other prompts as long push it down to host RAM
        llm.generate(prompt_token_ids=[ids(rng, args.prefix_tokens)], sampling_params=ONE)
    for i in range(args.decoders):
        engine.add_request(f"d{i}", ids(rng, 32), DECODE)
    for _ in range(8):  # prefilled, decoding
        engine.step()
    before = []
    for _ in range(16):
        began = time.perf_counter()
        engine.step()
        before.append(time.perf_counter() - began)
    loaded = engine.tiers.num_loaded["host"]
    arrived, steps, first = time.perf_counter(), [], None
    engine.add_request("t1", prefix + ids(rng, 16), ONE)
    while first is None:
        began = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - began)
        if any(o.request_id == "t1" for o in outs):
            first = time.perf_counter() - arrived
    for i in range(args.decoders):
        engine.abort_request(f"d{i}")
    assert engine.tiers.num_loaded["host"] > loaded, "the prefix was meant to come from host RAM"
    blocks = engine.tiers.num_loaded["host"] - loaded
    copy_s = engine.tiers.cost.fetch_seconds("host", blocks)  # None until two copies were measured (warm-up)
    return {"decode_step_ms": statistics.median(before) * 1e3, "longest_step_ms": max(steps) * 1e3,
            "ttft_ms": first * 1e3, "steps": len(steps), "blocks": blocks,
            "copy_ms": float("nan") if copy_s is None else copy_s * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench")
    p.add_argument("--prefix-tokens", type=int, default=4096)
    p.add_argument("--kv-bytes-per-token", type=int, default=8 << 10,
                   help="the model's KV bytes per token (the bench preset's in fp32; half that in bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--decoders", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every mode once")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    prefix_bytes = args.prefix_tokens * args.kv_bytes_per_token
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    llm = LLM(args.model, dtype=dtype, device=args.device, max_model_len=args.prefix_tokens + 64,
              kv_cache_memory=int(1.6 * prefix_bytes), host_kv_cache_memory=4 * prefix_bytes, progress=False)
    tiers, rng = llm.engine.tiers, random.Random(0)
    one_round(llm, rng, args)  # warm-up; its copy is measured, and so is every later one
    modes = ["inline", "async", "auto"]
    results = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes[r % 3:] + modes[:r % 3]:
            tiers.host_loads = mode
            results[mode].append(one_round(llm, rng, args))
            log(f"round {r + 1} {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[mode][-1].items()))
    llm.shutdown()
    print("| host_loads | decode step before (ms) | longest step while loading (ms) | longest / decode step "
          "| TTFT of the T1 request (ms) | copy (ms) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for mode, rounds in results.items():
        step = statistics.median(x["decode_step_ms"] for x in rounds)
        longest = statistics.median(x["longest_step_ms"] for x in rounds)
        ttft = statistics.median(x["ttft_ms"] for x in rounds)
        copy = statistics.median(x["copy_ms"] for x in rounds)
        summary[mode] = {"decode_step_ms": step, "longest_step_ms": longest, "ttft_ms": ttft, "copy_ms": copy}
        print(f"| {mode} | {step:.1f} | {longest:.1f} | {longest / step:.1f}x | {ttft:.0f} | {copy:.1f} |")
    for mode in ("async", "auto"):
        print(f"{mode} / inline: longest step {summary[mode]['longest_step_ms'] / summary['inline']['longest_step_ms']:.2f}, "
              f"TTFT {summary[mode]['ttft_ms'] / summary['inline']['ttft_ms']:.2f} (medians of {args.rounds} rounds)")
    print("command:", " ".join([".venv/bin/python", "benchmarks/host_load_overlap.py", *sys.argv[1:]]))
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
