"""`msem serve` stops the same way on Ctrl-C and on SIGTERM: Serve and Ray are shut down, nothing is left."""

import os
import signal
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_msem_serve_shuts_down_on_ctrl_c_and_sigterm(monkeypatch, capsys, stop):
    import ray
    from ray import serve

    import cluster.app
    import cluster.serve_command as command
    from cluster.cli import main

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: SimpleNamespace(dashboard_url="127.0.0.1:8265"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(cluster.app, "deploy", lambda config, serve_file: calls.append("deploy"))
    monkeypatch.setattr(command, "wait_until_healthy", lambda base, timeout: None)
    monkeypatch.setattr(command.time, "sleep", lambda seconds: os.kill(os.getpid(), stop))
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["serve", "--model", "tiny"]) == 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert calls == ["deploy", "serve.shutdown", "ray.shutdown"]
    assert "shutting down" in capsys.readouterr().out
