"""`RouterServiceActor`: the `RouterService` as a named Ray actor, with Ray-backed replica health checks."""

import ray

from experts.placement import Placement
from router_service.routing_table import TableSnapshot
from router_service.service import RouterService
from router_service.transport import ReplicaInfo


class RouterServiceActor:
    def __init__(self, placement: Placement, namespace: str, host: str = "127.0.0.1",
                 health_timeout: float = 2.0):
        self.namespace, self.health_timeout = namespace, health_timeout
        self.service = RouterService(placement, host=host, is_alive=self._is_alive)

    def _is_alive(self, info: ReplicaInfo) -> bool:
        try:
            actor = ray.get_actor(info.endpoints["ray"], namespace=self.namespace)
            return bool(ray.get(actor.health.remote(), timeout=self.health_timeout))
        except Exception:  # noqa: BLE001 - any failure to answer means not alive
            return False

    def register(self, info: ReplicaInfo) -> int:
        return self.service.register(info)

    def deregister(self, replica_id: str) -> int:
        return self.service.deregister(replica_id)

    def get_table(self, known_version: int) -> TableSnapshot | None:
        return self.service.get_table(known_version)

    def report_failure(self, replica_id: str) -> None:
        self.service.report_failure(replica_id)

    def record_load(self, counts: list[list[int]]) -> None:
        self.service.record_load(counts)

    def load_stats(self) -> dict:
        return self.service.load_stats()

    def store_address(self) -> tuple[str, int]:
        return self.service.store_address
