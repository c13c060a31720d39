"""The stall of running streams when every replica of one expert group is SIGKILLed, under Serve (CPU).

    .venv/bin/python benchmarks/group_loss.py [--transports grpc,torch] [--cover off on] [--period-s 1]
                                              [--json loss.json]

For each transport, with and without covering lost groups (`expert_groups.rebalance.cover_lost_groups`: off,
the streams wait for Serve's replacement; on, group 1 takes group 0's experts until it is back): deploy the
tiny preset with 2 expert groups, group 0 with 2 replicas (`group_replicas: {0: {min: 2, max: 2}}`), and the
expert groups' health-check period `--period-s` (1 s, the default), on a local Ray started here (loopback
ports). Run `--streams` streamed greedy completions once
without a fault (the reference texts, and the longest gap between chunks without a fault), then `--kills` times:
start the same streams, SIGKILL both replicas of ExpertGroup0 once every stream has had two chunks, and record
per stream the longest gap between chunks (its stall). Every stream must complete with the reference text.

The stall, broken down (seconds after the kill), from two pollers running every `--poll-s`:
- `dropped`: neither killed replica is listed for group 0 at `/v1/experts` (a shard reported the failure and
  the router's liveness check found them dead);
- `new actor`: the GCS lists a new actor of ExpertGroup0, in any state (Serve decided to replace them);
- `alive`: that actor is ALIVE (its process runs; the deployment's constructor may still be loading);
- `registered`: a new replica of group 0 is listed at `/v1/experts` (first, and both);
- `covered`: the active placement gives group 0 no experts (group 1 holds them); `home`: it gives group 0
  its experts again (cover on only);
- `resumed`: the end of the streams' stalls (their first chunk after it; the median over streams).
The shard's own account (`AttentionShard.failover_stats`): the longest MoE layer held up by the failover.
Target: a stall of at most 3 s on the tiny preset. The pollers cost some CPU; the machine has 2 cores.
"""

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2 as httpx  # noqa: E402

from tests.integration.serving import kill_replicas, tiny_config  # noqa: E402

GROUP, DEPLOYMENT = 0, "ExpertGroup0"
TARGET_STALL_S = 3.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def stream(http: httpx.AsyncClient, prompt: str, max_tokens: int, chunk_times: list[float]) -> tuple[str, str]:
    """One streamed greedy completion; appends each chunk's arrival time. -> (text, finish reason)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, finish = "", None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk_times.append(time.monotonic())
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice.get("finish_reason") or finish
    return text, finish


async def run_streams(port: int, prompts: list[str], max_tokens: int, kill_after_chunks: int | None = None):
    """The streams, concurrently; with `kill_after_chunks`, SIGKILL group 0's replicas once every stream has that
    many chunks. -> (texts and finish reasons, chunk times per stream, kill time or None)."""
    times: list[list[float]] = [[] for _ in prompts]
    killed: list[float] = []

    async def killer():
        while min(len(t) for t in times) < kill_after_chunks:
            await asyncio.sleep(0.005)
        killed.append(time.monotonic())
        pids = await asyncio.to_thread(kill_replicas, DEPLOYMENT)
        log(f"  killed {DEPLOYMENT} pids {pids}")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        tasks = [stream(http, p, max_tokens, t) for p, t in zip(prompts, times)]
        if kill_after_chunks is not None:
            tasks.append(killer())
        outs = await asyncio.gather(*tasks)
    return outs[:len(prompts)], times, (killed[0] if killed else None)


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def gap_end(times: list[float]) -> float:
    """When the longest gap between chunks ended: the stream's first chunk after its stall."""
    return max(zip(times, times[1:]), key=lambda pair: pair[1] - pair[0])[1]


