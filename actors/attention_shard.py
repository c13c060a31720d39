"""`AttentionShard`: an engine (requests, KV cache, attention) whose MoE layers call the expert groups; the one
definition behind the Ray actor shards of `LLM(expert_parallel=...)` and the `AttentionShard` deployment.

The engine class is handed in (`engine_cls`, normally `AsyncLLM`), with its arguments; the shard adds the
compute it was given and, with a router, the `RemoteExperts` backend from `connect_experts`. A Serve replica
streams (`stream`); a Ray actor may also answer whole batches (`generate`).

Torch sessions. Over the `torch` transport every shard is rank 0 of a session of its own, named after it, which
it opens at the router; the group replicas join each open session (one process-group member per session). How
several shards share the replicas: each session has its own process groups and epochs, so shards never wait for
one another's collectives, and a shard that dies ends only its own session. Requests are not pinned: any shard
serves any request, the ingress picks one per request, and a request whose shard died resumes on another.

An engine that failed inside a step (anything but a bad request, which fails alone) is dead: `check_health`
raises, so the supervisor (Serve, or Ray for an actor) replaces it, and later requests fail at once with
`EngineDeadError`.
"""

import asyncio
import dataclasses
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator

import torch

from actors.checkpoints import local_checkpoint
from actors.compute import Compute
from actors.handles import call, send
from actors.metrics import EngineMetrics, ExpertMetrics, publish_every
from engine.admission import Resume
from engine.outputs import RequestOutput, merge
from engine.sampling_params import SamplingParams
from mistral.checkpoint import CheckpointReader
from router_service.remote_experts import RemoteExperts, RouterClient

logger = logging.getLogger(__name__)
METRICS_S = 1.0
ROUTING_BLOCKS = 16_384  # block names a shard reports for KV-aware routing (32 bytes each: 512 KiB at most)
RAY_NAMESPACE = "msem"  # where the `ray` transport finds group replicas by actor name


@dataclasses.dataclass(frozen=True)
class ExpertLink:
    """How a shard reaches the expert groups."""

    transport: str = "grpc"  # grpc, torch or ray (see router_service/transport.py)
    host: str | None = "127.0.0.1"  # where a torch session's store binds and is reached (None: the node's address)
    call_timeout: float = 10.0  # deadline of one dispatch to one replica, seconds
    failover_timeout: float = 30.0  # how long a layer may wait for a group to have a live replica again
    startup_timeout: float = 30.0  # how long a new shard waits for every group to have one


class TorchSession:
    """A shard's torch session: the TCPStore its epochs form on (served here, so the session depends on its own
    ranks only), listed at the router and renewed every `renew_s` seconds while the shard lives."""

    def __init__(self, router, name: str, host: str | None, renew_s: float = 1.0):
        import ray
        import torch.distributed as dist

        self.store = dist.TCPStore(host or "0.0.0.0", 0, is_master=True, wait_for_workers=False)
        self.address = (host or ray.util.get_node_ip_address(), self.store.port)
        self._router, self.name, self._stop = router, name, threading.Event()
        call(router, "open_session", name, self.address)
        threading.Thread(target=self._renew, args=(renew_s,), name="msem-session", daemon=True).start()

    def _renew(self, renew_s: float) -> None:
        while not self._stop.wait(renew_s):
            try:
                send(self._router, "open_session", self.name, self.address)
            except Exception:  # noqa: BLE001 - the router is restarting; the next renewal lists it again
                logger.warning("renewing torch session %s failed", self.name, exc_info=True)

    def close(self) -> None:
        self._stop.set()


def connect_experts(router, link: ExpertLink, shard_id: str, model_dir: str, dtype: torch.dtype,
                    max_batch_tokens: int,
                    stats_sink=None) -> tuple[RemoteExperts, TorchSession | None]:
    """The expert backend of one shard, talking to the router (a Ray actor or Serve handle) and the group
    replicas; and, for the torch transport, its session (close it at shutdown)."""
    client = RouterClient(get_table=lambda version: call(router, "get_table", version, shard_id),
                          report_failure=lambda replica_id: call(router, "report_failure", replica_id),
                          record_load=lambda counts: send(router, "record_load", counts))
    session = None
    if link.transport == "grpc":
        from router_service.grpc_transport import GrpcTransport, message_limit_bytes

        model = CheckpointReader(model_dir).config
        limit = message_limit_bytes(max_batch_tokens, model.hidden_size, model.num_experts_per_tok, dtype)
        transport = GrpcTransport(timeout_s=link.call_timeout, max_message_bytes=limit)
    elif link.transport == "torch":
        from router_service.torch_transport import TorchTransport

        session = TorchSession(router, shard_id, link.host)
        backend = None  # the members of the shard's epochs are the replicas of its current routing table
        transport = TorchTransport(*session.address, shard_id, lambda: [r for reps in backend.table.replicas.values()
                                                                         for r in reps], timeout=link.call_timeout)
    elif link.transport == "ray":
        from router_service.ray_transport import RayTransport

        transport = RayTransport(namespace=RAY_NAMESPACE, timeout=link.call_timeout)
    else:
        raise ValueError(f"unknown transport {link.transport!r}: use grpc, torch or ray")
    backend = RemoteExperts(transport, client, failover_timeout=link.failover_timeout,
                            startup_timeout=link.startup_timeout, stats_sink=stats_sink)
    return backend, session


