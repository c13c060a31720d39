"""Health under real Serve: a wedged expert group is reported by `/health` and replaced by Serve.

The only replica of ExpertGroup0 is stopped with SIGSTOP: its process lives on, so Ray sees nothing wrong, but
it neither computes nor heartbeats. `/health` must say so (503, naming group 0) within a second per call, Serve's
health check (the replica's expert probe) must time out and start a new replica, and then `/health` is 200 and
requests run again. The stopped process is resumed or killed at the end, whatever happened.
"""

import os
import signal
import time

import httpx2 as httpx
import pytest

from tests.integration.serving import deploy_and_wait, openai_client, replica_pids, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    config = tiny_config(expert_groups={"health_check": {"period_s": 2, "timeout_s": 5}})
    deploy_and_wait(config)
    yield config
    serve.shutdown()


def health(config, limit_s: float = 1.0) -> tuple[int, dict]:
    """One /health call, which must answer within `limit_s`."""
    began = time.monotonic()
    reply = httpx.get(f"http://127.0.0.1:{config.http_port}/health", timeout=5)
    took = time.monotonic() - began
    assert took < limit_s, f"/health took {took:.2f} s"
    return reply.status_code, reply.json()


def poll_health(config, until_status: int, timeout: float, limit_s: float = 1.0) -> list[dict]:
    """Poll /health until it answers `until_status`; -> the bodies of the other answers seen meanwhile."""
    deadline, others = time.monotonic() + timeout, []
    while True:
        status, body = health(config, limit_s)
        if status == until_status:
            return others
        others.append(body)
        assert time.monotonic() < deadline, f"/health never answered {until_status}; last: {body}"
        time.sleep(0.2)


def test_a_wedged_expert_group_is_reported_and_replaced(app):
    assert health(app) == (200, {"status": "ok"})
    client = openai_client(app)
    client.completions.create(model="tiny", prompt="Before", max_tokens=4, extra_body={"ignore_eos": True})
    (pid,) = replica_pids("ExpertGroup0").values()
    os.kill(pid, signal.SIGSTOP)
    try:
        poll_health(app, 503, timeout=30)  # 3 missed heartbeats (3 s) and it shows
        _, body = health(app)
        assert body["error"] == {"message": "expert group 0 has no live replica", "type": "server_error",
                                 "param": None, "code": "service_unavailable"}
        # Serve's health check times out on the stopped replica (every 2 s, after 5 s here) and starts
        # another; until that one registers, every answer names group 0. While the new replica loads
        # on a small test machine the Serve proxy itself can be slow, so these calls only must not hang.
        unhealthy = poll_health(app, 200, timeout=240, limit_s=3.0)
        assert health(app) == (200, {"status": "ok"})
        assert all(b["error"]["message"] == "expert group 0 has no live replica" for b in unhealthy)
        assert set(replica_pids("ExpertGroup0").values()) - {pid}  # a new replica (the old one may still be
        # in Serve's graceful shutdown, which a stopped process never finishes)
        out = client.completions.create(model="tiny", prompt="After", max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
