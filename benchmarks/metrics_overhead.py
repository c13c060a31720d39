"""The cost of metrics: decode tokens/s of an in-process engine with every metrics hook on vs off, in one run.

    .venv/bin/python benchmarks/metrics_overhead.py [--model tiny] [--rounds 6] [--concurrency 8]

The engine runs the expert-parallel layer path in this process (`LLM(expert_parallel=...)`, local transport:
`RemoteExperts` dispatching to two expert groups), behind the same `Frontend` the servers use, with a local Ray
started so that the metrics reach Ray's real recorder. "on" is what a deployed shard and ingress do:

- the frontend records per request and per streamed delta (TTFT, inter-token latency, tokens, finish reasons);
- a publisher thread samples the engine once a second (`EngineMetrics`);
- `RemoteExperts` hands its layer-path stats to `ExpertMetrics` once a second.

"off" is the same frontend with `record_metrics=False`, no publisher and no stats sink. Rounds alternate
on/off in an ABBA order (on, off, off, on, ...) so that drift of a shared machine cancels; each round runs
`--concurrency` streams of `--max-tokens` greedy tokens (EOS ignored) from short prompts, so the time is
decode. Printed: tokens/s per round, the median of each side, and on/off (target >= 0.98).

On a small shared machine the rounds vary by more than the effect, so the "on" rounds also time every metrics
hook (the frontend's per-request and per-delta calls, the engine sampler, the stats sink, and the per-send
tally `RemoteExperts` keeps only when it has a sink): their total over the wall time bounds the share of decode
spent on metrics (from above: it includes waits for the GIL), and noise does not blur it.
"""

import argparse
import asyncio
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import metrics  # noqa: E402
from cluster.frontend import Frontend, LocalShards  # noqa: E402
from actors.metrics import EngineMetrics, ExpertMetrics, publish_every  # noqa: E402
from engine import LLM, AsyncLLM, SamplingParams  # noqa: E402
from experts.parallel_config import ExpertParallelConfig  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class HookTime:
    """Seconds spent inside the wrapped calls, summed over threads."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


async def one_round(frontend: Frontend, concurrency: int, max_tokens: int) -> float:
    """Generated tokens/s of `concurrency` concurrent streams."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def stream(i: int) -> int:
        tokens = 0
        async for delta in frontend.generate(frontend.encode(f"Count to {i}:"), params):
            tokens += sum(len(o.token_ids) for o in delta.outputs)
        return tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(stream(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side (even: ABBA order)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    llm = LLM(args.model, dtype="float32", max_model_len=512, progress=False,
              expert_parallel=ExpertParallelConfig(num_groups=2, transport="local"))
    backend = llm.expert_runtime.backend
    async_llm = AsyncLLM.from_llm(llm)
    vocab = llm.engine.model.config.vocab_size
    frontends = {on: Frontend(args.model, async_llm.tokenizer, async_llm.max_model_len, vocab,
                              LocalShards(async_llm), record_metrics=on) for on in (True, False)}
    hooks, tally = HookTime(), HookTime()
    backend._tally = tally.wrap(backend._tally)  # the layer path's per-send stats, gathered only with a sink
    for cls, name in ((metrics.ServingMetrics, "start"), (metrics.RequestTimer, "observe"),
                      (metrics.RequestTimer, "close")):
        setattr(cls, name, hooks.wrap(getattr(cls, name)))
    engine_metrics = EngineMetrics(args.model, "bench")
    sample_engine, expert_sink = hooks.wrap(lambda: engine_metrics.publish(async_llm.stats())), \
        hooks.wrap(ExpertMetrics())
    wall = {True: 0.0, False: 0.0}

    def run(on: bool) -> float:
        backend.stats_sink = expert_sink if on else None
        stop = publish_every(1.0, sample_engine, "bench-metrics") if on else None
        t0 = time.perf_counter()
        try:
            return asyncio.run(one_round(frontends[on], args.concurrency, args.max_tokens))
        finally:
            wall[on] += time.perf_counter() - t0
            if stop is not None:
                stop.set()

    run(True)  # warm-up: first-call costs on both paths
    run(False)
    hooks.seconds, tally.seconds, wall[True] = 0.0, 0.0, 0.0
    results: dict[bool, list[float]] = {True: [], False: []}
    order = [i % 4 in (0, 3) for i in range(2 * args.rounds)]  # on, off, off, on, ...
    for i, on in enumerate(order):
        results[on].append(run(on))
        log(f"round {i + 1:>2}/{len(order)}  metrics {'on ' if on else 'off'}  {results[on][-1]:8.1f} tok/s")
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"decode tokens/s, median of {args.rounds} rounds each ({args.model}, {args.concurrency} streams x "
          f"{args.max_tokens} tokens, expert-parallel layer path in-process):")
    print(f"  metrics on   {on:8.1f}   rounds {' '.join(f'{x:.0f}' for x in results[True])}")
    print(f"  metrics off  {off:8.1f}   rounds {' '.join(f'{x:.0f}' for x in results[False])}")
    print(f"  on / off     {on / off:8.4f}   (cost {100 * (1 - on / off):+.2f}%; target <= 2%)")
    for what, seconds in (("frontend, samplers and stats sink (actors/metrics.py)", hooks.seconds),
                          ("per-send tally of RemoteExperts", tally.seconds)):
        print(f"  time inside {what}: {seconds:.3f} s of {wall[True]:.1f} s of 'on' rounds "
              f"({100 * seconds / wall[True]:.2f}%)")
    async_llm.shutdown()
    llm.expert_runtime.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
