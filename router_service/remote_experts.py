"""`RemoteExperts`: the `ExpertBackend` of an attention shard whose experts live in other processes.

Per MoE layer: plan the sends (`dispatch.plan_layer`), pick a replica per group, hand the sends to the
transport, and combine the answers in slot order. The engine cannot tell it from `LocalExperts`.

Failover. A send that comes back as a `ReplicaFailure` is re-sent: to another live replica of its group if
there is one, else — after telling the router (which checks the replica and drops it if dead) — to whichever
replica the routing table lists next, typically the restarted one once it re-registers. If the router
meanwhile switches to a placement that covers the lost group (its experts now in the surviving groups: see
`router_service.service`), the layer is planned again under it. The shard waits for either at most
`failover_timeout` seconds, polling the table, and only then raises `ExpertGroupUnavailable`. Because experts
are pure, the re-sent batch computes the same bits, so clients see neither an error nor a different token.

A failed replica is skipped until the table changes after its failure (it was dropped, or re-registered with
new endpoints), so a dead replica costs one failed send per table version, not one per layer. A replica that
the router finds alive stays listed and the table does not change, so it is skipped for one wait round only
(about a second): a send can fail while the replica is up, e.g. to a restarted Ray actor, which registers from
its constructor but answers calls only once that returns. Skipped until a change, a lone replica would be
stranded and its group would fail after `failover_timeout`.

Replica choice. Among a group's live replicas a send goes to the one with the fewest tokens in flight from this
shard (`dispatch.choose_replica`). The choice and the reservation of the batch's tokens happen together under
one lock, so concurrent layer calls — several threads, or two calls of one engine step — spread over the
replicas instead of all seeing zero; the tokens are taken back in a `finally` once the transport returns,
raises or not.

Steps. The engine calls `begin_step()` before a forward pass and `end_step()` after it. A new routing table is
picked up only in `begin_step`, so every layer of one step sees the same replicas (a collective transport forms
its epoch once per membership change, at the step's first layer).

Host syncs. Per layer the plan costs one: the per-group row and slot counts (`dispatch.plan_layer`), which every
transport needs to size its sends. What each transport adds: `local` none (the group computes on the shard's
device; its grouped compute reads per-expert counts once per batch); `torch` the header exchange and the
answer's size (NCCL keeps the token tensors on the GPU); `grpc` and `ray` copy the batch to host memory and
back. Load counts stay on the device until `end_step`, which moves them to the host once per step.

Load. Tokens routed to each (layer, expert) are counted here and pushed to the router about once a second; the
router aggregates them for autoscaling and the experts dashboard. Pushes happen at step ends, so the last
second of counts before the engine goes idle stays here until the owner calls `flush_load` (a Serve shard does
so every second; `close` does it too). `flush_load` may run on another thread than the engine's.

Stats. With a `stats_sink`, the layer path also gathers what a metrics exporter needs (`LayerPathStats`): token
slots per (replica, layer, expert) as [L, E] tensors added to per send, the seconds of each answered send per
group, failovers and their stalls. They are handed to the sink at a step end at most once per
`stats_interval` seconds, and on `close()`, never per layer. The sink runs on the engine thread: it should
only record numbers.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from experts.expert_group import ExpertBatch
from router_service.dispatch import GroupSend, choose_replica, combine_results, plan_layer
from router_service.routing_table import TableSnapshot
from router_service.transport import ReplicaFailure, ReplicaInfo, Transport

logger = logging.getLogger(__name__)
WAIT_LOG_S = 15.0  # how often a shard waiting for its groups says so


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
class LayerPathStats:
    """What one shard's layer path did since the last flush (plain data, for a metrics sink).

    routed counts the token slots of answered sends only, so summed over replicas it is the layer's load even
    when a batch was re-sent; send_seconds too is of answered sends (dispatch to answer; the whole `forward`
    for a transport that cannot time each send). A failed send shows in failovers and the stall instead.
    """

    transport: str
    routed: dict[str, torch.Tensor] = field(default_factory=dict)  # replica id -> [L, E] long token slots
    replica_groups: dict[str, int] = field(default_factory=dict)  # replica id -> group id
    send_seconds: dict[int, list[float]] = field(default_factory=dict)  # group id -> seconds of each send
    outstanding: dict[str, int] = field(default_factory=dict)  # replica id -> tokens in flight at flush time
    failovers: int = 0  # sends re-sent since the last flush
    failover_stall_seconds: list[float] = field(default_factory=list)  # per layer that needed a re-send


@dataclass
class FailoverStats:
    resent_batches: int = 0
    failed_sends: int = 0
    replanned_layers: int = 0  # layers planned again under a placement that changed while they waited
    stall_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))  # per layer re-sent


class RemoteExperts:
    def __init__(self, transport: Transport, router: RouterClient, *, failover_timeout: float = 30.0,
                 startup_timeout: float | None = None, refresh_interval: float = 0.1,
                 load_report_interval: float = 1.0, poll_interval: float = 0.02,
                 stats_sink: Callable[[LayerPathStats], None] | None = None, stats_interval: float = 1.0):
        self.transport, self.router = transport, router
        self.stats_sink, self.stats_interval = stats_sink, stats_interval
        self._times_sends = getattr(transport, "times_sends", False)
        self._lock = threading.Lock()  # replica choice, in-flight tokens and the tallies below
        self.failover_timeout, self.refresh_interval = failover_timeout, refresh_interval
        self.load_report_interval, self.poll_interval = load_report_interval, poll_interval
        self._wait_round_s = poll_interval * 50  # one `_wait_for_change`
        self.table = self._wait_for_table(failover_timeout if startup_timeout is None else startup_timeout)
        self._copy_table: tuple = (-1, None, None)  # (placement version, copies [L, E, C], num_copies [L, E])
        self.outstanding: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self._failed: dict[str, tuple[int, float]] = {}  # replica id -> (table version, time) of its failure
        placement = self.table.placement
        self._load = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.long)  # host, flushed
        self._step_load: torch.Tensor | None = None  # [L, E] on the layers' device, until the step ends
        self._last_refresh = self._last_report = self._last_stats = time.monotonic()
        self._stats = LayerPathStats(transport.name)
        self.failover = FailoverStats()
        self.layer_seconds: deque[float] = deque(maxlen=65536)  # MoE call wall time of recent layers

    # ---- ExpertBackend ----

    def __call__(self, layer_id: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        flat = expert_ids.reshape(-1)
        if self._step_load is None or self._step_load.device != flat.device:
            with torch.inference_mode(False):  # a plain tensor: callers may or may not run in inference mode
                self._step_load = torch.zeros(self._load.shape, dtype=torch.long, device=flat.device)
        self._step_load[layer_id].index_add_(0, flat, torch.ones_like(flat))  # no host sync
        started, results, replanned = time.monotonic(), None, False
        while results is None:  # planned again when a failover brings a new placement (a lost group covered)
            placement = self.table.placement
            if self._copy_table[0] != placement.version:  # a rebalanced table: rebuilt once, not per layer
                self._copy_table = (placement.version, *(t.to(flat.device) for t in placement.copy_table()))
            _, copies, num_copies = self._copy_table
            sends = plan_layer(layer_id, hidden, expert_ids, weights, copies[layer_id], num_copies[layer_id],
                               placement.num_groups)
            results = self._run(sends, started, replanned)
            replanned = True
        out = combine_results(expert_ids.shape[0], expert_ids.shape[1], sends, results).to(hidden.dtype)
        self.layer_seconds.append(time.perf_counter() - t0)
        return out

    # ---- sending with failover ----

    def _run(self, sends: list[GroupSend], started: float, failed: bool) -> list[torch.Tensor] | None:
        """The answers in send order, failing over as the module note says; None when the table's placement
        changed while sends were still unanswered (their groups may hold other experts now: plan again).
        `started`: when the layer began; `failed`: an earlier plan of it failed over already."""
        results: list[torch.Tensor | None] = [None] * len(sends)
        pending, version = list(range(len(sends))), self.table.placement.version
        while True:
            ready: list[tuple[int, ReplicaInfo]] = []
            try:
                for i in pending:
                    if (replica := self._reserve(sends[i])) is not None:
                        ready.append((i, replica))
                answers, seconds = self._forward([(r, sends[i].batch) for i, r in ready])
            finally:
                self._release([(r, sends[i]) for i, r in ready])
            if self.stats_sink is not None:
                self._tally([(r, sends[i]) for i, r in ready], answers, seconds)
            for (i, r), answer in zip(ready, answers):
                if isinstance(answer, ReplicaFailure):
                    self._on_failure(r, answer)
                else:
                    results[i] = answer
            pending = [i for i in pending if results[i] is None]
            if not pending:
                break
            failed = True
            if time.monotonic() > started + self.failover_timeout:
                groups = sorted({sends[i].group_id for i in pending})
                raise ExpertGroupUnavailable(f"expert groups {groups} had no answering replica for "
                                             f"{self.failover_timeout:.0f} s")
            with self._lock:
                self.failover.resent_batches += len(pending)
                self._stats.failovers += len(pending)
            if all(self._pick(sends[i].group_id) is None for i in pending):
                self._wait_for_change()
            if self.table.placement.version != version:
                with self._lock:
                    self.failover.replanned_layers += 1
                logger.warning("expert failover: placement v%d in force; layer %d planned again",
                               self.table.placement.version, sends[0].batch.layer_id)
                return None
        if failed:
            stall = time.monotonic() - started
            with self._lock:
                self.failover.stall_seconds.append(stall)
                self._stats.failover_stall_seconds.append(stall)
            logger.warning("expert failover: layer %d redone after %.3f s", sends[0].batch.layer_id, stall)
        return results

    def _pick(self, group_id: int) -> ReplicaInfo | None:
        now = time.monotonic()
        live = [r for r in self.table.replicas_of(group_id) if not self._skipped(r.replica_id, now)]
        return choose_replica(live, self.outstanding, self.sent)

    def _skipped(self, replica_id: str, now: float) -> bool:
        """Failed, and neither has the table changed since nor has a wait round passed."""
        version, failed_at = self._failed.get(replica_id, (-1, 0.0))
        return version >= self.table.version and now - failed_at < self._wait_round_s

    def _reserve(self, send: GroupSend) -> ReplicaInfo | None:
        """Pick the send's replica and count its tokens in flight there, in one step (see the docstring)."""
        tokens = send.batch.hidden.shape[0]
        with self._lock:
            replica = self._pick(send.group_id)
            if replica is not None:
                rid = replica.replica_id
                self.outstanding[rid] = self.outstanding.get(rid, 0) + tokens
                self.sent[rid] = self.sent.get(rid, 0) + tokens
        return replica

    def _release(self, reserved: list[tuple[ReplicaInfo, GroupSend]]) -> None:
        with self._lock:
            for replica, send in reserved:
                self.outstanding[replica.replica_id] -= send.batch.hidden.shape[0]

    def _forward(self, pairs: list[tuple[ReplicaInfo, ExpertBatch]]) -> tuple[list, list[float]]:
        """The transport's answers and the seconds of each send."""
        if not pairs:
            return [], []
        if self._times_sends:
            seconds: list[float] = []
            return self.transport.forward(pairs, seconds=seconds), seconds
        began = time.perf_counter()
        answers = self.transport.forward(pairs)
        return answers, [time.perf_counter() - began] * len(pairs)

    def _tally(self, sent: list[tuple[ReplicaInfo, GroupSend]], answers: list, seconds: list[float]) -> None:
        """Add answered sends to the stats: their token slots per (layer, expert) and their seconds."""
        num_layers, num_experts = self._load.shape
        for (replica, send), answer, sec in zip(sent, answers, seconds):
            if isinstance(answer, ReplicaFailure):
                continue
            ids = send.batch.expert_ids.reshape(-1) + 1  # the -1 slots land in bin 0
            slots = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device).index_add_(
                0, ids, torch.ones_like(ids))[1:]  # [E]
            with self._lock:
                stats, rid = self._stats, replica.replica_id
                if rid not in stats.routed:
                    stats.routed[rid] = torch.zeros(num_layers, num_experts, dtype=torch.long, device=ids.device)
                    stats.replica_groups[rid] = replica.group_id
                stats.routed[rid][send.batch.layer_id] += slots
                stats.send_seconds.setdefault(replica.group_id, []).append(sec)

    def _on_failure(self, replica: ReplicaInfo, failure: ReplicaFailure) -> None:
        logger.warning("expert replica %s failed: %s", replica.replica_id, failure.reason)
        with self._lock:
            self.failover.failed_sends += 1
        self._failed[replica.replica_id] = (self.table.version, time.monotonic())
        self.router.report_failure(replica.replica_id)
        self._refresh()

    # ---- steps and the routing table ----

    def begin_step(self) -> None:
        if time.monotonic() - self._last_refresh >= self.refresh_interval:
            self._refresh()

    def end_step(self) -> None:
        """Move the step's load counts to the host (the one sync they cost), and push what is due."""
        if self._step_load is not None:
            counts = self._step_load.to("cpu", copy=True)
            self._step_load.zero_()
            with self._lock:
                self._load += counts
        now = time.monotonic()
        if now - self._last_report >= self.load_report_interval:
            self.flush_load()
        if self.stats_sink is not None and now - self._last_stats >= self.stats_interval:
            self.flush_stats(due_only=True)

    def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        newer = self.router.get_table(self.table.version)
        if newer is not None:
            self.table = newer

    def _wait_for_change(self) -> None:
        version = self.table.version
        end = time.monotonic() + self._wait_round_s
        while self.table.version == version and time.monotonic() < end:
            time.sleep(self.poll_interval)
            self._refresh()

    def _wait_for_table(self, timeout: float) -> TableSnapshot:
        start = time.monotonic()
        next_log = start + WAIT_LOG_S
        while True:
            table = self.router.get_table(-1)
            if table is not None and not table.missing_groups:
                return table
            missing = table.missing_groups if table is not None else "all"
            waited = time.monotonic() - start
            if waited > timeout:
                raise ExpertGroupUnavailable(f"expert groups {missing} did not register within {timeout:g} s")
            if time.monotonic() >= next_log:  # a node for them may be booting: say what is awaited
                logger.warning("waiting for expert groups %s to register (%.0f s of %.0f s)", missing, waited, timeout)
                next_log += WAIT_LOG_S
            time.sleep(self.poll_interval)

    def flush_load(self) -> None:
        """Push the per-(layer, expert) token counts gathered since the last push to the router."""
        with self._lock:
            self._last_report = time.monotonic()
            counts, self._load = self._load, torch.zeros_like(self._load)
        if int(counts.sum()):
            self.router.record_load(counts.tolist())

    def flush_stats(self, due_only: bool = False) -> None:
        """Hand the stats gathered since the last flush to the sink (with `due_only`, only once `stats_interval`
        has passed since then: two threads at a step boundary flush once)."""
        if self.stats_sink is None:
            return
        with self._lock:
            now = time.monotonic()
            if due_only and now - self._last_stats < self.stats_interval:
                return
            self._last_stats = now
            stats, self._stats = self._stats, LayerPathStats(self.transport.name)
            stats.outstanding = dict(self.outstanding)
        with torch.inference_mode(False):  # plain tensors for the sink, even when flushed inside a step
            stats.routed = {rid: counts.to("cpu", copy=True) for rid, counts in stats.routed.items()}
        try:
            self.stats_sink(stats)
        except Exception:  # noqa: BLE001 - metrics must not stop inference
            logger.warning("the layer-path stats sink failed", exc_info=True)

    def close(self) -> None:
        self.flush_load()
        self.flush_stats()
        self.transport.close()
