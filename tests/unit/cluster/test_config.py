"""ServeConfig loading and the per-group scaling it turns into (no Ray needed)."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cluster.autoscaling import RoutedTokensPolicy
from cluster.config import ServeConfig, load_config, parse_config
from mistral.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]


def test_configs_in_the_repository_load():
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert (tiny.model, tiny.host, tiny.http_port, tiny.grpc_port) == ("tiny", "127.0.0.1", 8000, 50051)
    assert tiny.expert_groups.num_groups == 2 and tiny.expert_groups.transport == "grpc"


def test_plain_config_file_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nexpert_groups:\n  num_groups: 4\n  group_replicas: {1: {min: 1, max: 3}}\n")
    config = load_config(path)
    assert config.expert_groups.bounds(1).max == 3 and config.expert_groups.bounds(0).max == 1
    assert ServeConfig().host == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize("data, message", [
    ({"modle": "tiny"}, "modle: Extra inputs are not permitted"),
    ({"expert_groups": {"replicas": {"min": 3, "max": 2}}}, "exceeds replicas.max"),
    ({"expert_groups": {"num_groups": 2, "group_replicas": {5: {"max": 2}}}}, "names groups [5]"),
    ({"expert_groups": {"transport": "carrier-pigeon"}}, "expert_groups.transport"),
    ({"http_port": 0}, "http_port"),
    ({"limits": {"max_requests": 0}}, "limits.max_requests"),
    ({"expert_groups": {"redundant_slots": -1}}, "expert_groups.redundant_slots"),
    ({"expert_groups": {"rebalance": {"min_gain": 2}}}, "expert_groups.rebalance.min_gain"),
    ({"expert_groups": {"rebalance": {"interval": 10}}}, "expert_groups.rebalance.interval: Extra inputs"),
    ({"attention": {"health_check": {"period_s": 0}}}, "attention.health_check.period_s"),
    ({"memory": {"write_policy": "write-around"}}, "memory.write_policy"),
    ({"memory": {"host_bytes": -1}}, "memory.host_bytes"),
    ({"memory": {"store": {"timeout_s": 0}}}, "memory.store.timeout_s"),
    ({"attention": {"routing": {"policy": "round-robin"}}}, "attention.routing.policy"),
    ({"expert_groups": {"rebalance": {"cover_lost_groups": "sometimes"}}},
     "expert_groups.rebalance.cover_lost_groups"),
], ids=["typo", "bounds", "unknown-group", "transport", "port", "limits", "redundant-slots", "min-gain",
        "rebalance-typo", "health-check", "write-policy", "host-bytes", "store-timeout", "routing-policy",
        "cover"])
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def _ctx(rates: dict, lo=1, hi=4, target=2):
    return SimpleNamespace(deployment_name="ExpertGroup1",
                           aggregated_metrics={"routed_tokens_per_s": rates} if rates is not None else None,
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
                           target_num_replicas=target)


def test_routed_tokens_policy_sizes_a_group_by_its_load():
    policy = RoutedTokensPolicy(target_tokens_per_s=1000)
    assert policy(_ctx({"r1": 1500, "r2": 1400}))[0] == 3  # 2900 tokens/s -> 3 replicas
    assert policy(_ctx({"r1": 10}))[0] == 1  # cold: the lower bound
    assert policy(_ctx({"r1": 9000, "r2": 9000}))[0] == 4  # hot: the upper bound
    assert policy(_ctx(None, target=2))[0] == 2  # no reports yet: unchanged
    with pytest.raises(ValueError):
        RoutedTokensPolicy(0)


def test_replica_bounds_become_deployment_options():
    from cluster.app import _scaling
    from cluster.config import Replicas

    assert _scaling(Replicas(min=2, max=2), 100, 500.0) == {"max_ongoing_requests": 100, "num_replicas": 2}
    autoscaled = _scaling(Replicas(min=1, max=3), 100, 500.0)["autoscaling_config"]
    assert (autoscaled["min_replicas"], autoscaled["max_replicas"]) == (1, 3)
    assert autoscaled["policy"] == {"policy_function": "cluster.autoscaling:RoutedTokensPolicy",
                                    "policy_kwargs": {"target_tokens_per_s": 500.0}}
    shards = _scaling(Replicas(min=1, max=4), 64, target_ongoing=16.0)["autoscaling_config"]
    assert shards["target_ongoing_requests"] == 16.0 and "policy" not in shards


def test_the_request_path_runs_with_serve_s_fast_settings_and_the_rest_with_ray_s_defaults():
    """Ingress and AttentionShard get SERVE_ENV (user code on the replica's loop); the Router, the expert groups
    and the memory store, whose methods may block, keep Ray's defaults."""
    from cluster.app import SERVE_ENV, build_app

    ingress = build_app(parse_config({"expert_groups": {"num_groups": 2}}))._bound_deployment
    _, shard, router, groups, store = ingress.init_args
    env = {d.name: d.ray_actor_options.get("runtime_env", {}).get("env_vars", {})
           for d in [ingress, shard._bound_deployment, router._bound_deployment, store._bound_deployment,
                     *(group._bound_deployment for group in groups)]}
    assert env["Ingress"] == SERVE_ENV and env["AttentionShard"] == SERVE_ENV | {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not any(name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")
                   for deployment in ("Router", "MemoryStore", "ExpertGroup0", "ExpertGroup1")
                   for name in env[deployment])
    assert SERVE_ENV["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"  # handles are called from engine threads


def test_serve_env_gives_ray_serve_the_settings_it_names():
    """What Ray Serve makes of SERVE_ENV, read where its processes read it (a fresh interpreter): the proxy and the
    handles call replicas over gRPC, user code runs on the replica's loop, no direct ingress."""
    from cluster.app import SERVE_ENV

    names = ("RAY_SERVE_PROXY_USE_GRPC", "RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
             "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP")
    code = ("import json; from ray.serve._private import constants as c; "
            f"print(json.dumps([getattr(c, n) for n in {names}]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | SERVE_ENV
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert dict(zip(names, json.loads(out))) == {
        "RAY_SERVE_PROXY_USE_GRPC": True, "RAY_SERVE_USE_GRPC_BY_DEFAULT": True,
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": False, "RAY_SERVE_ENABLE_DIRECT_INGRESS": False,
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": True}


def test_dense_model_with_expert_groups_is_refused(tmp_path):
    from cluster.app import build_app
    from tests.conftest import write_hf_checkpoint

    dense = write_hf_checkpoint(tmp_path / "dense", moe=False)
    with pytest.raises(ConfigError, match="dense model.*--expert-groups 0"):
        build_app(ServeConfig(model=str(dense)))


def test_building_the_app_needs_the_models_config_and_tokenizer_not_its_weights(tmp_path, mixtral_dir):
    """The head of a cluster may hold only the model's small files; the replicas read the weights on their nodes,
    and one whose node lacks them names the node and the path."""
    import shutil

    from actors.checkpoints import local_checkpoint
    from cluster.app import build_app
    from mistral.errors import CheckpointError

    head = tmp_path / "head"
    shutil.copytree(mixtral_dir, head, ignore=shutil.ignore_patterns("*.safetensors"))
    assert build_app(ServeConfig(model=str(head), expert_groups={"num_groups": 2})) is not None
    with pytest.raises(CheckpointError, match=rf"^node {socket.gethostname()} \(.+\) cannot read the model {head}: "
                                              rf"{head} holds no .safetensors weights"):
        local_checkpoint(str(head))
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"^node .+ cannot read the model {nowhere}: .*does not exist"):
        local_checkpoint(str(nowhere))
    assert local_checkpoint(str(mixtral_dir)).path == mixtral_dir


def test_msem_serve_refuses_a_bad_config_before_starting_anything(tmp_path, capsys):
    from cluster.cli import main

    (tmp_path / "bad.yaml").write_text("expert_groups: {num_groups: 0}\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "expert_groups.num_groups" in capsys.readouterr().err


def test_a_failed_deployment_is_reported_instead_of_waited_for(monkeypatch):
    from ray import serve

    from cluster.serve_command import DeployFailedError, wait_until_healthy

    failed = SimpleNamespace(status="DEPLOY_FAILED", message="ExpertGroup0: out of GPUs")
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"msem": failed}))
    with socket.socket() as s:  # a port nothing listens on: /health never answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeployFailedError, match="out of GPUs"):
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout=60)


@pytest.mark.parametrize("transport,group_gpus,shard_gpus,expected", [
    ("auto", 0, 0, "grpc"),  # CPU: grpc measured faster than gloo (docs/PERFORMANCE.md)
    ("auto", 1, 1, "torch"),  # NCCL between whole GPUs
    ("auto", 0.5, 1, "grpc"),  # a fraction could share a GPU with a shard, which NCCL refuses
    ("auto", 1, 0, "grpc"),  # a CPU shard in front of GPU groups
    ("torch", 0, 0, "torch"),  # gloo
    ("grpc", 1, 1, "grpc"),
])
def test_the_transport_in_use(transport, group_gpus, shard_gpus, expected):
    from cluster.config import ExpertGroupsConfig

    assert ExpertGroupsConfig(transport=transport).resolved_transport(group_gpus, shard_gpus) == expected


def test_torch_on_fractional_gpus_is_refused_with_the_numbers():
    from cluster.config import ExpertGroupsConfig

    with pytest.raises(ConfigError, match="needs whole GPUs .* got 0.5 per group replica and 1 per shard"):
        ExpertGroupsConfig(transport="torch").resolved_transport(0.5, 1)
