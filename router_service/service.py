"""`RouterService`: the control side of the layer path, Ray-free (the Ray actor is a thin wrapper).

It owns
- the `RoutingTable` (replicas register when ready; the service drops a replica that a shard reports failed
  once its health check says it is dead),
- the master `TCPStore` that collective transports build their per-epoch process groups on,
- per-(layer, expert) load statistics pushed by the shards, for autoscaling and the experts dashboard.
"""

import logging
import threading
import time
from collections.abc import Callable

import torch
from torch.distributed import TCPStore

from experts.placement import Placement
from router_service.routing_table import RoutingTable, TableSnapshot
from router_service.transport import ReplicaInfo

logger = logging.getLogger(__name__)


class RouterService:
    def __init__(self, placement: Placement, host: str = "127.0.0.1", store_port: int = 0,
                 is_alive: Callable[[ReplicaInfo], bool] | None = None):
        self.table = RoutingTable(placement)
        self.is_alive = is_alive or (lambda info: True)
        self.store = TCPStore(host, store_port, is_master=True, wait_for_workers=False)
        self.store_address = (host, self.store.port)
        self._load = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.long)
        self._served: dict[str, int] = {}  # replica id -> tokens it computed, from its heartbeats
        self._started = time.monotonic()
        self._lock = threading.Lock()  # the actor serves calls concurrently (a health check may block)

    def register(self, info: ReplicaInfo) -> int:
        with self._lock:
            version = self.table.register(info)
        logger.info("replica %s of group %d registered (table v%d)", info.replica_id, info.group_id, version)
        return version

    def deregister(self, replica_id: str) -> int:
        with self._lock:
            self._served.pop(replica_id, None)
            return self.table.deregister(replica_id)

    def heartbeat(self, info: ReplicaInfo, tokens_served: int) -> None:
        """A replica's periodic report: registers it again if this service lost it (it restarted)."""
        with self._lock:
            known = self.table.get(info.replica_id) == info
            self._served[info.replica_id] = tokens_served
        if not known:
            self.register(info)

    def get_table(self, known_version: int) -> TableSnapshot | None:
        """A snapshot newer than `known_version`, or None when the caller is up to date."""
        with self._lock:
            return self.table.snapshot() if self.table.version != known_version else None

    def report_failure(self, replica_id: str) -> None:
        """A shard could not reach a replica: drop it if its health check fails (a restart re-registers it)."""
        with self._lock:
            info = self.table.get(replica_id)
        if info is not None and not self.is_alive(info):
            with self._lock:
                if self.table.get(replica_id) is info:  # not re-registered meanwhile
                    logger.warning("replica %s is dead; dropped from the routing table", replica_id)
                    self.table.deregister(replica_id)

    def record_load(self, counts: list[list[int]]) -> None:
        with self._lock:
            self._load += torch.tensor(counts, dtype=torch.long)

    def load_stats(self) -> dict:
        """Tokens routed per (layer, expert) since start, and per expert and per group summed over layers."""
        placement = self.table.placement
        per_expert = self._load.sum(dim=0).tolist()
        per_group = [0] * placement.num_groups
        for expert, tokens in enumerate(per_expert):
            per_group[placement.expert_to_group[expert]] += tokens
        return {"seconds": time.monotonic() - self._started, "per_layer_expert": self._load.tolist(),
                "per_expert": per_expert, "per_group": per_group}

    def describe(self) -> dict:
        """Placement, live replicas (with the tokens each computed) and per-expert load, for dashboards."""
        with self._lock:
            snapshot = self.table.snapshot()
            served = dict(self._served)
        placement = snapshot.placement
        groups = [{"group": g, "experts": list(placement.experts_of(g)),
                   "replicas": [{"replica_id": r.replica_id, "endpoints": dict(r.endpoints),
                                 "tokens_served": served.get(r.replica_id, 0)}
                                for r in snapshot.replicas.get(g, ())]}
                  for g in range(placement.num_groups)]
        return {"table_version": snapshot.version, "num_layers": placement.num_layers,
                "num_experts": placement.num_experts, "groups": groups, "load": self.load_stats()}
