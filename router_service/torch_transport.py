"""The `torch` transport: a layer's expert batches go out and come back by all_to_all over a process group.

Lockstep. A session is one attention shard (rank 0) and the group replicas it sends to (ranks 1..n, in the
order of the epoch's member list). A collective needs every rank, so each layer is the same four
all_to_all_single calls on every rank; a member with nothing to do takes part with empty splits:

    1. header   [W, 7] int64, row r for rank r: (command, layer_id, N_r, H, k, dtype index, row bytes)
    2. hidden   [N_r, H] as bytes ([N_r, row bytes] uint8), shard -> member r
    3. route    [N_r, 2k] float64, shard -> member r: expert ids, then weights (both exact in float64)
    4. results  [A_r + 1, H] as bytes, member r -> shard: the [A_r, H] slot outputs, then a status row whose
                first byte is OK (0) or FAILED (1; the reason is under `error/{replica_id}`)

Sizes. Both sides know every split from the header and the route alone (A_r: the route's ids >= 0), and rows
travel as bytes, so a member stays in lockstep whatever it gets: a batch its group rejects, a header it cannot
use (a dtype index it does not know, a hidden size that is not its group's) or a group answer of the wrong shape
is answered FAILED. It has to be so because a collective does not report a wrong size cleanly: gloo aborts the
process that receives a chunk longer than it posted and silently takes a shorter one. Against a member that
sends short anyway (one speaking another version of this protocol) the shard presets each status row to
NO_ANSWER (255); a row left so comes back as a `ReplicaFailure` naming the replica, and the epoch goes on.

Epochs. Membership changes only by forming a new group. The shard allocates epoch n in the TCPStore, writes
its plan (members, backend, timeouts) under `PrefixStore(f"{session}/epoch{n}")`, waits (bounded) for every
member to mark itself joined, then writes `go` (or `abandon`, and retries without the absentees) and all
build the group on that prefix. The header command LEAVE ends an epoch cleanly; members then wait for the
next epoch that lists them. A member that dies breaks the collective (gloo: "connection closed by peer", or
the layer timeout). The shard drops the group, which breaks it for the survivors too, tells dead from alive
by heartbeats (a counter each member bumps every `heartbeat_interval`; dead: it did not move for
`heartbeat_timeout`, or sooner, when the member's ExpertService endpoint refuses connections because its
process is gone), forms an epoch of the live members and redoes the layer. A send whose replica is gone
comes back as `ReplicaFailure`, and the caller re-sends it elsewhere (experts are pure). `last_stall_s` is
how long that held the layer up.

The store. Each session's TCPStore is served by its shard (rank 0), so a session depends on nothing but its
own ranks: it outlives a restart of the router (which only lists sessions for the replicas to join), and it
ends with its shard. Members then find the store gone and stop (`done`).

Host syncs per layer: the header exchange and the answer sizes (the route's slot counts per member), which
size the collectives. With NCCL the token rows themselves never leave the GPU.

Store keys under the session: `epochs` (counter), `current`, `heartbeat/{replica_id}` (counter), and under
`epoch{n}/`: `plan`, `joined/{replica_id}`, `go`, `error/{replica_id}`, and the process group's own keys.

Legend: W ranks (the shard + n members), N rows sent to one member, k slots per token, A slots one member
computes (expert id >= 0), H hidden.
"""

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from experts.expert_group import ExpertBatch
from router_service.grpc_transport import refuses
from router_service.transport import ReplicaFailure, ReplicaInfo

logger = logging.getLogger(__name__)

LAYER, LEAVE = 0, 1  # header commands
HEADER = 7  # header columns: command, layer_id, N, H, k, dtype index, row bytes
OK, FAILED, NO_ANSWER = 0, 1, 255  # first byte of a reply's status row
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
POLL_S = 0.01  # store polling while an epoch forms (rare; never per layer)
REFUSAL_CHECK_S = 0.3  # a member silent this long (its beat is every 0.25 s) has its endpoint checked


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def _connect(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=_seconds(30), wait_for_workers=False)


