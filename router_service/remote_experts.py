"""`RemoteExperts`: the `ExpertBackend` of an attention shard whose experts live in other processes.

Per MoE layer: plan the sends (`dispatch.plan_layer`), pick a replica per group, hand the sends to the
transport, and combine the answers in slot order. The engine cannot tell it from `LocalExperts`.

Failover. A send that comes back as a `ReplicaFailure` is re-sent: to another live replica of its group if
there is one, else — after telling the router (which checks the replica and drops it if dead) — to whichever
replica the routing table lists next, typically the restarted one once it re-registers. The shard waits for
that at most `failover_timeout` seconds, polling the table, and only then raises `ExpertGroupUnavailable`.
Because experts are pure, the re-sent batch computes the same bits, so clients see neither an error nor a
different token.

A failed replica is skipped until the table changes after its failure (it was dropped, or re-registered with
new endpoints), so a dead replica costs one failed send per table version, not one per layer.

Load. Tokens routed to each (layer, expert) are counted here and pushed to the router about once a second; the
router aggregates them for autoscaling and the experts dashboard.
"""

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from router_service.dispatch import GroupSend, choose_replica, combine_results, plan_layer
from router_service.routing_table import TableSnapshot
from router_service.transport import ReplicaFailure, ReplicaInfo, Transport

logger = logging.getLogger(__name__)


class ExpertGroupUnavailable(RuntimeError):
    """No replica of an expert group answered within the failover timeout."""


@dataclass
class RouterClient:
    """What a shard needs from the router service, as plain callables (Ray calls in production, direct
    method calls in tests)."""

    get_table: Callable[[int], TableSnapshot | None]  # newer snapshot than the version given, or None
    report_failure: Callable[[str], None] = lambda replica_id: None
    record_load: Callable[[list[list[int]]], None] = lambda counts: None


@dataclass
class FailoverStats:
    resent_batches: int = 0
    failed_sends: int = 0
    stall_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))  # per layer re-sent


class RemoteExperts:
    def __init__(self, transport: Transport, router: RouterClient, *, failover_timeout: float = 30.0,
                 refresh_interval: float = 0.1, load_report_interval: float = 1.0, poll_interval: float = 0.02):
        self.transport, self.router = transport, router
        self.failover_timeout, self.refresh_interval = failover_timeout, refresh_interval
        self.load_report_interval, self.poll_interval = load_report_interval, poll_interval
        self.table = self._wait_for_table(None)
        self.expert_to_group = torch.tensor(self.table.placement.expert_to_group)
        self.outstanding: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self._failed: dict[str, int] = {}  # replica id -> table version when it failed
        placement = self.table.placement
        self._load = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.long)
        self._last_refresh = self._last_report = time.monotonic()
        self.failover = FailoverStats()
        self.layer_seconds: deque[float] = deque(maxlen=65536)  # MoE call wall time of recent layers

    # ---- ExpertBackend ----

    def __call__(self, layer_id: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if layer_id == 0:
            self._step_boundary()
        self._load[layer_id] += torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self._load.shape[1])
        sends = plan_layer(layer_id, hidden, expert_ids, weights, self.expert_to_group.to(expert_ids.device))
        results = self._run(sends)
        out = combine_results(expert_ids.shape[0], expert_ids.shape[1], sends, results).to(hidden.dtype)
        self.layer_seconds.append(time.perf_counter() - t0)
        return out

    # ---- sending with failover ----

    def _run(self, sends: list[GroupSend]) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * len(sends)
        pending = list(range(len(sends)))
        started, deadline = time.monotonic(), None
        while True:
            ready = [(i, r) for i in pending if (r := self._pick(sends[i].group_id)) is not None]
            for i, r in ready:
                self._add_outstanding(r, sends[i].batch.hidden.shape[0])
            answers = self.transport.forward([(r, sends[i].batch) for i, r in ready]) if ready else []
            for (i, r), answer in zip(ready, answers):
                self._add_outstanding(r, -sends[i].batch.hidden.shape[0])
                if isinstance(answer, ReplicaFailure):
                    self._on_failure(r, answer)
                else:
                    results[i] = answer
            pending = [i for i in pending if results[i] is None]
            if not pending:
                break
            deadline = deadline or started + self.failover_timeout
            if time.monotonic() > deadline:
                groups = sorted({sends[i].group_id for i in pending})
                raise ExpertGroupUnavailable(f"expert groups {groups} had no answering replica for "
                                             f"{self.failover_timeout:.0f} s")
            self.failover.resent_batches += len(pending)
            if all(self._pick(sends[i].group_id) is None for i in pending):
                self._wait_for_change()
        if deadline is not None:
            stall = time.monotonic() - started
            self.failover.stall_seconds.append(stall)
            logger.warning("expert failover: layer %d redone after %.3f s", sends[0].batch.layer_id, stall)
        return results

    def _pick(self, group_id: int) -> ReplicaInfo | None:
        live = [r for r in self.table.replicas_of(group_id)
                if self._failed.get(r.replica_id, -1) < self.table.version]
        return choose_replica(live, self.outstanding, self.sent)

    def _add_outstanding(self, replica: ReplicaInfo, tokens: int) -> None:
        rid = replica.replica_id
        self.outstanding[rid] = self.outstanding.get(rid, 0) + tokens
        if tokens > 0:
            self.sent[rid] = self.sent.get(rid, 0) + tokens

    def _on_failure(self, replica: ReplicaInfo, failure: ReplicaFailure) -> None:
        logger.warning("expert replica %s failed: %s", replica.replica_id, failure.reason)
        self.failover.failed_sends += 1
        self._failed[replica.replica_id] = self.table.version
        self.router.report_failure(replica.replica_id)
        self._refresh()

    # ---- routing table ----

    def _step_boundary(self) -> None:
        now = time.monotonic()
        if now - self._last_refresh >= self.refresh_interval:
            self._refresh()
        if now - self._last_report >= self.load_report_interval:
            self.flush_load()

    def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        newer = self.router.get_table(self.table.version)
        if newer is not None:
            self.table = newer

    def _wait_for_change(self) -> None:
        version = self.table.version
        end = time.monotonic() + self.poll_interval * 50
        while self.table.version == version and time.monotonic() < end:
            time.sleep(self.poll_interval)
            self._refresh()

    def _wait_for_table(self, known: int | None) -> TableSnapshot:
        deadline = time.monotonic() + self.failover_timeout
        while True:
            table = self.router.get_table(-1 if known is None else known)
            if table is not None and not table.missing_groups:
                return table
            if time.monotonic() > deadline:
                missing = table.missing_groups if table is not None else "all"
                raise ExpertGroupUnavailable(f"expert groups {missing} did not register within "
                                             f"{self.failover_timeout:.0f} s")
            time.sleep(self.poll_interval)

    def flush_load(self) -> None:
        """Push the per-(layer, expert) token counts gathered since the last push to the router."""
        self._last_report = time.monotonic()
        if int(self._load.sum()):
            counts, self._load = self._load.tolist(), torch.zeros_like(self._load)
            self.router.record_load(counts)

    def close(self) -> None:
        self.flush_load()
        self.transport.close()