class Monitor:
    """Polls the GCS (ExpertGroup0's actors) and `/v1/experts` (group 0's replicas) in two threads, and keeps the
    first time each stage of the recovery was seen after `start(kill_time)`."""

    def __init__(self, port: int, poll_s: float):
        self.port, self.poll_s = port, poll_s
        self.stop = threading.Event()
        self.events: dict[str, float] = {}
        self.old_actors = set(self.actors())
        self.old_replicas = set(self.replicas())

    @staticmethod
    def actors() -> dict[str, str]:
        from ray._private.state import actors

        return {a["ActorID"]: a["State"] for a in actors().values()
                if a["ActorClassName"] == f"ServeReplica:msem:{DEPLOYMENT}"}

    def group(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/v1/experts", timeout=10).json()["groups"][GROUP]

    def replicas(self) -> list[str]:
        return [r["replica_id"] for r in self.group()["replicas"]]

    def _see(self, name: str, seen: bool) -> None:
        if seen and name not in self.events:
            self.events[name] = time.monotonic()

    def _poll_gcs(self) -> None:
        while not self.stop.wait(self.poll_s):
            new = {a: s for a, s in self.actors().items() if a not in self.old_actors}
            self._see("new actor", bool(new))
            self._see("alive", "ALIVE" in new.values())

    def _poll_router(self) -> None:
        while not self.stop.wait(self.poll_s):
            group = self.group()
            listed = {r["replica_id"] for r in group["replicas"]}
            self._see("dropped", not listed & self.old_replicas)
            self._see("registered", bool(listed - self.old_replicas))
            self._see("both registered", len(listed - self.old_replicas) >= 2)
            self._see("covered", not group["experts"])
            self._see("home", "covered" in self.events and bool(group["experts"]))

    def start(self) -> None:
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._poll_gcs, self._poll_router)]
        for thread in self.threads:
            thread.start()

    def wait_for(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.events and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop.set()
        for thread in self.threads:
            thread.join()


def wait_for_group_replicas(port: int, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"http://127.0.0.1:{port}/v1/experts", timeout=10).json()
        if sum(r["alive"] for r in doc["groups"][GROUP]["replicas"]) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {GROUP} never had {count} live replicas")
        time.sleep(0.5)


def layer_stalls() -> list[float]:
    from ray import serve

    return serve.get_deployment_handle("AttentionShard", "msem").failover_stats.remote().result()["stalls"]


def run_config(args, transport: str, cover: bool) -> dict:
    from ray import serve

    from tests.integration.serving import deploy_and_wait

    period_s = args.period_s
    config = tiny_config(expert_groups={"transport": transport, "group_replicas": {GROUP: {"min": 2, "max": 2}},
                                        "health_check": {"period_s": period_s},
                                        "rebalance": {"cover_lost_groups": cover}})
    deploy_and_wait(config, timeout=600)
    port, prompts = config.http_port, [f"Story {i}: once upon a time" for i in range(args.streams)]
    try:
        wait_for_group_replicas(port, 2)
        (reference, times, _) = asyncio.run(run_streams(port, prompts, args.max_tokens))
        result = {"transport": transport, "cover": cover, "period_s": period_s,
                  "no_fault_gap_s": max(map(longest_gap, times)), "rounds": []}
        for k in range(args.kills):
            wait_for_group_replicas(port, 2)
            stalls_before = len(layer_stalls())
            monitor = Monitor(port, args.poll_s)
            monitor.start()
            outs, times, killed_at = asyncio.run(run_streams(port, prompts, args.max_tokens, kill_after_chunks=2))
            monitor.wait_for("home" if cover else "both registered", timeout=300)
            resumed = statistics.median(gap_end(ts) for ts in times)
            stalls = [longest_gap(ts) for ts in times]
            round_ = {"stall_median_s": statistics.median(stalls), "stall_max_s": max(stalls), "stalls_s": stalls,
                      "identical": sum(out == ref for out, ref in zip(outs, reference)),
                      "finished": sum(finish == "length" for _, finish in outs),
                      "layer_stall_max_s": max(layer_stalls()[stalls_before:], default=0.0),
                      "resumed": resumed - killed_at,
                      **{name: t - killed_at for name, t in monitor.events.items()}}
            result["rounds"].append(round_)
            log(f"  {transport} cover {cover}, kill {k + 1}: " + ", ".join(
                f"{key} {value:.2f}" for key, value in round_.items() if isinstance(value, float)))
        return result
    finally:
        serve.shutdown()


STAGES = ["dropped", "covered", "new actor", "alive", "registered", "resumed", "both registered", "home"]


def report(results: list[dict], streams: int) -> None:
    print("| transport | cover | kill | stall median / max (s) | no-fault gap (s) | layer stall (s) | "
          + " | ".join(f"{s} (s)" for s in STAGES) + " | identical |")
    print("|---" * (7 + len(STAGES)) + "|")
    for r in results:
        for k, x in enumerate(r["rounds"], 1):
            stages = " | ".join(f"{x[s]:.2f}" if s in x else "-" for s in STAGES)
            print(f"| {r['transport']} | {'on' if r['cover'] else 'off'} | {k} | {x['stall_median_s']:.2f} / "
                  f"{x['stall_max_s']:.2f} | {r['no_fault_gap_s']:.2f} | {x['layer_stall_max_s']:.2f} | {stages} | "
                  f"{x['identical']}/{streams} |")
    by_transport: dict[str, dict[bool, float]] = {}
    for r in results:
        worst = max(x["stall_max_s"] for x in r["rounds"])
        by_transport.setdefault(r["transport"], {})[r["cover"]] = worst
        print(f"{r['transport']}, cover {'on' if r['cover'] else 'off'}: max stall {worst:.2f} s "
              f"(target <= {TARGET_STALL_S:.0f} s: {'met' if worst <= TARGET_STALL_S else 'not met'})")
    for transport, worst in by_transport.items():
        if len(worst) == 2:
            print(f"{transport}: max stall with cover / without: {worst[True] / worst[False]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transports", default="grpc,torch")
    p.add_argument("--cover", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="expert_groups.rebalance.cover_lost_groups values to run")
    p.add_argument("--period-s", type=float, default=1.0, help="expert_groups.health_check.period_s")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--kills", type=int, default=2, help="kill rounds per deployment")
    p.add_argument("--poll-s", type=float, default=0.05)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import ray

    load_before = os.getloadavg()[0]
    ray.init(address="local", num_cpus=args.ray_cpus, namespace="msem", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    results = []
    try:
        for transport in args.transports.split(","):
            for cover in args.cover:
                log(f"deploying: transport {transport}, cover_lost_groups {cover}")
                results.append(run_config(args, transport, cover == "on"))
    finally:
        ray.shutdown()
    report(results, args.streams)
    print(f"1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("command:", shlex.join([".venv/bin/python", "benchmarks/group_loss.py", *sys.argv[1:]]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