def memory_report(stats) -> dict:
    """What a shard tells the memory store about its own tiers: the device pool (T0) and host RAM (T1)."""
    return {"device": {"usage": stats.kv_cache_usage, "prefix_cache_queries": stats.prefix_cache_queries,
                       "prefix_cache_hits": stats.prefix_cache_hits}, **(stats.kv_tiers or {})}


class AttentionShard:
    async def __init__(self, engine_cls, engine_kwargs: dict, compute: Compute, router=None,
                       link: ExpertLink = ExpertLink(), *, shard_id: str | None = None, model_name: str = "msem",
                       memory_store=None, memory_timeout_s: float = 2.0):
        """`engine_kwargs`: the engine's arguments (`model`: a preset name or checkpoint directory, limits) but
        the compute, experts and memory store, which the shard adds; `router`: None for a dense model or
        experts inside the shard; `memory_store`: the shared KV tier's handle (None: none), whose calls that
        take longer than `memory_timeout_s` count as misses."""
        if shard_id is None:
            from ray import serve

            shard_id = f"shard-{serve.get_replica_context().replica_id.unique_id}"
        self.shard_id, self.experts, self._session = shard_id, None, None
        model_dir = str(local_checkpoint(engine_kwargs["model"]).path)  # fails at once on a node without it
        if router is not None:
            self.experts, self._session = await asyncio.to_thread(
                connect_experts, router, link, shard_id, model_dir, compute.torch_dtype,
                engine_kwargs.get("max_num_batched_tokens", 2048), ExpertMetrics())
        self._memory_store = memory_store
        store_call = None if memory_store is None else \
            (lambda method, *args: call(memory_store, method, *args, timeout_s=memory_timeout_s))
        self.llm = await asyncio.to_thread(engine_cls, **engine_kwargs, dtype=compute.dtype, device=compute.device,
                                           experts=self.experts, memory_store_call=store_call, progress=False)
        self.metrics = EngineMetrics(model_name, shard_id)
        self._stop = publish_every(METRICS_S, self._publish, "msem-engine-metrics")

    def _publish(self) -> None:
        """Once a second: the engine's stats (to the metrics, and its KV tiers' to the memory store, which shows
        them in `/v1/memory`); and the expert load and layer-path stats gathered since the last step end pushed
        them (steps push only while the engine runs, so an idle shard would keep its last second of counts)."""
        stats = self.llm.stats()
        self.metrics.publish(stats)
        if self._memory_store is not None:
            send(self._memory_store, "report_shard", self.shard_id, memory_report(stats))
        if self.experts is not None:
            self.experts.flush_load()
            self.experts.flush_stats(due_only=True)

    async def stream(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                     resume: Resume | None = None, every_step: bool = True,
                     interval_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        """The request's deltas. Each one crosses to the caller as a message of its own (a Serve streaming
        item), so the engine coalesces them (`AsyncLLM.add_request`'s `stream_interval_s`): the first token goes
        at once (the time to first token), the last with the end, and between them the deltas of `interval_s` go
        merged as one message (as vLLM's `stream_interval` and Ray Serve LLM's stream batching); without
        `every_step` (the caller reads the request whole) the rest follow merged into one at the end."""
        async for delta in self.llm.add_request(prompt_token_ids, params, request_id, resume=resume,
                                                stream_interval_s=interval_s if every_step else math.inf):
            yield dataclasses.replace(delta, prompt_token_ids=[])  # the caller has them

    async def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Complete every prompt; outputs in input order."""
        async def one(ids: list[int]) -> RequestOutput:
            out = None
            async for delta in self.llm.add_request(ids, params, f"{self.shard_id}-{uuid.uuid4().hex[:8]}"):
                out = merge(out, delta)
            return out
        return list(await asyncio.gather(*(one(ids) for ids in prompt_token_ids)))

    def record_routing_stats(self) -> dict:
        """Serve asks every `attention.routing.stats_period_s`; its routers (in each Ingress replica) get the
        answer: the names of the blocks this shard could serve a prefix from, for KV-aware routing, and the
        keyspace they are named in."""
        return {"kv_blocks": self.llm.cached_block_names(ROUTING_BLOCKS), "keyspace_root": self.llm.keyspace_root.hex()}

    def healthy(self) -> bool:
        return self.llm.dead is None

    def check_health(self) -> None:
        """Raises once the engine died (its requests resume on another shard)."""
        if self.llm.dead is not None:
            raise RuntimeError(f"the engine stopped: {self.llm.dead!r}")

    def num_unfinished_requests(self) -> int:
        return self.llm.num_unfinished_requests

    def failover_stats(self) -> dict:
        f = self.experts.failover
        return {"failed_sends": f.failed_sends, "resent_batches": f.resent_batches, "stalls": list(f.stall_seconds)}

    def shutdown(self) -> None:
        """Stop the engine and leave the expert groups (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.llm.shutdown()
        if self.experts is not None:
            self.experts.close()
        if self._session is not None:
            self._session.close()

    def __del__(self):
        if hasattr(self, "_stop"):
            self.shutdown()

