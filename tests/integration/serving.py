"""Helpers for tests of the Serve application on a local Ray: configs on loopback ports, deploying, replicas."""

import os
import signal
import socket
import subprocess

import pytest

from cluster.config import ServeConfig

MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def pid_namespace() -> list[str]:
    """The command prefix that runs a command as PID 1 of a PID namespace of its own, every process of which dies
    with it (and `ray stop` inside which sees no Ray outside it); skips the test where none can be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the cluster runs in its own PID namespace (unshare --pid)")
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if probe.returncode:
        pytest.skip(f"cannot create a PID namespace: {probe.stderr.strip()}")
    return prefix


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited; a zombie not yet reaped by its parent counts as gone."""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:  # also when it vanishes between the lookup and the read
        return True


def tiny_config(**overrides) -> ServeConfig:
    """The tiny preset with two expert groups on free loopback ports, sized for a 2-core machine; `overrides`
    replace top-level fields, and `expert_groups` / `attention` entries are merged into the defaults."""
    data = {"model": "tiny", "max_model_len": MAX_MODEL_LEN, "host": "127.0.0.1", "http_port": free_port(),
            "grpc_port": free_port(), "attention": {"kv_cache_memory": 64 << 20, "num_cpus": 0.5},
            "expert_groups": {"num_groups": 2, "num_cpus": 0.25}}
    for key in ("attention", "expert_groups"):
        data[key] = {**data[key], **overrides.pop(key, {})}
    return ServeConfig.model_validate({**data, **overrides})


def deploy_and_wait(config: ServeConfig, timeout: float = 300) -> None:
    from cluster.app import deploy
    from cluster.serve_command import wait_until_healthy

    deploy(config)
    wait_until_healthy(f"http://127.0.0.1:{config.http_port}", timeout=timeout)


def openai_client(config: ServeConfig, timeout: float | None = None):
    """The official client of the app; `timeout` (seconds) bounds each call (default: the client's own)."""
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="unused", max_retries=0,
                  **({} if timeout is None else {"timeout": timeout}))


def replica_pids(deployment: str) -> dict[str, int]:
    """Actor id -> pid of the deployment's live replicas (from the GCS: no dashboard needed)."""
    from ray._private.state import actors

    return {a["ActorID"]: a["Pid"] for a in actors().values()
            if a["ActorClassName"] == f"ServeReplica:msem:{deployment}" and a["State"] == "ALIVE"}


def kill_replicas(deployment: str) -> list[int]:
    pids = list(replica_pids(deployment).values())
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def stream_text(client, prompt: str, max_tokens: int, on_first=None) -> tuple[str, str | None]:
    """A greedy streamed completion's text and finish reason; `on_first` runs when the first chunk arrives."""
    text, finish = "", None
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        if i == 0 and on_first is not None:
            on_first()
        text += chunk.choices[0].text if chunk.choices else ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    return text, finish
