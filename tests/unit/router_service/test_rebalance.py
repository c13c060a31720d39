"""Live rebalancing: the router's pending -> active -> settled lifecycle, the load window, and a rebalance in the
middle of generation that changes no output."""

import pytest

from engine import SamplingParams
from experts.parallel_config import ExpertParallelConfig
from experts.placement import make_placement
from router_service.service import LoadWindow, RebalancePolicy, RouterService
from router_service.transport import ReplicaInfo
from tests.conftest import same_greedy_outputs, small_llm

SKEWED = [[1000, 10, 10, 10, 10, 10, 10, 900], [10, 10, 10, 10, 10, 10, 800, 700]]  # [layer][expert]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(clock, num_groups=4, redundant_slots=1, **policy) -> tuple[RouterService, list[ReplicaInfo]]:
    placement = make_placement(8, 2, num_groups, "linear", redundant_slots=redundant_slots)
    service = RouterService(placement, policy=RebalancePolicy(**policy), clock=clock)
    replicas = [ReplicaInfo(f"g{g}", g) for g in range(num_groups)]
    for info in replicas:
        service.register(info)
    return service, replicas


def test_the_load_window_forgets_what_is_older_than_its_length():
    import torch

    clock, window = Clock(), LoadWindow(1, 2, seconds=10)
    window.add(torch.tensor([[5, 0]]), clock.now)
    clock.now += 6
    window.add(torch.tensor([[0, 3]]), clock.now)
    assert window.total(clock.now).tolist() == [[5, 3]]
    clock.now += 5  # the first second is now more than 10 s old
    assert window.total(clock.now).tolist() == [[0, 3]]
    clock.now += 100
    assert window.total(clock.now).tolist() == [[0, 0]]


def test_a_rebalance_switches_once_every_replica_holds_the_new_placement_and_settles_once_shards_moved():
    clock = Clock()
    service, replicas = _service(clock)
    service.record_load(SKEWED)
    service.get_table(-1, shard_id="shard-a")
    result = service.rebalance()
    assert result["status"] == "pending" and result["moved"] > 0
    assert result["balancedness_after"] > result["balancedness_before"]
    table_version = service.table.version

    answers = [service.heartbeat(info, 0, 0) for info in replicas]  # each still holds v0
    assert all(a["placement"].version == 1 for a in answers) and not any(a["settled"] for a in answers)
    assert [p.version for p in service.placements()] == [0, 1]  # a replica starting now loads both
    for info in replicas[:-1]:
        service.heartbeat(info, 0, 1)
    assert service.table.placement.version == 0  # one replica still loading
    clock.now += 1
    answer = service.heartbeat(replicas[-1], 0, 1)
    assert service.table.placement.version == 1 and service.table.version == table_version + 1
    assert answer == {"placement": None, "settled": False}  # shard-a may still send by v0
    service.get_table(table_version, shard_id="shard-a")  # it picked up the new table
    assert service.heartbeat(replicas[0], 0, 1) == {"placement": None, "settled": True}
    described = service.describe()
    assert described["placement_version"] == 1 and described["rebalance"]["last"]["status"] == "applied"
    assert described["balancedness"]["mean"] == pytest.approx(result["balancedness_after"])


def test_settling_does_not_wait_for_a_shard_gone_quiet_for_longer_than_the_settle_timeout():
    clock = Clock()
    service, replicas = _service(clock, settle_timeout_s=30)
    service.get_table(-1, shard_id="gone")
    clock.now += 1
    service.record_load(SKEWED)
    service.rebalance()
    for info in replicas:
        service.heartbeat(info, 0, 1)
    assert not service.heartbeat(replicas[0], 0, 1)["settled"]
    clock.now += 31
    assert service.heartbeat(replicas[0], 0, 1)["settled"]


def test_a_placement_that_a_replica_never_loads_is_abandoned():
    clock = Clock()
    service, replicas = _service(clock, switch_timeout_s=5)
    service.record_load(SKEWED)
    assert service.rebalance()["status"] == "pending"
    clock.now += 6
    service.tick()
    assert service.table.placement.version == 0 and service.describe()["rebalance"]["last"]["status"] == "abandoned"
    assert service.heartbeat(replicas[0], 0, 1)["placement"].version == 0  # back to the active placement


def test_periodic_rebalancing_moves_only_for_enough_gain():
    clock = Clock()
    service, _ = _service(clock, interval_s=10, min_gain=0.05, window_s=60)
    service.record_load([[100] * 8, [100] * 8])  # already balanced: nothing to gain
    clock.now += 11
    service.tick()
    assert service.describe()["rebalance"]["pending_version"] is None
    service.record_load(SKEWED)
    clock.now += 11
    service.tick()
    assert service.describe()["rebalance"]["pending_version"] == 1


def test_without_load_a_rebalance_changes_nothing():
    service, _ = _service(Clock())
    reply = service.rebalance()
    assert reply["status"] == "unchanged" and "no expert load" in reply["message"]
    assert service.table.placement.version == 0


@pytest.mark.parametrize("redundant_slots,tol", [(0, 0.0), (1, 1e-5)])
def test_a_rebalance_during_generation_changes_no_output(mixtral_dir, redundant_slots, tol):
    """Two in-process groups; mid-decode the router plans a placement, the replicas load it and the table
    switches: greedy tokens are the single-process engine's, the shard computes by the new placement from its
    next step on, and the groups drop moved experts once the switch settled.

    Experts that only move compute the same bits. A redundant copy takes part of an expert's rows, and a GEMM's
    rounding depends on its row count (MKL, cuBLAS), so logprobs then agree to fp32 rounding, not bitwise."""
    prompts = [[5, 17, 300, 2, 41, 9, 11], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    reference = small_llm(mixtral_dir).generate(prompt_token_ids=prompts, sampling_params=greedy)

    llm = small_llm(mixtral_dir, expert_parallel=ExpertParallelConfig(2, "local", redundant_slots=redundant_slots))
    runtime = llm.expert_runtime
    runtime.backend.refresh_interval = 0.0  # read the table at every step boundary
    runtime.service.record_load([[900, 800, 10, 10], [10, 10, 700, 600]])  # both hot experts in one group
    layers = {"calls": 0, "after_switch": []}
    forward = runtime.backend.__class__.__call__

    def counting(backend, layer_id, *args):
        layers["calls"] += 1
        if layers["calls"] == 10:  # mid-decode
            assert runtime.service.rebalance()["status"] == "pending"
            while runtime.service.table.placement.version != 1:
                runtime.sync()  # the replicas load the new experts; the table switches
        if runtime.service.table.placement.version == 1:
            layers["after_switch"].append(backend.table.placement.version)
        return forward(backend, layer_id, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(runtime.backend), "__call__", counting)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy)
    same_greedy_outputs(outs, reference, tol=tol)
    assert layers["after_switch"][0] == 0 and layers["after_switch"][-1] == 1  # switched at a step boundary
    runtime.sync()  # the shard asked for the table since the switch: settled
    for replica_id, follower in runtime.followers.items():
        group = follower.group
        held = {(layer, e) for layer in range(group.config.num_layers) for e in group.holds(layer)}
        assert held == set(runtime.service.table.placement.layer_experts_of(group.group_id))
    same_greedy_outputs(llm.generate(prompt_token_ids=prompts, sampling_params=greedy), reference, tol=tol)
    llm.shutdown()
