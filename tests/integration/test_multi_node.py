"""The Serve application on a multi-node Ray cluster, run on this one machine with `ray.cluster_utils.Cluster`.

    head       Serve controller, HTTP proxy, Ingress, Router, one replica of each expert group
    attention  the AttentionShard                                   ({"msem_attention": 1})
    experts    the other replica of each expert group               ({"msem_experts": 2})

The expert groups ask for {"msem_experts": 1} per replica and the shard for {"msem_attention": 1}, so Ray's
resources keep them on their node types. The head has room for all four expert replicas, so that the two lost
with the expert node come back there. Which node each replica of a group lands on is Serve's choice: it
spreads a deployment's replicas round-robin over the nodes that can take them (SPREAD), which with two
candidate nodes puts the two replicas of a group on different nodes; the test asserts that placement (from the
GCS) before the fault, so a change in Serve's scheduling fails with the placement it made.

Ingress and Router run on the head (`control_resources`, by default a resource only the head has), so the
loss of the expert node takes neither the edge's streams nor the routing table with it; the test asserts that.

Output is compared with the single-process engine: greedy text is identical, before the fault and for streams
that run through it (the expert node's replica processes are gone while every stream still runs).
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from tests.integration.serving import free_port, openai_client, process_gone, stream_text, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]  # ~2 min on a quiet 2-core machine

GROUPS = ("ExpertGroup0", "ExpertGroup1")
PROMPTS = ("Once upon a time", "Hello there", "The experts live on", "Count to ten:")
STREAM_TOKENS = 120


@pytest.fixture(scope="module")
def expected(reference) -> dict[str, tuple[str, str]]:
    """prompt -> (text, finish reason) of a greedy stream of the single-process engine, computed once."""
    return {prompt: (reference(prompt, STREAM_TOKENS), "length") for prompt in PROMPTS}


@pytest.fixture
def cluster():
    """A head, an attention node and an expert node on this machine, with the driver connected; yields
    (cluster, {role: node}). Logical CPUs exceed the machine's two cores: replicas ask for fractions."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"msem_experts": 4}, "include_dashboard": False,
        "dashboard_port": free_port()})  # Ray still starts its API server: not on 8265, which others may hold
    try:
        nodes = {"head": cluster.head_node,
                 "attention": cluster.add_node(num_cpus=1, resources={"msem_attention": 1}),
                 "experts": cluster.add_node(num_cpus=1, resources={"msem_experts": 2})}
        ray.init(address=cluster.address, namespace="msem", log_to_driver=False, configure_logging=False)
        yield cluster, nodes
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def live_replicas() -> list[dict]:
    """The GCS records of the app's live replica actors."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if a["ActorClassName"].startswith("ServeReplica:msem:") and a["State"] == "ALIVE"]


def placement(roles: dict[str, str]) -> dict[str, list[str]]:
    """Deployment -> the roles of the nodes its live replicas run on, sorted."""
    placed: dict[str, list[str]] = {}
    for actor in live_replicas():
        node = actor["Address"]["NodeID"]
        deployment = actor["ActorClassName"].removeprefix("ServeReplica:msem:")
        placed.setdefault(deployment, []).append(roles.get(node, node))
    return {deployment: sorted(on) for deployment, on in sorted(placed.items())}


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get("msem")
    status = app.deployments.get(deployment) if app is not None else None
    return status.replica_states.get("RUNNING", 0) if status is not None else 0


def wait_for_placement(roles: dict[str, str], wanted: dict[str, list[str]], timeout: float, what: str) -> None:
    """Poll until every deployment of `wanted` runs exactly there, with Serve counting its replicas running."""
    deadline = time.monotonic() + timeout
    while True:
        placed = placement(roles)
        if ({d: placed.get(d) for d in wanted} == wanted
                and all(running_replicas(d) == len(on) for d, on in wanted.items())):
            return
        assert time.monotonic() < deadline, f"{what}: replicas run on {placed}, wanted {wanted}"
        time.sleep(0.2)


def wait_until_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if not process_gone(pid)]:
        assert time.monotonic() < deadline, f"replica processes {alive} outlived their node by {timeout} s"
        time.sleep(0.05)


def greedy_text(client, prompt: str, max_tokens: int) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def deploy(transport: str):
    """Deploy the app: the shard on the attention node, two replicas of each group over head and expert node."""
    from cluster.app import deploy as deploy_app
    from cluster.serve_command import wait_until_healthy

    config = tiny_config(ingress_replicas=1, attention={"resources": {"msem_attention": 1}},
                         expert_groups={"transport": transport, "replicas": {"min": 2, "max": 2},
                                        "resources": {"msem_experts": 1}})
    deploy_app(config)
    wait_until_healthy(f"http://127.0.0.1:{config.http_port}", timeout=240)
    return config


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_losing_an_expert_node_mid_stream_loses_nothing(expected, reference, cluster, transport):
    cluster, nodes = cluster
    roles = {node.node_id: role for role, node in nodes.items()}
    config = deploy(transport)
    wait_for_placement(roles, {"AttentionShard": ["attention"], "ExpertGroup0": ["experts", "head"],
                               "ExpertGroup1": ["experts", "head"], "Ingress": ["head"], "Router": ["head"]},
                       timeout=60, what="before the fault")
    client = openai_client(config)
    assert greedy_text(client, "Hello there", 12) == reference("Hello there", 12)

    doomed = [a["Pid"] for a in live_replicas() if a["Address"]["NodeID"] == nodes["experts"].node_id]
    started = [threading.Event() for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [pool.submit(stream_text, openai_client(config).with_options(timeout=120), prompt,
                               STREAM_TOKENS, on_first=event.set) for prompt, event in zip(PROMPTS, started)]
        deadline = time.monotonic() + 60
        while not all(event.is_set() for event in started):
            failed = [s.exception() for s in streams if s.done() and s.exception() is not None]
            assert not failed, f"a stream failed before the fault: {failed}"
            assert time.monotonic() < deadline, "the streams never sent their first chunk"
            time.sleep(0.05)
        cluster.remove_node(nodes["experts"])
        wait_until_gone(doomed, timeout=30)
        finished_before = [prompt for prompt, s in zip(PROMPTS, streams) if s.done()]
        _, running = wait(streams, timeout=180)
        assert not running, f"{len(running)} streams still ran 180 s after the fault"
        results = {prompt: s.result() for prompt, s in zip(PROMPTS, streams)}
    assert not finished_before, f"streams finished before the expert replicas were gone: {finished_before}"
    assert results == expected

    wait_for_placement(roles, {group: ["head", "head"] for group in GROUPS}, timeout=120,
                       what="after losing the expert node")
    assert greedy_text(client, "Hello there", 12) == reference("Hello there", 12)
