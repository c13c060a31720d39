"""The gRPC layer path: wire encoding, ExpertService validation, and `GrpcTransport` == `LocalTransport` bitwise.

Servers bind 127.0.0.1 on a free port and are stopped by the fixture or test that started them.
Legend: N tokens, k slots per token, A computed slots, H hidden.
"""

import logging
import time

import grpc
import pytest
import torch

from experts.expert_group import ExpertBatch, ExpertBatchError, ExpertGroup
from experts.placement import make_placement
from experts.probe import ExpertProbe
from mistral.checkpoint import CheckpointReader
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from router_service.dispatch import slot_groups
from router_service.grpc_transport import GrpcTransport, is_serving, message_limit_bytes, serve_expert_group
from router_service.transport import LocalTransport, ReplicaFailure, ReplicaInfo
from router_service.wire import WireError, from_proto, to_proto
from tests.unit.experts.test_probe import WedgedGroup

MAX_BATCH_TOKENS = 64
NUM_GROUPS = 2


def load_groups(mixtral_dir, dtype: torch.dtype) -> tuple:
    reader = CheckpointReader(mixtral_dir)
    config = reader.config
    placement = make_placement(config.num_experts, config.num_layers, NUM_GROUPS, "round_robin")
    return placement, [ExpertGroup.load(reader, placement, g, dtype) for g in range(NUM_GROUPS)]


def start(group: ExpertGroup, replica_id: str, probe: ExpertProbe | None = None) -> tuple[grpc.Server, ReplicaInfo]:
    server, port = serve_expert_group(group, replica_id, max_batch_tokens=MAX_BATCH_TOKENS, probe=probe)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)  # polls until the port answers
    return server, ReplicaInfo(replica_id, group.group_id, {"grpc": address})


@pytest.fixture(scope="module")
def served(mixtral_dir):
    """Two round-robin groups in fp32, each behind its own ExpertService."""
    placement, groups = load_groups(mixtral_dir, torch.float32)
    started = [start(g, f"g{g.group_id}-r0") for g in groups]
    yield placement, groups, [info for _, info in started]
    for server, _ in started:
        server.stop(None).wait()


@pytest.fixture
def transport():
    with GrpcTransport(timeout_s=5.0) as t:
        yield t


def make_sends(placement, groups, replicas, num_tokens: int, seed: int, dtype=torch.float32) -> list:
    """One batch per (layer, group): the tokens with a slot in the group, foreign slots set to -1."""
    gen = torch.Generator().manual_seed(seed)
    config = groups[0].config
    copies, num_copies = placement.copy_table()
    sends = []
    for layer in range(config.num_layers):
        hidden = torch.randn(num_tokens, config.hidden_size, generator=gen).to(dtype)  # [N, H]
        scores = torch.randn(num_tokens, config.num_experts, generator=gen)
        weights, ids = torch.topk(scores.softmax(-1), config.num_experts_per_tok)  # [N, k] each
        for group, replica in zip(groups, replicas):
            here = slot_groups(ids, copies[layer], num_copies[layer]) == group.group_id  # [N, k]
            rows = here.any(dim=1)
            sends.append((replica, ExpertBatch(layer, hidden[rows], torch.where(here, ids, -1)[rows],
                                               weights[rows].float())))
    return sends


# --- wire ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_wire_round_trip_is_exact(dtype):
    t = (torch.randn(5, 7) * 1000).to(dtype)
    for sample in (t, t.t(), t[:0], t[1, 2]):  # contiguous, strided, empty, 0-d
        back = from_proto(to_proto(sample))
        assert back.dtype == dtype and back.shape == sample.shape and torch.equal(back, sample)
    back[...] = 0  # the decoded tensor owns writable memory


