"""Replica specs: the router refuses a group replica whose hidden size, weight dtype or experts do not fit the
deployment, names the mismatch, leaves the table as it was and keeps serving the others."""

import pytest

from experts.placement import make_placement
from router_service.service import REFUSALS_KEPT, ExpectedReplicas, ReplicaRefused, RouterService
from router_service.transport import ReplicaInfo, ReplicaSpec

EXPECTED = ExpectedReplicas(hidden_size=64, dtypes=("float32",))
SKEWED = [[1000, 10, 10, 10, 10, 10, 10, 900], [10, 10, 10, 10, 10, 10, 800, 700]]  # [layer][expert]


def spec_of(placement, group_id: int, **changes) -> ReplicaSpec:
    """The spec of a replica that holds exactly what `placement` gives its group."""
    experts = tuple(tuple(sorted(placement.experts_of(group_id, layer))) for layer in range(placement.num_layers))
    return ReplicaSpec(**{"hidden_size": 64, "dtype": "float32", "experts": experts, **changes})


@pytest.fixture
def service() -> RouterService:
    """8 experts, 2 layers, 4 groups of experts (2g, 2g + 1) and one redundant slot; groups 0-2 registered."""
    placement = make_placement(8, 2, 4, "linear", redundant_slots=1)
    service = RouterService(placement, expected=EXPECTED)
    for g in range(3):
        service.register(ReplicaInfo(f"g{g}-a", g, spec=spec_of(placement, g)))
    return service


def listed(service: RouterService) -> list[str]:
    return [r["replica_id"] for g in service.describe()["groups"] for r in g["replicas"]]


def test_a_replica_that_fits_is_registered(service):
    version = service.register(ReplicaInfo("g3-a", 3, spec=spec_of(service.table.placement, 3)))
    assert version == service.table.version and listed(service) == ["g0-a", "g1-a", "g2-a", "g3-a"]
    assert service.describe()["refused"] == []


@pytest.mark.parametrize("changes,message", [
    ({"dtype": "bfloat16"}, "replica g3-b of group 3 holds bfloat16 weights; this deployment serves float32"),
    ({"hidden_size": 32}, "replica g3-b of group 3 has hidden size 32; this model's is 64"),
    ({"experts": ((6, 7), (6,))}, "replica g3-b of group 3 lacks experts layer 1: [7] that placement v0 gives it"),
    ({"experts": ((6,), ())},
     "replica g3-b of group 3 lacks experts layer 0: [7], layer 1: [6, 7] that placement v0 gives it"),
    ({"experts": ((6, 7),)}, "replica g3-b of group 3 lacks experts layer 1: [6, 7] that placement v0 gives it"),
    ({"experts": ((6, 7), (6, 7), (6, 7))}, "replica g3-b of group 3 holds experts of 3 layers; the model has 2"),
    ({"experts": ((6, 7, 8), (6, 7))}, "replica g3-b of group 3 holds experts [8]; the model has experts 0..7"),
    ({"dtype": "float16", "hidden_size": 32},
     "replica g3-b of group 3 has hidden size 32; this model's is 64; holds float16 weights; this deployment "
     "serves float32"),
])
def test_a_replica_that_does_not_fit_is_refused_and_serving_goes_on(service, changes, message):
    before, snapshot = service.table.version, service.table.snapshot()
    with pytest.raises(ReplicaRefused) as refused:
        service.register(ReplicaInfo("g3-b", 3, spec=spec_of(service.table.placement, 3, **changes)))
    assert str(refused.value) == message
    assert service.table.version == before and service.table.snapshot() == snapshot
    assert listed(service) == ["g0-a", "g1-a", "g2-a"] and service.missing_groups() == [3]
    record = service.describe()["refused"]
    assert [(r["replica_id"], r["group"], r["reason"]) for r in record] == [("g3-b", 3, message)]
    service.register(ReplicaInfo("g3-b", 3, spec=spec_of(service.table.placement, 3)))  # fixed, it joins
    assert service.missing_groups() == []


