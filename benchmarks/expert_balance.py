"""Expert balance before vs after a live rebalance, with 0 and 1 redundant slots per group, in one run.

    .venv/bin/python benchmarks/expert_balance.py --json balance.json

The `bench` preset (8 experts, top-2) with its gates skewed so that most tokens of each layer go to two
experts (`skew_gates`), in 4 expert groups (linear placement: both hot experts of a layer start in one group).
32 concurrent requests (96-token prompts, 48 new tokens, greedy, EOS ignored) run through the router's
layer path in-process (`LLM(expert_parallel=...)` with the local transport: `RouterService`, `RemoteExperts`,
group replicas that follow the router). One engine keeps the start placement ("before"); another runs the
requests once, then its router's `rebalance()` plans a placement from the load window, its replicas load it and
the table switches ("after"). Both then run the same requests in alternating rounds. For each:

- balancedness per layer over the phase's load (mean / max of the group loads; 1.0 is perfect), its mean
  and minimum;
- the largest group's share of a layer's token slots: what bounds an MoE layer when groups run in parallel
  on their own devices;
- generated tokens/s (median of the rounds) and the p99 of the MoE call (plan + compute + combine).

On this CPU every group computes in one process, one after another, so the total expert work — and with it
tokens/s and the MoE call time — does not depend on how it is spread; the balance figures carry the effect.
Greedy outputs before and after must be identical (asserted).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from experts.parallel_config import ExpertParallelConfig
from mistral.checkpoint import CheckpointReader
from mistral.presets import write_preset

NUM_GROUPS, REQUESTS, PROMPT, NEW = 4, 32, 96, 48
TARGET_BALANCEDNESS = 0.9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def skew_gates(model_dir: Path, strength: float = 4.0) -> dict[int, tuple[int, int]]:
    """Make layer l's gate prefer experts (2l, 2l+1) mod E for every token: a constant hidden component (column
    0 of the embeddings) that only those experts' gate rows read. Returns layer -> hot experts."""
    [path] = sorted(model_dir.glob("*.safetensors"))
    tensors = load_file(path)
    config = CheckpointReader(model_dir).config
    tensors["model.embed_tokens.weight"][:, 0] = 1.0
    hot = {}
    for layer in range(config.num_layers):
        gate = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]  # [E, H]
        hot[layer] = (2 * layer % config.num_experts, (2 * layer + 1) % config.num_experts)
        gate[:, 0] = 0.0
        gate[list(hot[layer]), 0] = strength
    save_file(tensors, path, metadata={"format": "pt"})
    return hot


def rebalance(runtime) -> dict:
    """Plan from the load window, let the in-process replicas load the placement, switch and settle."""
    result = runtime.service.rebalance()
    deadline = time.monotonic() + 60
    while runtime.service.describe()["rebalance"]["pending_version"] is not None:
        assert time.monotonic() < deadline, "the rebalance did not complete"
        runtime.sync()
    return result


def phase(llm: LLM, prompts: list[list[int]]) -> tuple[dict, list]:
    """Run the requests once: balancedness of this run's load, tokens/s, MoE call times; and the tokens."""
    runtime = llm.expert_runtime
    backend, service = runtime.backend, runtime.service
    backend.flush_load()
    before = torch.tensor(service.load_stats()["per_layer_expert"])
    backend.layer_seconds.clear()
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t0
    backend.flush_load()
    load = (torch.tensor(service.load_stats()["per_layer_expert"]) - before).tolist()
    placement = service.table.placement
    per_layer = placement.balancedness(load)
    shares = [max(loads) / max(sum(loads), 1) for loads in placement.group_loads(load)]
    return {"placement_version": placement.version, "balancedness_mean": sum(per_layer) / len(per_layer),
            "balancedness_min": min(per_layer), "balancedness_per_layer": per_layer,
            "largest_group_share_mean": sum(shares) / len(shares), "tokens_per_s": REQUESTS * NEW / seconds,
            "layer_ms": [s * 1e3 for s in backend.layer_seconds]}, [o.outputs[0].token_ids for o in outs]


def summary(phases: list[dict]) -> dict:
    layer_ms = sorted(ms for p in phases for ms in p.pop("layer_ms"))
    return {**{k: v for k, v in phases[0].items() if k != "tokens_per_s"},
            "tokens_per_s": statistics.median(p["tokens_per_s"] for p in phases),
            "tokens_per_s_rounds": [p["tokens_per_s"] for p in phases],
            "moe_call_p99_ms": layer_ms[int(0.99 * (len(layer_ms) - 1))]}


def run(model_dir: Path, redundant_slots: int, rounds: int) -> dict:
    """Two engines on the same checkpoint and layout: one keeps the start placement, the other is rebalanced
    live after a first run; then both run the same requests in alternating rounds (ABBA), so that drift of
    the machine falls on both alike."""
    layout = ExpertParallelConfig(NUM_GROUPS, "local", redundant_slots=redundant_slots)
    llms = {name: LLM(str(model_dir), tokenizer="v1", dtype="float32", expert_parallel=layout, progress=False,
                      max_num_seqs=REQUESTS, enable_prefix_caching=False)  # every round computes every prompt
            for name in ("before", "after")}
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 30_000, (REQUESTS, PROMPT), generator=gen).tolist()
    runtime = llms["after"].expert_runtime
    runtime.backend.refresh_interval = 0.0  # read the table at every step boundary
    _, reference = phase(llms["after"], prompts)  # the load the rebalance plans from
    t0 = time.perf_counter()
    decision = rebalance(runtime)
    switch_s = time.perf_counter() - t0
    phases = {"before": [], "after": []}
    for r in range(rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            result, tokens = phase(llms[name], prompts)
            assert tokens == reference, f"the {name} placement changed the greedy output"
            phases[name].append(result)
    runtime.sync()  # settled: the shard asked for the table since the switch
    for llm in llms.values():
        llm.shutdown()
    return {"redundant_slots": redundant_slots, "before": summary(phases["before"]),
            "after": summary(phases["after"]), "moved": decision["moved"], "rebalance_seconds": switch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per placement (default 4)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_preset("bench", Path(tmp) / "bench", progress=False)
        hot = skew_gates(model_dir)
        log(f"hot experts per layer: {hot}")
        results = [run(model_dir, slots, args.rounds) for slots in (0, 1)]
    print(f"{'redundant':>9} {'phase':>7} {'balancedness':>12} {'min':>6} {'top group':>9} {'tok/s':>7} "
          f"{'MoE p99 ms':>10}")
    for r in results:
        for name in ("before", "after"):
            p = r[name]
            print(f"{r['redundant_slots']:>9} {name:>7} {p['balancedness_mean']:>12.3f} "
                  f"{p['balancedness_min']:>6.3f} {p['largest_group_share_mean']:>9.1%} {p['tokens_per_s']:>7.1f} "
                  f"{p['moe_call_p99_ms']:>10.2f}")
        print(f"{'':>9} moved {r['moved']} expert copies in {r['rebalance_seconds']:.2f} s; after/before tok/s "
              f"{r['after']['tokens_per_s'] / r['before']['tokens_per_s']:.2f}x")
    best = max(r["after"]["balancedness_mean"] for r in results)
    verdict = "met" if best >= TARGET_BALANCEDNESS else "missed"
    print(f"target: balancedness >= {TARGET_BALANCEDNESS} after rebalancing: {verdict} ({best:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
