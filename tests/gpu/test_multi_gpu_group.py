"""A group unit over every visible GPU: each GPU holds experts, and it answers like the group on one GPU."""

import pytest
import torch

from experts.expert_group import ExpertBatch, ExpertGroup
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from mistral.moe import route
from tests.conftest import write_hf_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")]

NUM_EXPERTS = 16  # per layer: every GPU of a 16-GPU node gets one


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("mixtral16"), num_local_experts=NUM_EXPERTS)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_group_over_every_gpu_uses_them_all_and_answers_like_one_gpu(checkpoint, dtype, tol):
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    whole = make_placement(NUM_EXPERTS, 2, 1, "linear")  # one group holds every expert
    before = [torch.cuda.memory_allocated(gpu) for gpu in gpus]
    many = ExpertGroup.load(CheckpointReader(checkpoint), whole, 0, dtype, gpus)
    assert many.devices == tuple(gpus) and many.device == gpus[0]
    assert all(torch.cuda.memory_allocated(gpu) > used for gpu, used in zip(gpus, before))
    for layer in many.layers:
        assert all(len(share.w1) and share.w1.device == gpu for share, gpu in zip(layer.shares, gpus))

    one = ExpertGroup.load(CheckpointReader(checkpoint), whole, 0, dtype, gpus[0])
    torch.manual_seed(0)
    x = torch.randn(64, 64)  # [T, H] fp32 on the wire, whatever the weights' dtype
    weights, ids = route(torch.randn(64, NUM_EXPERTS), 2)
    for layer in range(2):
        for device in (torch.device("cpu"), gpus[0]):
            batch = ExpertBatch(layer, x.to(device), ids.to(device), weights.to(device))
            got, want = many.forward(batch), one.forward(batch)
            assert got.device == device and got.dtype == torch.float32 and got.shape == (128, 64)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