def test_a_restarted_replica_that_no_longer_fits_keeps_its_old_entry(service):
    old = service.table.get("g0-a")
    with pytest.raises(ReplicaRefused, match="holds bfloat16 weights"):
        service.register(ReplicaInfo("g0-a", 0, spec=spec_of(service.table.placement, 0, dtype="bfloat16")))
    assert service.table.get("g0-a") is old


def test_more_than_one_dtype_may_be_allowed():
    placement = make_placement(8, 2, 4, "linear")
    service = RouterService(placement, expected=ExpectedReplicas(64, ("bfloat16", "float16")))
    service.register(ReplicaInfo("g0-a", 0, spec=spec_of(placement, 0, dtype="float16")))
    with pytest.raises(ReplicaRefused, match="holds float32 weights; this deployment serves bfloat16 or float16"):
        service.register(ReplicaInfo("g1-a", 1, spec=spec_of(placement, 1)))


def test_without_an_expectation_or_a_spec_nothing_is_checked(service):
    service.register(ReplicaInfo("g3-a", 3))  # no spec
    unchecked = RouterService(make_placement(8, 2, 4, "linear"))
    unchecked.register(ReplicaInfo("g0-a", 0, spec=ReplicaSpec(1, "int8", ())))
    assert "g3-a" in listed(service) and listed(unchecked) == ["g0-a"]


def test_during_a_rebalance_a_replica_is_checked_against_the_placement_it_says_it_holds(service):
    service.register(ReplicaInfo("g3-a", 3, spec=spec_of(service.table.placement, 3)))
    service.record_load(SKEWED)
    assert service.rebalance()["status"] == "pending"
    active, pending = service.placements()
    new = {g: [f"layer {layer}: {added}" for layer in range(2)
               if (added := sorted(set(pending.experts_of(g, layer)) - set(active.experts_of(g, layer))))]
           for g in range(4)}
    g = next(g for g in range(4) if new[g])  # a group that gains experts
    only_active, only_pending = spec_of(active, g), spec_of(pending, g)
    both = spec_of(active, g, experts=tuple(tuple(sorted(set(a) | set(p)))
                                            for a, p in zip(only_active.experts, only_pending.experts)))

    service.register(ReplicaInfo(f"g{g}-b", g, spec=only_active), placement_version=active.version)
    service.register(ReplicaInfo(f"g{g}-c", g, spec=both), placement_version=pending.version)  # old and new
    with pytest.raises(ReplicaRefused) as refused:  # says it holds v1 but did not load v1's new experts
        service.register(ReplicaInfo(f"g{g}-d", g, spec=only_active), placement_version=pending.version)
    assert str(refused.value) == f"replica g{g}-d of group {g} lacks experts {', '.join(new[g])} that placement v1 " \
                                 "gives it"
    assert f"g{g}-c" in listed(service) and f"g{g}-d" not in listed(service)


def test_a_heartbeat_that_registers_again_is_refused_too(service):
    placement = service.table.placement
    service.deregister("g1-a")  # this service lost it (it restarted)
    bad = ReplicaInfo("g1-a", 1, spec=spec_of(placement, 1, hidden_size=128))
    with pytest.raises(ReplicaRefused, match="replica g1-a of group 1 has hidden size 128; this model's is 64"):
        service.heartbeat(bad, tokens_served=5)
    assert "g1-a" not in listed(service) and service.missing_groups() == [1, 3]
    assert service.heartbeat(ReplicaInfo("g1-a", 1, spec=spec_of(placement, 1)), 5, 0)["placement"] is None
    served = {r["replica_id"]: r["tokens_served"] for g in service.describe()["groups"] for r in g["replicas"]}
    assert served["g1-a"] == 5


def test_the_record_of_refusals_is_bounded_and_keeps_the_newest(service):
    for i in range(REFUSALS_KEPT + 4):
        with pytest.raises(ReplicaRefused):
            service.register(ReplicaInfo(f"bad-{i}", 3, spec=spec_of(service.table.placement, 3, hidden_size=1)))
    record = service.describe()["refused"]
    assert [r["replica_id"] for r in record] == [f"bad-{i}" for i in range(4, REFUSALS_KEPT + 4)]
