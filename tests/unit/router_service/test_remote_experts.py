"""RemoteExperts over in-process groups: parity with the single-process engine, failover, replica choice under
concurrency, load statistics and the layer-path stats."""

import pickle
import threading
import time
from collections import Counter

import pytest
import torch

from engine import SamplingParams
from experts.expert_group import ExpertGroup
from experts.parallel_config import ExpertParallelConfig
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from router_service.remote_experts import ExpertGroupUnavailable, LayerPathStats, RemoteExperts, RouterClient
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

    def forward(self, sends, seconds=None):
        self.calls += 1
        if self.calls in self._kills:
            replica_id, then = self._kills.pop(self.calls)
            self.dead.add(replica_id)
            if then is not None:
                then()
        return [ReplicaFailure(r.replica_id, "killed") if r.replica_id in self.dead else out
                for (r, _), out in zip(sends, super().forward(sends, seconds))]


def local_cluster(mixtral_dir, replicas, failover_timeout=10.0, **options):
    placement = make_placement(4, 2, 2, "linear", replicas)
    transport = FlakyTransport({})
    service = RouterService(placement, is_alive=lambda info: info.replica_id not in transport.dead)
    for g, count in enumerate(replicas):
        for r in range(count):
            transport.groups[f"g{g}-r{r}"] = ExpertGroup.load(CheckpointReader(mixtral_dir), placement, g,
                                                              torch.float32)
            service.register(ReplicaInfo(f"g{g}-r{r}", g))
    client = RouterClient(lambda version: over_the_wire(service.get_table(version)), service.report_failure,
                          service.record_load)
    backend = RemoteExperts(transport, client, failover_timeout=failover_timeout, poll_interval=0.005, **options)
    return service, transport, backend


def over_the_wire(snapshot):
    """A table snapshot as a shard in another process gets it: a copy, no object shared with the router."""
    return pickle.loads(pickle.dumps(snapshot))


def test_a_dead_replica_is_replaced_by_its_sibling_without_changing_a_token(mixtral_dir, reference):
    flushed: list[LayerPathStats] = []
    service, transport, backend = local_cluster(mixtral_dir, (2, 1), stats_sink=flushed.append,
                                                stats_interval=3600)
    version = service.table.version
    transport.kill_at(6, "g0-r0")
    outs = small_llm(mixtral_dir, experts=backend).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    same_greedy_outputs(outs, reference, tol=0.0)
    assert backend.failover.failed_sends >= 1 and backend.failover.stall_seconds
    assert backend.failover.replanned_layers == 0  # the placement did not change: the sibling took the batch
    assert service.table.get("g0-r0") is None and service.table.version > version  # dropped as dead
    backend.close()
    (stats,) = flushed
    assert stats.failovers == backend.failover.resent_batches >= 1
    assert stats.failover_stall_seconds == list(backend.failover.stall_seconds)


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


def test_a_lone_replica_that_fails_a_send_while_alive_is_sent_to_again(mixtral_dir, reference):
    service, transport, backend = local_cluster(mixtral_dir, (1, 1), failover_timeout=5.0)
    version = service.table.version
    forward = transport.forward

    def unavailable_once(sends, **timing):  # like a call to a restarted Ray actor whose constructor runs still
        answers = forward(sends, **timing)
        if transport.calls == 6:
            answers = [ReplicaFailure(r.replica_id, "unavailable") if r.replica_id == "g1-r0" else answer
                       for (r, _), answer in zip(sends, answers)]
        return answers

    transport.forward = unavailable_once
    outs = small_llm(mixtral_dir, experts=backend).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    same_greedy_outputs(outs, reference, tol=0.0)
    assert backend.failover.failed_sends == 1 and service.table.version == version  # alive: kept in the table


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
    with pytest.raises(ValueError, match="redundant_slots must be >= 0"):
        ExpertParallelConfig(2, "local", redundant_slots=-1)
    dense = write_hf_checkpoint(tmp_path / "dense", moe=False)
    with pytest.raises(ValueError, match="dense model"):
        small_llm(dense, expert_parallel=ExpertParallelConfig(2, "local"))


# --- replica choice under concurrency ---------------------------------------------------------------------------

class SlowTransport:
    """Answers zeros of the right shape after `delay` seconds, and notes where each send went; raises `error`
    when one is set. It cannot time sends one by one (no `times_sends`)."""

    name = "slow"

    def __init__(self, delay: float, error: Exception | None = None):
        self.delay, self.error = delay, error
        self.replicas: list[str] = []
        self.lock = threading.Lock()

    def forward(self, sends):
        with self.lock:
            self.replicas += [r.replica_id for r, _ in sends]
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [torch.zeros(int((b.expert_ids >= 0).sum()), b.hidden.shape[1]) for _, b in sends]

    def close(self) -> None:
        pass


