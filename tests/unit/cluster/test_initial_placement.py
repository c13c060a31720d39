"""The start-up placement from a file (`expert_groups.initial_placement`): a recorded load, a placement, a saved
`/v1/experts` document; bad files are refused by name."""

import json
from pathlib import Path

import pytest

from cluster.app import initial_placement, plan
from cluster.config import ServeConfig
from experts.placement import make_placement
from mistral.errors import ConfigError
from router_service.service import RouterService

LOAD = [[900, 10, 10, 10, 10, 10, 10, 800], [10, 10, 10, 10, 10, 10, 700, 600]]


def _write(tmp_path, data) -> Path:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(data))
    return path


def test_a_recorded_load_is_planned_onto_the_groups_and_slots(tmp_path):
    base = make_placement(8, 2, 4, "linear", redundant_slots=1)
    placement = initial_placement(_write(tmp_path, {"load": LOAD}), base)
    assert placement.slots_per_group == base.slots_per_group
    assert min(placement.balancedness(LOAD)) > max(base.balancedness(LOAD))
    assert len(placement.groups_of(0, 0)) == 2  # the hottest expert got its redundant copy


def test_a_placement_or_a_saved_experts_document_is_taken_as_it_is(tmp_path):
    base = make_placement(8, 2, 4, "linear", redundant_slots=1)
    service = RouterService(make_placement(8, 2, 4, "round_robin", redundant_slots=1))
    document = service.describe()
    assert initial_placement(_write(tmp_path, document), base) == service.table.placement
    assert initial_placement(_write(tmp_path, document["placement"]), base) == service.table.placement


@pytest.mark.parametrize("content,message", [
    ("{not json", "not readable JSON"),
    (json.dumps({"load": [[1, 2]]}), "load must be 2 lists"),
    (json.dumps(make_placement(8, 2, 2, "linear").to_dict()), "places 8 experts x 2 layers in 2 groups"),
])
def test_bad_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        initial_placement(path, make_placement(8, 2, 4, "linear", redundant_slots=1))
    with pytest.raises(ConfigError, match="does not exist"):
        initial_placement(tmp_path / "missing.json", make_placement(8, 2, 4, "linear"))


def test_plan_applies_redundant_slots_and_the_initial_placement(tmp_path):
    recorded = _write(tmp_path, {"load": LOAD * 2})  # the tiny preset has 4 layers
    config = ServeConfig.model_validate({"model": "tiny", "expert_groups": {
        "num_groups": 2, "redundant_slots": 1, "initial_placement": str(recorded)}})
    _, placement = plan(config)
    assert placement.slots_per_group == 5 and placement.version == 1


def test_a_host_tier_too_small_for_the_memory_store_is_refused_before_deploying():
    config = ServeConfig(model="tiny", max_model_len=512, memory={"host_bytes": 1 << 16})
    with pytest.raises(ConfigError, match="memory.host_bytes is 65536; staging one sequence of max_model_len 512"):
        plan(config)
    plan(ServeConfig(model="tiny", max_model_len=512, memory={"host_bytes": 1 << 16, "store": None}))
