import threading

import pytest
import torch

from experts.expert_group import ExpertBatch, ExpertBatchError, ExpertGroup
from experts.placement import Placement, make_placement
from mistral.checkpoint import CheckpointReader, expert_tensor_names
from mistral.moe import route
from mistral.weights import load_model
from router_service.dispatch import combine_results, plan_layer


@pytest.fixture(scope="module")
def model(mixtral_dir):
    return load_model(CheckpointReader(mixtral_dir), torch.float32, progress=False)


def names(pairs) -> list[str]:
    return sorted(n for layer, e in pairs for n in expert_tensor_names(layer, e))


def run_layer(groups, placement, layer, x, ids, weights) -> torch.Tensor:
    copies, num_copies = placement.copy_table()
    sends = plan_layer(layer, x, ids, weights, copies[layer], num_copies[layer])
    return combine_results(x.shape[0], ids.shape[1], sends, [groups[s.group_id].forward(s.batch) for s in sends])


def routing(num_tokens: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, 64)
    weights, ids = route(torch.randn(num_tokens, 4), 2)
    return x, ids, weights


def test_a_group_reads_only_its_own_tensors(mixtral_dir):
    placement = make_placement(4, 2, 2, "round_robin")
    reader = CheckpointReader(mixtral_dir)
    group = ExpertGroup.load(reader, placement, 1, torch.float32)
    assert group.experts == (1, 3) and group.holds(0) == group.holds(1) == (1, 3)
    assert sorted(reader.tensors_read) == names((layer, e) for layer in range(2) for e in (1, 3))
    assert group.devices == (torch.device("cpu"),) and group.layers[0].shares[0].w1.shape == (2, 96, 64)


@pytest.mark.parametrize("num_groups,strategy", [(1, "linear"), (2, "linear"), (2, "round_robin"), (4, "linear")])
def test_groups_together_compute_the_local_experts_bitwise(model, mixtral_dir, num_groups, strategy):
    placement = make_placement(4, 2, num_groups, strategy)
    groups = [ExpertGroup.load(CheckpointReader(mixtral_dir), placement, g, torch.float32)
              for g in range(num_groups)]
    x, ids, weights = routing(13)
    for layer in range(2):
        assert torch.equal(run_layer(groups, placement, layer, x, ids, weights), model.experts(layer, x, ids, weights))


# Layer 0: every expert copied in two of three groups; layer 1: one copy each, but not the config's map.
COPIES = Placement(4, 2, (((0, 1, 2), (0, 2, 3), (1, 3)), ((3,), (0, 2), (1,))), (1, 1, 1), 3)


def test_copies_spread_over_groups_compute_the_local_experts(model, mixtral_dir):
    """A layer whose experts have one copy each is bitwise equal to the local engine. With two copies, each copy
    runs its expert on part of the rows; a matmul over fewer rows may round differently (MKL picks kernels by
    row count), so the layer agrees to within float32 rounding, not bit for bit."""
    groups = [ExpertGroup.load(CheckpointReader(mixtral_dir), COPIES, g, torch.float32) for g in range(3)]
    for seed, num_tokens in enumerate((1, 5, 13, 80)):
        x, ids, weights = routing(num_tokens, seed)
        got, want = run_layer(groups, COPIES, 0, x, ids, weights), model.experts(0, x, ids, weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got, run_layer(groups, COPIES, 0, x, ids, weights))  # the same split every time
        assert torch.equal(run_layer(groups, COPIES, 1, x, ids, weights), model.experts(1, x, ids, weights))
    assert all(g.tokens_served > 0 for g in groups)


