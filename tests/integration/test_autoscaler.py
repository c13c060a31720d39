"""Ray's own autoscaler places msem's roles on cluster.yaml's node types: Ray's fake multi-node provider, on which
the real autoscaler launches and stops "nodes" (each a raylet on this machine) as it would EC2 instances.

- Node types: cluster.yaml's, with its marker resources and faked GPUs, counts scaled down to one machine, and
  min_workers 0, so that every worker node is one the autoscaler started for Serve's demand.
- The application: the tiny preset, asking for the roles' resources of the shipped Mixtral config
  (configs/mixtral-8x7b.yaml). Its replicas ask for no GPU (the CPU twin): the markers alone place the roles.
- The autoscaler: Ray's v1 one, which cluster.yaml's head runs (RAY_enable_autoscaler_v2=0).
- The cluster runs in a PID namespace of its own (as test_ray_up's SSH nodes), so that its teardown ends every
  process the autoscaler started.

Asserted: deploying makes the autoscaler start one attention node and one expert node, and no other; the shard runs
on the attention node, both groups on the expert node, Ingress, Router and the memory store on the head; raising
ExpertGroup0's replicas starts one more expert node and no other node, and moves no other replica.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.serving import free_ports, openai_client, pid_namespace, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
# cluster.yaml's worker types at one machine's scale: an expert node holds two group replicas, so a third needs a
# second node. The fake provider makes object_store_memory the node's object store (Ray's least, ~75 MiB, is
# plenty here).
SCALED = {"attention": {"CPU": 1, "GPU": 1, "msem_attention": 1},
          "experts": {"CPU": 1, "GPU": 2, "msem_experts": 2}}
OBJECT_STORE = 100 * 1024**2


def mirrored_node_types(head_type: str) -> dict:
    """cluster.yaml's node types under the fake provider: the same names (the head under `head_type`, the name the
    fake provider gives its head), the same resources at `SCALED`'s counts."""
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = launcher["available_node_types"]
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert {name: set(t["resources"]) for name, t in workers.items()} == {n: set(r) for n, r in SCALED.items()}, \
        "cluster.yaml's worker types changed: update SCALED"
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    mirrored = {name: {"resources": SCALED[name] | {"object_store_memory": OBJECT_STORE}, "node_config": {},
                       "min_workers": 0, "max_workers": t["max_workers"]} for name, t in workers.items()}
    return mirrored | {head_type: {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0}}


@pytest.fixture
def autoscaling_cluster(monkeypatch):
    """A Ray head with the autoscaler on the fake provider, and this process connected to it as its driver."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray._raylet import Config
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    from cluster.app import SERVE_ENV

    namespace = pid_namespace()
    root = Path(tempfile.mkdtemp(prefix="msem-fake-"))  # short: Ray's socket paths live below it
    gcs, client_server, agent, metrics = free_ports(4)
    launcher = {"cluster_name": "msem-fake", "max_workers": 7, "upscaling_speed": 1.0, "idle_timeout_minutes": 10,
                "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs}", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True},
                "auth": {}, "available_node_types": mirrored_node_types(FAKE_HEAD_NODE_TYPE),
                "head_node_type": FAKE_HEAD_NODE_TYPE, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
                **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "head_start_ray_commands",
                                       "worker_start_ray_commands")}}
    (root / "autoscaling.json").write_text(json.dumps(launcher))
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take loopback as every node's address (the fake nodes too), as
    # it does on a laptop; the driver below does the same.
    env = {**os.environ, **SERVE_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "AUTOSCALER_METRIC_PORT": str(metrics), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = Path(sys.executable).parent / "ray"
    with open(root / "head.log", "w") as log:
        head = subprocess.Popen([*namespace, ray_cli, "start", "--head", "--block", f"--port={gcs}",
                                 "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                                 f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false",
                                 f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client_server}",
                                 f"--autoscaling-config={root / 'autoscaling.json'}", f"--temp-dir={root / 'ray'}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        for name, value in SERVE_ENV.items():
            monkeypatch.setenv(name, value)
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (started := (root / "head.log").read_text()):
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{started}"
            assert time.monotonic() < deadline, f"no Ray head after 60 s:\n{started}"
            time.sleep(0.2)
        # Token authentication is on by default: the driver of a cluster named by its address turns it on itself,
        # and Ray's config (cached at import) must read the mode again.
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        Config.initialize("")
        ray.init(address=f"127.0.0.1:{gcs}", namespace="msem", log_to_driver=False, configure_logging=False)
        yield root
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        head.kill()  # SIGKILL: unshare ignores SIGTERM while it waits; its namespace dies with it
        head.wait()
        shutil.rmtree(root, ignore_errors=True)


def node_types() -> dict[str, str]:
    """Node id -> node type of the cluster's live nodes (the type named by the marker a node carries)."""
    import ray

    return {node["NodeID"]: next((name for name in SCALED if f"msem_{name}" in node["Resources"]), "head")
            for node in ray.nodes() if node["Alive"]}


