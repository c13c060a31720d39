"""RemoteExperts over in-process groups: parity with the single-process engine, failover, load statistics."""

import threading

import pytest
import torch

from engine import SamplingParams
from experts.expert_group import ExpertGroup
from experts.parallel_config import ExpertParallelConfig
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from router_service.remote_experts import ExpertGroupUnavailable, RemoteExperts, RouterClient
from router_service.routing_table import RoutingTable
from router_service.service import RouterService
from router_service.transport import LocalTransport, ReplicaFailure, ReplicaInfo
from tests.conftest import same_greedy_outputs, small_llm

PROMPTS = [[5, 17, 300, 2, 41, 9, 11], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    return small_llm(mixtral_dir).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)


@pytest.mark.parametrize("num_groups,strategy,replicas", [
    (1, "linear", 1), (2, "linear", 1), (2, "round_robin", 1), (4, "linear", 1), (2, "round_robin", (1, 2)),
])
def test_local_transport_layouts_equal_the_single_process_engine(mixtral_dir, reference, num_groups, strategy,
                                                                  replicas):
    config = ExpertParallelConfig(num_groups, "local", strategy, replicas)
    with small_llm(mixtral_dir, expert_parallel=config) as llm:
        same_greedy_outputs(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY), reference, tol=0.0)
        backend = llm.expert_runtime.backend
        if replicas != 1:  # both replicas of group 1 got work
            assert backend.sent["g1-r0"] > 0 and backend.sent["g1-r1"] > 0


class FlakyTransport(LocalTransport):
    """In-process groups where replicas listed in `dead` fail every send, like a killed process.
    `kill_at(call, replica_id)` kills one deterministically when the transport carries its `call`-th layer."""

    def __init__(self, groups):
        super().__init__(groups)
        self.dead: set[str] = set()
        self.calls = 0
        self._kills: dict[int, tuple[str, object]] = {}

    def kill_at(self, call: int, replica_id: str, then=None) -> None:
        self._kills[call] = (replica_id, then)

    def forward(self, sends):
        self.calls += 1
        if self.calls in self._kills:
            replica_id, then = self._kills.pop(self.calls)
            self.dead.add(replica_id)
            if then is not None:
                then()
        return [ReplicaFailure(r.replica_id, "killed") if r.replica_id in self.dead else out
                for (r, _), out in zip(sends, super().forward(sends))]


def local_cluster(mixtral_dir, replicas, failover_timeout=10.0):
    placement = make_placement(4, 2, 2, "linear", replicas)
    transport = FlakyTransport({})
    service = RouterService(placement, is_alive=lambda info: info.replica_id not in transport.dead)
    for g, count in enumerate(replicas):
        for r in range(count):
            transport.groups[f"g{g}-r{r}"] = ExpertGroup.load(CheckpointReader(mixtral_dir), placement, g,
                                                              torch.float32)
            service.register(ReplicaInfo(f"g{g}-r{r}", g))
    client = RouterClient(service.get_table, service.report_failure, service.record_load)
    backend = RemoteExperts(transport, client, failover_timeout=failover_timeout, poll_interval=0.005)
    return service, transport, backend


def test_a_dead_replica_is_replaced_by_its_sibling_without_changing_a_token(mixtral_dir, reference):
    service, transport, backend = local_cluster(mixtral_dir, (2, 1))
    version = service.table.version
    transport.kill_at(6, "g0-r0")
    outs = small_llm(mixtral_dir, experts=backend).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    same_greedy_outputs(outs, reference, tol=0.0)
    assert backend.failover.failed_sends >= 1 and backend.failover.stall_seconds
    assert service.table.get("g0-r0") is None and service.table.version > version  # dropped as dead


def test_a_lone_replica_that_restarts_is_waited_for(mixtral_dir, reference):
    service, transport, backend = local_cluster(mixtral_dir, (1, 1))
    restarted = threading.Event()

    def restart_later():
        def come_back():
            transport.dead.discard("g1-r0")
            service.register(ReplicaInfo("g1-r0", 1, {"local": "restarted"}))
            restarted.set()
        threading.Timer(0.3, come_back).start()  # the fault: the replica is away for a while

    transport.kill_at(6, "g1-r0", then=restart_later)
    outs = small_llm(mixtral_dir, experts=backend).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert restarted.is_set()
    same_greedy_outputs(outs, reference, tol=0.0)
    assert max(backend.failover.stall_seconds) >= 0.2


def test_a_group_that_never_returns_fails_after_the_timeout(mixtral_dir):
    service, transport, backend = local_cluster(mixtral_dir, (1, 1), failover_timeout=0.5)
    transport.dead.add("g1-r0")
    llm = small_llm(mixtral_dir, experts=backend)
    with pytest.raises(ExpertGroupUnavailable, match=r"expert groups \[1\]"):
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY)


def test_load_statistics_count_every_routed_slot(mixtral_dir):
    service, _, backend = local_cluster(mixtral_dir, (1, 1))
    llm = small_llm(mixtral_dir, experts=backend)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    backend.flush_load()
    stats = service.load_stats()
    tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)  # the last token is not fed
    assert sum(stats["per_expert"]) == tokens * 2 * 2  # top-2, 2 layers
    assert sum(stats["per_group"]) == sum(stats["per_expert"])


def test_routing_table_versions_and_snapshots():
    table = RoutingTable(make_placement(4, 2, 2))
    assert table.snapshot().missing_groups == [0, 1]
    table.register(ReplicaInfo("a", 0, {"grpc": "x:1"}))
    table.register(ReplicaInfo("b", 1))
    assert table.version == 2 and table.snapshot().missing_groups == []
    table.register(ReplicaInfo("a", 0, {"grpc": "x:2"}))  # a restart: same id, new endpoint
    snap = table.snapshot()
    assert snap.version == 3 and [r.endpoints["grpc"] for r in snap.replicas_of(0)] == ["x:2"]
    table.deregister("a")
    table.deregister("a")  # unknown now: no new version
    assert table.version == 4 and table.snapshot().missing_groups == [0]
    with pytest.raises(ValueError, match="names group 5"):
        table.register(ReplicaInfo("c", 5))


def test_expert_parallel_configuration_errors(tmp_path):
    from tests.conftest import write_hf_checkpoint

    with pytest.raises(ValueError, match="unknown transport 'smoke'"):
        ExpertParallelConfig(2, "smoke")
    with pytest.raises(ValueError, match="num_groups must be at least 1"):
        ExpertParallelConfig(0)
    with pytest.raises(ValueError, match="must be positive"):
        ExpertParallelConfig(2, failover_timeout=0)
    dense = write_hf_checkpoint(tmp_path / "dense", moe=False)
    with pytest.raises(ValueError, match="dense model"):
        small_llm(dense, expert_parallel=ExpertParallelConfig(2, "local"))
