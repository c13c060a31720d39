"""`msem serve` stops cleanly, as a service manager or a terminal stops it: SIGTERM to the process (`docker stop`,
Kubernetes), SIGINT to its process group (Ctrl-C), and SIGTERM to the process group (systemd's default stop,
which signals every process of the service). The process exits 0 within a bound, without a crash dump or a
traceback, and no process of its Ray session is left; the stream in flight runs to its end, except when the
signal reached Ray's own processes too (SIGTERM to the group: they stop at once, and so does msem serve)."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.serving import openai_client, stream_text, tiny_config

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300  # a local Ray and the tiny model on a busy 2-core machine
STOP_TIMEOUT_S = 60  # Serve gives a replica 20 s to finish its requests, then Ray shuts down
SESSION = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")
CRASH_MARKS = ("Traceback", "SIGTERM received", "***", "Aborted", "logging.cc")


def _wait_until_healthy(server: subprocess.Popen, url: str, stderr: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.poll() is None, \
            f"msem serve exited with {server.returncode} before it answered:\n{stderr.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"{url} did not answer within {START_TIMEOUT_S} s"
        time.sleep(0.2)


class Session:
    """The processes of the Ray session that `msem serve` started, as (pid, start time): everything under it, and
    whatever names the session directory or runs under its raylet (a worker, an agent), wherever re-parented."""

    def __init__(self, server_pid: int):
        self.server_pid, self.processes = server_pid, set()
        self.name, self.raylets = "", set()
        self.collect()

    def collect(self) -> None:
        import psutil

        descendants = psutil.Process(self.server_pid).children(recursive=True)
        cmdlines = [" ".join(_cmdline(p)) for p in descendants]
        self.name = next(m.group() for line in cmdlines if (m := SESSION.search(line)))
        self.raylets |= {p.pid for p, line in zip(descendants, cmdlines) if "/raylet/raylet " in line}
        self.processes |= {(p.pid, p.create_time()) for p in descendants} | self.members()

    def members(self) -> set[tuple[int, float]]:
        return _members(self.name, self.raylets)

    def alive(self) -> list[str]:
        """The session's processes still running (those seen before and any found now)."""
        return _alive(self.processes | self.members())


def _members(session: str, raylets: set[int]) -> set[tuple[int, float]]:
    """Live processes whose command line names `session` or whose environment names one of its raylets."""
    import psutil

    found = set()
    for process in psutil.process_iter():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            env_raylet = process.environ().get("RAY_RAYLET_PID", "")
            if session in " ".join(_cmdline(process)) or (env_raylet.isdigit() and int(env_raylet) in raylets):
                found.add((process.pid, process.create_time()))
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def _alive(processes: set[tuple[int, float]]) -> list[str]:
    import psutil

    alive = []
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(_cmdline(process))[:100]}")
        except psutil.Error:
            continue
    return alive


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.mark.parametrize("stop,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
                         ids=["SIGTERM-to-process", "SIGINT-to-group", "SIGTERM-to-group"])
def test_msem_serve_stops_cleanly(tmp_path, stop, to_group):
    drains = not (stop == signal.SIGTERM and to_group)  # Ray's processes ignore SIGINT, not SIGTERM
    config = tiny_config().model_copy(update={"expert_groups": None})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local Ray of its own
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        server = subprocess.Popen([str(Path(sys.executable).with_name("msem")), "serve", "--config",
                                   str(tmp_path / "serve.yaml")], stdout=out, stderr=err, env=env,
                                  start_new_session=True)  # its own process group, as a terminal's job has
    try:
        _wait_until_healthy(server, f"http://127.0.0.1:{config.http_port}/health", stderr)
        session = Session(server.pid)
        began = []

        def send_stop() -> None:  # once the stream has started: it is in flight when the signal arrives
            session.collect()  # again: the replicas' workers are running now
            began.append(time.monotonic())
            if to_group:
                os.killpg(server.pid, stop)  # Ctrl-C: the terminal signals the whole foreground group
            else:
                server.send_signal(stop)

        try:
            text, finish = stream_text(openai_client(config), "The quick brown fox", 48, on_first=send_stop)
        except Exception:  # noqa: BLE001 - the stream's replica stopped under it
            if drains:
                raise
        else:
            assert not drains or (finish == "length" and text), "the stream in flight was drained to its end"
        code = server.wait(timeout=STOP_TIMEOUT_S)
        stopped_in = time.monotonic() - began[0]
    finally:
        _stop_for_good(server)
    assert code == 0, f"exit status {code}\n{stderr.read_text()}"
    assert stopped_in < STOP_TIMEOUT_S
    assert "shutting down" in stdout.read_text()
    assert not [mark for mark in CRASH_MARKS if mark in stderr.read_text()], stderr.read_text()
    assert session.raylets and len(session.processes) > 10, "the session's processes were found"
    left = session.alive()
    assert not left, "processes of the Ray session outlived msem serve:\n" + "\n".join(left)


def _stop_for_good(server: subprocess.Popen) -> None:
    """After a failure: stop `msem serve` as its users do, and kill its process group if that fails too."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