def replicas(types: dict[str, str]) -> dict[str, dict[str, str]]:
    """Deployment -> {actor id: node type} of its live replicas, from the GCS."""
    from ray._private.state import actors

    placed = collections.defaultdict(dict)
    for actor in actors().values():
        if actor["ActorClassName"].startswith("ServeReplica:msem:") and actor["State"] == "ALIVE":
            deployment = actor["ActorClassName"].removeprefix("ServeReplica:msem:")
            placed[deployment][actor["ActorID"]] = types.get(actor["Address"]["NodeID"], "unknown")
    return placed


def wait_for_placement(wanted: dict[str, list[str]], timeout: float, what: str) -> tuple[dict, dict]:
    """Poll until the replicas run exactly on the node types `wanted` says, and Serve reports the application
    running; returns the node types and the replicas then."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        types = node_types()
        running = replicas(types)
        placed = {deployment: sorted(on.values()) for deployment, on in running.items()}
        app = serve.status().applications.get("msem")
        if placed == wanted and app is not None and app.status == "RUNNING":
            return types, running
        assert app is None or app.status != "DEPLOY_FAILED", f"{what}: {app.message}"
        assert time.monotonic() < deadline, f"{what}: replicas on {placed} (nodes {types}), wanted {wanted}"
        time.sleep(0.5)


def test_the_autoscaler_starts_each_roles_node_type(autoscaling_cluster):
    from cluster.app import deploy

    shipped = yaml.safe_load((ROOT / "configs" / "mixtral-8x7b.yaml").read_text())["applications"][0]["args"]
    config = tiny_config(ingress_replicas=1,
                         attention={"num_gpus": 0, "resources": shipped["attention"]["resources"]},
                         expert_groups={"num_gpus": 0, "resources": shipped["expert_groups"]["resources"]})
    assert sorted(node_types().values()) == ["head"]

    deploy(config)
    wanted = {"AttentionShard": ["attention"], "ExpertGroup0": ["experts"], "ExpertGroup1": ["experts"],
              "Ingress": ["head"], "Router": ["head"], "MemoryStore": ["head"]}
    types, before = wait_for_placement(wanted, timeout=240, what="after deploying")
    assert sorted(types.values()) == ["attention", "experts", "head"]
    completion = openai_client(config, timeout=60).completions.create(model="tiny", prompt="Hello", max_tokens=4)
    assert completion.usage.completion_tokens == 4

    grown = config.model_dump()
    grown["expert_groups"]["group_replicas"] = {0: {"min": 2, "max": 2}}
    deploy(type(config).model_validate(grown))
    grown_types, after = wait_for_placement(wanted | {"ExpertGroup0": ["experts", "experts"]}, timeout=120,
                                            what="after raising ExpertGroup0's replicas")
    assert set(types) < set(grown_types)
    assert [grown_types[node] for node in set(grown_types) - set(types)] == ["experts"]
    others = {d: on for d, on in before.items() if d != "ExpertGroup0"}
    assert {d: on for d, on in after.items() if d != "ExpertGroup0"} == others, "a replica of another deployment moved"
    assert set(before["ExpertGroup0"]) < set(after["ExpertGroup0"])