def test_wire_bytes_are_little_endian():
    assert to_proto(torch.tensor([1], dtype=torch.int64)).data == b"\x01" + b"\x00" * 7
    assert to_proto(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"


@pytest.mark.parametrize("msg, match", [
    (pb.Tensor(data=b"\x00" * 15, dtype="float32", shape=[2, 2]), "needs 16 bytes, got 15"),
    (pb.Tensor(data=b"\x00" * 20, dtype="float32", shape=[2, 2]), "needs 16 bytes, got 20"),
    (pb.Tensor(data=b"\x00" * 16, dtype="float64", shape=[2]), "unknown dtype 'float64'"),
    (pb.Tensor(data=b"", dtype="int64", shape=[-1, 0]), "negative dimension"),
    (pb.Tensor(data=b"", dtype="float32", shape=[1 << 40, 1 << 40]), "at most 1000"),
])
def test_wire_rejects_malformed_tensors(msg, match):
    with pytest.raises(WireError, match=match):
        from_proto(msg, max_elements=1000)


# --- parity ---------------------------------------------------------------------------------------------------

def test_grpc_matches_local_bitwise(served, transport):
    placement, groups, replicas = served
    local = LocalTransport({r.replica_id: g for r, g in zip(replicas, groups)})
    for num_tokens, seed in ((1, 0), (9, 1), (MAX_BATCH_TOKENS, 2)):
        sends = make_sends(placement, groups, replicas, num_tokens, seed)
        remote_out, local_out = transport.forward(sends), local.forward(sends)
        assert len(remote_out) == len(sends)
        for (_, batch), got, want in zip(sends, remote_out, local_out):
            num_slots = int((batch.expert_ids >= 0).sum())
            assert got.shape == (num_slots, groups[0].config.hidden_size)  # [A, H]
            assert got.dtype == torch.float32 and torch.equal(got, want)


def test_grpc_matches_local_bitwise_in_bfloat16(mixtral_dir, transport):
    placement, groups = load_groups(mixtral_dir, torch.bfloat16)
    started = [start(g, f"bf16-g{g.group_id}") for g in groups]
    try:
        replicas = [info for _, info in started]
        sends = make_sends(placement, groups, replicas, 12, seed=3, dtype=torch.bfloat16)
        local = LocalTransport({r.replica_id: g for r, g in zip(replicas, groups)})
        for got, want in zip(transport.forward(sends), local.forward(sends)):
            assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    finally:
        for server, _ in started:
            server.stop(None).wait()


def test_transport_raises_for_a_batch_the_replica_refuses(served, transport):
    placement, groups, replicas = served
    replica, batch = make_sends(placement, groups, replicas, 4, seed=4)[0]
    foreign = ExpertBatch(batch.layer_id, batch.hidden, torch.full_like(batch.expert_ids, 1), batch.weights)
    with pytest.raises(ExpertBatchError, match="does not live in group 0"):
        transport.forward([(replica, foreign)])


# --- the server's edge --------------------------------------------------------------------------------------

def good_request(placement, groups, replicas, num_tokens: int = 4) -> pb.ForwardRequest:
    _, batch = make_sends(placement, groups, replicas, num_tokens, seed=5)[0]  # layer 0, group 0 (experts 0, 2)
    return pb.ForwardRequest(layer_id=batch.layer_id, hidden=to_proto(batch.hidden),
                             expert_ids=to_proto(batch.expert_ids), weights=to_proto(batch.weights))


def reshape(msg: pb.Tensor, shape: list[int]) -> None:
    del msg.shape[:]
    msg.shape.extend(shape)


def corrupt(req: pb.ForwardRequest, case: str) -> None:
    n, h = req.hidden.shape
    if case == "wrong shape":
        reshape(req.hidden, [n * 2, h // 2])
    elif case == "integer hidden":
        req.hidden.CopyFrom(to_proto(from_proto(req.hidden).long()))
    elif case == "wrong ids dtype":
        req.expert_ids.CopyFrom(to_proto(from_proto(req.expert_ids).float()))
    elif case == "wrong byte count":
        req.weights.data = req.weights.data[:-1]
    elif case == "unknown dtype":
        req.hidden.dtype = "float64"
    elif case == "unknown layer":
        req.layer_id = 2
    elif case == "negative layer":
        req.layer_id = -1
    elif case == "foreign expert":
        req.expert_ids.CopyFrom(to_proto(torch.ones(n, 2, dtype=torch.int64)))  # expert 1 lives in group 1
    elif case == "missing field":
        req.ClearField("weights")
    else:
        raise AssertionError(case)


CASES = {"wrong shape": "hidden must be", "integer hidden": "hidden must be a floating-point tensor",
         "wrong ids dtype": "must be int64", "wrong byte count": "weights: float32 tensor",
         "unknown dtype": "unknown dtype", "unknown layer": "unknown layer 2", "negative layer": "unknown layer -1",
         "foreign expert": "expert 1 does not live in group 0", "missing field": "weights is missing"}


def test_malformed_payloads_are_invalid_argument_and_the_server_keeps_serving(served, caplog):
    placement, groups, replicas = served
    caplog.set_level(logging.INFO, logger="router_service.grpc_transport")
    with grpc.insecure_channel(replicas[0].endpoints["grpc"]) as channel:
        stub = pb_grpc.ExpertServiceStub(channel)
        for case, message in CASES.items():
            req = good_request(placement, groups, replicas)
            corrupt(req, case)
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert message in err.value.details(), (case, err.value.details())

        oversized = good_request(placement, groups, replicas, num_tokens=4 * MAX_BATCH_TOKENS)
        config = groups[0].config
        limit = message_limit_bytes(MAX_BATCH_TOKENS, config.hidden_size, config.num_experts_per_tok, torch.float32)
        assert oversized.hidden.shape[0] > MAX_BATCH_TOKENS and oversized.ByteSize() < limit
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(oversized, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"takes at most {MAX_BATCH_TOKENS}" in err.value.details()

        req = good_request(placement, groups, replicas)
        out = from_proto(stub.Forward(req, timeout=5).output)
        assert out.shape == (int((from_proto(req.expert_ids) >= 0).sum()), groups[0].config.hidden_size)
    refusals = [r for r in caplog.records if r.name == "router_service.grpc_transport"]
    assert len(refusals) == len(CASES) + 1 and all(r.levelno == logging.INFO for r in refusals)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_health_and_info(served):
    _, groups, replicas = served
    config = groups[1].config
    with grpc.insecure_channel(replicas[1].endpoints["grpc"]) as channel:
        stub = pb_grpc.ExpertServiceStub(channel)
        assert stub.Health(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.SERVING
        info = stub.Info(pb.InfoRequest(), timeout=5)
    assert (info.group_id, info.replica_id, list(info.expert_ids)) == (1, "g1-r0", [1, 3])
    assert (info.num_layers, info.hidden_size, info.dtype) == (config.num_layers, config.hidden_size, "float32")
    assert (info.max_batch_tokens, info.num_experts_per_tok) == (MAX_BATCH_TOKENS, config.num_experts_per_tok)


def test_health_is_not_serving_while_the_experts_are_wedged(served):
    _, groups, _ = served
    wedged = WedgedGroup(groups[0])
    server, info = start(wedged, "g0-wedged", probe=ExpertProbe(wedged, timeout_s=0.3))
    try:
        with grpc.insecure_channel(info.endpoints["grpc"]) as channel:
            stub = pb_grpc.ExpertServiceStub(channel)
            began = time.monotonic()
            assert stub.Health(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.NOT_SERVING
            assert time.monotonic() - began < 2.0
            assert not is_serving(info.endpoints["grpc"], timeout_s=2.0)  # what the router asks
            wedged.release.set()
            assert stub.Health(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.SERVING
    finally:
        wedged.release.set()
        server.stop(None).wait()


def test_message_limit_covers_the_largest_response():
    limit = message_limit_bytes(4096, 4096, 2, torch.bfloat16)
    assert limit > 4096 * 2 * 4096 * 2  # N * k rows of [H] in bf16
    assert message_limit_bytes(1 << 20, 1 << 14, 8, torch.float32) == 2**31 - 1


# --- failures -------------------------------------------------------------------------------------------------

def test_a_stopped_replica_is_a_failure_value_and_the_live_one_answers(served):
    placement, groups, replicas = served
    server, dead = start(groups[1], "g1-dead")
    server.stop(None).wait()
    sends = make_sends(placement, groups, [replicas[0], dead], 6, seed=6)[:2]  # layer 0: group 0 live, 1 dead
    want = LocalTransport({replicas[0].replica_id: groups[0]}).forward(sends[:1])[0]
    timeout_s = 2.0
    with GrpcTransport(timeout_s=timeout_s) as transport:
        began = time.monotonic()
        live_out, dead_out = transport.forward(sends)
        assert time.monotonic() - began < timeout_s + 1.0
        assert torch.equal(live_out, want)
        assert isinstance(dead_out, ReplicaFailure) and dead_out.replica_id == "g1-dead"
        assert "UNAVAILABLE" in dead_out.reason or "DEADLINE_EXCEEDED" in dead_out.reason

        # The routing table publishes the replica at a new address: the channel is rebuilt and the call works.
        moved = ReplicaInfo("g1-dead", 1, {"grpc": replicas[1].endpoints["grpc"]})
        (out,) = transport.forward([(moved, sends[1][1])])
        assert torch.equal(out, groups[1].forward(sends[1][1]))


def test_a_replica_without_a_grpc_endpoint_is_a_failure(served, transport):
    placement, groups, replicas = served
    _, batch = make_sends(placement, groups, replicas, 2, seed=7)[0]
    (out,) = transport.forward([(ReplicaInfo("nowhere", 0, {}), batch)])
    assert isinstance(out, ReplicaFailure) and "no grpc endpoint" in out.reason
