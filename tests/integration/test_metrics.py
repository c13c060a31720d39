"""Ray's metrics export after real traffic carries every series the msem Grafana dashboard queries.

A local Ray exports metrics on a free port (what Prometheus scrapes), the application runs the tiny preset with
two expert groups (group 1 with two replicas) behind an API key, and the traffic covers every panel: a prompt
whose blocks are evicted to host RAM and loaded back (the KV tiers), streamed completions that share a prompt
(prefix-cache hits) with more of them than the shard runs at once (requests waiting), one request refused for
each of 400, 401 and 429, and a group replica killed mid-traffic (a failover).
The export lags the recording by a report interval or two, so the test polls it with a deadline.
"""

import os
import random
import re
import signal
import threading
import time
import urllib.request

import httpx2 as httpx
import pytest

from tests.integration.serving import deploy_and_wait, free_port, replica_pids, tiny_config
from tests.unit.cluster.test_metrics import dashboard_metric_names

pytestmark = pytest.mark.slow
KEY = "sk-metrics"
PROMPT = "Count the stars above the hills and the rivers below them, one by one, slowly: " * 2
MAX_REQUESTS = 5  # the admission limit: one more concurrent request gets 429


@pytest.fixture(scope="module")
def metrics_port():
    """Local Ray with its metrics export on a free port, reported every second (the default is 10 s)."""
    import ray

    from cluster.app import init_local_ray

    port = free_port()
    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                   _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def app(metrics_port):
    from ray import serve

    # one Ingress replica: admission limits hold per replica, so MAX_REQUESTS clients fill its slots
    # a device pool of 64 blocks (32 KiB each), so that a flood of prompts pushes blocks down to host RAM
    config = tiny_config(grpc_port=None, api_keys=[KEY], limits={"max_requests": MAX_REQUESTS}, ingress_replicas=1,
                         attention={"max_num_seqs": 2, "kv_cache_memory": 64 << 15},
                         expert_groups={"group_replicas": {1: {"min": 2, "max": 2}}})
    deploy_and_wait(config)
    yield config
    serve.shutdown()


def scrape(port: int) -> dict[str, list[tuple[str, float]]]:
    """Sample name -> (labels, value) of every sample on Ray's metrics export."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels, value = re.fullmatch(r"([^{ ]+)(\{.*\})? (\S+)", line).groups()
            samples.setdefault(name, []).append((labels or "", float(value)))
    return samples


def _missing(port: int, names: set[str]) -> set[str]:
    samples = scrape(port)
    return {name for name in names if not any(value > 0 for _, value in samples.get(name, []))}


def reload_from_host_ram(base: str, auth: dict) -> None:
    """A prompt, then prompts that evict its blocks from the device pool to host RAM, then the prompt again:
    the KV tier series get values."""
    rng = random.Random(0)
    prompt = [rng.randrange(100, 30_000) for _ in range(200)]
    with httpx.Client(base_url=base, headers=auth, timeout=120) as http:
        for ids in [prompt] + [prompt[:16] + [rng.randrange(100, 30_000) for _ in range(400)] for _ in range(4)]:
            assert http.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1}).status_code == 200
        reply = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
        assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 192


def test_every_dashboard_series_is_exported_with_real_values(app, metrics_port):
    base = f"http://127.0.0.1:{app.http_port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}
    stop, errors = threading.Event(), []

    def client():  # streams completions back to back until told to stop
        with httpx.Client(base_url=base, headers=auth, timeout=120) as http:
            while not stop.is_set():
                try:
                    with http.stream("POST", "/v1/completions", json=body) as reply:
                        if reply.status_code != 429:  # the extra client is refused now and then: expected
                            assert reply.status_code == 200, reply.read()
                        for _ in reply.iter_lines():
                            pass
                except Exception as error:  # noqa: BLE001 - reported by the test
                    errors.append(error)
                    return

    with httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/v1/models").status_code == 401
        bad = http.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": [10**9], "max_tokens": 2})
        assert bad.status_code == 400
    reload_from_host_ram(base, auth)  # before the clients take every admission slot
    clients = [threading.Thread(target=client, daemon=True) for _ in range(MAX_REQUESTS)]
    for thread in clients:
        thread.start()
    wanted = dashboard_metric_names()
    try:
        deadline = time.monotonic() + 60
        while _missing(metrics_port, {"ray_msem_expert_group_computed_tokens_total"}):  # traffic reaches group 1
            assert time.monotonic() < deadline, "no expert traffic within 60 s"
            time.sleep(1)
        with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
            refused = [http.post("/v1/completions", json={**body, "stream": False}).status_code for _ in range(3)]
        assert 429 in refused  # MAX_REQUESTS clients hold every admission slot
        os.kill(next(iter(replica_pids("ExpertGroup1").values())), signal.SIGKILL)  # sends fail over to the other
        deadline, missing = time.monotonic() + 120, wanted
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            missing = _missing(metrics_port, wanted)
        assert not missing, f"series the dashboard queries that the export lacks or has only at 0: {sorted(missing)}"
        rejected = {re.search(r'reason="(\d+)"', labels).group(1)
                    for labels, value in scrape(metrics_port)["ray_msem_requests_rejected_total"] if value > 0}
        assert rejected == {"400", "401", "429"}
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    assert not errors, errors  # the failover was invisible to the clients
