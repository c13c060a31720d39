import pytest
import torch

from experts.expert_group import ExpertBatch, ExpertBatchError, ExpertGroup
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader, expert_tensor_names
from mistral.moe import route
from mistral.weights import load_model
from router_service.dispatch import combine_results, plan_layer


@pytest.fixture(scope="module")
def reader_and_model(mixtral_dir):
    return CheckpointReader(mixtral_dir), load_model(CheckpointReader(mixtral_dir), torch.float32, progress=False)


def test_a_group_reads_only_its_own_tensors(mixtral_dir):
    placement = make_placement(4, 2, 2, "round_robin")
    reader = CheckpointReader(mixtral_dir)
    group = ExpertGroup.load(reader, placement, 1, torch.float32)
    assert group.experts == (1, 3)
    wanted = [n for layer in range(2) for e in (1, 3) for n in expert_tensor_names(layer, e)]
    assert sorted(reader.tensors_read) == sorted(wanted)
    assert group.w1[0].shape == (2, 96, 64)


@pytest.mark.parametrize("num_groups,strategy", [(1, "linear"), (2, "linear"), (2, "round_robin"), (4, "linear")])
def test_groups_together_compute_the_local_experts_bitwise(reader_and_model, mixtral_dir, num_groups, strategy):
    _, model = reader_and_model
    placement = make_placement(4, 2, num_groups, strategy)
    groups = [ExpertGroup.load(CheckpointReader(mixtral_dir), placement, g, torch.float32)
              for g in range(num_groups)]
    torch.manual_seed(0)
    x = torch.randn(13, 64)
    weights, ids = route(torch.randn(13, 4), 2)
    for layer in range(2):
        sends = plan_layer(layer, x, ids, weights, torch.tensor(placement.expert_to_group))
        results = [groups[s.group_id].forward(s.batch) for s in sends]
        assert torch.equal(combine_results(13, 2, sends, results), model.experts(layer, x, ids, weights))


@pytest.mark.parametrize("change,match", [
    (dict(layer_id=7), "unknown layer 7"),
    (dict(hidden=torch.zeros(3, 65)), r"hidden must be \[N, 64\]"),
    (dict(hidden=torch.zeros(3, 64, dtype=torch.float64)), "hidden must be torch.float32"),
    (dict(expert_ids=torch.zeros(3, 3, dtype=torch.long)), r"expert_ids must be \[3, 2\]"),
    (dict(expert_ids=torch.tensor([[0, 9], [0, -1], [2, -1]])), "expert id 9 is outside"),
    (dict(expert_ids=torch.tensor([[1, -1], [0, -1], [2, -1]])), "expert 1 does not live in group 0"),
    (dict(weights=torch.zeros(3, 2, dtype=torch.float64)), "weights float32"),
])
def test_malformed_batches_are_refused(mixtral_dir, change, match):
    placement = make_placement(4, 2, 2, "round_robin")  # group 0 holds experts 0 and 2
    group = ExpertGroup.load(CheckpointReader(mixtral_dir), placement, 0, torch.float32)
    fields = dict(layer_id=0, hidden=torch.zeros(3, 64), expert_ids=torch.tensor([[0, 2], [0, -1], [2, -1]]),
                  weights=torch.full((3, 2), 0.5))
    assert group.forward(ExpertBatch(**fields)).shape == (4, 64)
    with pytest.raises(ExpertBatchError, match=match):
        group.forward(ExpertBatch(**(fields | change)))
