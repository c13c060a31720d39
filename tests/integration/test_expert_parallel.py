"""Expert parallelism on a local Ray cluster: every transport and layout equals the single-process engine,
and a replica killed with SIGKILL mid-batch costs no request and changes no token."""

import os
import signal
import time

import pytest

from engine import LLM, SamplingParams
from experts.parallel_config import ExpertParallelConfig
from mistral.checkpoint import expert_tensor_names
from tests.conftest import same_greedy_outputs, small_llm
from tests.integration.serving import process_gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [[5 + i, 17, 300 - i, 2, 41, 9, 11 + i][: 3 + i % 5] for i in range(16)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    return small_llm(mixtral_dir).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)


def info(llm: LLM, replica_id: str) -> dict:
    import ray

    return ray.get(llm.expert_runtime.replicas[replica_id].describe.remote())


def kill_mid_batch(llm: LLM, replica_id: str, at_layer: int) -> list[int]:
    """SIGKILL a replica's process when the shard sends its `at_layer`-th layer, and wait until it is gone
    before that layer goes out, so the fault always lands inside the batch. Returns [] until it happened."""
    pid = info(llm, replica_id)["pid"]
    transport = llm.expert_runtime.backend.transport
    forward, calls, killed = transport.forward, [0], []

    def forward_with_fault(sends, **timing):
        calls[0] += 1
        if calls[0] == at_layer:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not process_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            killed.append(pid)
        return forward(sends, **timing)

    transport.forward = forward_with_fault
    return killed


LAYOUTS = [
    ("ray", 1, "linear", 1),
    ("ray", 2, "round_robin", 1),
    ("ray", 4, "linear", 1),
    ("ray", 2, "linear", (2, 1)),
    ("grpc", 2, "round_robin", (1, 2)),
    ("torch", 2, "linear", 1),
]


@pytest.mark.parametrize("transport,num_groups,strategy,replicas", LAYOUTS)
def test_layouts_equal_the_single_process_engine(ray_cluster, mixtral_dir, reference, transport, num_groups,
                                                 strategy, replicas):
    config = ExpertParallelConfig(num_groups, transport, strategy, replicas)
    with small_llm(mixtral_dir, expert_parallel=config) as llm:
        same_greedy_outputs(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY), reference, tol=1e-5)
        placement = llm.expert_runtime.placement
        for g in range(num_groups):  # each group read exactly its own tensors
            wanted = [n for layer, e in placement.layer_experts_of(g) for n in expert_tensor_names(layer, e)]
            assert sorted(info(llm, f"g{g}-r0")["tensors_read"]) == sorted(wanted)


@pytest.mark.parametrize("transport", ["ray", "grpc", "torch"])
def test_killing_a_replica_mid_batch_loses_nothing(ray_cluster, mixtral_dir, reference, transport):
    config = ExpertParallelConfig(2, transport, "linear", (2, 1), failover_timeout=60)
    with small_llm(mixtral_dir, expert_parallel=config) as llm:
        killed = kill_mid_batch(llm, "g0-r0", at_layer=6)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        assert killed, "the fault was not injected"
        same_greedy_outputs(outs, reference, tol=1e-5)
        backend = llm.expert_runtime.backend
        if transport == "torch":  # the broken collective is redone inside the transport, in a new epoch
            assert backend.transport.epoch >= 2 and backend.transport.last_stall_s is not None
        elif transport == "grpc":  # the dead server's send failed and was re-sent to g0-r1
            assert backend.failover.failed_sends >= 1 and backend.failover.stall_seconds
        # ray: a call to the dead actor either fails (and is re-sent) or waits for Ray's restart of it


def test_a_lone_replica_is_covered_by_the_other_group_until_ray_restarts_it(ray_cluster, mixtral_dir, reference):
    config = ExpertParallelConfig(2, "ray", "linear", 1, failover_timeout=120)
    with small_llm(mixtral_dir, expert_parallel=config) as llm:
        first_pid = info(llm, "g1-r0")["pid"]
        killed = kill_mid_batch(llm, "g1-r0", at_layer=6)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        assert killed
        same_greedy_outputs(outs, reference, tol=1e-5)
        router = llm.expert_runtime.router
        assert ray_cluster.get(router.describe.remote())["placement_version"] >= 1  # group 0 covered group 1
        deadline = time.monotonic() + 120  # Ray restarts it; it registers and the home placement returns
        while (doc := ray_cluster.get(router.describe.remote()))["lost_groups"] or doc["placement_version"] < 2:
            assert time.monotonic() < deadline, f"group 1 never came back: {doc['lost_groups']}"
            time.sleep(0.2)
        assert doc["groups"][1]["experts"] == [2, 3] and info(llm, "g1-r0")["pid"] != first_pid
        same_greedy_outputs(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY), reference, tol=1e-5)


@pytest.mark.parametrize("transport", ["ray", "torch"])
def test_an_attention_shard_actor_serves_through_the_same_expert_groups(ray_cluster, mixtral_dir, reference,
                                                                        transport):
    from actors.attention_shard import AttentionShard, ExpertLink
    from actors.compute import Compute
    from engine.async_llm import AsyncLLM

    config = ExpertParallelConfig(2, transport, "round_robin", 1)
    with small_llm(mixtral_dir, expert_parallel=config) as llm:
        shard = ray_cluster.remote(AttentionShard).options(num_cpus=0).remote(
            AsyncLLM, {"model": str(mixtral_dir), "tokenizer": "v1"}, Compute("cpu", "float32"),
            llm.expert_runtime.router, ExpertLink(transport), shard_id="second-shard")
        outs = ray_cluster.get(shard.generate.remote(PROMPTS, GREEDY))
        same_greedy_outputs(outs, reference, tol=1e-5)
        # both shards keep their own torch session on the same replicas
        assert llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY)[0].outputs[0].token_ids == \
            reference[0].outputs[0].token_ids
        ray_cluster.get(shard.shutdown.remote())
        ray_cluster.kill(shard)
