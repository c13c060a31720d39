"""Serving overhead: the Serve application over HTTP against the in-process engine, for the same work.

    .venv/bin/python benchmarks/serve_load.py [--model tiny] [--concurrency 1 8 32] [--rounds 3] [--json out.json]

For each concurrency C, C clients each send `--requests` streaming completions one after another (prompt of
`--prompt-tokens` tokens, `--max-tokens` new tokens, greedy, EOS ignored so every request does the same work).
Measured per layout: requests/s, time to first token (TTFT) p50/p99 and inter-token latency (ITL, the gaps
between streamed chunks) p50/p99. Layouts, all in one run:

- `engine`: `AsyncLLM` with the same C concurrent streams in one process (no HTTP, no Serve, no Ray): the
  baseline. It runs with `--threads` torch threads (1), as many as Ray gives the shard (OMP_NUM_THREADS = its
  num_cpus).
- `serve`: the Serve application (Ingress -> AttentionShard, experts inside the shard) over HTTP SSE, its deltas
  coalesced over the default `stream_interval_s`.
- `serve-each-step`: the same with `stream_interval_s` 0 (each engine step's delta crosses as its own message).
- `serve+ep2`: `serve` with two expert group deployments over gRPC (adds the per-layer hop).
- `serve-floor`: Ray Serve's own cost of the same path, without msem: the same request through Serve's proxy to
  a FastAPI ingress deployment, which streams SSE from a handle call to a second deployment that yields the
  requested number of one-token items at once (no tokenizer, no model, no msem code). Its TTFT is the least any
  application with this path can reach on the machine.

`--layouts` picks which of them run (all by default); the engine baseline always runs. The machine's speed
drifts over minutes, so the engine and a layout alternate in `--rounds` rounds (engine first in even rounds,
the layout first in odd ones), and each figure is the median over rounds; a ratio is the median of the rounds'
ratios, each between an engine round and the layout round next to it.

Ratios are layout / engine: requests/s below 1 and latencies above 1 are the serving overhead. For each layout,
the CPU time of Serve's processes on this machine (the proxy, each deployment's replicas together) and of the load
generator (`client`) is reported per request, also a median over rounds.
"""

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2 as httpx  # noqa: E402  (the openai client's HTTP library)
import psutil  # noqa: E402
import torch  # noqa: E402

from cluster.app import deploy, init_local_ray  # noqa: E402
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


def _engine_process(conn, args, prompt_ids: list[int]) -> None:
    torch.set_num_threads(args.threads)
    llm = AsyncLLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, progress=False)
    try:
        while (job := conn.recv()) is not None:
            concurrency, max_tokens, requests = job
            conn.send(asyncio.run(_clients(concurrency, requests,
                                           lambda: _engine_request(llm, prompt_ids, max_tokens))))
    finally:
        llm.shutdown()


@contextlib.contextmanager
def engine_load(args, prompt_ids: list[int]):
    """Yields `load(concurrency, max_tokens, requests) -> summary` of the engine with its clients in one process,
    a process without Ray (Ray's threads in this one would take the interpreter lock from the engine's)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_engine_process, args=(theirs, args, prompt_ids), daemon=True)
    process.start()

    def load(concurrency: int, max_tokens: int, requests: int) -> dict:
        ours.send((concurrency, max_tokens, requests))
        return ours.recv()
    try:
        yield load
    finally:
        ours.send(None)
        process.join(60)


@contextlib.contextmanager
def serve_load(args, prompt_ids, expert_groups: int | None, stream_interval_s: float | None = None):
    """Deploys the layout; yields its `load(concurrency, max_tokens, requests) -> summary` over HTTP."""
    from ray import serve

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
    try:
        yield _http_load(base, prompt_ids)
    finally:
        serve.shutdown()


@contextlib.contextmanager
def floor_load(prompt_ids: list[int]):
    """Deploys the `serve-floor` stub application with msem's Serve settings; yields its `load`."""
    from fastapi import FastAPI
    from ray import serve
    from sse_starlette import EventSourceResponse

    from cluster.app import SERVE_ENV

    api = FastAPI()
    options = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": SERVE_ENV}},
               "max_ongoing_requests": 1024}

    @serve.deployment(**options)
    class Tokens:
        async def stream(self, n: int):
            for i in range(n):
                yield {"index": i, "text": " x"}

    @serve.deployment(**options)
    @serve.ingress(api)
    class Edge:
        def __init__(self, tokens):
            self.tokens = tokens.options(stream=True)

        @api.post("/v1/completions")
        async def completions(self, body: dict):
            async def events():
                async for item in self.tokens.stream.remote(body["max_tokens"]):
                    yield json.dumps({"choices": [item]})
                yield "[DONE]"
            return EventSourceResponse(events(), sep="\n")

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Edge.bind(Tokens.bind()), name="floor", route_prefix="/")
    try:
        yield _http_load(f"http://127.0.0.1:{port}", prompt_ids)
    finally:
        serve.shutdown()


