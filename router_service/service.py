"""`RouterService`: the control side of the layer path, Ray-free (`actors.router.Router` runs it as a Ray actor
or a Serve deployment).

It owns
- the `RoutingTable` (replicas register when ready; the service drops a replica that a shard reports failed
  once its health check says it is dead, and refuses one whose `ReplicaSpec` does not fit the deployment),
- per-(layer, expert) load pushed by the shards: totals since start, and a sliding window (`LoadWindow`) that
  balancedness and rebalancing read,
- live rebalancing of the placement.

Rebalancing. `rebalance()` (on request) or `tick()` (periodically, when the policy has an interval and the
gain in mean balancedness reaches `min_gain`) plans a new placement from the load window with
`experts.eplb.rebalance`. It becomes *pending*: each group replica learns it from its heartbeat's answer,
loads the experts it lacks in the background and reports the version it holds. Once every live replica holds
the pending placement, the table switches to it as a new version, which shards pick up at their next step
boundary. Replicas keep their old experts too until the switch is *settled* — every shard that asked for the
table recently has asked again since the switch, so none sends by the old placement any more (or
`settle_timeout_s` passed) — and only then drop them. A replica that starts meanwhile loads the active and the
pending placement (`placements()`). Outputs do not change: a (layer, expert) computes the same bits in any
group that holds it.

    active v0 ──rebalance()──► pending v1 ──all replicas hold v1──► active v1 ──shards moved──► settled
                                   │ replicas extend                     table version + 1        replicas retain
                                   └── not held by all within switch_timeout_s: abandoned (logged)

Lost groups. When a shard reports the last replica of a group dead, the group's experts would compute nowhere
until a new replica has started and loaded them (seconds to tens of seconds of stalled layers). With
`cover_lost_groups`, the service switches at once to a covering placement (`experts.cover`): the surviving
groups take the lost group's experts, which they load in the background like a rebalance's, and the table
switches once they hold them, typically within a second or two. The placement before the first loss is kept as
*home*. When a replica of a lost group registers again (it loads its home experts at start: `placements`), the
service switches back: to home once no group is lost, else to a cover of the groups still lost. Rebalancing
waits while a group is covered. A switch in progress is replaced by the newer one (the replicas hold both sets
until a switch settles, so nothing is dropped early), and placement versions never repeat.

    home v0 ──group 1 lost──► cover v1 (pending ► active) ──a group 1 replica registers──► home as v2

Refusal. With `ExpectedReplicas`, a replica that registers with a spec (directly, or again from a heartbeat) must
have the model's hidden size, an allowed weight dtype, and at least the experts that the placement it says it
holds gives its group (more is fine: during a switch it holds the old and the new ones). Otherwise `register`
raises `ReplicaRefused` naming the mismatch, the table stays as it was and serving goes on; `describe` lists the
last refusals.
"""

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from experts import eplb
from experts.cover import cover
from experts.placement import Placement
from router_service.routing_table import RoutingTable, TableSnapshot
from router_service.transport import ReplicaInfo, ReplicaSpec

logger = logging.getLogger(__name__)

REFUSALS_KEPT = 16  # refusals that `describe` lists, the newest last


@dataclass(frozen=True)
class RebalancePolicy:
    interval_s: float | None = None  # periodic rebalancing every this many seconds; None: only on request
    window_s: float = 60.0  # load window that balancedness and the planner read
    min_gain: float = 0.05  # periodic: least gain in mean balancedness worth moving experts for
    switch_timeout_s: float = 120.0  # a pending placement not held by every replica by then is abandoned
    settle_timeout_s: float = 30.0  # at most this long after a switch, replicas drop the old experts
    cover_lost_groups: bool = True  # survivors take a group's experts when its last replica dies


