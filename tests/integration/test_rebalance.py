"""Live rebalancing under Serve: a placement planned from the load window replaces a lopsided one while
requests stream, with no failed request and no changed token; a replica started later loads the new placement
from the Router, not the config's."""

import threading
import time

import httpx2 as httpx
import pytest

from tests.integration.serving import (deploy_and_wait, kill_replicas, openai_client, replica_pids, stream_text,
                                       tiny_config)

pytestmark = pytest.mark.slow
LOPSIDED = [0, 0, 0, 0, 0, 0, 0, 1]  # group 0 holds seven experts of every layer, group 1 one


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    config = tiny_config(expert_groups={"placement": LOPSIDED, "rebalance": {"settle_timeout_s": 5}})
    deploy_and_wait(config)
    yield config
    serve.shutdown()


def _experts(config) -> dict:
    return httpx.get(f"http://127.0.0.1:{config.http_port}/v1/experts", timeout=10).json()


def _wait_for_load(config) -> None:
    """Shards push their expert load once a second: plan only once the Router has some to plan from."""
    deadline = time.monotonic() + 30
    while not sum(map(sum, _experts(config)["load"]["window"]["per_layer_expert"])):
        assert time.monotonic() < deadline, "no shard reported expert load within 30 s"
        time.sleep(0.05)


def test_a_live_rebalance_changes_no_output_and_a_restarted_replica_loads_it(app, reference):
    client = openai_client(app)
    client.completions.create(model="tiny", prompt="Warm up the load window", max_tokens=16)
    before = _experts(app)
    assert before["placement_version"] == 0 and before["groups"][1]["slots"] == [[7]] * before["num_layers"]

    prompts = [f"Story number {i}:" for i in range(4)]
    results, started = {}, threading.Barrier(len(prompts) + 1, timeout=120)
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(
        p, stream_text(client, p, 160, on_first=started.wait))) for p in prompts]
    for thread in threads:
        thread.start()
    started.wait()  # every stream is under way: the switch happens mid-generation
    _wait_for_load(app)
    reply = httpx.post(f"http://127.0.0.1:{app.http_port}/v1/experts/rebalance", timeout=120).json()
    for thread in threads:
        thread.join(120)
    assert reply["status"] == "applied" and reply["moved"] > 0
    assert reply["balancedness_after"] > reply["balancedness_before"]
    assert results == {p: (reference(p, 160), "length") for p in prompts}

    after = _experts(app)
    assert after["placement_version"] == 1 and after["rebalance"]["last"]["status"] == "applied"
    assert len(after["groups"][1]["slots"][0]) > 1  # group 1 now holds more than expert 7

    old = set(replica_pids("ExpertGroup1"))
    assert kill_replicas("ExpertGroup1")
    text, finish = stream_text(client, "After the restart", 24)  # group 0 covers group 1 meanwhile
    assert (text, finish) == (reference("After the restart", 24), "length")
    deadline = time.monotonic() + 120
    while (set(replica_pids("ExpertGroup1")) <= old or (now := _experts(app))["lost_groups"] or
           now["groups"][1]["slots"] != after["groups"][1]["slots"]):
        assert time.monotonic() < deadline, "Serve did not replace the killed replica, or it did not come home"
        time.sleep(0.2)
    # home again (after a cover, as v3): the rebalanced slots of v1, not the config's
    assert now["placement_version"] in (1, 3) and now["groups"][0]["slots"] == after["groups"][0]["slots"]
