"""The torch transport (all_to_all over gloo, one process group per epoch) against in-process expert groups.

Parity: every answer equals `LocalTransport`'s bit for bit, including layers where a member receives nothing
(it still takes part, with empty splits). Failover: a member killed with SIGKILL breaks the collective; the
next forward answers the live replicas, returns a `ReplicaFailure` for the dead one within a bounded time,
and later epochs (without it, or with a replacement) serve again. Malformed traffic: a group that raises or
answers the wrong shape, a header a member cannot use, a reply that comes short: the send fails with a reason,
and the next layer on the same epoch equals the local computation.
"""

import contextlib
import multiprocessing
import os
import signal
import time

import pytest
import torch
from torch.distributed import TCPStore

from experts.expert_group import ExpertBatch, ExpertGroup
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from router_service.dispatch import slot_groups
from router_service.torch_transport import DTYPES, TorchMember, TorchTransport
from router_service.transport import LocalTransport, ReplicaFailure, ReplicaInfo
from tests.unit.router_service.torch_member_process import serve_member

HOST = "127.0.0.1"
NUM_GROUPS = 2


@pytest.fixture(scope="module")
def groups(mixtral_dir):
    """The two round_robin groups (experts 0, 2 and 1, 3), loaded in this process: the reference."""
    reader = CheckpointReader(mixtral_dir)
    placement = make_placement(reader.config.num_experts, reader.config.num_layers, NUM_GROUPS, "round_robin")
    return placement, [ExpertGroup.load(reader, placement, g, torch.float32) for g in range(NUM_GROUPS)]


@pytest.fixture
def store():
    """The master store (the router service owns it in production); transports and members are clients."""
    return TCPStore(HOST, 0, is_master=True, wait_for_workers=False)


def layer_batches(groups, layer_id: int, seed: int, num_tokens: int = 7) -> list[ExpertBatch]:
    """One layer's dispatch: random top-k routing over all experts, split into one batch per group."""
    placement, loaded = groups
    config = loaded[0].config
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, config.hidden_size, generator=gen)  # [T, H]
    ids = torch.stack([torch.randperm(config.num_experts, generator=gen)[:config.num_experts_per_tok]
                       for _ in range(num_tokens)])  # [T, k]
    weights = torch.rand(num_tokens, config.num_experts_per_tok, generator=gen).softmax(-1)  # [T, k] fp32
    copies, num_copies = placement.copy_table()
    owner = slot_groups(ids, copies[layer_id], num_copies[layer_id])  # [T, k] group of each slot
    batches = []
    for g in range(NUM_GROUPS):
        rows = (owner == g).any(1)
        batches.append(ExpertBatch(layer_id, hidden[rows], torch.where(owner == g, ids, -1)[rows], weights[rows]))
    return batches


def assert_same(answers, expected):
    assert len(answers) == len(expected)
    for answer, want in zip(answers, expected):
        assert isinstance(answer, torch.Tensor), answer
        assert answer.shape == want.shape and torch.equal(answer, want)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_parity_with_local_groups_over_several_layers(groups, store):
    _, (g0, g1) = groups
    r0, r1 = ReplicaInfo("g0-a", 0), ReplicaInfo("g1-a", 1)
    members = [TorchMember(g, r.replica_id, HOST, store.port, "parity", heartbeat_interval=0.1)
               for g, r in ((g0, r0), (g1, r1))]
    for member in members:
        member.start()
    transport = TorchTransport(HOST, store.port, "parity", lambda: [r0, r1], timeout=5.0)
    local = LocalTransport({"g0-a": g0, "g1-a": g1})
    try:
        for step, layer_id in enumerate([0, 1, 1, 0]):  # several layers in a row on one epoch
            b0, b1 = layer_batches(groups, layer_id, seed=step)
            sends = [(r0, b0), (r1, b1)]
            assert_same(transport.forward(sends), local.forward(sends))
        epoch = transport.epoch

        b0, _ = layer_batches(groups, 1, seed=10)
        assert_same(transport.forward([(r0, b0)]), local.forward([(r0, b0)]))  # g1-a gets empty splits

        b0, b1 = layer_batches(groups, 0, seed=11)
        c0, _ = layer_batches(groups, 1, seed=12)
        sends = [(r0, b0), (r1, b1), (r0, c0)]  # two batches for one replica: two exchanges
        assert_same(transport.forward(sends), local.forward(sends))

        bad = transport.forward([(r0, b1), (r1, b1)])  # group 1's experts sent to group 0: answered, not hung
        assert isinstance(bad[0], ReplicaFailure) and "does not live in group 0" in bad[0].reason
        assert_same(bad[1:], local.forward([(r1, b1)]))
        unknown = transport.forward([(ReplicaInfo("nobody", 0), b0)])
        assert isinstance(unknown[0], ReplicaFailure)

        assert transport.epoch == epoch and transport.last_stall_s is None  # no failover, one epoch
    finally:
        transport.close()
        for member in members:
            member.stop()


