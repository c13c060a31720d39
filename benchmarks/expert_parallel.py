"""Single-process engine vs 2 expert groups over each transport, side by side in one run.

    .venv/bin/python benchmarks/expert_parallel.py --json ep.json

The `bench` preset, fp32, 32 concurrent requests of a 128-token prompt and 128 new tokens (greedy, EOS ignored).
For each layout: generated tokens/s and its ratio to the single-process engine; the per-layer MoE call latency
on the shard (plan + send + remote compute + receive + combine) at p50/p99; and the hop's cost:

    dispatch+combine per layer = MoE call latency over the transport - MoE call latency of the `local` layout

(the `local` layout runs the same plan, expert compute and combine in-process, with no hop), and its share of
the mean engine step time. Greedy tokens are compared to the single-process run. Targets on the 2-core CPU:
the best transport keeps >= 50% of single-process throughput and dispatch+combine <= 25% of step time.

Every layout runs in its own process and shares the machine's cores: the expert groups are separate processes
that compete with the shard, so on 2 cores the figures say more about overhead than about scaling. The
expert-parallel shards run with `LAYER_PATH_ENV` (passive OpenMP waiting, as msem's actors do), the
single-process engine with the default environment (its best).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from engine import LLM, SamplingParams
from experts.parallel_config import LAYER_PATH_ENV, ExpertParallelConfig
from mistral.config import ModelConfig
from mistral.presets import resolve_model

TARGET_THROUGHPUT, TARGET_SHARE = 0.5, 0.25


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def timed_steps(llm: LLM) -> list[float]:
    """Wrap the engine's step to record each step's wall time."""
    times, step = [], llm.engine.step

    def timed():
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        return out

    llm.engine.step = timed
    return times


def run_layout(model_dir: str, transport: str | None, prompts, params, groups: int) -> dict:
    ep = None if transport is None else ExpertParallelConfig(groups, transport, "linear", 1, failover_timeout=120)
    llm = LLM(model_dir, dtype="float32", progress=False, expert_parallel=ep)
    try:
        llm.generate(prompt_token_ids=[p[:16] for p in prompts[:2]], sampling_params=SamplingParams(max_tokens=4))
        backend = llm.expert_runtime.backend if ep else None
        if backend:
            backend.layer_seconds.clear()
        steps = timed_steps(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
        res = {"tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, "seconds": elapsed,
               "mean_step_s": statistics.mean(steps), "steps": len(steps),
               "tokens": [o.outputs[0].token_ids for o in outs]}
        if backend:
            layers = backend.layer_seconds
            res |= {"layer_p50_s": percentile(layers, 0.5), "layer_p99_s": percentile(layers, 0.99),
                    "layer_mean_s": statistics.mean(layers), "layers_per_step": len(layers) / len(steps)}
        return res
    finally:
        llm.shutdown()


def run_in_child(args, layout: str) -> dict:
    """One layout in a fresh process: the single-process engine with the default environment, the expert-parallel
    shard with `LAYER_PATH_ENV` (as msem's Ray actors get it), which must be set before torch loads OpenMP."""
    env = dict(os.environ, **({} if layout == "single" else LAYER_PATH_ENV))
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--model", args.model, "--groups", str(args.groups),
                        "--requests", str(args.requests), "--layout", layout, "--layout-json", out.name],
                       env=env, check=True)
        return json.load(open(out.name))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench")
    p.add_argument("--transports", default="local,ray,grpc,torch")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--layout", help=argparse.SUPPRESS)  # run one layout, in the child process
    p.add_argument("--layout-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layout is not None:
        model_dir = str(resolve_model(args.model))
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.requests, 128), generator=gen).tolist()
        params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        transport = None if args.layout == "single" else args.layout
        with open(args.layout_json, "w") as f:
            json.dump(run_layout(model_dir, transport, prompts, params, args.groups), f)
        return

    results = {}
    for name in ["single", *args.transports.split(",")]:
        log(f"running {name} ...")
        results[name] = run_in_child(args, name)
        log(f"  {results[name]['tokens_per_s']:.1f} tok/s")

    base = results["single"]
    local = results.get("local")
    rows = ["| layout | tok/s | vs single | identical | MoE call p50 / p99 (ms) | dispatch+combine p50 "
            "(ms/layer) | share of step |", "|---|---|---|---|---|---|---|"]
    rows.append(f"| single process | {base['tokens_per_s']:.1f} | 1.00x | - | - | - | - |")
    for name, r in results.items():
        if name == "single":
            continue
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
        hop = share = None
        if local is not None and name != "local":
            hop = r["layer_p50_s"] - local["layer_p50_s"]
            share = max(0.0, r["layer_mean_s"] - local["layer_mean_s"]) * r["layers_per_step"] / r["mean_step_s"]
            r |= {"dispatch_combine_p50_s": hop, "dispatch_combine_share": share}
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        rows.append(f"| {args.groups} groups, {name} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
                    f"{same}/{len(r['tokens'])} | {1e3 * r['layer_p50_s']:.2f} / {1e3 * r['layer_p99_s']:.2f} | "
                    + (f"{1e3 * hop:.2f} | {100 * share:.0f}% |" if hop is not None else "(baseline) | - |"))
    print("\n".join(rows))
    remote = {n: r for n, r in results.items() if n not in ("single", "local")}
    if remote:
        best = max(remote, key=lambda n: remote[n]["tokens_per_s"])
        r = remote[best]
        print(f"best transport: {best}, {100 * r['ratio']:.0f}% of single-process throughput "
              f"(target >= {100 * TARGET_THROUGHPUT:.0f}%)"
              + (f", dispatch+combine {100 * r['dispatch_combine_share']:.0f}% of step time "
                 f"(target <= {100 * TARGET_SHARE:.0f}%)" if "dispatch_combine_share" in r else ""))
    if args.json:
        for r in results.values():
            r.pop("tokens")
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