@dataclass(frozen=True)
class ExpectedReplicas:
    """What every group replica of this deployment must hold besides its group's experts."""

    hidden_size: int
    dtypes: tuple[str, ...]  # weight dtype names a replica may hold, e.g. ("bfloat16",)

    def mismatches(self, spec: ReplicaSpec, placement: Placement, group_id: int) -> list[str]:
        """Why a replica with `spec` cannot serve group `group_id` of `placement`; empty when it can. Holding
        experts the placement gives other groups is no reason (a replica keeps moved experts until a switch
        settles); lacking one of its own, or holding one the model does not have, is."""
        found = []
        if spec.hidden_size != self.hidden_size:
            found.append(f"has hidden size {spec.hidden_size}; this model's is {self.hidden_size}")
        if spec.dtype not in self.dtypes:
            found.append(f"holds {spec.dtype} weights; this deployment serves {' or '.join(self.dtypes)}")
        if len(spec.experts) > placement.num_layers:
            found.append(f"holds experts of {len(spec.experts)} layers; the model has {placement.num_layers}")
        unknown = sorted({e for held in spec.experts for e in held if not 0 <= e < placement.num_experts})
        if unknown:
            found.append(f"holds experts {unknown}; the model has experts 0..{placement.num_experts - 1}")
        held = list(spec.experts) + [()] * (placement.num_layers - len(spec.experts))
        lacking = [f"layer {layer}: {missing}" for layer in range(placement.num_layers)
                   if (missing := sorted(set(placement.experts_of(group_id, layer)) - set(held[layer])))]
        if lacking:
            found.append(f"lacks experts {', '.join(lacking)} that placement v{placement.version} gives it")
        return found


class ReplicaRefused(ValueError):
    """A replica whose `ReplicaSpec` does not fit this deployment; the message names the replica and the mismatch."""


class LoadWindow:
    """Per-(layer, expert) token counts of the last `seconds`, kept in one-second buckets (bounded memory)."""

    def __init__(self, num_layers: int, num_experts: int, seconds: float):
        self.shape, self.seconds = (num_layers, num_experts), seconds
        self._buckets: deque[tuple[int, torch.Tensor]] = deque()

    def add(self, counts: torch.Tensor, now: float) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1].add_(counts)
        else:
            self._buckets.append((second, counts.clone()))
        self._prune(now)

    def total(self, now: float) -> torch.Tensor:
        self._prune(now)
        out = torch.zeros(self.shape, dtype=torch.long)
        for _, counts in self._buckets:
            out += counts
        return out

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.seconds:
            self._buckets.popleft()


