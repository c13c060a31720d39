"""`ExpertGroupActor`: one replica of an expert group as a Ray actor.

It loads only its group's tensors, opens the endpoints of the transports in use (the actor itself for `ray`,
an ExpertService for `grpc`, a process-group member for `torch`) and then registers with the router, so a
replica is never routed to before it can answer. A restarted replica (Ray re-runs `__init__` after a crash)
registers again under the same id with its new endpoints.

`health` runs a 1-token probe through the experts (`ExpertProbe`) and raises when it fails, so the router's
liveness check drops a replica whose compute is wedged, not only one whose process died.

CUDA is initialised lazily: the device is chosen inside `__init__`, after Ray has set CUDA_VISIBLE_DEVICES for
the GPU it granted, never at import.
"""

import os

import ray
import torch

from experts.expert_group import ExpertBatch, ExpertGroup
from experts.placement import Placement
from experts.probe import ExpertProbe
from mistral.checkpoint import DTYPES, CheckpointReader
from router_service.transport import ReplicaInfo


class ExpertGroupActor:
    def __init__(self, model_dir: str, placement: Placement, group_id: int, replica_id: str, dtype: str,
                 router_name: str, namespace: str, transports: tuple[str, ...], host: str = "127.0.0.1",
                 max_batch_tokens: int = 8192, torch_sessions: tuple[str, ...] = ()):
        gpus = ray.get_gpu_ids()
        device = torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.reader = CheckpointReader(model_dir)
        self.group = ExpertGroup.load(self.reader, placement, group_id, DTYPES[dtype], device)
        self.replica_id, self.group_id = replica_id, group_id
        self.probe = ExpertProbe(self.group)
        endpoints = {"ray": ray.get_runtime_context().get_actor_name()}
        self._server, self._members = None, []
        if "grpc" in transports:
            from router_service.grpc_transport import serve_expert_group

            self._server, port = serve_expert_group(self.group, replica_id, host=host, port=0,
                                                    max_batch_tokens=max_batch_tokens, probe=self.probe)
            endpoints["grpc"] = f"{host}:{port}"
        router = ray.get_actor(router_name, namespace=namespace)
        if "torch" in transports:
            from router_service.torch_transport import TorchMember

            store_host, store_port = ray.get(router.store_address.remote())
            for session in torch_sessions:
                self._members.append(TorchMember(self.group, replica_id, store_host, store_port, session))
                self._members[-1].start()
        ray.get(router.register.remote(ReplicaInfo(replica_id, group_id, endpoints)))

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        return self.group.forward(batch).cpu()

    def health(self) -> bool:
        """True once the experts computed a probe; raises `ExpertProbeFailed` when they did not in time."""
        self.probe.check()
        return True

    def info(self) -> dict:
        return {"replica_id": self.replica_id, "group_id": self.group_id, "experts": list(self.group.experts),
                "pid": os.getpid(), "device": str(self.group.device),
                "tensors_read": list(self.reader.tensors_read), "files_opened": list(self.reader.files_opened)}
