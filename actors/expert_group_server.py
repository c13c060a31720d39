"""`ExpertGroupServer`: one replica of one expert group, the one definition behind the Ray actors of
`LLM(expert_parallel=...)` and the `ExpertGroup{g}` deployments of the Serve app.

Start-up, in order, so that no shard is routed to it before it can answer:
1. load the placement the router has now (a rebalance may have replaced the first one) and read only this
   group's expert tensors, on the devices it was given (`Compute`; a unit of several GPUs spreads its experts
   over all of them);
2. open its endpoints: an ExpertService (gRPC: the layer hop of the `grpc` transport, and the health check the
   router's liveness test calls for every transport), its own actor for the `ray` transport, and for the `torch`
   transport a process-group member per torch session of the router;
3. register with the router, sending a `ReplicaSpec` (hidden size, dtype, experts held): the router refuses a
   replica that would compute other bits or lack experts, with a message naming the mismatch.

Then a heartbeat thread reports tokens served and the placement held every `HEARTBEAT_S`, and at once when a
placement finished loading; the answer says which placement to hold (`PlacementFollower` loads it in the
background: a rebalance, or the experts of a lost group that this one covers) and which torch sessions are live (members
are started for new ones and stopped for ended ones). A restarted replica registers again.

Health: `check_health` (Serve's hook) runs a 1-token probe through the experts (`ExpertProbe`), as does the
ExpertService's Health RPC, so a replica whose compute is wedged is replaced, not only a dead process.
CUDA is touched only inside `__init__`, after Ray has set CUDA_VISIBLE_DEVICES for the GPUs it granted.
"""

import asyncio
import dataclasses
import logging
import os
import threading
import time

import ray
import torch

from actors.checkpoints import local_checkpoint
from actors.compute import Compute
from actors.handles import call
from actors.metrics import BusyClock, ExpertGroupMetrics, publish_every
from actors.router import HEARTBEAT_S
from experts.expert_group import ExpertBatch, ExpertGroup
from experts.probe import ExpertProbe
from router_service.grpc_transport import serve_expert_group
from router_service.placement_follower import PlacementFollower
from router_service.transport import ReplicaInfo, ReplicaSpec

logger = logging.getLogger(__name__)
METRICS_S = 1.0


