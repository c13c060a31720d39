"""The `ray up` configs (cluster.yaml, cluster.local.yaml) pass Ray's own validation and deploy real configs.

Validation follows `ray up` (ray.autoscaler._private.commands._bootstrap_config): `prepare_config` merges the
provider's defaults (and, for the local provider, builds its single node type from head_ip/worker_ips), then
`validate_config` checks the result against ray-schema.json. Only the cloud API calls are left out.
"""

import copy
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cluster import capacity
from cluster.app import SERVE_ENV
from cluster.config import HEAD, load_config
from cluster.deployment_plan import GIB, plan_groups
from mistral.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ["cluster.yaml", "cluster.local.yaml"]


def read(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def validate_like_ray_up(config: dict) -> dict:
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def head_commands(config: dict) -> list[list[str]]:
    return [shlex.split(cmd) for cmd in config["head_start_ray_commands"]]


def deployed_configs(config: dict) -> list[Path]:
    """The configs/ files the head deploys: `serve deploy ~/msem/<path>`, with ~/msem the synced sources."""
    return [ROOT / argv[2].removeprefix("~/msem/") for argv in head_commands(config) if argv[:2] == ["serve", "deploy"]]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_accepts_the_cluster_config(name):
    config = validate_like_ray_up(read(name))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_deployed_config_fits_the_node_types_at_its_upper_bounds(name):
    """Every resource a deployment asks for exists on a node type that can hold it, and the replica bounds fit
    the node types' max_workers (cluster/capacity.py, as `ray up`'s head checks it when deploying)."""
    config = read(name)
    types = capacity.node_types(validate_like_ray_up(config))
    for path in deployed_configs(config):
        serve = load_config(path)
        assert capacity.problems(serve, types) == [], path
        if not capacity.declared(types):  # the local provider: Ray measures each machine when it starts it
            asked = {key for role in capacity.roles(serve, has_gpus=False) for key in role.demand}
            assert asked <= {"CPU", "GPU", HEAD}


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_starts_ray_with_msem_serve_settings(name):
    """Serve's proxy and controller read SERVE_ENV when they start, from the environment `ray start` gave Ray."""
    config = read(name)
    starts = [" ".join(cmd.split()) for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for cmd in config[key] if "ray start" in cmd]
    settings = " ".join(f"{name}={value}" for name, value in SERVE_ENV.items())
    assert len(starts) == 2 and all(f"{settings} ray start" in cmd for cmd in starts), starts


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_head_starts_ray_with_the_dashboard_then_deploys_a_valid_serve_config(name):
    config = read(name)
    commands = config["head_start_ray_commands"]
    start = next(i for i, cmd in enumerate(commands) if "ray start --head" in cmd)
    assert re.search(r"--dashboard-port=8265\b", commands[start])
    assert re.search(r"--dashboard-host=\S+", commands[start])
    paths = deployed_configs(config)
    assert paths, f"{name} deploys nothing"
    assert all("serve deploy" not in cmd for cmd in commands[:start]), "serve deploy needs Ray started first"
    for path in paths:
        assert path.is_file(), f"{name} deploys {path.relative_to(ROOT)}, which does not exist"
        ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        load_config(path)


def test_gpu_cluster_serves_mixtral_with_explicit_gpus():
    config = read("cluster.yaml")
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= t["min_workers"] for t in workers.values())
    assert "--dashboard-host=0.0.0.0" in " ".join(config["head_start_ray_commands"])
    [path] = deployed_configs(config)
    serve = load_config(path)
    assert serve.dtype == "bfloat16" and serve.host == "0.0.0.0"
    # The groups fill an A100 40 GB (msem plan), not one expert each.
    groups = plan_groups(PRESETS["mixtral-8x7b"].config, 40 * GIB, dtype_bytes=2)
    assert serve.expert_groups.num_groups == groups.num_groups == 3
    # At `serve deploy` time no GPU worker may be up yet, so GPUs must not be left to autodetection.
    assert serve.attention.num_gpus == 1 and serve.expert_groups.num_gpus == 1


