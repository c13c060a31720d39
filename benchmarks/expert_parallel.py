"""Single-process engine vs 2 expert groups: in-process layouts per transport, the Serve app, the NCCL hop.

    .venv/bin/python benchmarks/expert_parallel.py --json ep.json               # in-process layouts (bench)
    .venv/bin/python benchmarks/expert_parallel.py --serve --json serve.json    # Serve layouts (tiny)
    .venv/bin/python benchmarks/expert_parallel.py --hop nccl                   # NCCL hop, >= groups + 1 GPUs

In-process layouts (the default): the `bench` preset, fp32, 32 concurrent requests of a 128-token prompt and 128
new tokens (greedy, EOS ignored), `LLM(expert_parallel=...)` per transport. For each layout: generated tokens/s
and its ratio to the single-process engine; the per-layer MoE call latency on the shard (plan + send + remote
compute + receive + combine) at p50/p99; and the hop's cost:

    dispatch+combine per layer = MoE call latency over the transport - MoE call latency of the `local` layout

(the `local` layout runs the same plan, expert compute and combine in-process, with no hop), and its share of
the mean engine step time. Greedy tokens are compared to the single-process run. Targets on the 2-core CPU:
the best transport keeps >= 50% of single-process throughput and dispatch+combine <= 25% of step time.

Every layout runs in its own process and shares the machine's cores: the expert groups are separate processes
that compete with the shard, so on 2 cores the figures say more about overhead than about scaling. The
expert-parallel shards run with `LAYER_PATH_ENV` (passive OpenMP waiting, as msem's actors do), the
single-process engine with the default environment (its best).

Serve layouts (`--serve`, the `tiny` preset by default): the Serve application (Ingress -> AttentionShard ->
ExpertGroup0..n-1, sized as the integration tests size it for 2 cores: shard 0.5 CPU, each group replica 0.25,
so one torch thread each; `--shard-cpus`, `--group-cpus`) on a local Ray started here (`--ray-cpus`, loopback
ports), once per `expert_groups.transport` (grpc, torch: gloo on CPU). The same 32 prompts go as concurrent plain completions (`/v1/completions`, token-id prompts,
`max_tokens` 128, greedy, `ignore_eos`) over HTTP; tokens/s counts completion tokens over the wall time of the
32. The baseline is the in-process `LLM` on the same prompts, in a child process with the default environment.
The machine is shared and its load drifts, so the two are paired: each of `--rounds` rounds runs the single
process (while the app idles) and then the app on new prompts, and the ratio is the median of the rounds'.
Texts are compared with the baseline's. Target: the best Serve layout >= 50% of the single process.
`--transports grpc,torch,none` adds the app without expert groups (experts inside the shard): Serve's own cost.

Hop (`--hop nccl`): the torch transport's dispatch+combine per MoE layer on GPUs. One shard (rank 0, GPU 0)
and one member per group (rank g + 1, GPU g + 1), each its own process (torch.multiprocessing); the shard runs
`RemoteExperts` over `TorchTransport` exactly as a Serve shard does (plan, header, hidden, route and answer
all_to_alls, combine) on `--hop-tokens` (256) tokens with random top-k routing. The members answer at once
(each slot's row echoed, no expert math), so the time per layer, synchronised on the GPU, is dispatch+combine.
Target <= 200 us at 256 tokens with 2 groups. NCCL refuses two ranks of one communicator on one GPU
("Duplicate GPU detected"), so it needs groups + 1 GPUs. `--hop gloo` runs the same harness on CPU processes.
"""

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.integration.serving (Serve layouts)

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from experts.parallel_config import LAYER_PATH_ENV, ExpertParallelConfig  # noqa: E402
from mistral.config import ModelConfig  # noqa: E402
from mistral.presets import resolve_model  # noqa: E402

TARGET_THROUGHPUT, TARGET_SHARE, TARGET_HOP_US = 0.5, 0.25, 200.0
PROMPT_TOKENS, MAX_TOKENS = 128, 128
HOST = "127.0.0.1"


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
               "tokens": [o.outputs[0].token_ids for o in outs], "texts": [o.outputs[0].text for o in outs]}
        if backend:
            layers = backend.layer_seconds
            res |= {"layer_p50_s": percentile(layers, 0.5), "layer_p99_s": percentile(layers, 0.99),
                    "layer_mean_s": statistics.mean(layers), "layers_per_step": len(layers) / len(steps)}
        return res
    finally:
        llm.shutdown()