def fake_cluster(transport, replicas=(2, 1), **options) -> RemoteExperts:
    """4 experts over 2 layers, experts 0-1 in group 0 and 2-3 in group 1, no weights anywhere."""
    service = RouterService(make_placement(4, 2, 2, "linear", replicas))
    for g, count in enumerate(replicas):
        for r in range(count):
            service.register(ReplicaInfo(f"g{g}-r{r}", g))
    client = RouterClient(service.get_table, service.report_failure, service.record_load)
    return RemoteExperts(transport, client, **options)


HIDDEN = 8
# k = 2: group 0 gets t0 [0, -1] and t1 [1, 0]; group 1 gets t0 [-1, 2] and t2 [3, 2]
KNOWN_IDS = torch.tensor([[0, 2], [1, 0], [3, 2]])


def call(backend: RemoteExperts, layer: int, expert_ids: torch.Tensor = KNOWN_IDS) -> torch.Tensor:
    t, k = expert_ids.shape
    return backend(layer, torch.randn(t, HIDDEN), expert_ids, torch.full((t, k), 1.0 / k))


def test_concurrent_calls_spread_over_replicas_by_tokens_in_flight():
    transport = SlowTransport(delay=0.3)
    backend = fake_cluster(transport)
    backend.sent["g0-r1"] = 10_000  # r1 was sent far more: the old "fewest ever sent" rule would avoid it
    only_group_0 = torch.tensor([[0, 1], [1, 0], [0, 1]])
    start = threading.Barrier(4)

    def worker():
        start.wait()
        call(backend, 1, only_group_0)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.15)  # every call is inside the slow transport now
    assert backend.outstanding == {"g0-r0": 6, "g0-r1": 6}  # 3 tokens per call, two calls on each
    for thread in threads:
        thread.join()
    assert Counter(transport.replicas) == {"g0-r0": 2, "g0-r1": 2}
    assert backend.outstanding == {"g0-r0": 0, "g0-r1": 0}


def test_a_call_in_flight_steers_the_next_one_to_the_idle_replica():
    backend = fake_cluster(transport := SlowTransport(delay=0.3))
    backend.sent["g0-r1"] = 10_000
    first = threading.Thread(target=call, args=(backend, 1))
    first.start()
    time.sleep(0.1)
    call(backend, 1)  # g0-r0 has 2 tokens in flight, g0-r1 none
    first.join()
    assert [r for r in transport.replicas if r.startswith("g0")] == ["g0-r0", "g0-r1"]


def test_an_exception_from_the_transport_leaves_nothing_in_flight():
    backend = fake_cluster(SlowTransport(delay=0.0, error=RuntimeError("transport bug")))
    with pytest.raises(RuntimeError, match="transport bug"):
        call(backend, 1)
    assert backend.outstanding == {"g0-r0": 0, "g1-r0": 0}


# --- layer-path stats -------------------------------------------------------------------------------------------

def test_stats_after_a_known_batch(mixtral_dir):
    flushed: list[LayerPathStats] = []
    _, _, backend = local_cluster(mixtral_dir, (2, 1), stats_sink=flushed.append, stats_interval=3600)
    hidden = CheckpointReader(mixtral_dir).config.hidden_size
    weights = torch.full((3, 2), 0.5)
    for layer in (0, 1, 0):  # two steps: g0 goes to r0, then r1 (r0 was sent more), then r0 (tie, by id)
        backend(layer, torch.randn(3, hidden), KNOWN_IDS, weights)
    assert not flushed  # the interval has not passed
    backend.close()
    (stats,) = flushed
    assert stats.transport == "local"
    assert stats.replica_groups == {"g0-r0": 0, "g0-r1": 0, "g1-r0": 1}
    assert stats.routed["g0-r0"].tolist() == [[4, 2, 0, 0], [0, 0, 0, 0]]  # slots per [layer][expert]
    assert stats.routed["g0-r1"].tolist() == [[0, 0, 0, 0], [2, 1, 0, 0]]
    assert stats.routed["g1-r0"].tolist() == [[0, 0, 4, 2], [0, 0, 2, 1]]
    assert {g: len(s) for g, s in stats.send_seconds.items()} == {0: 3, 1: 3}
    assert all(0 < s < 5 for seconds in stats.send_seconds.values() for s in seconds)
    assert stats.outstanding == {"g0-r0": 0, "g0-r1": 0, "g1-r0": 0}
    assert (stats.failovers, stats.failover_stall_seconds) == (0, [])