@pytest.mark.parametrize("name, path, typo", [
    ("cluster.yaml", ["worker_start_ray_commands"], "worker_start_ray_command"),
    ("cluster.yaml", ["available_node_types", "experts", "max_workers"], "max_worker"),
    ("cluster.local.yaml", ["head_start_ray_commands"], "head_start_ray_command"),
    ("cluster.local.yaml", ["auth", "ssh_private_key"], "ssh_privat_key"),
])
def test_a_misspelled_key_fails_validation(name, path, typo):
    config = read(name)
    *parents, key = path
    node = config
    for parent in parents:
        node = node[parent]
    node[typo] = node.pop(key)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_like_ray_up(config)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_gets_msems_sources_and_nothing_else(name):
    """What `pip install -e ~/msem` needs (pyproject.toml, its readme, every package it lists) and the Serve configs,
    each mounted on its own: a mount of the whole checkout would hash and sync a local .venv too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    wanted = ["pyproject.toml", project["project"]["readme"], *packages, "configs"]
    assert read(name)["file_mounts"] == {f"~/msem/{path}": f"./{path}" for path in wanted}
    assert all((ROOT / path).exists() for path in wanted)


def setup_of(config: dict, role: str) -> str:
    """The setup commands a node of `role` ("head" or "worker") runs, in order, as one text."""
    return "\n".join(" ".join(cmd.split()) for cmd in config["setup_commands"] + config[f"{role}_setup_commands"])


def test_each_node_copies_the_model_the_deployed_config_names():
    """Workers copy the whole checkpoint to the `model` path; the head only its small files (building the app
    reads its config and tokenizer, tests/unit/cluster/test_config.py)."""
    config = read("cluster.yaml")
    [path] = deployed_configs(config)
    model = load_config(path).model
    syncs = {role: [cmd for cmd in setup_of(config, role).splitlines() if cmd.startswith("aws s3 sync")]
             for role in ("head", "worker")}
    for role, [sync] in syncs.items():
        assert sync.endswith(f"/{Path(model).name} {model}"), sync
    assert "--exclude '*.safetensors'" in syncs["head"][0] and "--exclude" not in syncs["worker"][0]
    profiles = {name: t["node_config"]["IamInstanceProfile"] for name, t in config["available_node_types"].items()}
    assert profiles.pop(config["head_node_type"]) == {"Name": "msem-head"}  # it may pass msem-model-read on
    assert set(map(str, profiles.values())) == {str({"Name": "msem-model-read"})}


def test_the_head_installs_cpu_torch_and_the_gpu_workers_cuda_torch():
    config = read("cluster.yaml")
    head, worker = setup_of(config, "head"), setup_of(config, "worker")
    assert "download.pytorch.org/whl/cpu" in head and "cu128" not in head
    assert "download.pytorch.org/whl/cu128" in worker and "whl/cpu" not in worker
    assert worker.index("nvidia-smi") < worker.index("whl/cu128"), "the driver is checked before torch is installed"


@pytest.mark.parametrize("driver, ok", [("570.86.15", True), ("580.65.06", True), ("550.54.15", False), (None, False)])
def test_a_worker_without_an_nvidia_driver_of_at_least_570_stops_saying_so(tmp_path, driver, ok):
    [check] = [cmd for cmd in read("cluster.yaml")["worker_setup_commands"] if "nvidia-smi" in cmd]
    if driver is not None:  # a stand-in nvidia-smi that reports the driver; without one, none is installed
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\necho {driver}\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    done = subprocess.run(["bash", "-c", check], env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert (done.returncode == 0) == ok, done
    if not ok:
        assert f"NVIDIA driver {driver or 'missing'}: msem's CUDA 12.8 torch needs >= 570" in done.stderr


def test_the_endpoints_answer_on_the_head_and_the_security_group_opens_them():
    """HTTP (Serve's proxy, HeadOnly) and gRPC (the Ingress, pinned to the head) both answer on the head's address,
    at the ports the security group opens; nothing else is opened to the outside (Ray adds SSH)."""
    config = read("cluster.yaml")
    [path] = deployed_configs(config)
    serve = load_config(path)
    assert yaml.safe_load(path.read_text())["proxy_location"] == "HeadOnly"
    assert serve.control_resources == {HEAD: 0.001}
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert sorted((rule["FromPort"], rule["ToPort"]) for rule in rules) == sorted(
        [(serve.http_port, serve.http_port), (serve.grpc_port, serve.grpc_port)])


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_exports_metrics_on_one_port(name):
    config = read(name)
    starts = [" ".join(cmd.split()) for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for cmd in config[key] if "ray start" in cmd]
    assert all("--metrics-export-port=8080" in cmd for cmd in starts), starts


def test_on_prem_machines_reach_each_other_through_fixed_ports_and_the_machines_address():
    config = read("cluster.local.yaml")
    head, worker = [next(" ".join(cmd.split()) for cmd in config[key] if "ray start" in cmd)
                    for key in ("head_start_ray_commands", "worker_start_ray_commands")]
    fixed = re.findall(r"--(?:object-manager|node-manager|min-worker|max-worker|metrics-export)-port=\d+", head)
    assert len(fixed) == 5 and all(flag in worker for flag in fixed)
    [path] = deployed_configs(config)
    serve = load_config(path)
    assert serve.host == "0.0.0.0" and yaml.safe_load(path.read_text())["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_the_head_runs_the_autoscaler_the_tests_run(name):
    """`ray up` runs Ray's v2 autoscaler unless told otherwise. That one counts the head among the local provider's
    workers, so it starts none; the v1 one starts the on-prem worker (test_ray_up.py) and cluster.yaml's node
    types for each role (test_autoscaler.py)."""
    head = next(cmd for cmd in read(name)["head_start_ray_commands"] if "ray start --head" in cmd).split()
    assert "RAY_enable_autoscaler_v2=0" in head[:head.index("ray")]
