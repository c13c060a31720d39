"""Replica bounds against node types: the shipped cluster.yaml holds configs/mixtral-8x7b.yaml at its upper
bounds, and bounds that do not fit are named with their numbers, also by `msem serve`'s planning."""

from pathlib import Path

import pytest
import yaml

from cluster import capacity
from cluster.app import _check_capacity
from cluster.config import load_config, parse_config
from mistral.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
MIXTRAL = ROOT / "configs" / "mixtral-8x7b.yaml"


def _types(experts_max: int = 2) -> list[capacity.NodeType]:
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    launcher["available_node_types"]["experts"]["max_workers"] = experts_max
    return capacity.node_types(launcher)


def test_the_shipped_cluster_holds_the_shipped_config_and_ties_roles_to_node_types():
    config = load_config(MIXTRAL)
    assert capacity.problems(config, _types()) == []
    holds = {t.name: {r.name: t.holds(r.demand) for r in capacity.roles(config, has_gpus=True)} for t in _types()}
    assert holds["head"]["AttentionShard"] == holds["head"]["ExpertGroup0"] == 0
    assert (holds["attention"]["AttentionShard"], holds["attention"]["ExpertGroup0"]) == (1, 0)
    assert (holds["experts"]["AttentionShard"], holds["experts"]["ExpertGroup2"]) == (0, 8)


def test_bounds_beyond_the_node_types_are_named_with_their_numbers():
    args = yaml.safe_load(MIXTRAL.read_text())["applications"][0]["args"]
    args["expert_groups"] |= {"replicas": {"min": 1, "max": 8}, "group_replicas": {0: {"min": 1, "max": 10}}}
    found = capacity.problems(parse_config(args), _types())
    assert found[0] == ("ExpertGroup0..2 may run 26 replicas of {CPU: 0.5, GPU: 1, msem_experts: 1} at their upper "
                        "bounds; the node types that hold one (experts: 2 x 8) hold 16")
    assert "all roles at their upper bounds ask for 30 GPU; the node types have 20 at their max_workers" in found


def test_a_resource_no_node_type_has_is_named():
    config = parse_config({"attention": {"resources": {"msem_attnetion": 1}}, "expert_groups": None,
                           "memory": None})
    (problem, total) = capacity.problems(config, _types())
    assert "AttentionShard may run 1 replicas of {CPU: 1, GPU: 1, msem_attnetion: 1}" in problem
    assert problem.endswith("(none) hold 0") and "msem_attnetion" in total


def test_node_types_without_declared_resources_are_not_judged():
    """The local provider's node type declares nothing: Ray measures each machine when it starts it."""
    local = capacity.node_types({"head_node_type": "local.cluster.node",
                                 "available_node_types": {"local.cluster.node": {"max_workers": 0}}})
    assert capacity.problems(parse_config({"attention": {"replicas": {"min": 1, "max": 99}}}), local) == []


def test_planning_refuses_bounds_the_cluster_cannot_hold(tmp_path):
    launcher = tmp_path / "ray_bootstrap_config.yaml"
    config = parse_config({"attention": {"replicas": {"min": 1, "max": 9}, "num_gpus": 1,
                                         "resources": {"msem_attention": 1}}, "expert_groups": None})
    _check_capacity(config, launcher)  # no launcher config: not a cluster `ray up` started, nothing to check
    launcher.write_text((ROOT / "cluster.yaml").read_text())
    with pytest.raises(ConfigError, match=r"AttentionShard may run 9 replicas .* hold 4.*raise the node types"):
        _check_capacity(config, launcher)


def test_the_capacity_command_prints_each_role_and_exits_1_when_the_bounds_do_not_fit(tmp_path, capsys):
    from cluster import cli

    assert cli.main(["capacity", "--config", str(MIXTRAL), "--cluster", str(ROOT / "cluster.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ExpertGroup0                6  {CPU: 0.5, GPU: 1, msem_experts: 1}          experts: 2 x 8" in out
    assert "head: 1 x 16" in out.split("MemoryStore")[1].splitlines()[0]  # pinned to the head
    assert out.endswith("fits " + str(ROOT / "cluster.yaml") + " at its upper replica bounds\n")
    small = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    small["available_node_types"]["experts"]["max_workers"] = 1
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    assert cli.main(["capacity", "--config", str(MIXTRAL), "--cluster", str(tmp_path / "small.yaml")]) == 1
    assert "does not fit: ExpertGroup0..2 may run 14 replicas" in capsys.readouterr().out
    assert cli.main(["capacity", "--config", str(ROOT / "configs" / "tiny.yaml"),
                     "--cluster", str(ROOT / "cluster.local.yaml")]) == 0
    assert capsys.readouterr().out.endswith("(Ray measures those machines when it starts them): not checked\n")
    assert cli.main(["capacity", "--config", str(MIXTRAL), "--cluster", str(tmp_path / "none.yaml")]) == 2
    assert "is not a readable cluster launcher config" in capsys.readouterr().err
