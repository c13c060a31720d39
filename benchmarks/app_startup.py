"""Start-up cost of the Serve application: how long a deploy takes, and the CPU time and memory of each role.

    .venv/bin/python benchmarks/app_startup.py [--model tiny] [--expert-groups 2] [--rounds 2] [--json out.json]

Each round starts a local Ray (msem's Serve settings), deploys the application on free loopback ports (the
default layout: two Ingress replicas, one attention shard, `--expert-groups` expert group deployments, the
Router and the memory store), waits until `/health` answers, then reads the CPU time every process of the
session used since the deploy began and its resident memory, and shuts everything down. Every replica starts
at once, so on a small machine the deploy's wall time follows the CPU the replicas spend starting (imports,
weights, tokenizer).
"""

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from cluster.app import deploy, init_local_ray  # noqa: E402
from cluster.config import ServeConfig  # noqa: E402
from cluster.serve_command import wait_until_healthy  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds() -> dict[int, float]:
    seconds = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.Error:
            continue
    return seconds


def _roles(before: dict[int, float]) -> dict[str, dict]:
    """Per role (a replica's deployment, Serve's proxy or controller): processes, CPU seconds since `before`,
    resident MB."""
    roles: dict[str, dict] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(process.info["cmdline"] or [])
            times, rss = process.cpu_times(), process.memory_info().rss
        except psutil.Error:
            continue
        if title.startswith("ray::ServeReplica:"):
            role = title.split(":")[-1].split()[0]
        elif title.startswith(("ray::ProxyActor", "ray::ServeController")):
            role = title.split()[0].removeprefix("ray::").split(".")[0]
        else:
            continue
        entry = roles.setdefault(role, {"processes": 0, "cpu_s": 0.0, "rss_mb": 0.0})
        entry["processes"] += 1
        entry["cpu_s"] += times.user + times.system - before.get(process.pid, 0.0)
        entry["rss_mb"] += rss / 2**20
    return roles


def one_round(args) -> dict:
    import ray
    from ray import serve

    port = _free_port()
    config = ServeConfig.model_validate({
        "model": args.model, "max_model_len": 512, "host": "127.0.0.1", "http_port": port, "grpc_port": _free_port(),
        "dtype": "float32", "attention": {"kv_cache_memory": 64 << 20},
        "expert_groups": {"num_groups": args.expert_groups} if args.expert_groups else None})
    init_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        before, began = _cpu_seconds(), time.monotonic()
        deploy(config)
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout=600)
        wall = time.monotonic() - began
        roles = _roles(before)
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"deploy_s": wall, "cpu_s": sum(r["cpu_s"] for r in roles.values()), "roles": roles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--expert-groups", type=int, default=2, help="0: the experts inside the shard")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rounds = [one_round(args) for _ in range(args.rounds)]
    print(f"deploy: {statistics.median(r['deploy_s'] for r in rounds):.1f} s wall, "
          f"{statistics.median(r['cpu_s'] for r in rounds):.1f} s CPU (medians of {len(rounds)} rounds)")
    print(f"{'role':<16} {'processes':>9} {'CPU s each':>10} {'RSS MB each':>11}")
    for role in sorted(rounds[0]["roles"], key=lambda name: -rounds[0]["roles"][name]["cpu_s"]):
        entries = [r["roles"][role] for r in rounds if role in r["roles"]]
        count = entries[0]["processes"]
        print(f"{role:<16} {count:>9} {statistics.median(e['cpu_s'] for e in entries) / count:>10.1f} "
              f"{statistics.median(e['rss_mb'] for e in entries) / count:>11.0f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds},
                                        indent=2))


if __name__ == "__main__":
    main()
