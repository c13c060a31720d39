"""The `Transport` seam: how one layer's expert batches reach group replicas and come back.

`RemoteExperts` plans a layer (which tokens go to which replica), hands the transport a list of
(replica, batch) sends, and gets one result per send, in order: the [A, H] weighted slot outputs, or a
`ReplicaFailure` when that replica did not answer (died, timed out, unreachable). A failure is a value, not an
exception, so a transport that reached three replicas out of four returns the three answers; the caller re-sends
only the lost batch (experts are pure: recomputing a batch anywhere gives the same bits).

Implementations: `local` (in-process groups), `ray` (actor calls), `grpc` (ExpertService), `torch`
(all_to_all over a process group per epoch). Only this module's types cross into `remote_experts.py`.

Timing. A transport that can time each send on its own says so with `times_sends = True` and takes
`forward(sends, seconds=[])`, appending one duration per send (dispatch to answer). For the others the caller
times the whole `forward` and books that for each send.
"""

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from experts.expert_group import ExpertBatch


@dataclass(frozen=True)
class ReplicaSpec:
    """What a group replica holds when it registers, so that the router can refuse one that would compute other
    bits (another checkpoint or dtype) or lack experts its group serves.

    experts: per layer, the global expert ids it holds, ascending. During a rebalance a replica holds the old and
    the new placement's experts, e.g. ((0, 1), (0, 1, 6)) while expert 6 moves into its layer 1.
    """

    hidden_size: int
    dtype: str  # the weights' dtype name, e.g. "bfloat16"
    experts: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ReplicaInfo:
    """One live replica of an expert group, as the routing table publishes it.

    endpoints: transport name -> address, e.g. {"ray": "msem-expert-g0-r1", "grpc": "127.0.0.1:50213"}.
    spec: what it held when it registered (None: it is not checked).
    """

    replica_id: str
    group_id: int
    endpoints: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    spec: ReplicaSpec | None = field(default=None, hash=False, compare=False)


@dataclass
class ReplicaFailure:
    """A send that produced no result; `reason` is for logs and the error a caller may finally raise."""

    replica_id: str
    reason: str


class Transport(Protocol):
    name: str
    times_sends: bool  # forward takes `seconds` (see the module docstring); absent means False

    def forward(self, sends: list[tuple[ReplicaInfo, ExpertBatch]],
                seconds: list[float] | None = None) -> list[torch.Tensor | ReplicaFailure]:
        """Run every batch on its replica (concurrently where the transport can); one result per send, in order.
        `seconds` only where `times_sends`: one duration per send is appended to it."""
        ...

    def close(self) -> None:
        ...


class LocalTransport:
    """In-process groups: the single-process engine's layout, and the yardstick for the others."""

    name = "local"
    times_sends = True

    def __init__(self, groups: dict[str, "ExpertGroupLike"]):
        self.groups = groups  # replica id -> group

    def forward(self, sends: list[tuple[ReplicaInfo, ExpertBatch]],
                seconds: list[float] | None = None) -> list[torch.Tensor | ReplicaFailure]:
        out = []
        for replica, batch in sends:
            began = time.perf_counter()
            group = self.groups.get(replica.replica_id)
            out.append(group.forward(batch) if group is not None
                       else ReplicaFailure(replica.replica_id, "no such local replica"))
            if seconds is not None:
                seconds.append(time.perf_counter() - began)
        return out

    def close(self) -> None:
        pass


class ExpertGroupLike(Protocol):
    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        ...