def test_membership_change_starts_a_new_epoch(groups, store):
    _, (g0, g1) = groups
    r0, r1 = ReplicaInfo("g0-a", 0), ReplicaInfo("g1-a", 1)
    listed = [r0, r1]
    members = [TorchMember(g, r.replica_id, HOST, store.port, "change", heartbeat_interval=0.1)
               for g, r in ((g0, r0), (g1, r1))]
    for member in members:
        member.start()
    transport = TorchTransport(HOST, store.port, "change", lambda: list(listed), timeout=5.0)
    local = LocalTransport({"g0-a": g0, "g1-a": g1})
    try:
        b0, b1 = layer_batches(groups, 0, seed=0)
        assert_same(transport.forward([(r0, b0), (r1, b1)]), local.forward([(r0, b0), (r1, b1)]))
        first = transport.epoch
        listed.remove(r1)  # g1-a is told to leave; it waits for an epoch that lists it again
        answers = transport.forward([(r0, b0), (r1, b1)])
        assert transport.epoch > first and isinstance(answers[1], ReplicaFailure)
        assert_same(answers[:1], local.forward([(r0, b0)]))
        listed.append(r1)
        assert_same(transport.forward([(r0, b0), (r1, b1)]), local.forward([(r0, b0), (r1, b1)]))
        assert transport.last_stall_s is None
    finally:
        transport.close()
        for member in members:
            member.stop()


class HangsOnce:
    """A group whose first batch hangs until the shard has given up on the layer and published a new epoch."""

    def __init__(self, group: ExpertGroup, store: TCPStore, session: str):
        self.group, self.device, self.store, self.session, self.hung = group, group.device, store, session, False

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        if not self.hung:
            self.hung = True
            key = f"{self.session}/current"
            first = int(self.store.get(key))
            wait_for(lambda: int(self.store.get(key)) > first, 30, "the shard to start a new epoch")
        return self.group.forward(batch)


def test_a_member_that_hangs_past_the_layer_timeout(groups, store):
    _, (g0, g1) = groups
    r0, r1 = ReplicaInfo("g0-a", 0), ReplicaInfo("g1-a", 1)
    client = TCPStore(HOST, store.port, is_master=False, wait_for_workers=False)
    members = [TorchMember(HangsOnce(g0, client, "hang"), "g0-a", HOST, store.port, "hang", heartbeat_interval=0.1),
               TorchMember(g1, "g1-a", HOST, store.port, "hang", heartbeat_interval=0.1)]
    for member in members:
        member.start()
    transport = TorchTransport(HOST, store.port, "hang", lambda: [r0, r1], timeout=1.0, heartbeat_timeout=1.0)
    local = LocalTransport({"g0-a": g0, "g1-a": g1})
    try:
        b0, b1 = layer_batches(groups, 0, seed=0)
        sends = [(r0, b0), (r1, b1)]
        assert_same(transport.forward(sends), local.forward(sends))  # timed out, both alive: redone in a new epoch
        assert transport.epoch == 2 and 1.0 <= transport.last_stall_s < 1.0 + 5.0
        assert_same(transport.forward(sends), local.forward(sends))
    finally:
        transport.close()
        for member in members:
            member.stop()


@contextlib.contextmanager
def serving(store, session: str, g0, g1, member=TorchMember, shard=TorchTransport):
    """A shard of class `shard`, and members g0-a (of class `member`, computing with `g0`) and g1-a in threads
    of this process; -> (transport, g0-a's member, its replica info, g1-a's replica info)."""
    r0, r1 = ReplicaInfo("g0-a", 0), ReplicaInfo("g1-a", 1)
    members = [member(g0, "g0-a", HOST, store.port, session, heartbeat_interval=0.1),
               TorchMember(g1, "g1-a", HOST, store.port, session, heartbeat_interval=0.1)]
    for started in members:
        started.start()
    transport = shard(HOST, store.port, session, lambda: [r0, r1], timeout=5.0)
    try:
        yield transport, members[0], r0, r1
    finally:
        transport.close()
        for started in members:
            started.stop()