def test_stats_reach_the_sink_at_step_boundaries_not_per_layer(mixtral_dir):
    flushed: list[LayerPathStats] = []
    _, _, backend = local_cluster(mixtral_dir, (1, 1), stats_sink=flushed.append, stats_interval=0.0)
    small_llm(mixtral_dir, experts=backend).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    backend.close()
    steps = len(backend.layer_seconds) // 2  # 2 MoE layers per step
    assert 1 < len(flushed) <= steps + 1  # once per step at most (interval 0), plus close()
    routed = sum(counts.sum() for stats in flushed for counts in stats.routed.values())
    assert not any(counts.is_inference() for stats in flushed for counts in stats.routed.values())
    tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert routed == tokens * 2 * 2  # top-2, 2 layers: every slot once


def test_whole_forward_seconds_for_a_transport_that_cannot_time_sends():
    flushed: list[LayerPathStats] = []
    backend = fake_cluster(SlowTransport(delay=0.05), stats_sink=flushed.append)
    call(backend, 1)
    backend.close()
    (stats,) = flushed
    assert stats.transport == "slow" and set(stats.send_seconds) == {0, 1}
    assert all(s >= 0.05 for seconds in stats.send_seconds.values() for s in seconds)


def test_missing_groups_counts_only_replicas_with_recent_heartbeats():
    now = [100.0]
    service = RouterService(make_placement(4, 2, 2), heartbeat_timeout_s=3.0, clock=lambda: now[0])
    untimed = RouterService(make_placement(4, 2, 2), clock=lambda: now[0])  # replicas that do not heartbeat
    assert service.missing_groups() == [0, 1]
    a, b = ReplicaInfo("a", 0), ReplicaInfo("b", 1)
    for router in (service, untimed):
        router.register(a)
        router.register(b)
    assert service.missing_groups() == []
    now[0] += 2.0
    service.heartbeat(b, tokens_served=0)
    now[0] += 2.0  # a: 4 s since its last sign of life (it is stopped); b: 2 s
    assert service.missing_groups() == [0]
    assert [r["alive"] for g in service.describe()["groups"] for r in g["replicas"]] == [False, True]
    assert untimed.missing_groups() == []  # still in the routing table: no shard has failed on it yet
    service.heartbeat(a, tokens_served=0)
    assert service.missing_groups() == []


def test_the_engine_marks_every_step_and_a_new_table_is_taken_only_at_its_start(mixtral_dir):
    service, _, backend = local_cluster(mixtral_dir, (1, 1))
    marks = []  # ("(" or ")", MoE layers run so far)
    for name, mark in (("begin_step", "("), ("end_step", ")")):
        original = getattr(backend, name)
        setattr(backend, name, lambda _m=mark, _f=original: (marks.append((_m, len(backend.layer_seconds))), _f()))
    backend.refresh_interval = 0.0
    llm = small_llm(mixtral_dir, experts=backend)
    llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    assert marks == [("(", 0), (")", 2), ("(", 2), (")", 4), ("(", 4), (")", 6)]  # 3 steps of 2 MoE layers

    version = backend.table.version
    service.register(ReplicaInfo("g0-r1", 0))  # the table changes while a step runs
    x = torch.randn(4, 64)
    ids, weights = torch.tensor([[0, 3]] * 4), torch.full((4, 2), 0.5)
    backend(1, x, ids, weights)
    assert backend.table.version == version  # not mid-step
    type(backend).begin_step(backend)
    assert backend.table.version > version


def test_a_new_shard_waits_past_the_failover_timeout_for_groups_still_starting(caplog, monkeypatch):
    """Its groups' node may still be booting: the shard waits up to its startup timeout, saying what it awaits,
    and then names the groups that never came."""
    monkeypatch.setattr("router_service.remote_experts.WAIT_LOG_S", 0.1)
    service = RouterService(make_placement(4, 2, 2, "linear", (1, 1)))
    service.register(ReplicaInfo("g0-r0", 0))
    client = RouterClient(service.get_table, service.report_failure, service.record_load)
    threading.Timer(0.6, service.register, (ReplicaInfo("g1-r0", 1),)).start()  # group 1's node comes up late
    with caplog.at_level("WARNING", logger="router_service.remote_experts"):
        backend = RemoteExperts(LocalTransport({}), client, failover_timeout=0.1, startup_timeout=10.0,
                                poll_interval=0.01)
    assert sorted(backend.table.replicas) == [0, 1]
    assert "waiting for expert groups [1] to register" in caplog.text

    alone = RouterService(make_placement(4, 2, 2, "linear", (1, 1)))
    alone.register(ReplicaInfo("g0-r0", 0))
    with pytest.raises(ExpertGroupUnavailable, match=r"expert groups \[1\] did not register within 0.3 s"):
        RemoteExperts(LocalTransport({}), RouterClient(alone.get_table, alone.report_failure, alone.record_load),
                      failover_timeout=10.0, startup_timeout=0.3, poll_interval=0.01)
