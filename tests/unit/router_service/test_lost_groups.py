"""Lost groups: when a group's last replica dies, the survivors take its experts (a covering placement), the
shard plans the waiting layer again under it, and the home placement returns once the group has a replica."""

import threading
import time

import pytest
import torch

from experts.expert_group import ExpertGroup
from experts.placement import make_placement
from mistral.checkpoint import CheckpointReader
from router_service.placement_follower import PlacementFollower
from router_service.remote_experts import RemoteExperts, RouterClient
from router_service.service import RebalancePolicy, RouterService
from router_service.transport import ReplicaInfo
from tests.conftest import same_greedy_outputs, small_llm
from tests.unit.router_service.test_rebalance import SKEWED, Clock
from tests.unit.router_service.test_remote_experts import GREEDY, PROMPTS, FlakyTransport, over_the_wire


def _service(dead: set[str], num_groups=4, **policy) -> tuple[RouterService, list[ReplicaInfo]]:
    service = RouterService(make_placement(8, 2, num_groups, "linear"), is_alive=lambda info: info.replica_id not in dead,
                            policy=RebalancePolicy(**policy), clock=Clock())
    replicas = [ReplicaInfo(f"g{g}", g) for g in range(num_groups)]
    for info in replicas:
        service.register(info)
    return service, replicas


def _hold(service: RouterService, replicas: list[ReplicaInfo], version: int) -> None:
    """Every replica reports, by heartbeat, that it holds placement `version`."""
    for info in replicas:
        service.heartbeat(info, 0, version)


def test_the_last_replica_of_a_group_dying_switches_to_a_cover_and_its_return_switches_home():
    dead: set[str] = set()
    service, replicas = _service(dead)
    home = service.table.placement
    dead.add("g1")
    service.report_failure("g1")
    assert service.table.placement is home  # pending until the survivors hold it
    survivors = [replicas[0], replicas[2], replicas[3]]
    answer = service.heartbeat(replicas[0], 0, 0)
    covering = answer["placement"]
    assert covering.version == 1 and covering.experts_of(1, 0) == () and covering.experts_of(1, 1) == ()
    assert service.missing_groups() == [1]  # its experts compute nowhere until the switch
    assert [p.version for p in service.placements(1)] == [0, 0, 1]  # a new group-1 replica loads home too
    _hold(service, survivors, 1)
    assert service.table.placement == covering and service.missing_groups() == []
    described = service.describe()
    assert described["lost_groups"] == [1] and described["home_version"] == 0
    assert service.rebalance()["message"].startswith("groups [1] lost every replica")

    back = ReplicaInfo("g1-new", 1)
    service.register(back, 0)  # it loaded its home experts at start
    assert service.table.placement == covering  # still covered until every replica holds home again
    _hold(service, survivors + [back], 2)
    assert service.table.placement.layers == home.layers and service.table.placement.version == 2
    assert service.describe()["lost_groups"] == [] and service.describe()["home_version"] is None


def test_two_lost_groups_and_one_back_keep_the_other_covered():
    dead: set[str] = set()
    service, replicas = _service(dead)
    home = service.table.placement
    for rid in ("g1", "g2"):
        dead.add(rid)
        service.report_failure(rid)
    _hold(service, [replicas[0], replicas[3]], 2)  # the second cover replaced the first before it applied
    both = service.table.placement
    assert both.version == 2 and both.experts_of(1, 0) == both.experts_of(2, 0) == ()
    back = ReplicaInfo("g2-new", 2)
    service.register(back, 0)
    _hold(service, [replicas[0], replicas[3], back], 3)
    now = service.table.placement
    assert now.experts_of(2, 0)[:2] == home.experts_of(2, 0) and now.experts_of(1, 0) == ()  # home, and a cover
    assert service.describe()["lost_groups"] == [1]


def test_no_cover_when_disabled_or_when_no_group_survives_or_a_sibling_lives():
    dead: set[str] = set()
    service, replicas = _service(dead, cover_lost_groups=False)
    dead.add("g1")
    service.report_failure("g1")
    assert service.heartbeat(replicas[0], 0, 0)["placement"] is None and service.missing_groups() == [1]

    service, replicas = _service(dead, num_groups=1)
    dead.add("g0")
    service.report_failure("g0")
    assert service.describe()["lost_groups"] == [] and service.missing_groups() == [0]

    service, replicas = _service(set())
    service.register(ReplicaInfo("g1-b", 1))
    dead = {"g1"}
    service.is_alive = lambda info: info.replica_id not in dead
    service.report_failure("g1")  # its sibling g1-b still serves group 1
    assert service.describe()["lost_groups"] == [] and service.heartbeat(replicas[0], 0, 0)["placement"] is None


