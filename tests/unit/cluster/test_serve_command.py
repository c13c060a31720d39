"""`msem serve` stops the same way on Ctrl-C and on SIGTERM, serving or still starting: it drains the application,
stops what it started, and leaves no process behind (tests/integration/test_shutdown.py does it for real)."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

class FakeRay:
    """Ray and Serve as `msem serve` calls them, recording the calls; `drains` is False for an application that
    never finishes its requests, `gcs_up` False for a Ray the signal stopped too, `stops_in_drain` True for a Ray
    that stops while the drain waits on a Serve call (which then never answers: it sleeps, recording its end)."""

    def __init__(self, monkeypatch, drains: bool = True, other_apps: tuple[str, ...] = (), gcs_up: bool = True,
                 stops_in_drain: bool = False):
        import ray
        from ray import serve

        import cluster.app
        import cluster.serve_command as command

        self.calls, self.apps = [], {"msem", *other_apps}
        self.drains, self.gcs_up, self.stops_in_drain = drains, gcs_up, stops_in_drain
        monkeypatch.setattr(ray, "init", lambda **kwargs: SimpleNamespace(dashboard_url="127.0.0.1:8265"))
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "shutdown", lambda: self.calls.append("ray.shutdown"))
        monkeypatch.setattr(serve, "status", self._status)
        monkeypatch.setattr(serve, "delete", self._delete)
        monkeypatch.setattr(serve, "shutdown", lambda: self.calls.append("serve.shutdown"))
        monkeypatch.setattr(cluster.app, "deploy", lambda config, serve_file: self.calls.append("deploy"))
        monkeypatch.setattr(command, "wait_until_healthy", lambda base, timeout: None)
        monkeypatch.setattr(command, "_descendants", lambda: [])  # never this test run's own processes
        monkeypatch.setattr(command, "_gcs_stopped", lambda: not self.gcs_up)

    def _status(self) -> SimpleNamespace:
        if self.stops_in_drain and self.calls[-1:] == ["delete msem"]:
            self.gcs_up = False
            time.sleep(60)  # a call to the stopped GCS: Ray's own reconnect timeout would end the process
            self.calls.append("status returned")
        return SimpleNamespace(applications=dict.fromkeys(self.apps))

    def _delete(self, name: str, _blocking: bool = True) -> None:
        self.calls.append(f"delete {name}")
        if self.drains:
            self.apps.discard(name)


@pytest.fixture
def restore_signals():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _on_sleep(monkeypatch, action) -> None:
    """Run `action(seconds)` instead of sleeping (in `msem serve` only)."""
    import cluster.serve_command as command

    monkeypatch.setattr(command, "time", SimpleNamespace(sleep=action, monotonic=time.monotonic))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_serving_drains_then_stops_ray(monkeypatch, capsys, restore_signals, stop):
    from cluster.cli import main

    ray = FakeRay(monkeypatch)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), stop))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["deploy", "delete msem", "ray.shutdown"]  # a local Ray takes Serve with it
    out = capsys.readouterr().out
    assert "ready" in out and "shutting down" in out and "stopping at once" not in out


def test_ctrl_c_stops_it_even_when_sigint_came_ignored(monkeypatch, capsys, restore_signals):
    """A background job of a script starts with SIGINT ignored; `kill -INT` still stops it, as it does uvicorn."""
    from cluster.cli import main

    ray = FakeRay(monkeypatch)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), signal.SIGINT))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["deploy", "delete msem", "ray.shutdown"]
    assert "shutting down" in capsys.readouterr().out


def test_a_signal_while_deploying_stops_too(monkeypatch, capsys, restore_signals):
    import cluster.app
    from cluster.cli import main

    ray = FakeRay(monkeypatch)
    monkeypatch.setattr(cluster.app, "deploy", lambda config, serve_file: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["delete msem", "ray.shutdown"]
    assert "ready" not in capsys.readouterr().out


def test_a_second_signal_skips_the_drain(monkeypatch, capsys, restore_signals):
    from cluster.cli import main

    ray = FakeRay(monkeypatch, drains=False)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), signal.SIGTERM))  # serving, then the drain's poll
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["deploy", "delete msem", "ray.shutdown"]
    assert "stopping at once" in capsys.readouterr().out


def test_a_signal_that_stopped_ray_too_skips_the_drain(monkeypatch, capsys, restore_signals):
    """A signal sent to the whole process group (systemd's stop) stops the local Ray as well: Serve is not
    called then, since each call would wait a minute for the GCS."""
    from cluster.cli import main

    ray = FakeRay(monkeypatch, gcs_up=False)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["deploy", "ray.shutdown"]
    assert "nothing is left to drain" in capsys.readouterr().out


def test_ray_stopping_during_a_serve_call_of_the_drain_ends_the_drain(monkeypatch, capsys, restore_signals):
    """The signal reached Ray's processes too, but after the drain had checked that the GCS answers: the Serve
    call then waiting on the stopped GCS is interrupted as soon as the GCS is seen stopped."""
    from cluster.cli import main

    ray = FakeRay(monkeypatch, drains=False, stops_in_drain=True)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == ["deploy", "delete msem", "ray.shutdown"]
    out = capsys.readouterr().out
    assert "nothing is left to drain" in out and "stopping at once" not in out


def test_a_failed_start_stops_what_it_started(monkeypatch, capsys, restore_signals):
    import cluster.serve_command as command
    from cluster.cli import main

    ray = FakeRay(monkeypatch)

    def fail(base, timeout):
        raise command.DeployFailedError("the application failed to deploy: out of GPUs")

    monkeypatch.setattr(command, "wait_until_healthy", fail)
    assert main(["serve", "--model", "tiny"]) == 2
    assert ray.calls == ["deploy", "delete msem", "ray.shutdown"]
    assert "out of GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("other_apps, calls", [
    ((), ["deploy", "delete msem", "serve.shutdown", "ray.shutdown"]),
    (("other",), ["deploy", "delete msem", "ray.shutdown"]),
], ids=["serve-idle", "serve-in-use"])
def test_on_a_cluster_serve_stops_only_when_nothing_else_runs_on_it(monkeypatch, restore_signals, other_apps,
                                                                     calls):
    from cluster.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray = FakeRay(monkeypatch, other_apps=other_apps)
    _on_sleep(monkeypatch, lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["serve", "--model", "tiny"]) == 0
    assert ray.calls == calls


def test_detach_leaves_the_application_running(monkeypatch, restore_signals):
    from cluster.cli import main

    ray = FakeRay(monkeypatch)
    assert main(["serve", "--model", "tiny", "--detach"]) == 0
    assert ray.calls == ["deploy"]


def test_leftover_processes_are_terminated_then_killed():
    import psutil

    from cluster.serve_command import _terminate

    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline() == "ready\n"  # its SIGTERM handler is in place
    try:
        began = time.monotonic()
        _terminate([psutil.Process(polite.pid), psutil.Process(stubborn.pid)], timeout=0.5)
        assert polite.poll() is not None and stubborn.poll() is not None  # _terminate reaped them: gone
        assert 0.5 <= time.monotonic() - began < 5  # the stubborn one was given its 0.5 s, then killed
    finally:
        for process in (polite, stubborn):
            process.kill()
            process.wait()