def _http_load(base: str, prompt_ids: list[int]):
    async def load(concurrency: int, max_tokens: int, requests: int) -> dict:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
            return await _clients(concurrency, requests, lambda: _http_request(http, prompt_ids, max_tokens))
    return lambda c, max_tokens, requests: asyncio.run(load(c, max_tokens, requests))


def _serve_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of Serve's processes on this machine and of this one (`client`, the load
    generator); a Serve process's role is `proxy` or the replica's deployment."""
    times = psutil.Process().cpu_times()
    found = {os.getpid(): ("client", times.user + times.system)}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or ()).split()
        if not title:
            continue
        if title[0].startswith("ray::ProxyActor"):
            role = "proxy"
        elif title[0].startswith("ray::ServeReplica:"):
            role = title[0].split(":")[-1].split(".")[0]  # ray::ServeReplica:<app>:<deployment>[.<method>]
        else:
            continue
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = (role, times.user + times.system)
    return found


def _with_cpu(load):
    """`load`, its summary with the CPU milliseconds per request each Serve role spent meanwhile."""
    def measured(concurrency: int, max_tokens: int, requests: int) -> dict:
        before = _serve_cpu()
        summary = load(concurrency, max_tokens, requests)
        spent = collections.Counter()
        for pid, (role, seconds) in _serve_cpu().items():
            if pid in before:  # a replica started meanwhile has no share of this load to report
                spent[role] += seconds - before[pid][1]
        return summary | {f"cpu_ms/req {role}": 1e3 * seconds / (concurrency * requests)
                          for role, seconds in sorted(spent.items())}
    return measured


def alternate(args, engine, layout) -> tuple[dict, dict]:
    """Per concurrency, `args.rounds` rounds of the engine and the layout, alternating which goes first:
    ({C: engine figures}, {C: layout figures with the median ratios to the engine})."""
    engine(1, 4, 1), layout(1, 4, 1)  # warm-up
    by_engine, by_layout = {}, {}
    for c in args.concurrency:
        rounds = []
        for r in range(args.rounds):
            first, second = (engine, layout) if r % 2 == 0 else (layout, engine)
            a, b = first(c, args.max_tokens, args.requests), second(c, args.max_tokens, args.requests)
            rounds.append((a, b) if r % 2 == 0 else (b, a))
        by_engine[c] = _median(e for e, _ in rounds)
        by_layout[c] = _median(s for _, s in rounds) | {
            f"{key}_ratio": statistics.median(s[key] / e[key] for e, s in rounds) for key in RATIOS}
    return by_engine, by_layout


RATIOS = ("requests_per_s", "ttft_p50_ms", "itl_p50_ms")


def _median(summaries) -> dict:
    summaries = list(summaries)
    return {key: statistics.median(s[key] for s in summaries if key in s) for key in summaries[0]}


LAYOUTS = {"serve": (None,), "serve-each-step": (None, 0.0), "serve+ep2": (2,),  # expert groups, stream interval
           "serve-floor": None}


def _print(results: dict) -> None:
    print(f"{'layout':<24}{'C':>4}{'req/s':>9}{'ratio':>7}{'TTFT p50':>10}{'p99':>8}{'ratio':>7}"
          f"{'ITL p50':>9}{'p99':>8}{'ratio':>7}   (ms; medians over rounds; ratio = layout / engine)")
    for layout, by_c in results.items():
        for c, r in by_c.items():
            ratios = [r.get(f"{key}_ratio", 1.0) for key in RATIOS]
            print(f"{layout:<24}{c:>4}{r['requests_per_s']:>9.2f}{ratios[0]:>7.2f}{r['ttft_p50_ms']:>10.1f}"
                  f"{r['ttft_p99_ms']:>8.1f}{ratios[1]:>7.2f}{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}"
                  f"{ratios[2]:>7.2f}")
    print("CPU ms per request of Serve's processes and of the load generator (medians over rounds):")
    for layout, by_c in results.items():
        for c, r in by_c.items():
            cpu = {key.split(" ", 1)[1]: ms for key, ms in r.items() if key.startswith("cpu_ms/req ")}
            if cpu:
                print(f"{layout:<24}{c:>4}   " + "  ".join(f"{role} {ms:.1f}" for role, ms in cpu.items()))


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
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the engine and each layout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    prompt_ids = [1] + [100 + i % 1000 for i in range(args.prompt_tokens - 1)]
    results = {}
    with engine_load(args, prompt_ids) as engine:
        init_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)  # with msem's Serve settings
        try:
            for layout in args.layouts:
                if LAYOUTS[layout] is None:
                    deployed = floor_load(prompt_ids)
                else:
                    groups, interval = (*LAYOUTS[layout], args.stream_interval)[:2]
                    deployed = serve_load(args, prompt_ids, groups, interval)
                with deployed as load:
                    results[f"engine ({layout})"], results[layout] = alternate(args, engine, _with_cpu(load))
        finally:
            ray.shutdown()
            _print(results)  # what ran, also when a layout failed
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