def make_prompts(model_dir: str, num_requests: int, seed: int = 0) -> list[list[int]]:
    """The benchmark's prompts: random token ids, the same in every process for one seed."""
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (num_requests, PROMPT_TOKENS), generator=gen).tolist()


def run_in_child(args, layout: str, seed: int = 0) -> dict:
    """One layout in a fresh process: the single-process engine with the default environment, the expert-parallel
    shard with `LAYER_PATH_ENV` (as msem's Ray actors get it), which must be set before torch loads OpenMP."""
    env = dict(os.environ, **({} if layout == "single" else LAYER_PATH_ENV))
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--model", args.model, "--groups", str(args.groups),
                        "--requests", str(args.requests), "--layout", layout, "--layout-json", out.name,
                        "--seed", str(seed)],
                       env=env, check=True)
        return json.load(open(out.name))


# ---- the Serve layouts ----

async def complete_all(port: int, model_name: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """The prompts as concurrent plain completions over HTTP; -> the response bodies, in prompt order."""
    import httpx2 as httpx

    body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=600, limits=limits) as http:
        replies = await asyncio.gather(*(http.post("/v1/completions", json={**body, "prompt": p}) for p in prompts))
    for reply in replies:
        reply.raise_for_status()
    return [reply.json() for reply in replies]


def run_serve_layout(args, transport: str) -> dict:
    """Deploy the app with `transport` on the layer path and warm it up; then per round, the single process on
    that round's prompts (a child, while the app idles) and the app on the same prompts."""
    from ray import serve

    from tests.integration.serving import deploy_and_wait, tiny_config

    config = tiny_config(model=args.model, attention={"num_cpus": args.shard_cpus},
                         expert_groups={"num_groups": args.groups, "transport": "grpc" if transport == "none" else
                                        transport, "num_cpus": args.group_cpus})
    if transport == "none":  # the reference: Serve's own overhead, with the experts inside the shard
        config = config.model_copy(update={"expert_groups": None})
    model_dir, rounds = str(resolve_model(args.model)), []
    deploy_and_wait(config, timeout=600)
    try:
        warm = [[1] + [100 + i] * 15 for i in range(2)]  # every process on the path, and a torch epoch formed
        asyncio.run(complete_all(config.http_port, config.model_name, warm, 4))
        for seed in range(1, args.rounds + 1):  # new prompts each round: no prefix-cache hits
            single = run_in_child(args, "single", seed)
            began = time.perf_counter()
            replies = asyncio.run(complete_all(config.http_port, config.model_name,
                                               make_prompts(model_dir, args.requests, seed), MAX_TOKENS))
            elapsed = time.perf_counter() - began
            tokens_per_s = sum(r["usage"]["completion_tokens"] for r in replies) / elapsed
            identical = sum(r["choices"][0]["text"] == text for r, text in zip(replies, single["texts"]))
            rounds.append({"single_tokens_per_s": single["tokens_per_s"], "tokens_per_s": tokens_per_s,
                           "ratio": tokens_per_s / single["tokens_per_s"], "identical": identical})
            log(f"  round {seed}: single {single['tokens_per_s']:.1f} tok/s, {transport} {tokens_per_s:.1f} tok/s")
    finally:
        serve.shutdown()
    return {"rounds": rounds, **{key: statistics.median(r[key] for r in rounds)
                                 for key in ("single_tokens_per_s", "tokens_per_s", "ratio")}}