def test_a_cover_replaces_a_pending_rebalance_and_versions_never_repeat():
    dead: set[str] = set()
    service = RouterService(make_placement(8, 2, 2, "linear", redundant_slots=1),
                            is_alive=lambda info: info.replica_id not in dead, clock=Clock())
    replicas = [ReplicaInfo("g0", 0), ReplicaInfo("g1", 1)]
    for info in replicas:
        service.register(info)
    service.record_load(SKEWED)
    assert service.rebalance()["status"] == "pending"  # v1, not yet held
    dead.add("g1")
    service.report_failure("g1")
    covering = service.heartbeat(replicas[0], 0, 0)["placement"]
    assert covering.version == 2 and sorted(covering.experts_of(0, 0)) == list(range(8))
    service.heartbeat(replicas[0], 0, 2)
    assert service.table.placement == covering
    assert service.describe()["rebalance"]["last"]["status"] == "pending"  # never applied, and not mislabelled


@pytest.fixture
def covering_cluster(mixtral_dir):
    """Two in-process groups of one replica each, with heartbeat threads that follow the router's placement."""
    placement = make_placement(4, 2, 2, "linear")
    transport = FlakyTransport({})
    service = RouterService(placement, is_alive=lambda info: info.replica_id not in transport.dead)
    reader = CheckpointReader(mixtral_dir)
    followers, stop = {}, threading.Event()

    def start(replica_id: str, group_id: int, loads=(placement,)) -> None:
        group = ExpertGroup.load(reader, loads[0], group_id, torch.float32)
        for extra in loads[1:]:
            group.extend(reader, extra)
        transport.groups[replica_id] = group
        followers[replica_id] = PlacementFollower(group, reader, loads[-1], replica_id)
        service.register(ReplicaInfo(replica_id, group_id), followers[replica_id].version)

    def beats() -> None:
        while not stop.wait(0.01):
            for replica_id, follower in list(followers.items()):
                if replica_id not in transport.dead:
                    info = service.table.get(replica_id) or ReplicaInfo(replica_id, follower.group.group_id)
                    follower.follow(service.heartbeat(info, 0, follower.version))

    start("g0-r0", 0)
    start("g1-r0", 1)
    threading.Thread(target=beats, daemon=True).start()
    client = RouterClient(lambda version: over_the_wire(service.get_table(version)), service.report_failure,
                          service.record_load)
    backend = RemoteExperts(transport, client, failover_timeout=10.0, poll_interval=0.005, refresh_interval=0.0)
    yield service, transport, backend, start, followers
    stop.set()


def test_a_lost_group_is_covered_mid_generation_without_changing_a_token(mixtral_dir, covering_cluster):
    reference = small_llm(mixtral_dir).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    service, transport, backend, start, followers = covering_cluster
    transport.kill_at(6, "g1-r0")  # its only replica: nothing to fail over to but a cover
    llm = small_llm(mixtral_dir, experts=backend)
    same_greedy_outputs(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY), reference, tol=0.0)
    covering = service.table.placement
    assert covering.version == 1 and service.describe()["lost_groups"] == [1]
    assert backend.failover.stall_seconds and backend.table.placement == covering
    assert backend.failover.replanned_layers == 1  # the waiting layer, planned again under the cover
    assert followers["g0-r0"].group.holds(0) == (0, 1, 2, 3)  # the survivor loaded group 1's experts

    start("g1-r1", 1, service.placements(1))  # Serve's replacement: it loads its home experts at start
    service.get_table(-1, shard_id="shard")
    deadline = time.monotonic() + 10
    while service.table.placement.version != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.table.placement.layers == make_placement(4, 2, 2, "linear").layers
    same_greedy_outputs(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY), reference, tol=0.0)
    service.get_table(-1, shard_id="shard")  # the shard moved to the home table: the switch settles
    deadline = time.monotonic() + 10
    while followers["g0-r0"].group.holds(0) != (0, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert followers["g0-r0"].group.holds(0) == (0, 1)  # the cover's extra experts are dropped again
    assert backend.sent.get("g1-r1", 0) > 0  # the returned group serves again
