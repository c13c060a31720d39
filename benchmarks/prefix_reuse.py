"""Prefix reuse through the KV tiers: time to first token per tier, and a multi-turn chat workload under Serve.

    .venv/bin/python benchmarks/prefix_reuse.py [--model bench] [--prefix-tokens 4096] [--json out.json]

Part 1, TTFT of a shared prefix (`--prefix-tokens`) plus a short suffix, in one run, in-process engines over a
MemoryStore that runs as a Ray actor (its blocks travel as Ray call arguments and results, the object store
path the Serve deployment uses), with a disk tier in a temporary directory, write-through:

- cold: engine A computes everything;
- T0 hit: A again (its device pool holds the prefix);
- T1 hit: A after two other prompts of the same length evicted the prefix from its pool to its host RAM;
- T2 hit from another shard: a fresh engine B, whose pool and host RAM are empty, loads it from the store;
- disk hit: the store restarted (empty RAM) and a fresh engine C loads it from the store's disk.

Each figure is one request with `max_tokens=1` (prefill plus one token); the suffix differs per request, so
its tokens are always computed. Target: a T2 hit <= 25% of cold.

Part 2 (`--chats`, skipped with `--chats 0`): `--chats` conversations of `--turns` turns run concurrently
against the Serve application with two attention shards; each turn sends the whole conversation so far plus
`--turn-tokens` new tokens and streams `--max-tokens` tokens. Four deployments, one after another: with and
without the memory tiers (host RAM + MemoryStore), each with KV-aware routing and with Serve's power-of-two
routing. Printed: generated tokens/s, TTFT p50/p99, and the share of prompt tokens served from a cache.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2 as httpx  # noqa: E402

from benchmarks.serve_load import _free_port, _percentile  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30_000) for _ in range(n)]


def ttft(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=ONE)[0]
    seconds = time.perf_counter() - start
    log(f"  {len(prompt)} tokens, {out.num_cached_tokens} cached: {seconds * 1e3:.0f} ms")
    return seconds


def run_tiers(args) -> dict:
    import ray

    from actors.memory_store import MemoryStore

    block_bytes = args.kv_bytes_per_token * 16
    prefix_bytes = args.prefix_tokens * args.kv_bytes_per_token
    store_actor = ray.remote(MemoryStore)
    with tempfile.TemporaryDirectory() as disk:
        def start_store():
            handle = store_actor.options(num_cpus=0).remote(4 * prefix_bytes, disk, 4 * prefix_bytes,
                                                            "write-through")
            ray.get(handle.describe.remote())  # started: its start-up is not part of any figure
            return handle

        store = start_store()

        def call(method, *a):
            return ray.get(getattr(store, method).remote(*a), timeout=60)

        def engine() -> LLM:  # a pool that holds 1.5 prompts: two more evict the first
            return LLM(args.model, dtype="float32", max_model_len=args.prefix_tokens + 64,
                       kv_cache_memory=int(1.5 * (prefix_bytes + 4 * block_bytes)),
                       host_kv_cache_memory=4 * prefix_bytes, kv_write_policy="write-through",
                       memory_store_call=call, progress=False)

        rng = random.Random(0)
        prefix = ids(rng, args.prefix_tokens)
        a = engine()
        ttft(a, ids(rng, 64))  # warm-up
        figures = {"cold": ttft(a, prefix + ids(rng, 16)), "t0": ttft(a, prefix + ids(rng, 16))}
        for _ in range(2):
            a.generate(prompt_token_ids=[ids(rng, args.prefix_tokens)], sampling_params=ONE)
        figures["t1"] = ttft(a, prefix + ids(rng, 16))
        a.shutdown()
        b = engine()
        figures["t2"] = ttft(b, prefix + ids(rng, 16))
        b.shutdown()
        ray.kill(store)
        store = start_store()  # the same directory: RAM empty, disk kept
        c = engine()
        figures["disk"] = ttft(c, prefix + ids(rng, 16))
        c.shutdown()
    return figures


def run_chats(args, memory: bool, kv_aware: bool) -> dict:
    from ray import serve

    from cluster.app import deploy
    from cluster.config import ServeConfig
    from cluster.serve_command import wait_until_healthy

    port = _free_port()
    config = ServeConfig.model_validate({
        "model": args.model, "served_model_name": "bench", "max_model_len": args.max_model_len, "dtype": "float32",
        "http_port": port, "grpc_port": None, "expert_groups": None, "ingress_replicas": 1,
        "attention": {"num_cpus": 0, "replicas": {"min": 2, "max": 2},
                      "routing": {"policy": "kv-aware" if kv_aware else "power-of-two",
                                  "max_imbalance": args.max_imbalance}},
        "memory": {"host_bytes": 1 << 30, "write_policy": "write-through"} if memory else None})
    deploy(config)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, timeout=600)
    first_chunk, prompt_tokens, cached_tokens, generated = [], [], [], [0]
    lock = threading.Lock()

    async def chat(http: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        prompt = ids(rng, args.turn_tokens * 2)
        for _ in range(args.turns):
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"]:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            with lock:
                first_chunk.append(first)
                prompt_tokens.append(usage["prompt_tokens"])
                cached_tokens.append(usage["prompt_tokens_details"]["cached_tokens"])
                generated[0] += usage["completion_tokens"]
            prompt = prompt + ids(rng, args.turn_tokens)

    async def workload() -> float:
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            start = time.perf_counter()
            await asyncio.gather(*(chat(http, seed) for seed in range(args.chats)))
            return time.perf_counter() - start

    try:
        elapsed = asyncio.run(workload())
    finally:
        serve.shutdown()
    return {"tokens_per_s": generated[0] / elapsed, "ttft_p50_ms": 1e3 * statistics.median(first_chunk),
            "ttft_p99_ms": 1e3 * _percentile(first_chunk, 0.99),
            "cached_share": sum(cached_tokens) / sum(prompt_tokens), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--prefix-tokens", type=int, default=4096)
    parser.add_argument("--kv-bytes-per-token", type=int, default=8 << 10,
                        help="the model's fp32 KV bytes per token (bench: 8 layers x k/v x 2 heads x 64 x 4)")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-imbalance", type=int, default=1, help="attention.routing.max_imbalance")
    parser.add_argument("--skip-ttft", action="store_true", help="only the multi-turn chats")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="msem")
    results: dict = {}
    try:
        if not args.skip_ttft:
            log("TTFT per tier")
            results["ttft_s"] = run_tiers(args)
        if args.chats:
            for memory in (True, False):
                for kv_aware in (True, False):
                    name = f"{'tiers' if memory else 'no tiers'}, {'kv-aware' if kv_aware else 'power-of-two'}"
                    log(f"multi-turn chats: {name}")
                    results.setdefault("chats", {})[name] = run_chats(args, memory, kv_aware)
    finally:
        ray.shutdown()
    if "ttft_s" in results:
        cold = results["ttft_s"]["cold"]
        print(f"TTFT, {args.prefix_tokens}-token prefix + 16 tokens ({args.model}):")
        for state, seconds in results["ttft_s"].items():
            print(f"  {state:<5} {seconds * 1e3:9.0f} ms  {seconds / cold:6.3f} x cold")
    for name, r in results.get("chats", {}).items():
        print(f"{name:<27} {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.0f} ms  "
              f"p99 {r['ttft_p99_ms']:7.0f} ms  cached {100 * r['cached_share']:5.1f}% of prompt tokens")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