def run_serve(args) -> dict:
    """Each Serve layout on one local Ray, paired round by round with the single process."""
    import ray

    ray.init(address="local", num_cpus=args.ray_cpus, namespace="msem", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        results = {}
        for transport in args.transports.split(","):
            log(f"running serve {transport} ...")
            results[f"serve {transport}"] = run_serve_layout(args, transport)
        return results
    finally:
        ray.shutdown()


def report_serve(args, results: dict) -> None:
    rows = ["| layout | tok/s (median) | single process, same rounds (median) | vs single (median of rounds) | "
            "per round: serve / single tok/s | text identical |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        per_round = ", ".join(f"{x['tokens_per_s']:.0f} / {x['single_tokens_per_s']:.0f}" for x in r["rounds"])
        same = sum(x["identical"] for x in r["rounds"])
        layout = f"{name}, {args.groups} groups" if name != "serve none" else "serve, experts in the shard"
        rows.append(f"| {layout} | {r['tokens_per_s']:.1f} | {r['single_tokens_per_s']:.1f} | "
                    f"{r['ratio']:.2f}x | {per_round} | {same}/{args.requests * len(r['rounds'])} |")
    print("\n".join(rows))
    best = max((n for n in results if n != "serve none"), key=lambda n: results[n]["ratio"])
    print(f"best Serve layout: {best}, {100 * results[best]['ratio']:.0f}% of single-process throughput "
          f"(target >= {100 * TARGET_THROUGHPUT:.0f}%)")
    if {"serve grpc", "serve torch"} <= set(results):
        grpc, torch_ = results["serve grpc"]["tokens_per_s"], results["serve torch"]["tokens_per_s"]
        print(f"torch / grpc tok/s: {torch_ / grpc:.2f}")


# ---- the torch transport's hop per layer (NCCL on GPUs, or gloo on CPU) ----

class EchoGroup:
    """A group replica that answers at once: each computed slot's row, unchanged (no expert math)."""

    def __init__(self, device: torch.device):
        self.device = device

    def forward(self, batch) -> torch.Tensor:
        return batch.hidden.repeat_interleave((batch.expert_ids >= 0).sum(1), dim=0)  # [A, H]


def hop_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    """One process of the hop benchmark: rank 0 is the shard, rank g + 1 the member of group g."""
    import datetime

    import torch.distributed as dist

    from router_service.torch_transport import TorchMember

    nccl = args.hop == "nccl"
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=datetime.timedelta(seconds=600))
    if rank == 0:
        store.set("result", json.dumps(hop_shard(args, port, device)))
        store.set("done", "1")
        return
    member = TorchMember(EchoGroup(device), f"g{rank - 1}", HOST, port, "hop", heartbeat_interval=0.25)
    member.start()
    store.wait(["done"])
    member.stop()


def hop_shard(args, port: int, device: torch.device) -> dict:
    """Time `RemoteExperts` over `TorchTransport` per layer, synchronised on the device."""
    from experts.placement import make_placement
    from mistral.moe import route
    from router_service.remote_experts import RemoteExperts, RouterClient
    from router_service.routing_table import TableSnapshot
    from router_service.torch_transport import TorchTransport
    from router_service.transport import ReplicaInfo

    model = ModelConfig.from_dir(str(resolve_model(args.model)))
    placement = make_placement(model.num_experts, model.num_layers, args.groups, "linear")
    replicas = [ReplicaInfo(f"g{g}", g) for g in range(args.groups)]
    table = TableSnapshot(1, placement, {g: (replicas[g],) for g in range(args.groups)})
    transport = TorchTransport(HOST, port, "hop", lambda: replicas, timeout=60.0, join_timeout=120.0)
    experts = RemoteExperts(transport, RouterClient(get_table=lambda known: None if known == table.version else table))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.hop_tokens, model.hidden_size, generator=gen).to(device, getattr(torch, args.hop_dtype))
    weights, expert_ids = route(torch.randn(args.hop_tokens, model.num_experts, generator=gen),
                                model.num_experts_per_tok)
    weights, expert_ids = weights.to(device), expert_ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    try:
        for i in range(args.hop_warmup + args.hop_layers):
            layer = i % model.num_layers
            if layer == 0:
                experts.begin_step()
            sync()
            began = time.perf_counter()
            experts(layer, hidden, expert_ids, weights)
            sync()
            if i >= args.hop_warmup:
                seconds.append(time.perf_counter() - began)
            if layer == model.num_layers - 1:
                experts.end_step()
    finally:
        experts.close()
    return {"backend": args.hop, "device": str(device), "tokens": args.hop_tokens, "groups": args.groups,
            "hidden": model.hidden_size, "dtype": args.hop_dtype, "layers": len(seconds), "epochs": transport.epoch,
            "p50_us": 1e6 * percentile(seconds, 0.5), "p99_us": 1e6 * percentile(seconds, 0.99),
            "mean_us": 1e6 * statistics.mean(seconds)}


