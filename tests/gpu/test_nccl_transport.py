"""The torch transport over NCCL: a shard on one GPU, a group replica in its own process on another, token rows
never leaving the GPUs. Answers equal the in-process group's (fp32) within GPU rounding. NCCL refuses two ranks
of one communicator on the same device, so this needs two GPUs."""

import multiprocessing

import pytest
import torch
from torch.distributed import TCPStore

from experts.expert_group import ExpertBatch, ExpertGroup
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from router_service.torch_transport import TorchTransport
from router_service.transport import ReplicaInfo
from tests.unit.router_service.torch_member_process import serve_member

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


def test_nccl_layers_equal_the_in_process_group(mixtral_dir):
    reader = CheckpointReader(mixtral_dir)
    config = reader.config
    placement = make_placement(config.num_experts, config.num_layers, 1, "linear")
    reference = ExpertGroup.load(reader, placement, 0, torch.float32)  # CPU
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    member = multiprocessing.get_context("spawn").Process(
        target=serve_member, args=(str(mixtral_dir), 1, 0, "g0-r0", "127.0.0.1", store.port, "s", 0.25, "cuda:1"),
        daemon=True)
    member.start()
    try:
        replica = ReplicaInfo("g0-r0", 0)
        transport = TorchTransport("127.0.0.1", store.port, "s", lambda: [replica], timeout=60.0)
        gen = torch.Generator().manual_seed(0)
        for layer in range(config.num_layers):
            hidden = torch.randn(256, config.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(config.num_experts, generator=gen)[:2] for _ in range(256)])
            weights = torch.rand(256, 2, generator=gen).softmax(-1)
            batch = ExpertBatch(layer, hidden.cuda(0), ids.cuda(0), weights.cuda(0))
            (answer,) = transport.forward([(replica, batch)])
            assert answer.is_cuda and transport.epoch >= 1
            want = reference.forward(ExpertBatch(layer, hidden, ids, weights))
            torch.testing.assert_close(answer.cpu(), want, atol=1e-4, rtol=1e-4)
        transport.close()
    finally:
        member.kill()
        member.join()
