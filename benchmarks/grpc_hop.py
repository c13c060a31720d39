"""Where the time of one MoE layer over gRPC goes: expert compute vs the hop itself.

    .venv/bin/python benchmarks/grpc_hop.py [--model bench] [--tokens 1 32 256]

Two ExpertService servers (the two groups of a linear placement, one torch thread each, as a Ray replica with
num_cpus <= 1 gets) run in their own processes. For T tokens with random top-k routing, per layer, p50 over
the calls:

- `local`: both groups' `ExpertGroup.forward` in this process, one after the other, with this process's
  threads: the work of the single-process layout.
- `remote compute`: the slower group's `forward` with one thread in this process (what a server computes).
- `grpc`: `GrpcTransport.forward` of both groups' batches, concurrently, as `RemoteExperts` sends them.
- `hop`: grpc - remote compute: serialization, the two processes' wake-ups and the bytes on loopback.
"""

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from experts.expert_group import ExpertGroup  # noqa: E402
from experts.placement import Placement, make_placement  # noqa: E402
from mistral.checkpoint import CheckpointReader  # noqa: E402
from mistral.config import ModelConfig  # noqa: E402
from mistral.presets import resolve_model  # noqa: E402
from router_service.dispatch import plan_layer  # noqa: E402
from router_service.grpc_transport import GrpcTransport, serve_expert_group  # noqa: E402
from router_service.transport import ReplicaInfo  # noqa: E402


def _placement(config: ModelConfig) -> Placement:
    return make_placement(config.num_experts, config.num_layers, 2, "linear", 1)


def _load(model: str, group: int) -> ExpertGroup:
    reader = CheckpointReader(resolve_model(model))
    return ExpertGroup.load(reader, _placement(reader.config), group, torch.float32)


def _serve(model: str, group: int, ports: mp.Queue) -> None:
    torch.set_num_threads(1)
    server, port = serve_expert_group(_load(model, group), f"g{group}", max_batch_tokens=4096)
    ports.put((group, port))
    server.wait_for_termination()


def _p50_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    resolve_model(args.model)  # materialise once before the servers read it
    ports: mp.Queue = mp.get_context("spawn").Queue()
    servers = [mp.get_context("spawn").Process(target=_serve, args=(args.model, g, ports), daemon=True)
               for g in range(2)]
    for server in servers:
        server.start()
    replicas = {}
    for _ in servers:
        group, port = ports.get(timeout=300)
        replicas[group] = ReplicaInfo(f"g{group}", group, {"grpc": f"127.0.0.1:{port}"})
    groups = [_load(args.model, g) for g in range(2)]
    config = groups[0].config
    copies, num_copies = _placement(config).copy_table()
    transport = GrpcTransport(timeout_s=30, max_message_bytes=256 << 20)
    threads = torch.get_num_threads()
    print(f"{'tokens':>6}{'local':>9}{'remote compute':>16}{'grpc':>9}{'hop':>8}   (ms per layer, p50; "
          f"local with {threads} threads)")
    torch.manual_seed(0)
    for tokens in args.tokens:
        local, remote, grpc = [], [], []
        for call in range(args.calls + 5):
            layer = call % config.num_layers
            hidden = torch.randn(tokens, config.hidden_size)
            ids = torch.stack([torch.randperm(config.num_experts)[:config.num_experts_per_tok]
                               for _ in range(tokens)])
            sends = plan_layer(layer, hidden, ids, torch.rand(ids.shape), copies[layer], num_copies[layer])
            start = time.perf_counter()
            for send in sends:
                groups[send.group_id].forward(send.batch)
            local.append(time.perf_counter() - start)
            torch.set_num_threads(1)
            slowest = 0.0
            for send in sends:
                start = time.perf_counter()
                groups[send.group_id].forward(send.batch)
                slowest = max(slowest, time.perf_counter() - start)
            remote.append(slowest)
            torch.set_num_threads(threads)
            start = time.perf_counter()
            transport.forward([(replicas[s.group_id], s.batch) for s in sends])
            grpc.append(time.perf_counter() - start)
        local, remote, grpc = local[5:], remote[5:], grpc[5:]  # the first calls warm up
        print(f"{tokens:>6}{_p50_ms(local):>9.2f}{_p50_ms(remote):>16.2f}{_p50_ms(grpc):>9.2f}"
              f"{_p50_ms(grpc) - _p50_ms(remote):>8.2f}")
    transport.close()


if __name__ == "__main__":
    main()