def run_hop(args) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    world = args.groups + 1
    if args.hop == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise SystemExit(f"--hop nccl needs CUDA GPUs and a CUDA build of torch with NCCL (this is torch "
                             f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}); "
                             "--hop gloo runs the same harness on CPU")
        if torch.cuda.device_count() < world:
            raise SystemExit(f"--hop nccl runs 1 shard + {args.groups} group members, one GPU each: {world} GPUs. "
                             "NCCL refuses two ranks of one communicator on one GPU ('Duplicate GPU detected'); "
                             f"this machine has {torch.cuda.device_count()}. Use fewer --groups or more GPUs")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)  # the session's store, served here
    os.environ.update(LAYER_PATH_ENV)  # the ranks' environment, as msem's layer-path actors get it
    mp.spawn(hop_rank, args=(args, store.port), nprocs=world, join=True)
    return json.loads(store.get("result"))


def report_hop(r: dict) -> None:
    print(f"torch transport over {r['backend']} ({r['device']} shard), {r['groups']} groups, {r['tokens']} tokens, "
          f"hidden {r['hidden']} {r['dtype']}, {r['layers']} layers timed: dispatch+combine per layer "
          f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, mean {r['mean_us']:.0f} us "
          f"(target <= {TARGET_HOP_US:.0f} us on GPUs); {r['epochs']} epoch(s) formed")


# ---- the in-process layouts ----

def run_layouts(args) -> dict:
    results = {}
    for name in ["single", *args.transports.split(",")]:
        log(f"running {name} ...")
        results[name] = run_in_child(args, name)
        log(f"  {results[name]['tokens_per_s']:.1f} tok/s")
    return results


def report_layouts(args, results: dict) -> None:
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="preset or checkpoint directory (default: bench; tiny with --serve)")
    p.add_argument("--transports", help="default: local,ray,grpc,torch; grpc,torch with --serve, where none adds "
                   "the app without expert groups (experts in the shard) as a reference")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--serve", action="store_true", help="the Serve layouts over HTTP instead of in-process ones")
    p.add_argument("--ray-cpus", type=int, default=4, help="CPUs of the local Ray that --serve starts")
    p.add_argument("--shard-cpus", type=float, default=0.5, help="--serve: num_cpus of the shard (its torch threads: "
                   "max(1, floor(num_cpus)))")
    p.add_argument("--group-cpus", type=float, default=0.25, help="--serve: num_cpus of each group replica")
    p.add_argument("--rounds", type=int, default=3, help="--serve: measured rounds per layout")
    p.add_argument("--hop", choices=["nccl", "gloo"], help="only time the torch transport's hop per layer")
    p.add_argument("--hop-tokens", type=int, default=256)
    p.add_argument("--hop-dtype", default="bfloat16")
    p.add_argument("--hop-layers", type=int, default=2000, help="layers timed, after --hop-warmup untimed ones")
    p.add_argument("--hop-warmup", type=int, default=200)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--layout", help=argparse.SUPPRESS)  # run one layout, in the child process
    p.add_argument("--layout-json", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the child's prompts
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.serve else "bench")
    args.transports = args.transports or ("grpc,torch" if args.serve else "local,ray,grpc,torch")
    if args.layout is not None:
        model_dir = str(resolve_model(args.model))
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        transport = None if args.layout == "single" else args.layout
        with open(args.layout_json, "w") as f:
            json.dump(run_layout(model_dir, transport, make_prompts(model_dir, args.requests, args.seed), params,
                                 args.groups), f)
        return

    load_before = os.getloadavg()[0]
    if args.hop:
        results = run_hop(args)
        report_hop(results)
    elif args.serve:
        results = run_serve(args)
        report_serve(args, results)
    else:
        results = run_layouts(args)
        report_layouts(args, results)
    print(f"1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("command:", shlex.join([".venv/bin/python", "benchmarks/expert_parallel.py",
                                  *(sys.argv[1:] if argv is None else argv)]))
    if args.json:
        for r in results.values() if not (args.hop or args.serve) else ():
            r.pop("tokens")
            r.pop("texts")
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