def test_extend_reads_only_the_new_pairs_and_computes_like_a_fresh_load(mixtral_dir):
    start = make_placement(4, 2, 3, "linear")  # group 1 holds expert 2 in both layers
    group = ExpertGroup.load(CheckpointReader(mixtral_dir), start, 1, torch.float32)
    reader = CheckpointReader(mixtral_dir)
    assert group.extend(reader, COPIES) == 3  # layer 0: 0, 3 are new; layer 1: 0 is new
    assert sorted(reader.tensors_read) == names([(0, 0), (0, 3), (1, 0)])
    assert group.holds(0) == (0, 2, 3) and group.holds(1) == (0, 2) and group.experts == (0, 2, 3)
    assert group.extend(reader, COPIES) == 0 and len(reader.tensors_read) == 9  # nothing more to read

    fresh = ExpertGroup.load(CheckpointReader(mixtral_dir), COPIES, 1, torch.float32)
    x = torch.randn(6, 64)
    for layer, ids in ((0, [[0, 3], [2, -1], [3, 0], [-1, 2], [0, -1], [2, 3]]),
                       (1, [[0, 2], [2, -1], [-1, 0], [0, 2], [2, 0], [-1, 2]])):
        batch = ExpertBatch(layer, x, torch.tensor(ids), torch.rand(6, 2))
        assert torch.equal(group.forward(batch), fresh.forward(batch))

    assert group.retain(COPIES) == 0
    assert group.retain(start) == 3 and group.holds(0) == group.holds(1) == (2,)
    with pytest.raises(ExpertBatchError, match=r"expert 0 does not live in group 1 in layer 0 \(it holds \[2\]"):
        group.forward(ExpertBatch(0, x, torch.tensor([[0, 2]] * 6), torch.rand(6, 2)))


def batches(num_tokens: int, seed: int) -> list[ExpertBatch]:
    """Routed batches for each layer, with some slots left to another group and a token with no slot here."""
    x, ids, weights = routing(num_tokens, seed)
    ids = torch.where(torch.rand(ids.shape) < 0.3, -1, ids)
    ids[0] = -1
    return [ExpertBatch(layer, x, ids, weights) for layer in range(2)]


@pytest.mark.parametrize("num_devices", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_spread_over_devices_computes_the_single_device_bits(mixtral_dir, num_devices, dtype):
    """Several CPU "devices" take the split and gather path of a multi-GPU unit."""
    whole = make_placement(4, 2, 1, "linear")  # one group holds every expert
    one = ExpertGroup.load(CheckpointReader(mixtral_dir), whole, 0, dtype)
    many = ExpertGroup.load(CheckpointReader(mixtral_dir), whole, 0, dtype, ["cpu"] * num_devices)
    assert many.devices == (torch.device("cpu"),) * num_devices and many.device == torch.device("cpu")
    for layer in many.layers:
        sizes = [len(share.w1) for share in layer.shares]
        assert len(sizes) == num_devices and sum(sizes) == 4 and max(sizes) - min(sizes) <= 1
    for seed, num_tokens in enumerate((1, 5, 13, 80)):
        for batch in batches(num_tokens, seed):
            assert torch.equal(many.forward(batch), one.forward(batch))
    assert many.tokens_served == one.tokens_served


def test_a_group_spread_over_devices_extends_and_retains_like_one_device(mixtral_dir):
    start = make_placement(4, 2, 3, "linear")  # group 1 holds expert 2 in both layers
    one = ExpertGroup.load(CheckpointReader(mixtral_dir), start, 1, torch.float32)
    many = ExpertGroup.load(CheckpointReader(mixtral_dir), start, 1, torch.float32, ["cpu"] * 3)
    assert [len(share.w1) for share in many.layers[1].shares] == [0, 1, 0]  # idle devices compute nothing
    for change in (lambda g: g.extend(CheckpointReader(mixtral_dir), COPIES), lambda g: g.retain(start),
                   lambda g: g.extend(CheckpointReader(mixtral_dir), COPIES), lambda g: g.retain(COPIES)):
        assert change(many) == change(one)
        assert [many.holds(layer) for layer in range(2)] == [one.holds(layer) for layer in range(2)]
        for batch in batches(13, 0):
            ids = batch.expert_ids
            batch.expert_ids = torch.where(torch.isin(ids, torch.tensor(one.holds(batch.layer_id))), ids, -1)
            assert torch.equal(many.forward(batch), one.forward(batch))


@pytest.mark.parametrize("weights_dtype,wire_dtype", [(torch.bfloat16, torch.float32),
                                                      (torch.float32, torch.bfloat16)])
def test_a_group_computes_in_its_weights_dtype_and_answers_in_the_wire_dtype(mixtral_dir, weights_dtype,
                                                                             wire_dtype):
    whole = make_placement(4, 2, 1, "linear")
    group = ExpertGroup.load(CheckpointReader(mixtral_dir), whole, 0, weights_dtype)
    reference = ExpertGroup.load(CheckpointReader(mixtral_dir), whole, 0, torch.float32)
    for batch in batches(13, 0):
        wire = ExpertBatch(batch.layer_id, batch.hidden.to(wire_dtype), batch.expert_ids, batch.weights)
        native = ExpertBatch(batch.layer_id, wire.hidden.to(weights_dtype), batch.expert_ids, batch.weights)
        got = group.forward(wire)
        assert got.dtype == wire_dtype
        assert torch.equal(got, group.forward(native).to(wire_dtype))  # the same computation, converted
        torch.testing.assert_close(got.float(), reference.forward(batch), rtol=2e-2, atol=2e-2)


def test_forward_in_another_thread_never_fails_while_the_holdings_change(mixtral_dir):
    start = make_placement(4, 2, 2, "round_robin")  # group 0 holds 0 and 2 everywhere
    more = Placement(4, 2, (((0, 1, 2), (1, 3)), ((0, 2, 3), (1, 3))), (1, 1), 3)
    group = ExpertGroup.load(CheckpointReader(mixtral_dir), start, 0, torch.float32)
    x = torch.randn(16, 64)
    batches = [ExpertBatch(layer, x, torch.tensor([[0, 2], [2, -1], [-1, 0], [2, 0]] * 4), torch.rand(16, 2))
               for layer in range(2)]
    want = [group.forward(b) for b in batches]
    stop, errors, calls = threading.Event(), [], [0]

    def serve():
        while not stop.is_set():
            try:
                for batch, expected in zip(batches, want):
                    assert torch.equal(group.forward(batch), expected)
                    calls[0] += 1
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)
                return

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for _ in range(30):
            assert group.extend(CheckpointReader(mixtral_dir), more) == 2
            assert group.retain(start) == 2
    finally:
        stop.set()
        worker.join()
    assert not errors and calls[0] > 0


