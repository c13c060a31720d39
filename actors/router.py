"""`Router`: the routing service as a component, the one definition behind the Ray actor of
`LLM(expert_parallel=...)` and the `Router` deployment of the Serve app.

It wraps `RouterService` (routing table, per-expert load, rebalancing) with what a process around it needs:
- liveness: a replica is alive while its ExpertService answers the gRPC health check (every group replica
  serves one, whichever transport carries its layers);
- a background tick once a second: pending placement switches, periodic rebalancing, the router's metrics;
- torch sessions: each attention shard on the `torch` transport serves the TCPStore of its own session and
  lists it here (`open_session`, renewed every second); heartbeat answers carry the list, so the group replicas
  join new sessions. A session not renewed for `session_timeout_s` (its shard stopped or died) is dropped from
  the list; its members have left already, when its store went away. After a restart of the router the shards'
  renewals list their sessions again within a second, and the sessions themselves never noticed.
"""

import asyncio
import logging
import threading
import time

from actors.metrics import RouterMetrics, publish_every
from experts.placement import Placement
from router_service.grpc_transport import is_serving
from router_service.routing_table import TableSnapshot
from router_service.service import ExpectedReplicas, RebalancePolicy, RouterService
from router_service.transport import ReplicaInfo

logger = logging.getLogger(__name__)
TICK_S = 1.0  # how often the router advances rebalancing and publishes its metrics
# How often group replicas heartbeat. The answer carries a placement switch, so this bounds how soon the
# survivors of a lost group start loading its experts.
HEARTBEAT_S = 0.5
LIVE_S = 3.0  # a replica that has not heartbeated for this long is not live (for `/health`)


def is_alive(info: ReplicaInfo) -> bool:
    return "grpc" in info.endpoints and is_serving(info.endpoints["grpc"])


class Router:
    def __init__(self, placement: Placement, rebalance: dict | None = None, expected: ExpectedReplicas | None = None,
                 session_timeout_s: float = 10.0):
        """`rebalance`: `RebalancePolicy` fields; `expected`: what a joining replica must hold (it is refused
        otherwise)."""
        self.service = RouterService(placement, is_alive=is_alive, heartbeat_timeout_s=LIVE_S,
                                     policy=RebalancePolicy(**(rebalance or {})), expected=expected)
        self.session_timeout_s = session_timeout_s
        self._sessions: dict[str, tuple[tuple[str, int], float]] = {}  # session -> (store address, renewed at)
        self._sessions_lock = threading.Lock()  # calls and the tick thread both touch them
        self.metrics = RouterMetrics()
        self._stop = publish_every(TICK_S, self._tick, "msem-router-tick")

    def _tick(self) -> None:
        self.service.tick()
        self._expire_sessions()
        self.metrics.update(self.service.describe())

    # ---- replicas ----

    def register(self, info: ReplicaInfo, placement_version: int | None = None) -> int:
        return self.service.register(info, placement_version)

    def deregister(self, replica_id: str) -> int:
        return self.service.deregister(replica_id)

    def heartbeat(self, info: ReplicaInfo, tokens_served: int, placement_version: int | None = None) -> dict:
        """The service's answer (what to hold) and the torch sessions to take part in."""
        with self._sessions_lock:
            sessions = {session: address for session, (address, _) in self._sessions.items()}
        return {**self.service.heartbeat(info, tokens_served, placement_version), "sessions": sessions}

    def placements(self, group_id: int | None = None) -> list[Placement]:
        return self.service.placements(group_id)

    async def report_failure(self, replica_id: str) -> None:
        await asyncio.to_thread(self.service.report_failure, replica_id)  # its health check may take a while

    def missing_groups(self) -> list[int]:
        """Groups with experts and no replica that heartbeated within `LIVE_S` (for `/health`)."""
        return self.service.missing_groups()

    # ---- shards ----

    def get_table(self, known_version: int, shard_id: str | None = None) -> TableSnapshot | None:
        return self.service.get_table(known_version, shard_id)

    def record_load(self, counts: list[list[int]]) -> None:
        self.service.record_load(counts)

    def open_session(self, session: str, store_address: tuple[str, int]) -> None:
        """List (or renew) a shard's torch session, whose store is at `store_address`, for the group replicas."""
        with self._sessions_lock:
            if session not in self._sessions:
                logger.info("torch session %s opened (store %s:%d)", session, *store_address)
            self._sessions[session] = (tuple(store_address), time.monotonic())

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        with self._sessions_lock:
            for session, (_, renewed) in list(self._sessions.items()):
                if now - renewed > self.session_timeout_s:
                    del self._sessions[session]
                    logger.info("torch session %s closed: not renewed for %.0f s", session, now - renewed)

    # ---- rebalancing and the view ----

    async def rebalance(self, wait_s: float = 60.0) -> dict:
        """Plan and start a rebalance; wait (at most `wait_s`) until the switch is applied or given up."""
        result = await asyncio.to_thread(self.service.rebalance)
        deadline = time.monotonic() + wait_s
        while result["status"] == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            last = self.service.last_rebalance or {}
            if last.get("placement_version") == result["placement_version"] and last["status"] != "pending":
                result = {**result, "status": last["status"]}
        return result

    def describe(self) -> dict:
        with self._sessions_lock:
            sessions = sorted(self._sessions)
        return {**self.service.describe(), "sessions": sessions}

    def load_stats(self) -> dict:
        return self.service.load_stats()

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
