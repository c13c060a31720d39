"""The memory tiers under Serve: two attention shards with small device pools and host RAM over the shared
MemoryStore. Multi-turn chats return to their warm shard; blocks pushed down to the store come back from it;
`/v1/memory` shows every tier; a SIGKILLed store costs no request and is replaced."""

import os
import random
import signal
import threading
import time

import httpx2 as httpx
import pytest

from tests.integration.serving import (MAX_MODEL_LEN, deploy_and_wait, openai_client, replica_pids, stream_text,
                                       tiny_config)

pytestmark = pytest.mark.slow
BLOCK_BYTES = 32 << 10  # tiny: 4 layers x (k, v) x 2 kv heads x 32 dims x 4 bytes x 16 tokens
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    # One Ingress replica: its router's own index decides at once (with two, the shards' reports do, a second
    # later). Experts inside the shards: the layer path is not under test here.
    config = tiny_config(attention={"kv_cache_memory": 64 * BLOCK_BYTES, "replicas": {"min": 2, "max": 2}},
                         ingress_replicas=1, grpc_port=None,
                         memory={"host_bytes": 40 * BLOCK_BYTES, "store": {"ram_bytes": 64 << 20}})
    config = config.model_copy(update={"expert_groups": None})
    deploy_and_wait(config)
    yield config
    serve.shutdown()


@pytest.fixture(scope="module")
def reference():
    from engine import LLM, SamplingParams

    llm = LLM("tiny", dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)

    def complete(prompt: list[int], max_tokens: int) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0].text
    return complete


def memory(config) -> dict:
    reply = httpx.get(f"http://127.0.0.1:{config.http_port}/v1/memory", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def loaded_from_store(config) -> int:
    return sum(shard["loaded_blocks"]["store"] for shard in memory(config)["shards"].values())


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30_000) for _ in range(n)]


def test_multi_turn_chats_return_to_their_warm_shard(app, reference):
    client, rng = openai_client(app), random.Random(0)
    for _ in range(4):
        prompt, held = tokens(rng, 60), 0
        for _ in range(3):
            out = client.completions.create(prompt=prompt, max_tokens=4, **GREEDY)
            assert out.choices[0].text == reference(prompt, 4)
            assert out.usage.prompt_tokens_details.cached_tokens >= held  # the previous turn, on this shard
            held = (len(prompt) - 1) // 16 * 16
            prompt = prompt + tokens(rng, 30)  # the next turn: the whole conversation so far, then more


def test_blocks_pushed_down_to_the_store_come_back_from_it(app, reference):
    client, rng = openai_client(app), random.Random(1)
    prompt = tokens(rng, 200)
    first = client.completions.create(prompt=prompt, max_tokens=4, **GREEDY)
    for _ in range(8):  # prompts that share only its first block: routed to its shard, whose pool (64 blocks)
        # and host RAM (40) they overflow, so that its other blocks go down to the store
        client.completions.create(prompt=prompt[:16] + tokens(rng, 400), max_tokens=2, **GREEDY)
    deadline = time.monotonic() + 30
    while not memory(app)["store"]["ram"]["num_blocks"]:  # written back in the background
        assert time.monotonic() < deadline, "no block reached the memory store"
        time.sleep(0.2)
    again = client.completions.create(prompt=prompt, max_tokens=4, **GREEDY)
    assert first.choices[0].text == again.choices[0].text == reference(prompt, 4)
    assert again.usage.prompt_tokens_details.cached_tokens == (len(prompt) - 1) // 16 * 16
    deadline = time.monotonic() + 30
    while not loaded_from_store(app):  # shards report their tiers once a second
        assert time.monotonic() < deadline, f"no shard loaded blocks from the store: {memory(app)}"
        time.sleep(0.2)
    info = memory(app)
    assert len(info["shards"]) == 2 and info["store"]["ram"]["used_bytes"] <= 64 << 20
    assert all(shard["host"]["used_bytes"] <= 40 * BLOCK_BYTES for shard in info["shards"].values())


def test_a_killed_store_costs_no_request_and_is_replaced(app, reference):
    client, rng = openai_client(app), random.Random(2)
    prompts = [tokens(rng, 100) for _ in range(4)]
    results, started = {}, threading.Barrier(len(prompts) + 1, timeout=120)

    def run(i: int) -> None:
        results[i] = stream_text(client, prompts[i], 48, on_first=started.wait)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    started.wait()
    (pid,) = replica_pids("MemoryStore").values()
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert results == {i: (reference(p, 48), "length") for i, p in enumerate(prompts)}
    text = client.completions.create(prompt=prompts[0] + [5, 6], max_tokens=4, **GREEDY).choices[0].text
    assert text == reference(prompts[0] + [5, 6], 4)  # served while the store may still be down
    deadline = time.monotonic() + 60
    while set(replica_pids("MemoryStore").values()) - {pid} == set():
        assert time.monotonic() < deadline, "Serve did not replace the killed memory store"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while httpx.get(f"http://127.0.0.1:{app.http_port}/v1/memory", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "/v1/memory did not come back"
        time.sleep(0.2)