@pytest.mark.parametrize("change,match", [
    (dict(layer_id=7), "unknown layer 7"),
    (dict(hidden=torch.zeros(3, 65)), r"hidden must be \[N, 64\]"),
    (dict(hidden=torch.zeros(3, 64, dtype=torch.long)), "hidden must be a floating-point tensor, got torch.int64"),
    (dict(expert_ids=torch.zeros(3, 3, dtype=torch.long)), r"expert_ids must be \[3, 2\]"),
    (dict(expert_ids=torch.tensor([[0, 9], [0, -1], [2, -1]])), "expert id 9 is outside"),
    (dict(expert_ids=torch.tensor([[1, -1], [0, -1], [2, -1]])), "expert 1 does not live in group 0 in layer 0"),
    (dict(layer_id=1, expert_ids=torch.tensor([[0, -1], [0, -1], [2, -1]])),
     r"expert 2 does not live in group 0 in layer 1 \(it holds \[0, 1\] there\)"),
    (dict(weights=torch.zeros(3, 2, dtype=torch.float64)), "weights float32"),
])
def test_malformed_batches_are_refused(mixtral_dir, change, match):
    placement = Placement(4, 2, (((0, 2), (1, 3)), ((0, 1), (2, 3))), (1, 1), 2)  # group 0: 0, 2 then 0, 1
    group = ExpertGroup.load(CheckpointReader(mixtral_dir), placement, 0, torch.float32)
    fields = dict(layer_id=0, hidden=torch.zeros(3, 64), expert_ids=torch.tensor([[0, 2], [0, -1], [2, -1]]),
                  weights=torch.full((3, 2), 0.5))
    assert group.forward(ExpertBatch(**fields)).shape == (4, 64)
    with pytest.raises(ExpertBatchError, match=match):
        group.forward(ExpertBatch(**(fields | change)))