class ExpertGroupServer:
    async def __init__(self, model: str, group_id: int, router, compute: Compute, *, transport: str = "grpc",
                       host: str | None = "127.0.0.1", max_batch_tokens: int = 8192, num_gpus: int = 1,
                       replica_id: str | None = None):
        """`model`: a preset name (materialised on this node) or a checkpoint directory; `host`: the address its
        endpoints bind and advertise (None: this node's); `replica_id`: default from Serve's replica id."""
        if compute.device == "cpu":
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        devices = compute.devices(max(1, num_gpus))
        reader = local_checkpoint(model)
        first, *later = await router.placements.remote(group_id)
        group = await asyncio.to_thread(ExpertGroup.load, reader, first, group_id, compute.torch_dtype,
                                        devices if len(devices) > 1 else devices[0])
        for placement in later:  # a switch is under way, or the group is lost and others cover it: hold both
            await asyncio.to_thread(group.extend, reader, placement)
        if replica_id is None:
            from ray import serve

            replica_id = f"g{group_id}-{serve.get_replica_context().replica_id.unique_id}"
        self.group, self.router, self.reader = group, router, reader
        self.busy = BusyClock()  # time computing: Serve's utilisation cannot see the per-layer traffic
        group.forward = self.busy.timed(group.forward)
        self.probe = ExpertProbe(group)
        host = host or ray.util.get_node_ip_address()
        self.server, port = serve_expert_group(group, replica_id, host=host, max_batch_tokens=max_batch_tokens,
                                               probe=self.probe)
        endpoints = {"grpc": f"{host}:{port}"}
        if (actor_name := ray.get_runtime_context().get_actor_name()) and transport == "ray":
            endpoints["ray"] = actor_name
        self._stop, self._wake = threading.Event(), threading.Event()  # the heartbeat thread's
        self.follower = PlacementFollower(group, reader, (later or [first])[-1], replica_id, on_loaded=self._wake.set)
        self.info = ReplicaInfo(replica_id, group_id, endpoints, self._spec())
        self.torch = transport == "torch"
        self._members: dict[str, object] = {}  # torch session -> TorchMember
        await router.register.remote(self.info, self.follower.version)
        self._last = (time.monotonic(), 0)
        threading.Thread(target=self._heartbeats, name="msem-heartbeat", daemon=True).start()
        work = ExpertGroupMetrics(group_id, replica_id, lambda: group.tokens_served, self.busy)
        publish_every(METRICS_S, work.publish, "msem-group-metrics", stop=self._stop)
        logger.info("expert group %d replica %s serves on %s", group_id, replica_id, endpoints)

    def _spec(self) -> ReplicaSpec:
        model = self.reader.config
        return ReplicaSpec(model.hidden_size, str(self.group.dtype).removeprefix("torch."), self._holdings())

    def _holdings(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.group.holds(layer) for layer in range(self.reader.config.num_layers))

    def _heartbeats(self) -> None:
        while True:
            try:
                info = dataclasses.replace(self.info, spec=self._spec())  # what it holds now (rebalances)
                answer = call(self.router, "heartbeat", info, self.group.tokens_served, self.follower.version,
                              timeout_s=10)
                self.follower.follow(answer)
                self._follow_sessions(answer["sessions"])
            except Exception:  # noqa: BLE001 - the router may be restarting; the next beat re-registers
                logger.warning("heartbeat of %s failed", self.info.replica_id, exc_info=True)
            self._wake.wait(HEARTBEAT_S)  # or sooner: a placement finished loading
            self._wake.clear()
            if self._stop.is_set():
                return

    def _follow_sessions(self, sessions: dict[str, tuple[str, int]]) -> None:
        """Join the torch sessions listed that this replica has not joined yet. A member leaves by itself when
        its session's store goes away (the shard stopped or died); it is not restarted while still listed."""
        if not self.torch:
            return
        from router_service.torch_transport import TorchMember

        ended = {session for session, member in self._members.items() if member.done}
        self._members = {session: member for session, member in self._members.items()
                         if session in sessions or not member.done}  # ended ones are kept while listed
        for session, (host, port) in sessions.items():
            if session not in self._members and session not in ended:
                self._members[session] = TorchMember(self.group, self.info.replica_id, host, port, session)
                self._members[session].start()

    # ---- the `ray` transport's endpoint ----

    async def forward(self, batch: ExpertBatch) -> torch.Tensor:
        return (await asyncio.to_thread(self.group.forward, batch)).cpu()

    # ---- health, scaling, introspection ----

    async def check_health(self) -> None:
        """Raises `ExpertProbeFailed` when the experts did not compute a 1-token probe in time."""
        await asyncio.to_thread(self.probe.check)

    def record_autoscaling_stats(self) -> dict[str, float]:
        now, tokens = time.monotonic(), self.group.tokens_served
        (then, before), self._last = self._last, (now, tokens)
        return {"routed_tokens_per_s": (tokens - before) / max(now - then, 1e-3)}

    def describe(self) -> dict:
        return {"replica_id": self.info.replica_id, "group_id": self.info.group_id, "pid": os.getpid(),
                "experts": [list(held) for held in self._holdings()], "devices": [str(d) for d in self.group.devices],
                "endpoints": self.info.endpoints,
                "torch_sessions": sorted(s for s, member in self._members.items() if not member.done),
                "tensors_read": list(self.reader.tensors_read), "files_opened": list(self.reader.files_opened)}

    def shutdown(self) -> None:
        """Leave: stop beating, deregister, close the endpoints (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        for member in self._members.values():
            member.stop(timeout=1.0)
        try:
            self.router.deregister.remote(self.info.replica_id)
        finally:
            self.server.stop(grace=None)

    def __del__(self):
        if hasattr(self, "_stop"):
            self.shutdown()
