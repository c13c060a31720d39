"""The Serve deployment graph end to end on a local Ray: OpenAI HTTP, gRPC, expert load, failures, scaling.

One application (tiny preset, two expert groups) serves the whole module on free loopback ports, once per
layer-path transport (grpc, torch over gloo). Outputs are compared with the in-process single-process engine on
the same preset: greedy and seeded text is identical.
"""

import asyncio
import os
import signal
import time

import httpx2 as httpx
import pytest

from cluster.config import Replicas
from tests.integration.serving import (deploy_and_wait, kill_replicas, openai_client, replica_pids, stream_text,
                                       tiny_config)

pytestmark = pytest.mark.slow


BOTH = pytest.mark.parametrize("app", ["grpc", "torch"], indirect=True)  # tests of the layer path
EDGE = pytest.mark.parametrize("app", ["grpc"], indirect=True)  # tests of the edge, whatever the transport


@pytest.fixture(scope="module")
def app(ray_cluster, request):
    from ray import serve

    config = tiny_config(expert_groups={"transport": request.param})
    deploy_and_wait(config)
    yield config
    serve.shutdown()


@BOTH
def test_openai_api_matches_the_single_process_engine(app, reference):
    client = openai_client(app)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference("Hello there", 12)
    assert out.usage.completion_tokens == 12
    text, finish = stream_text(client, "Hello there", 12)
    assert (text, finish) == (reference("Hello there", 12), "length")
    seeded = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0.9,
                                       seed=7, extra_body={"ignore_eos": True})
    assert seeded.choices[0].text == reference("Hello there", 12, temperature=0.9, seed=7)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, n=2, temperature=0.8, seed=1)
    assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)


@EDGE
def test_one_request_that_fans_out_to_several_shard_calls(app, reference):
    # a batch of prompts, and self-verification's candidates and verdicts, are sibling Serve handle calls made
    # while serving one request; Serve's router must route every one of them at once (cluster.app's
    # `_own_serve_request_id`), not one by one after seconds of backoff
    client = openai_client(app, timeout=20)
    batch = client.completions.create(model="tiny", prompt=["Hello there", "Hello there", "Hi"], max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in batch.choices][:2] == [reference("Hello there", 6)] * 2 and len(batch.choices) == 3
    verified = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=6, temperature=1.0,
        extra_body={"self_verification": {"candidates": 4, "method": "verifier"}})
    assert len(verified.model_extra["self_verification"]["candidates"]) == 4


@BOTH
def test_64_concurrent_requests(app):
    async def main():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=120) as http:
            body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            replies = await asyncio.gather(*(http.post("/v1/completions", json={**body, "prompt": f"Count {i}"})
                                             for i in range(64)))
        return replies

    replies = asyncio.run(main())
    assert [r.status_code for r in replies] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in replies)


@EDGE
def test_grpc_and_experts_dashboard(app):
    from cluster.client import InferenceClient

    client = InferenceClient(f"127.0.0.1:{app.grpc_port}")
    reply = client.generate("Hello there", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert reply.usage.completion_tokens == 5
    experts = httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json()
    assert [g["experts"] for g in experts["groups"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(len(g["replicas"]) == 1 for g in experts["groups"])
    deadline = time.monotonic() + 10  # the shards push routed tokens about once a second, also once idle
    while sum(experts["load"]["per_expert"]) == 0:
        assert time.monotonic() < deadline, "the shards never reported the tokens they routed"
        time.sleep(0.2)
        experts = httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json()


@EDGE
def test_disconnect_aborts_the_request(app):
    from ray import serve

    shard = serve.get_deployment_handle("AttentionShard", "msem")
    with httpx.stream("POST", f"http://127.0.0.1:{app.http_port}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Go", "max_tokens": 400, "stream": True,
                            "ignore_eos": True}) as response:
        lines = response.iter_lines()  # kept open: dropping it closes the connection
        next(line for line in lines if line.startswith("data: "))
        assert shard.num_unfinished_requests.remote().result() == 1
    deadline = time.monotonic() + 30
    while shard.num_unfinished_requests.remote().result() != 0:
        assert time.monotonic() < deadline, "the disconnected request still runs"
        time.sleep(0.05)


@BOTH
@pytest.mark.parametrize("deployment", ["AttentionShard", "ExpertGroup0", "Router"])
def test_killed_replica_mid_stream_loses_nothing(app, reference, deployment):
    before = replica_pids(deployment)
    killed = []
    text, finish = stream_text(openai_client(app), "Once upon a time", 120,
                                on_first=lambda: killed.extend(kill_replicas(deployment)))
    assert killed and set(before.values()) == set(killed)
    assert (text, finish) == (reference("Once upon a time", 120), "length")
    deadline = time.monotonic() + 120  # Serve replaces the replica (the stream may have ended before: a cover)
    while not ((after := replica_pids(deployment)) and not set(after) & set(before)):
        assert time.monotonic() < deadline, f"Serve did not replace the killed {deployment} replica"
        time.sleep(0.2)
    if deployment == "ExpertGroup0":  # its only replica: group 1 covered its experts, until the replacement came
        deadline = time.monotonic() + 120
        while (doc := httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json())["lost_groups"] or \
                doc["groups"][0]["experts"] != [0, 1, 2, 3]:
            assert time.monotonic() < deadline, f"group 0 never came home: {doc['lost_groups']}"
            time.sleep(0.2)
        assert doc["placement_version"] >= 2  # the cover, then home again


@EDGE
def test_new_requests_succeed_at_once_when_an_ingress_replica_dies(app, reference):
    ingresses = replica_pids("Ingress")
    assert len(ingresses) == 2  # the default: no single point of failure at the front
    killed = next(iter(ingresses))
    os.kill(ingresses[killed], signal.SIGKILL)
    client = openai_client(app)
    for _ in range(8):  # at once, not after Serve replaced it
        out = client.completions.create(model="tiny", prompt="Again", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == reference("Again", 4)
    deadline = time.monotonic() + 120  # Serve replaces it (and later tests find two again)
    while not (len(now := replica_pids("Ingress")) == 2 and killed not in now):
        assert time.monotonic() < deadline, "Serve did not replace the killed Ingress replica"
        time.sleep(0.2)


@BOTH
def test_scaling_one_expert_group_touches_only_that_deployment(app):
    others = {d: set(replica_pids(d)) for d in ("Ingress", "AttentionShard", "Router", "ExpertGroup0")}
    group1 = set(replica_pids("ExpertGroup1"))
    deploy_and_wait(app.model_copy(update={"expert_groups": app.expert_groups.model_copy(
        update={"group_replicas": {1: Replicas(min=2, max=2)}})}))
    deadline = time.monotonic() + 120
    while len(replica_pids("ExpertGroup1")) < 2:
        assert time.monotonic() < deadline, "the second replica of group 1 never started"
        time.sleep(0.2)
    assert {d: set(replica_pids(d)) for d in others} == others
    assert group1 < set(replica_pids("ExpertGroup1"))
    client = openai_client(app)
    deadline = time.monotonic() + 60
    while True:
        client.completions.create(model="tiny", prompt="Scale", max_tokens=8, extra_body={"ignore_eos": True})
        replicas = httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json()["groups"][1]["replicas"]
        if len(replicas) == 2 and all(r["tokens_served"] > 0 for r in replicas):
            break
        assert time.monotonic() < deadline, f"traffic never reached the new replica: {replicas}"