def assert_serves_on(transport, groups, r0, r1, epoch: int):
    """A good layer after a bad one: the same answers as the local groups, on the same epoch, no failover."""
    _, (g0, g1) = groups
    b0, b1 = layer_batches(groups, 1, seed=99)
    sends = [(r0, b0), (r1, b1)]
    assert_same(transport.forward(sends), LocalTransport({"g0-a": g0, "g1-a": g1}).forward(sends))
    assert transport.epoch == epoch and transport.last_stall_s is None


class Misbehaves:
    """Group 0 as a replica with a fault: while `armed`, its next batch raises, or is answered with one slot row
    `fewer` or `more` than it owes; then it computes correctly again."""

    def __init__(self, group: ExpertGroup, how: str):
        self.group, self.device, self.how, self.armed = group, group.device, how, False

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        if not self.armed:
            return self.group.forward(batch)
        self.armed = False
        if self.how == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = self.group.forward(batch)  # [A, H]
        return out[:-1] if self.how == "fewer" else torch.cat([out, out[:1]])


@pytest.mark.parametrize("how", ["raises", "fewer", "more"])
def test_a_group_that_fails_or_answers_the_wrong_shape_fails_only_its_send(groups, store, how):
    _, (g0, g1) = groups
    double = Misbehaves(g0, how)
    with serving(store, f"wrong-{how}", double, g1) as (transport, _, r0, r1):
        b0, b1 = layer_batches(groups, 0, seed=0)
        sends = [(r0, b0), (r1, b1)]
        local = LocalTransport({"g0-a": g0, "g1-a": g1})
        assert_same(transport.forward(sends), local.forward(sends))
        epoch = transport.epoch
        double.armed = True
        answers = transport.forward(sends)
        num_slots, h = int((b0.expert_ids >= 0).sum()), g0.config.hidden_size
        reason = {"raises": "CUDA error: an illegal memory access was encountered",
                  "fewer": f"the group answered [{num_slots - 1}, {h}] for [{num_slots}, {h}] slot outputs",
                  "more": f"the group answered [{num_slots + 1}, {h}] for [{num_slots}, {h}] slot outputs"}[how]
        assert isinstance(answers[0], ReplicaFailure) and answers[0].replica_id == "g0-a"
        assert answers[0].reason == f"replica g0-a could not compute its batch: {reason}"
        assert_same(answers[1:], local.forward([(r1, b1)]))
        assert_serves_on(transport, groups, r0, r1, epoch)


class SkewedShard(TorchTransport):
    """A shard of another release: while `skewed`, its headers name a dtype index no member knows."""

    skewed = False

    def _layer_header(self, batches: dict[int, ExpertBatch], world: int) -> torch.Tensor:
        header = super()._layer_header(batches, world)
        if self.skewed:
            header[1:, 5] = len(DTYPES)
        return header


def test_a_header_the_member_cannot_use_is_answered_as_a_failure(groups, store):
    _, (g0, g1) = groups
    h = g0.config.hidden_size
    with serving(store, "header", g0, g1, shard=SkewedShard) as (transport, _, r0, r1):
        b0, b1 = layer_batches(groups, 0, seed=0)
        sends = [(r0, b0), (r1, b1)]
        assert_same(transport.forward(sends), LocalTransport({"g0-a": g0, "g1-a": g1}).forward(sends))
        epoch = transport.epoch

        transport.skewed = True
        answers = transport.forward(sends)
        transport.skewed = False
        for answer in answers:
            assert isinstance(answer, ReplicaFailure)
            assert f"the header names dtype index {len(DTYPES)}; this replica knows 0..{len(DTYPES) - 1}" in \
                answer.reason

        narrow = ExpertBatch(0, b0.hidden[:, :-1], b0.expert_ids, b0.weights)  # a hidden size not its group's
        (answer,) = transport.forward([(r0, narrow)])
        assert isinstance(answer, ReplicaFailure) and f"hidden must be [N, {h}], got" in answer.reason
        assert_serves_on(transport, groups, r0, r1, epoch)


