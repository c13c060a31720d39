"""Serving overhead: the Serve application over HTTP against the in-process engine, for the same work.

    .venv/bin/python benchmarks/serve_load.py [--model tiny] [--concurrency 1 8 32] [--json out.json]

For each concurrency C, C clients each send `--requests` streaming completions one after another (prompt of
`--prompt-tokens` tokens, `--max-tokens` new tokens, greedy, EOS ignored so every request does the same work).
Measured per layout: requests/s, time to first token (TTFT) p50/p99 and inter-token latency (ITL, the gaps
between streamed chunks) p50/p99. Layouts, all in one run:

- `engine`: `AsyncLLM` in this process, the same C concurrent streams (no HTTP, no Serve): the baseline. It
  runs with `--threads` torch threads (1), as many as Ray gives the shard (OMP_NUM_THREADS = its num_cpus).
- `serve`: the Serve application (Ingress -> AttentionShard, experts inside the shard) over HTTP SSE, its deltas
  coalesced over the default `stream_interval_s`.
- `serve-each-step`: the same with `stream_interval_s` 0 (each engine step's delta crosses as its own message).
- `serve+ep2`: `serve` with two expert group deployments over gRPC (adds the per-layer hop).

`--layouts` picks which of the three run (all by default); the engine baseline always runs.

Ratios are layout / engine: requests/s below 1 and latencies above 1 are the serving overhead.
"""

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2 as httpx  # noqa: E402
import torch  # noqa: E402  (the openai client's HTTP library)

from cluster.config import ServeConfig  # noqa: E402
from engine import AsyncLLM, SamplingParams  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(elapsed: float, num_requests: int, ttft: list[float], itl: list[float]) -> dict:
    return {"requests_per_s": num_requests / elapsed, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99), "itl_p50_ms": 1e3 * statistics.median(itl),
            "itl_p99_ms": 1e3 * _percentile(itl, 0.99)}


async def _clients(concurrency: int, requests: int, one) -> dict:
    """Run `concurrency` clients of `requests` sequential requests; `one()` -> (ttft, [itl gaps])."""
    ttft, itl = [], []

    async def client():
        for _ in range(requests):
            first, gaps = await one()
            ttft.append(first)
            itl.extend(gaps)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return _summary(time.perf_counter() - start, concurrency * requests, ttft, itl)


async def _timed(chunks: AsyncIterator) -> tuple[float, list[float]]:
    """(seconds to the first chunk, gaps between the following ones) of one streamed request."""
    start = last = time.perf_counter()
    first, gaps = None, []
    async for _ in chunks:
        now = time.perf_counter()
        if first is None:
            first = now - start
        else:
            gaps.append(now - last)
        last = now
    return first, gaps


def _engine_request(llm: AsyncLLM, prompt_ids: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return _timed(llm.add_request(prompt_ids, params))


async def _http_request(http: httpx.AsyncClient, prompt_ids: list[int], max_tokens: int):
    body = {"model": "bench", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}

    async def events():
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield line
    return await _timed(events())


def run_engine(args, prompt_ids) -> dict:
    torch.set_num_threads(args.threads)
    llm = AsyncLLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, progress=False)
    try:
        asyncio.run(_clients(1, 1, lambda: _engine_request(llm, prompt_ids, 4)))  # warm-up
        return {c: asyncio.run(_clients(c, args.requests, lambda: _engine_request(llm, prompt_ids, args.max_tokens)))
                for c in args.concurrency}
    finally:
        llm.shutdown()


def run_serve(args, prompt_ids, expert_groups: int | None, stream_interval_s: float | None = None) -> dict:
    from ray import serve

    from cluster.app import deploy
    from cluster.serve_command import wait_until_healthy

    port = _free_port()
    config = ServeConfig.model_validate({
        "model": args.model, "served_model_name": "bench", "max_model_len": args.max_model_len,
        "http_port": port, "grpc_port": None, "dtype": "float32",
        "expert_groups": {"num_groups": expert_groups, "num_cpus": 0} if expert_groups else None,
        "attention": {"num_cpus": 0},
        **({} if stream_interval_s is None else {"stream_interval_s": stream_interval_s})})
    deploy(config)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, timeout=600)

    async def load(concurrency: int, max_tokens: int, requests: int) -> dict:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
            return await _clients(concurrency, requests, lambda: _http_request(http, prompt_ids, max_tokens))

    try:
        asyncio.run(load(1, 4, 1))  # warm-up
        return {c: asyncio.run(load(c, args.max_tokens, args.requests)) for c in args.concurrency}
    finally:
        serve.shutdown()


LAYOUTS = {"serve": (None,), "serve-each-step": (None, 0.0), "serve+ep2": (2,)}  # expert groups, stream interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the engine baseline: what a shard with num_cpus <= 1 gets from Ray")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--stream-interval", type=float, help="the serve layouts' stream_interval_s (default: the "
                        "config's); serve-each-step keeps 0")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    prompt_ids = [1] + [100 + i % 1000 for i in range(args.prompt_tokens - 1)]
    results = {"engine": run_engine(args, prompt_ids)}
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="msem")
    try:
        for layout in args.layouts:
            groups, interval = (*LAYOUTS[layout], args.stream_interval)[:2]
            results[layout] = run_serve(args, prompt_ids, groups, interval)
    finally:
        ray.shutdown()
    print(f"{'layout':<16}{'C':>4}{'req/s':>9}{'ratio':>7}{'TTFT p50':>10}{'p99':>8}{'ratio':>7}"
          f"{'ITL p50':>9}{'p99':>8}{'ratio':>7}   (ms; ratio = layout / engine)")
    for layout, by_c in results.items():
        for c, r in by_c.items():
            base = results["engine"][c]
            print(f"{layout:<16}{c:>4}{r['requests_per_s']:>9.2f}{r['requests_per_s'] / base['requests_per_s']:>7.2f}"
                  f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}{r['ttft_p50_ms'] / base['ttft_p50_ms']:>7.2f}"
                  f"{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}{r['itl_p50_ms'] / base['itl_p50_ms']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
