"""The Serve deployment graph end to end on a local Ray: OpenAI HTTP, gRPC, expert load, failures, scaling.

One application (tiny preset, two expert groups over gRPC) serves the whole module on free loopback ports.
Outputs are compared with the in-process single-process engine on the same preset: greedy text is identical.
"""

import asyncio
import os
import signal
import socket
import time

import httpx2 as httpx
import pytest

from cluster.config import Replicas, ServeConfig

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(http_port: int, grpc_port: int, **expert_groups) -> ServeConfig:
    return ServeConfig.model_validate({
        "model": "tiny", "max_model_len": MAX_MODEL_LEN, "host": "127.0.0.1", "http_port": http_port,
        "grpc_port": grpc_port,
        "attention": {"kv_cache_memory": 64 << 20, "num_cpus": 0.5},
        "expert_groups": {"num_groups": 2, "num_cpus": 0.25, **expert_groups}})


def _deploy(config: ServeConfig) -> None:
    from cluster.app import deploy
    from cluster.serve_command import wait_until_healthy

    deploy(config)
    wait_until_healthy(f"http://127.0.0.1:{config.http_port}", timeout=300)


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    config = _config(_free_port(), _free_port())
    _deploy(config)
    yield config
    serve.shutdown()


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the single-process engine on the same preset."""
    from engine import LLM, SamplingParams

    llm = LLM("tiny", dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)

    def complete(prompt: str, max_tokens: int) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate(prompt, params)[0].outputs[0].text
    return complete


def _openai(config: ServeConfig):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="unused", max_retries=0)


def _replica_pids(deployment: str) -> dict[str, int]:
    """Actor id -> pid of the deployment's live replicas (from the GCS: no dashboard in these tests)."""
    from ray._private.state import actors

    return {a["ActorID"]: a["Pid"] for a in actors().values()
            if a["ActorClassName"] == f"ServeReplica:msem:{deployment}" and a["State"] == "ALIVE"}


def _kill(deployment: str) -> list[int]:
    pids = list(_replica_pids(deployment).values())
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _stream_text(client, prompt: str, max_tokens: int, on_first=None) -> tuple[str, str | None]:
    text, finish = "", None
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        if i == 0 and on_first is not None:
            on_first()
        text += chunk.choices[0].text if chunk.choices else ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    return text, finish


def test_openai_api_matches_the_single_process_engine(app, reference):
    client = _openai(app)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference("Hello there", 12)
    assert out.usage.completion_tokens == 12
    text, finish = _stream_text(client, "Hello there", 12)
    assert (text, finish) == (reference("Hello there", 12), "length")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, n=2, temperature=0.8, seed=1)
    assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)


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


def test_grpc_and_experts_dashboard(app):
    from cluster.client import InferenceClient

    client = InferenceClient(f"127.0.0.1:{app.grpc_port}")
    reply = client.generate("Hello there", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert reply.usage.completion_tokens == 5
    experts = httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json()
    assert [g["experts"] for g in experts["groups"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(len(g["replicas"]) == 1 for g in experts["groups"])
    assert sum(experts["load"]["per_expert"]) > 0  # the shards reported routed tokens


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


@pytest.mark.parametrize("deployment", ["AttentionShard", "ExpertGroup0"])
def test_killed_replica_mid_stream_loses_nothing(app, reference, deployment):
    before = _replica_pids(deployment)
    killed = []
    text, finish = _stream_text(_openai(app), "Once upon a time", 120,
                                on_first=lambda: killed.extend(_kill(deployment)))
    assert killed and set(before.values()) == set(killed)
    assert (text, finish) == (reference("Once upon a time", 120), "length")
    after = _replica_pids(deployment)
    assert after and not set(after) & set(before)  # Serve replaced the replica


def test_scaling_one_expert_group_touches_only_that_deployment(app):
    others = {d: set(_replica_pids(d)) for d in ("Ingress", "AttentionShard", "Router", "ExpertGroup0")}
    group1 = set(_replica_pids("ExpertGroup1"))
    _deploy(_config(app.http_port, app.grpc_port, group_replicas={1: Replicas(min=2, max=2)}))
    deadline = time.monotonic() + 120
    while len(_replica_pids("ExpertGroup1")) < 2:
        assert time.monotonic() < deadline, "the second replica of group 1 never started"
        time.sleep(0.2)
    assert {d: set(_replica_pids(d)) for d in others} == others
    assert group1 < set(_replica_pids("ExpertGroup1"))
    client = _openai(app)
    deadline = time.monotonic() + 60
    while True:
        client.completions.create(model="tiny", prompt="Scale", max_tokens=8, extra_body={"ignore_eos": True})
        replicas = httpx.get(f"http://127.0.0.1:{app.http_port}/v1/experts").json()["groups"][1]["replicas"]
        if len(replicas) == 2 and all(r["tokens_served"] > 0 for r in replicas):
            break
        assert time.monotonic() < deadline, f"traffic never reached the new replica: {replicas}"