class RouterService:
    def __init__(self, placement: Placement, is_alive: Callable[[ReplicaInfo], bool] | None = None,
                 policy: RebalancePolicy = RebalancePolicy(),
                 heartbeat_timeout_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 expected: ExpectedReplicas | None = None):
        """`heartbeat_timeout_s`: a replica that has not heartbeated for this long counts as not live in
        `missing_groups` and `describe` (None: replicas that do not heartbeat, like the actors', are live).
        `expected`: what a registering replica's spec must match (None: specs are not checked)."""
        self.table = RoutingTable(placement)
        self.expected = expected
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.is_alive = is_alive or (lambda info: True)
        self.policy, self.clock = policy, clock
        self._load = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.long)
        self._window = LoadWindow(placement.num_layers, placement.num_experts, policy.window_s)
        self._served: dict[str, int] = {}  # replica id -> tokens it computed, from its heartbeats
        self._beats: dict[str, float] = {}  # replica id -> time of its last heartbeat
        self._holds: dict[str, int] = {}  # replica id -> placement version whose experts it holds
        self._shards: dict[str, float] = {}  # shard id -> when it last asked for the table
        self._pending: tuple[Placement, float] | None = None  # (placement, since)
        self._version = placement.version  # the newest placement version planned: versions never repeat
        self._lost: set[int] = set()  # groups whose experts the survivors cover
        self._home: Placement | None = None  # the placement before the first loss, while a group is lost
        self._switched_at: float | None = None
        self._last_plan = self._started = clock()
        self.last_rebalance: dict | None = None
        self._refused: deque[dict] = deque(maxlen=REFUSALS_KEPT)
        self._lock = threading.Lock()  # the actor serves calls concurrently (a health check may block)

    # ---- replicas ----

    def register(self, info: ReplicaInfo, placement_version: int | None = None) -> int:
        """Add a replica; `placement_version` is the newest placement whose experts it holds (default: the
        active one). Raises `ReplicaRefused`, leaving the table as it was, when its spec does not fit."""
        with self._lock:
            self._check(info, placement_version)
            version = self.table.register(info)
            self._holds[info.replica_id] = self.table.placement.version if placement_version is None \
                else placement_version
            self._beats[info.replica_id] = self.clock()
            if info.group_id in self._lost:
                self._recover(info.group_id)
        logger.info("replica %s of group %d registered (table v%d)", info.replica_id, info.group_id, version)
        return version

    def _check(self, info: ReplicaInfo, placement_version: int | None) -> None:
        """Refuse a replica whose spec does not fit (see the module note); the refusal is kept for `describe`.
        A replica names the pending placement's version once it loaded it; any other version means the active
        placement, whose experts it must hold to serve the table."""
        placement = self.table.placement
        if self.expected is None or info.spec is None or not 0 <= info.group_id < placement.num_groups:
            return  # the table refuses an unknown group itself
        if self._pending is not None and placement_version == self._pending[0].version:
            placement = self._pending[0]
        found = self.expected.mismatches(info.spec, placement, info.group_id)
        if found:
            reason = f"replica {info.replica_id} of group {info.group_id} " + "; ".join(found)
            self._refused.append({"replica_id": info.replica_id, "group": info.group_id, "reason": reason,
                                  "at": time.time()})
            logger.warning("refused: %s", reason)
            raise ReplicaRefused(reason)

    def deregister(self, replica_id: str) -> int:
        with self._lock:
            for known in (self._served, self._beats, self._holds):
                known.pop(replica_id, None)
            return self.table.deregister(replica_id)

    def heartbeat(self, info: ReplicaInfo, tokens_served: int, placement_version: int | None = None) -> dict:
        """A replica's periodic report: registers it again if this service lost it (it restarted). The answer
        tells it what to hold: `placement` (None when it holds it already) and whether the last switch has
        `settled`, so that it may drop experts the active placement no longer gives it. Raises `ReplicaRefused`
        when it must register again and its spec does not fit (nothing of it is recorded then)."""
        with self._lock:
            known = self.table.get(info.replica_id) == info
        if not known:
            self.register(info, placement_version)
        with self._lock:
            self._served[info.replica_id] = tokens_served
            self._beats[info.replica_id] = self.clock()
            if placement_version is not None:
                self._holds[info.replica_id] = placement_version
        self.tick()
        with self._lock:
            target = self._pending[0] if self._pending else self.table.placement
            return {"placement": None if placement_version == target.version else target,
                    "settled": self._pending is None and self._settled()}

    def placements(self, group_id: int | None = None) -> list[Placement]:
        """What a starting replica of `group_id` loads: the active placement, its home one if the group is lost
        (covered by others now, it is switched back once this replica registers), then the pending one if a
        switch is under way."""
        with self._lock:
            return [self.table.placement] + ([self._home] if group_id in self._lost else []) + \
                ([self._pending[0]] if self._pending else [])

    def report_failure(self, replica_id: str) -> None:
        """A shard could not reach a replica: drop it if its health check fails (a restart re-registers it)."""
        with self._lock:
            info = self.table.get(replica_id)
        if info is not None and not self.is_alive(info):
            with self._lock:
                if self.table.get(replica_id) is info:  # not re-registered meanwhile
                    logger.warning("replica %s is dead; dropped from the routing table", replica_id)
                    self.table.deregister(replica_id)
                    if not self.table.snapshot().replicas_of(info.group_id):
                        self._cover(info.group_id)

    # ---- lost groups ----

    def _cover(self, group_id: int) -> None:
        """The last replica of `group_id` died: switch to a placement where the survivors hold its experts."""
        if not self.policy.cover_lost_groups or group_id in self._lost:
            return
        home = self._home or self.table.placement
        covering = cover(home, self._lost | {group_id}, self._current_load(), self._version + 1)
        if covering is None:
            logger.warning("group %d lost its last replica and no other group is left to cover it", group_id)
            return
        self._lost.add(group_id)
        self._home = home
        logger.warning("group %d lost its last replica: groups %s take its experts (placement v%d)", group_id,
                       sorted(set(range(home.num_groups)) - self._lost), covering.version)
        self._switch(covering)

    def _recover(self, group_id: int) -> None:
        """A replica of a lost group registered: switch back to home, or to a cover of the groups still lost."""
        self._lost.discard(group_id)
        target = cover(self._home, self._lost, self._current_load(), self._version + 1)
        logger.info("group %d is back: placement v%d %s", group_id, target.version,
                    f"covers groups {sorted(self._lost)}" if self._lost else "is home again")
        if not self._lost:
            self._home = None
        self._switch(target)

    def _switch(self, placement: Placement) -> None:
        """Make `placement` pending (replacing a switch in progress) and advance at once."""
        now = self.clock()
        if self._pending is not None:
            logger.info("placement v%d replaced by v%d before every replica held it", self._pending[0].version,
                        placement.version)
        self._version = placement.version
        self._pending = (placement, now)
        self._advance(now)

    def _current_load(self) -> torch.Tensor:
        load = self._window_load(self.clock())
        return load if int(load.sum()) else self._load.clone()

    def missing_groups(self) -> list[int]:
        """Groups that hold experts and have no live replica now, for `/health`: none in the table, or none that
        heartbeated within `heartbeat_timeout_s` (a stopped replica stays in the table until a shard fails on
        it). A lost group that the others cover is not missing."""
        with self._lock:
            snapshot = self.table.snapshot()
            return [g for g in snapshot.needed_groups
                    if not any(self._live(r.replica_id) for r in snapshot.replicas_of(g))]

    def _live(self, replica_id: str) -> bool:
        beat = self._beats.get(replica_id)
        return self.heartbeat_timeout_s is None or (beat is not None and
                                                    self.clock() - beat <= self.heartbeat_timeout_s)

    # ---- shards ----

    def get_table(self, known_version: int, shard_id: str | None = None) -> TableSnapshot | None:
        """A snapshot newer than `known_version`, or None when the caller is up to date. A shard that names
        itself is tracked: after this call it sends by the active placement only."""
        with self._lock:
            if shard_id is not None:
                self._shards[shard_id] = self.clock()
            return self.table.snapshot() if self.table.version != known_version else None

    def record_load(self, counts: list[list[int]]) -> None:
        # In-process shards call this inside the engine's inference mode; the sums must stay ordinary tensors.
        with torch.inference_mode(False), self._lock:
            counts = torch.tensor(counts, dtype=torch.long)
            self._load += counts
            self._window.add(counts, self.clock())

    # ---- rebalancing ----

    def rebalance(self) -> dict:
        """Plan a placement from the load window (the totals since start when the window is empty) and make
        it pending unless it gains nothing. Returns what was decided."""
        with self._lock:
            return self._plan(min_gain=0.0, reason="requested")

    def tick(self) -> None:
        """Periodic work: complete or abandon a pending switch; plan when the policy's interval is due."""
        with self._lock:
            now = self.clock()
            if self._pending is not None:
                self._advance(now)
            elif self.policy.interval_s is not None and now - self._last_plan >= self.policy.interval_s:
                self._plan(min_gain=self.policy.min_gain, reason="periodic")

    def _plan(self, min_gain: float, reason: str) -> dict:
        now = self._last_plan = self.clock()
        current = self.table.placement
        if self._pending is not None:
            return {**self._summary("pending", current, self._pending[0], self._window_load(now)),
                    "message": "a placement switch is already under way"}
        load = self._current_load()
        if self._lost:
            return {**self._summary("unchanged", current, current, load),
                    "message": f"groups {sorted(self._lost)} lost every replica and are covered by the others; "
                               "rebalancing waits until they are back"}
        candidate = dataclasses.replace(eplb.rebalance(load.tolist(), current), version=self._version + 1)
        result = self._summary("unchanged", current, candidate, load)
        if not int(load.sum()):
            result["message"] = "no expert load recorded yet: shards report theirs once a second while serving"
        gain = result["balancedness_after"] - result["balancedness_before"]
        if result["moved"] and gain > 0 and gain >= min_gain:
            result["status"] = "pending"
            self._switch(candidate)
            result["status"] = "applied" if self._pending is None else "pending"
        logger.info("rebalance (%s): %s; balancedness %.3f -> %.3f, %d expert copies move (placement v%d)",
                    reason, result["status"], result["balancedness_before"], result["balancedness_after"],
                    result["moved"], candidate.version if result["status"] != "unchanged" else current.version)
        if result["status"] != "unchanged" or reason == "requested":
            self.last_rebalance = {**result, "reason": reason, "at": time.time()}
        return result

    def _advance(self, now: float) -> None:
        pending, since = self._pending
        live = [r for reps in self.table.snapshot().replicas.values() for r in reps]
        waiting = [r.replica_id for r in live if self._holds.get(r.replica_id) != pending.version]
        if not waiting:
            self.table.set_placement(pending)
            self._pending, self._switched_at = None, now
            logger.info("placement v%d active (table v%d) after %.2f s", pending.version, self.table.version,
                        now - since)
            self._mark_rebalance(pending, "applied")
        elif now - since > self.policy.switch_timeout_s:
            self._pending = None
            logger.warning("placement v%d abandoned: replicas %s did not load it within %.0f s",
                           pending.version, waiting, self.policy.switch_timeout_s)
            self._mark_rebalance(pending, "abandoned")

    def _mark_rebalance(self, placement: Placement, status: str) -> None:
        if self.last_rebalance is not None and self.last_rebalance["placement_version"] == placement.version:
            self.last_rebalance["status"] = status

    def _settled(self) -> bool:
        if self._switched_at is None:
            return True
        now, since = self.clock(), self._switched_at
        if now - since >= self.policy.settle_timeout_s:
            return True
        recent = (t for t in self._shards.values() if now - t < self.policy.settle_timeout_s)
        return all(t >= since for t in recent)

    def _window_load(self, now: float) -> torch.Tensor:
        return self._window.total(now)

    @staticmethod
    def _summary(status: str, current: Placement, candidate: Placement, load: torch.Tensor) -> dict:
        rows = load.tolist()
        before, after = current.balancedness(rows), candidate.balancedness(rows)
        moved = sum(len(set(candidate.layer_experts_of(g)) - set(current.layer_experts_of(g)))
                    for g in range(current.num_groups))
        return {"status": status, "placement_version": candidate.version, "moved": moved,
                "balancedness_before": sum(before) / len(before), "balancedness_after": sum(after) / len(after)}

    # ---- views ----

    def load_stats(self) -> dict:
        """Tokens routed per (layer, expert), per expert and per group since start, and the load window."""
        with self._lock:
            placement, total = self.table.placement, self._load.clone()
            window = self._window_load(self.clock())
        per_layer_group = placement.group_loads(total.tolist())
        return {"seconds": self.clock() - self._started, "per_layer_expert": total.tolist(),
                "per_expert": total.sum(dim=0).tolist(),
                "per_group": [round(sum(layer[g] for layer in per_layer_group), 3)
                              for g in range(placement.num_groups)],
                "window": {"seconds": self.policy.window_s, "per_layer_expert": window.tolist()}}

    def describe(self) -> dict:
        """Placement (per layer, with redundant copies), live replicas, load and balancedness, rebalancing, the
        last refused replicas: the `/v1/experts` document."""
        load = self.load_stats()
        now = self.clock()
        with self._lock:
            snapshot = self.table.snapshot()
            served, beats = dict(self._served), dict(self._beats)
            alive = {r.replica_id: self._live(r.replica_id) for reps in snapshot.replicas.values() for r in reps}
            pending = self._pending[0].version if self._pending else None
            last = dict(self.last_rebalance) if self.last_rebalance else None
            refused = [dict(r) for r in self._refused]
            lost, home = sorted(self._lost), self._home.version if self._home else None
        placement = snapshot.placement
        window = load["window"]["per_layer_expert"]
        per_layer = placement.balancedness(window)
        groups = [{"group": g,
                   "experts": sorted({e for _, e in placement.layer_experts_of(g)}),
                   "slots": [list(placement.experts_of(g, layer)) for layer in range(placement.num_layers)],
                   "replicas": [{"replica_id": r.replica_id, "endpoints": dict(r.endpoints),
                                 "tokens_served": served.get(r.replica_id, 0), "alive": alive[r.replica_id],
                                 "last_heartbeat_s": round(now - beats[r.replica_id], 3)
                                 if r.replica_id in beats else None}
                                for r in snapshot.replicas.get(g, ())]}
                  for g in range(placement.num_groups)]
        policy = self.policy
        return {"table_version": snapshot.version, "placement_version": placement.version,
                "num_layers": placement.num_layers, "num_experts": placement.num_experts,
                "slots_per_group": placement.slots_per_group, "groups": groups, "load": load,
                "balancedness": {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)},
                "placement": placement.to_dict(),
                "rebalance": {"enabled": policy.interval_s is not None, "interval_s": policy.interval_s,
                              "window_s": policy.window_s, "min_gain": policy.min_gain,
                              "pending_version": pending, "last": last},
                "lost_groups": lost, "home_version": home,
                "refused": refused}