class ShortensReplies:
    """A member's process group that, while its member is `short`, sends each reply (a layer's fourth
    all_to_all) one row short, as a member speaking another version of the protocol could."""

    def __init__(self, pg, member: "ShortReplies"):
        self.pg, self.member, self.calls = pg, member, 0

    def alltoall_base(self, out, inp, out_rows, in_rows, options):
        self.calls += 1
        if self.calls == 4 and self.member.short:
            inp, in_rows = inp[:-1], [in_rows[0] - 1] + in_rows[1:]
        return self.pg.alltoall_base(out, inp, out_rows, in_rows, options)


class ShortReplies(TorchMember):
    """A member whose replies come one row short while `short`."""

    short = False

    def _serve_layer(self, pg, *args) -> bool:
        return super()._serve_layer(ShortensReplies(pg, self), *args)


def test_a_reply_that_comes_short_fails_its_send_and_the_epoch_serves_on(groups, store):
    _, (g0, g1) = groups
    with serving(store, "short", g0, g1, member=ShortReplies) as (transport, member, r0, r1):
        b0, b1 = layer_batches(groups, 0, seed=0)
        sends = [(r0, b0), (r1, b1)]
        local = LocalTransport({"g0-a": g0, "g1-a": g1})
        assert_same(transport.forward(sends), local.forward(sends))
        epoch = transport.epoch
        member.short = True
        answers = transport.forward(sends)
        member.short = False
        owed = int((b0.expert_ids >= 0).sum()) + 1
        assert isinstance(answers[0], ReplicaFailure)
        assert answers[0].reason.startswith(f"replica g0-a answered fewer than the {owed} rows it owed")
        assert_same(answers[1:], local.forward([(r1, b1)]))
        assert_serves_on(transport, groups, r0, r1, epoch)


@pytest.fixture
def member_processes():
    """Start members in processes of their own; every one is killed and joined when the test ends."""
    context = multiprocessing.get_context("spawn")
    started = []

    def start(*args):
        process = context.Process(target=serve_member, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.join(10)


def test_failover_when_a_member_is_killed(groups, store, mixtral_dir, member_processes):
    _, (g0, g1) = groups
    a, b, c = ReplicaInfo("g0-a", 0), ReplicaInfo("g0-b", 0), ReplicaInfo("g0-c", 0)  # c: the replacement
    other = ReplicaInfo("g1-a", 1)
    processes = {r.replica_id: member_processes(str(mixtral_dir), NUM_GROUPS, r.group_id, r.replica_id, HOST,
                                                store.port, "failover", 0.1)
                 for r in (a, b, other, c)}
    wait_for(lambda: all(store.check([f"failover/heartbeat/{rid}"]) for rid in processes), 60,
             "the member processes to start")
    listed = [a, b, other]  # what a (possibly stale) routing table says
    transport = TorchTransport(HOST, store.port, "failover", lambda: list(listed), timeout=5.0,
                               heartbeat_timeout=1.0)
    local = LocalTransport({"g0-a": g0, "g0-b": g0, "g0-c": g0, "g1-a": g1})
    try:
        b0, b1 = layer_batches(groups, 0, seed=0)
        c0, _ = layer_batches(groups, 0, seed=1)
        sends = [(a, b0), (b, c0), (other, b1)]
        assert_same(transport.forward(sends), local.forward(sends))
        epoch = transport.epoch

        os.kill(processes["g0-a"].pid, signal.SIGKILL)
        processes["g0-a"].join(10)
        started = time.monotonic()
        b0, b1 = layer_batches(groups, 1, seed=2)
        c0, _ = layer_batches(groups, 1, seed=3)
        answers = transport.forward([(a, b0), (b, c0), (other, b1)])  # the table still lists the dead one
        took = time.monotonic() - started
        assert isinstance(answers[0], ReplicaFailure) and answers[0].replica_id == "g0-a"
        assert_same(answers[1:], local.forward([(b, c0), (other, b1)]))
        assert transport.epoch > epoch and transport.last_stall_s is not None
        assert transport.last_stall_s <= took < 1.0 + 5.0  # heartbeat_timeout plus forming the new epoch
        print(f"failover stall: {transport.last_stall_s:.3f} s")

        listed.remove(a)  # the table catches up: the re-sent batch goes to g0-b
        sends = [(b, b0), (other, b1)]
        assert_same(transport.forward(sends), local.forward(sends))

        listed.append(c)  # a replacement replica joins a new epoch and serves
        epoch = transport.epoch
        sends = [(c, b0), (other, b1), (b, c0)]
        assert_same(transport.forward(sends), local.forward(sends))
        assert transport.epoch > epoch
    finally:
        transport.close()