def _make_group(store: dist.Store, rank: int, world: int, backend: str, timeout: float):
    """A group of our own, never the global default one: a process may take part in several sessions.

    NCCL: by default PyTorch's watchdog tears the whole process down when a collective fails or times out,
    and `wait()` returns before the collective ends. Failover needs the gloo behaviour instead: a wait that
    blocks and raises, after which the group is dropped and a new epoch formed. Blocking wait gives that (set
    before the first NCCL group of the process, which reads it). Not yet exercised on GPUs."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _seconds(timeout)
        return dist.ProcessGroupNCCL(store, rank, world, options)
    return dist.ProcessGroupGloo(store, rank, world, _seconds(timeout))


def _wire_dtype(index: int, h: int, row: int) -> torch.dtype:
    """The dtype a layer header names; raises for an index this side does not know or rows of another width."""
    if not 0 <= index < len(DTYPES):
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in DTYPES)
        raise ValueError(f"the header names dtype index {index}; this replica knows 0..{len(DTYPES) - 1} ({names}): "
                         "run the shard and the replicas from one release")
    if row != h * DTYPES[index].itemsize:
        raise ValueError(f"rows of {row} bytes cannot hold {h} {DTYPES[index]} values")
    return DTYPES[index]


def _all_to_all(pg, out: torch.Tensor, inp: torch.Tensor, out_rows: list[int], in_rows: list[int],
                timeout: float | None = None):
    """all_to_all_single along dim 0 (split sizes in rows); returns the work to wait on."""
    options = dist.AllToAllOptions()
    if timeout is not None:
        options.timeout = _seconds(timeout)
    return pg.alltoall_base(out, inp, out_rows, in_rows, options)


class TorchTransport:
    """The shard side, rank 0. `members()` gives the live replicas (the routing table's); when it changes, the
    next `forward` starts a new epoch. `join_timeout` bounds how long an epoch waits for its members."""

    name = "torch"

    def __init__(self, store_host: str, store_port: int, session: str, members: Callable[[], list[ReplicaInfo]],
                 timeout: float = 5.0, heartbeat_timeout: float = 2.0, join_timeout: float | None = None):
        self.session, self.members = session, members
        self.timeout, self.heartbeat_timeout = timeout, heartbeat_timeout
        self.join_timeout = timeout if join_timeout is None else join_timeout
        self.epoch = 0  # the current epoch; 0 before the first
        self.last_stall_s: float | None = None  # how long the last failover held a layer up
        self._store = _connect(store_host, store_port)
        self._pg, self._backend, self._ranks = None, "gloo", {}  # ranks: replica id -> rank 1..n
        self._excluded: dict[str, int] = {}  # replica id -> its heartbeat count when it was left out
        self._device = torch.device("cpu")  # where the layers' rows live (a GPU for NCCL)
        self._lock = threading.Lock()

    def forward(self, sends: list[tuple[ReplicaInfo, ExpertBatch]]) -> list[torch.Tensor | ReplicaFailure]:
        batches = [batch for _, batch in sends]
        if len({(b.hidden.shape[1:], b.expert_ids.shape[1:], b.hidden.dtype, b.hidden.device) for b in batches}) > 1:
            raise ValueError("a layer's batches travel in one tensor: give them one hidden size, k, dtype, device")
        if batches and batches[0].hidden.dtype not in DTYPES:
            raise ValueError(f"the torch transport sends {DTYPES}, not {batches[0].hidden.dtype}")
        with self._lock:
            backend = "nccl" if any(b.hidden.is_cuda for b in batches) else "gloo"
            if batches:
                self._device = batches[0].hidden.device  # the header travels where the rows do
            wanted = self._wanted()
            if wanted != list(self._ranks) or backend != self._backend or (wanted and self._pg is None):
                self._form_epoch(wanted, backend)  # at a step boundary: nothing is in flight
            results: list = [None] * len(sends)
            rounds: list[dict[str, int]] = []  # replica id -> send index; a replica at most once per exchange
            for i, (replica, _) in enumerate(sends):
                free = next((r for r in rounds if replica.replica_id not in r), None)
                if free is None:
                    rounds.append(free := {})
                free[replica.replica_id] = i
            for exchange in rounds:
                self._run_round(exchange, batches, results)
            return results

    def close(self) -> None:
        with self._lock:
            self._leave_epoch()

    def _wanted(self) -> list[str]:
        """Listed replicas, minus the ones left out earlier whose heartbeat has not moved since."""
        listed = list(dict.fromkeys(m.replica_id for m in self.members()))
        self._excluded = {rid: beat for rid, beat in self._excluded.items()
                          if rid in listed and self._heartbeat(rid) == beat}
        return [rid for rid in listed if rid not in self._excluded]

    def _form_epoch(self, wanted: list[str], backend: str) -> None:
        """Publish epochs until all of `wanted` join; each retry goes on without the ones that did not."""
        self._leave_epoch()
        self._backend = backend
        while wanted:
            n = self._store.add(f"{self.session}/epochs", 1)
            store = dist.PrefixStore(f"{self.session}/epoch{n}", self._store)
            store.set("plan", json.dumps({"members": wanted, "backend": backend, "timeout": self.timeout,
                                          "join_timeout": self.join_timeout}))
            self._store.set(f"{self.session}/current", str(n))
            keys, deadline = [f"joined/{rid}" for rid in wanted], time.monotonic() + self.join_timeout
            while not store.check(keys) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            missing = [rid for rid, key in zip(wanted, keys) if not store.check([key])]
            store.set("go", "abandon" if missing else "go")
            if not missing:
                try:
                    self._pg = _make_group(store, 0, len(wanted) + 1, backend, self.timeout)
                    self.epoch, self._ranks = n, {rid: rank for rank, rid in enumerate(wanted, start=1)}
                    logger.info("session %s: epoch %d with %s", self.session, n, wanted)
                    return
                except RuntimeError as error:
                    logger.warning("session %s: epoch %d did not form: %s", self.session, n, error)
                missing = self._find_dead(wanted) or wanted  # all alive: leave all out until they beat again
            logger.warning("session %s: epoch %d goes on without %s", self.session, n, missing)
            self._excluded.update({rid: self._heartbeat(rid) for rid in missing})
            wanted = [rid for rid in wanted if rid not in missing]

    def _leave_epoch(self) -> None:
        """Tell the members to leave (if the group still works), then drop it; its sockets close with it."""
        if self._pg is not None and self._ranks:
            header = torch.zeros(len(self._ranks) + 1, HEADER, dtype=torch.long)
            header[1:, 0] = LEAVE
            try:
                self._exchange_header(header)
            except RuntimeError as error:
                logger.info("session %s: epoch %d was already broken: %s", self.session, self.epoch, error)
        self._pg, self._ranks = None, {}

    def _heartbeat(self, rid: str) -> int:
        return self._store.add(f"{self.session}/heartbeat/{rid}", 0)

    def _find_dead(self, rids: list[str]) -> list[str]:
        """Alive: its counter moves within `heartbeat_timeout` by this process's clock (no clock skew). Dead
        sooner: one that has not beaten after `REFUSAL_CHECK_S` and whose ExpertService refuses connections."""
        start, alive, gone = {rid: self._heartbeat(rid) for rid in rids}, set(), set()
        began = time.monotonic()
        checked = False
        while len(alive) + len(gone) < len(rids) and time.monotonic() < began + self.heartbeat_timeout:
            time.sleep(POLL_S)
            alive.update(rid for rid in rids if rid not in alive and self._heartbeat(rid) != start[rid])
            if not checked and time.monotonic() - began >= REFUSAL_CHECK_S:
                checked, endpoints = True, {m.replica_id: m.endpoints.get("grpc") for m in self.members()}
                gone = {rid for rid in rids if rid not in alive and endpoints.get(rid) and refuses(endpoints[rid])}
        return [rid for rid in rids if rid not in alive]

    def _run_round(self, exchange: dict[str, int], batches: list[ExpertBatch], results: list) -> None:
        """One layer exchange; if the collective breaks, form an epoch of the live members and redo it."""
        started, broken = time.monotonic(), 0
        while True:
            for rid in [rid for rid in exchange if rid not in self._ranks]:
                results[exchange.pop(rid)] = ReplicaFailure(rid, self._absent(rid))
            if not exchange:
                break
            try:
                answers = self._exchange({self._ranks[rid]: batches[i] for rid, i in exchange.items()})
                for rid, i in exchange.items():
                    results[i] = answers[self._ranks[rid]]
                break
            except RuntimeError as error:  # recover outside the except block: its traceback holds the group,
                failure = str(error)       # and dropping the group is what sets the survivors free
            broken += 1
            logger.warning("session %s: epoch %d broke: %s", self.session, self.epoch, failure)
            members, self._pg, self._ranks = list(self._ranks), None, {}
            dead = self._find_dead(members)
            if not dead and broken > 1:  # all alive, yet it broke twice: a failover cannot help this layer
                for rid, i in exchange.items():
                    results[i] = ReplicaFailure(rid, f"the layer collective failed twice: {failure}")
                break
            self._excluded.update({rid: self._heartbeat(rid) for rid in dead})
            self._form_epoch(self._wanted(), self._backend)
        if broken:
            self.last_stall_s = time.monotonic() - started
            logger.warning("session %s: failover held the layer up %.3f s (now epoch %d)", self.session,
                           self.last_stall_s, self.epoch)

    def _absent(self, rid: str) -> str:
        return (f"replica {rid} is not in epoch {self.epoch} of session {self.session!r}: not listed, dead (no "
                f"heartbeat for {self.heartbeat_timeout} s) or not joined within {self.join_timeout} s; "
                "re-send its batch to another replica")

    def _exchange_header(self, header: torch.Tensor) -> None:
        device, ones = self._device if self._backend == "nccl" else "cpu", [1] * len(header)
        _all_to_all(self._pg, torch.empty_like(header, device=device), header.to(device), ones, ones).wait()

    @staticmethod
    def _layer_header(batches: dict[int, ExpertBatch], world: int) -> torch.Tensor:
        """[W, HEADER]: row r goes to rank r (see the module note); a member without a batch gets N = 0."""
        first = next(iter(batches.values()))
        h, k, dtype = first.hidden.shape[1], first.expert_ids.shape[1], first.hidden.dtype
        header = torch.zeros(world, HEADER, dtype=torch.long)
        header[1:] = torch.tensor([LAYER, -1, 0, h, k, DTYPES.index(dtype), h * dtype.itemsize])
        for r, batch in batches.items():
            header[r, 1:3] = torch.tensor([batch.layer_id, len(batch.hidden)])
        return header

    def _exchange(self, batches: dict[int, ExpertBatch]) -> dict[int, torch.Tensor | ReplicaFailure]:
        """One lockstep layer. batches: rank -> batch; the other members take part with empty splits."""
        world, ranks = len(self._ranks) + 1, sorted(batches)
        first = batches[ranks[0]]
        h, k, dtype, device = first.hidden.shape[1], first.expert_ids.shape[1], first.hidden.dtype, first.hidden.device
        row = h * dtype.itemsize  # bytes of one hidden row
        rows = [len(batches[r].hidden) if r in batches else 0 for r in range(world)]  # N_r (0 for rank 0)
        slots = dict(zip(ranks, torch.stack([(batches[r].expert_ids >= 0).sum() for r in ranks]).tolist()))  # A_r
        back = [slots[r] + 1 if r in batches else int(r > 0) for r in range(world)]  # one sync for all members
        self._exchange_header(self._layer_header(batches, world))
        zeros = [0] * world
        hidden = torch.cat([batches[r].hidden for r in ranks]).view(torch.uint8)  # [sum N_r, H] as bytes
        route = torch.cat([torch.cat([batches[r].expert_ids.double(), batches[r].weights.double()], 1)
                           for r in ranks]).to(device)  # [sum N_r, 2k]
        _all_to_all(self._pg, hidden.new_empty(0, row), hidden, zeros, rows).wait()
        _all_to_all(self._pg, route.new_empty(0, 2 * k), route, zeros, rows).wait()
        raw = torch.empty(sum(back), row, dtype=torch.uint8, device=device)  # [sum (A_r + 1), H] as bytes
        status_rows = [sum(back[:r + 1]) - 1 for r in ranks]  # each reply ends with its status row
        raw[status_rows, 0] = NO_ANSWER  # a reply that comes short leaves it so
        _all_to_all(self._pg, raw, hidden.new_empty(0, row), back, zeros).wait()
        parts, rids = raw.view(dtype).split(back), list(self._ranks)
        errors = dist.PrefixStore(f"{self.session}/epoch{self.epoch}/error", self._store)
        answers: dict[int, torch.Tensor | ReplicaFailure] = {}
        for r, status in zip(ranks, raw[status_rows, 0].tolist()):
            rid = rids[r - 1]
            if status == OK:
                answers[r] = parts[r][:-1]  # [A_r, H]
            elif status == FAILED:
                answers[r] = ReplicaFailure(rid, f"replica {rid} could not compute its batch: "
                                                 f"{errors.get(rid).decode()}")
            else:
                answers[r] = ReplicaFailure(rid, f"replica {rid} answered fewer than the {back[r]} rows it owed: "
                                                 "it speaks another version of the torch transport's protocol; "
                                                 "run the shard and the replicas from one release")
        return answers


class TorchMember:
    """The member side: one replica of one group in one session. `start()` runs two daemon threads: one bumps
    the heartbeat counter, one joins each epoch that lists this replica and serves its layers."""

    def __init__(self, group, replica_id: str, store_host: str, store_port: int, session: str,
                 heartbeat_interval: float = 0.25, idle_timeout: float = 600.0):
        self.group, self.replica_id, self.session = group, replica_id, session
        self.heartbeat_interval, self.idle_timeout = heartbeat_interval, idle_timeout
        self.epoch = 0  # the last epoch this member joined
        self._address = (store_host, store_port)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{replica_id}"),
                         threading.Thread(target=self._run, daemon=True, name=f"member-{replica_id}")]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and leave. Between epochs that is at once; inside one, the thread may stay (a daemon)
        until the collective it waits in ends: the shard's next layer, or `idle_timeout`."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def done(self) -> bool:
        """Stopped, or the session ended (its store is gone: the shard that owns it stopped or died)."""
        return self._stopping.is_set()

    def _beat(self) -> None:
        try:
            store = _connect(*self._address)
            while not self._stopping.is_set():
                store.add(f"{self.session}/heartbeat/{self.replica_id}", 1)
                self._stopping.wait(self.heartbeat_interval)
        except RuntimeError as error:  # the store is gone
            logger.info("replica %s: session %s ended: %s", self.replica_id, self.session, error)
            self._stopping.set()

    def _run(self) -> None:
        try:
            store = _connect(*self._address)
            while (found := self._next_epoch(store)) is not None:
                try:
                    self._serve(store, *found)
                except RuntimeError as error:  # a collective broke: a peer died, or the shard dropped the group
                    logger.warning("replica %s left epoch %d: %s", self.replica_id, found[0], error)
        except RuntimeError as error:  # the store is gone: the session ended
            logger.info("replica %s: session %s ended: %s", self.replica_id, self.session, error)
        finally:
            self._stopping.set()  # a member that cannot serve must not look alive

    def _next_epoch(self, store: dist.Store) -> tuple[int, dict] | None:
        """Wait for the latest epoch to be newer, list this replica and still be gathering members (older ones
        were superseded; one whose `go` is written runs without us)."""
        current, seen = f"{self.session}/current", self.epoch
        while not self._stopping.is_set():
            latest = int(store.get(current)) if store.check([current]) else 0
            if latest > seen:
                seen, epoch_store = latest, dist.PrefixStore(f"{self.session}/epoch{latest}", store)
                plan = json.loads(epoch_store.get("plan"))
                if self.replica_id in plan["members"] and not epoch_store.check(["go"]):
                    return latest, plan
            self._stopping.wait(POLL_S)
        return None

    def _serve(self, store: dist.Store, n: int, plan: dict) -> None:
        """Join epoch n (mark joined, wait for the shard's go), then serve layers until told to leave."""
        self.epoch, epoch_store = n, dist.PrefixStore(f"{self.session}/epoch{n}", store)
        epoch_store.set(f"joined/{self.replica_id}", "1")
        deadline = time.monotonic() + plan["join_timeout"] + plan["timeout"]
        while not epoch_store.check(["go"]):
            if time.monotonic() > deadline or self._stopping.wait(POLL_S):
                return
        if epoch_store.get("go") != b"go":
            return
        rank, world = plan["members"].index(self.replica_id) + 1, len(plan["members"]) + 1
        pg = _make_group(epoch_store, rank, world, plan["backend"], plan["timeout"])
        device = self.group.device if plan["backend"] == "nccl" else torch.device("cpu")
        while self._serve_layer(pg, epoch_store, world, device):
            pass

    def _serve_layer(self, pg, epoch_store: dist.Store, world: int, device: torch.device) -> bool:
        """One lockstep layer (see the module note); False when told to leave. What it sends is sized from the
        header and the route, never from its group's answer."""
        ones, zeros = [1] * world, [0] * world
        header = torch.empty(world, HEADER, dtype=torch.long, device=device)  # row j from rank j
        self._wait_idle(_all_to_all(pg, header, torch.zeros_like(header), ones, ones, self.idle_timeout), device)
        command, layer_id, n, h, k, dtype_index, row = header[0].tolist()
        if command == LEAVE:
            return False
        from_shard = [n] + [0] * (world - 1)
        hidden = torch.empty(n, row, dtype=torch.uint8, device=device)  # [N, H] as bytes
        route = torch.empty(n, 2 * k, dtype=torch.float64, device=device)  # [N, 2k]
        _all_to_all(pg, hidden, hidden.new_empty(0, row), from_shard, zeros).wait()
        _all_to_all(pg, route, route.new_empty(0, 2 * k), from_shard, zeros).wait()
        expert_ids = route[:, :k].long()  # [N, k]
        num_slots = int((expert_ids >= 0).sum())
        reply = torch.zeros(num_slots + 1, row, dtype=torch.uint8, device=device)  # [A + 1, H] as bytes; last: status
        if n:
            try:
                dtype = _wire_dtype(dtype_index, h, row)
                result = self.group.forward(ExpertBatch(layer_id, hidden.view(dtype), expert_ids,
                                                        route[:, k:].float()))  # [A, H]
                if result.shape != (num_slots, h):
                    raise ValueError(f"the group answered {list(result.shape)} for [{num_slots}, {h}] slot outputs")
                reply[:num_slots].view(dtype).copy_(result)
            except Exception as error:  # answered as a failure, never by leaving lockstep
                logger.warning("replica %s: layer %d batch failed: %s", self.replica_id, layer_id, error)
                epoch_store.set(f"error/{self.replica_id}", str(error))
                reply[num_slots, 0] = FAILED
        _all_to_all(pg, reply.new_empty(0, row), reply, zeros, [num_slots + 1] + [0] * (world - 1)).wait()
        return True

    def _wait_idle(self, work, device: torch.device) -> None:
        """Between steps a member may wait long for the next header (up to `idle_timeout`, the op's own
        timeout); wait in slices so that `stop()` is seen. A timed-out gloo wait leaves the op running; a
        timed-out NCCL wait aborts the communicator, so NCCL polls `is_completed` instead."""
        while device.type == "cuda" and not work.is_completed():
            if self._stopping.wait(1e-4):
                raise RuntimeError(f"replica {self.replica_id} is stopping")
        while True:
            try:
                work.wait(_seconds(0.5))
                return
            except RuntimeError:
                if work.is_completed() or self._stopping.is_set():
                    raise
