"""The `ray` transport: one actor call per send. The simple fallback, and the easiest to debug.

Each replica's endpoint is its named actor (`endpoints["ray"]`). Calls go out together and are awaited with a
deadline; a dead, restarting or silent actor becomes a `ReplicaFailure`. Ray serialises the tensors itself
(zero-copy for large CPU tensors through its object store). A send's time runs from its call to the moment its
answer was fetched; answers are fetched in send order, so a fast answer behind a slow one counts the wait.
"""

import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from experts.expert_group import ExpertBatch
from router_service.transport import ReplicaFailure, ReplicaInfo

_ACTOR_ERRORS = (RayActorError, GetTimeoutError, ray.exceptions.ActorUnavailableError)


class RayTransport:
    name = "ray"
    times_sends = True

    def __init__(self, namespace: str | None = None, timeout: float = 10.0):
        self.namespace, self.timeout = namespace, timeout
        self._handles: dict[str, "ray.actor.ActorHandle"] = {}

    def _handle(self, replica: ReplicaInfo):
        name = replica.endpoints["ray"]
        if name not in self._handles:
            self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return self._handles[name]

    def forward(self, sends: list[tuple[ReplicaInfo, ExpertBatch]],
                seconds: list[float] | None = None) -> list[torch.Tensor | ReplicaFailure]:
        began, refs = time.perf_counter(), []
        for replica, batch in sends:
            try:
                refs.append(self._handle(replica).forward.remote(batch))
            except (ValueError, *_ACTOR_ERRORS) as error:  # ValueError: no actor of that name (yet)
                refs.append(ReplicaFailure(replica.replica_id, repr(error)))
        out, deadline = [], time.monotonic() + self.timeout
        for (replica, _), ref in zip(sends, refs):
            out.append(self._get(replica, ref, deadline))
            if seconds is not None:
                seconds.append(time.perf_counter() - began)
        return out

    @staticmethod
    def _get(replica: ReplicaInfo, ref, deadline: float) -> torch.Tensor | ReplicaFailure:
        if isinstance(ref, ReplicaFailure):
            return ref
        try:
            return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except _ACTOR_ERRORS as error:
            if isinstance(error, GetTimeoutError):
                ray.cancel(ref)
            return ReplicaFailure(replica.replica_id, type(error).__name__)

    def close(self) -> None:
        self._handles.clear()
