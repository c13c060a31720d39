"""`ray up cluster.local.yaml` for real: over SSH to 127.0.0.1, Ray up, the app deployed and answering, `ray down`.

The "head node" is this machine behind a private sshd:
- on loopback, a free port, a temporary host key and client key; nothing of the machine's ssh setup is used.
  Ray's local provider has no SSH port setting, so ssh reaches that port through `auth.ssh_proxy_command`.
- in its own PID namespace: `ray stop` (run by the config and by `ray down`) ends every Ray process it can
  see, and must not see other Ray instances on this machine. Killing sshd ends everything started over SSH.
- with its own HOME and TMPDIR (sshd `SetEnv`), so the synced checkout and Ray's sessions stay temporary.
The config is cluster.local.yaml with three changes: this venv (which has msem) instead of the installing setup
commands; free ports instead of its fixed ones and Ray's defaults (GCS 6379, dashboard 8265, object and node
managers, metrics, workers, client server 10001, agent 52365); and the deployed Serve config copied to bind
loopback on free HTTP and gRPC ports.
"""

import getpass
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml

from tests.integration.serving import free_ports, pid_namespace

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PACKAGES = {"sshd": "openssh-server", "rsync": "rsync"}  # rsync: `ray up` syncs files with it

RELAY = """\
# ssh ProxyCommand: joins ssh's stdin/stdout to a TCP address.
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))

def pump(src, dst):
    while data := os.read(src, 1 << 16):
        while data:
            data = data[os.write(dst, data):]

def upstream():
    pump(0, sock.fileno())
    sock.shutdown(socket.SHUT_WR)

threading.Thread(target=upstream, daemon=True).start()
pump(sock.fileno(), 1)
"""


@dataclass(frozen=True)
class SSHNode:
    key: Path  # authorized client key
    home: Path
    tmp: Path  # the node's TMPDIR; Ray's sessions go to tmp/ray
    proxy_command: str


@dataclass(frozen=True)
class Ports:
    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent: int
    http: int
    grpc: int
    object_manager: int
    node_manager: int
    metrics: int


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def ensure_tools() -> str:
    """The sshd binary, installing openssh-server (and rsync) with apt-get when missing."""
    missing = [package for tool, package in PACKAGES.items() if not find_tool(tool)]
    if missing:
        if not shutil.which("apt-get"):
            pytest.skip(f"{' and '.join(missing)} missing, and no apt-get to install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["update", "-qq"], ["install", "-y", "-qq", "--no-install-recommends", *missing]):
            try:
                done = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                pytest.skip(f"apt-get {args[0]} timed out installing {missing}")
            if done.returncode:
                pytest.skip(f"apt-get {args[0]} could not install {missing}: {done.stderr.strip()[-300:]}")
    return find_tool("sshd")


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def ssh_node():
    namespace = pid_namespace()
    sshd = ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="msem-rayup-"))  # short: Ray's socket paths live below it
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / name], check=True)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    (root / "relay.py").write_text(RELAY)
    [port] = free_ports(1)
    (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
AuthorizedKeysFile {root}/authorized_keys
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv HOME={home} TMPDIR={tmp} RAY_USAGE_STATS_ENABLED=0
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = root / "sshd.log"
    with open(log, "w") as out:
        # sshd is PID 1 of its namespace: when unshare dies, sshd dies, and with it every process in it.
        sshd_process = subprocess.Popen([*namespace, sshd, "-D", "-e", "-f", root / "sshd_config"],
                                        stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_for(lambda: sshd_process.poll() is not None or accepts(port), timeout=15, interval=0.1):
            pytest.fail(f"sshd did not listen on 127.0.0.1:{port}:\n{log.read_text()}")
        if sshd_process.poll() is not None:
            pytest.fail(f"sshd exited with {sshd_process.returncode}:\n{log.read_text()}")
        proxy = shlex.join([sys.executable, str(root / "relay.py"), "127.0.0.1", str(port)])
        yield SSHNode(root / "client_key", home, tmp, proxy)
    finally:
        sshd_process.kill()  # SIGKILL: unshare ignores SIGTERM while it waits for sshd
        sshd_process.wait()
        shutil.rmtree(root, ignore_errors=True)


def serve_config_on(ports: Ports, path: Path) -> dict:
    """A copy of a configs/ file whose HTTP and gRPC servers listen on loopback, on the given ports."""
    config = yaml.safe_load(path.read_text())
    config["http_options"].update(host="127.0.0.1", port=ports.http)
    config["applications"][0]["args"].update(host="127.0.0.1", http_port=ports.http, grpc_port=ports.grpc)
    return config


def smoke_config(node: SSHNode, ports: Ports, cluster_name: str) -> dict:
    """cluster.local.yaml aimed at the SSH node, on this venv and free ports (see the module docstring)."""
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = cluster_name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(node.key),
                      "ssh_proxy_command": node.proxy_command}
    # The real setup ends with a venv that has msem, first on PATH; this venv has msem already.
    config["setup_commands"] = [f"echo 'export PATH=\"{VENV_BIN}:$PATH\"' >> ~/.bashrc"]
    commands = []
    for command in config["head_start_ray_commands"]:
        if "ray start --head" in command:
            fixed = {"--port=6379": f"--port={ports.gcs}",
                     "--dashboard-port=8265": f"--dashboard-port={ports.dashboard}",
                     "--object-manager-port=8076": f"--object-manager-port={ports.object_manager}",
                     "--node-manager-port=8077": f"--node-manager-port={ports.node_manager}",
                     "--metrics-export-port=8080": f"--metrics-export-port={ports.metrics}",
                     "--min-worker-port=10002": "--min-worker-port=0", "--max-worker-port=10999": "--max-worker-port=0"}
            for port, free in fixed.items():  # 0: workers take random ports
                assert port in command, command
                command = command.replace(port, free)
            command += f" --ray-client-server-port={ports.client_server}"
            command += f" --dashboard-agent-listen-port={ports.dashboard_agent} --num-cpus=4"
        elif command.startswith("serve deploy ~/msem/"):
            deployed = ROOT / shlex.split(command)[2].removeprefix("~/msem/")
            copy = node.tmp / deployed.name
            copy.write_text(yaml.safe_dump(serve_config_on(ports, deployed)))
            command = f"serve deploy -a http://127.0.0.1:{ports.dashboard} {copy}"
        commands.append(command)
    config["head_start_ray_commands"] = commands
    return config


def run_ray(*args: str, env: dict, timeout: float, check: bool = True) -> str:
    try:
        done = subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        pytest.fail(f"`ray {' '.join(args)}` took more than {timeout}s:\n{output[-8000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0 or not check, f"`ray {' '.join(args)}` failed:\n{output[-8000:]}"
    return output


def get_json(url: str, body: dict | None = None, timeout: float = 5) -> dict | None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except OSError:
        return None


def msem_app(dashboard_port: int) -> dict:
    """The application's entry in Serve's REST API: status, message, deployments."""
    applications = (get_json(f"http://127.0.0.1:{dashboard_port}/api/serve/applications/") or {}).get("applications")
    return (applications or {}).get("msem", {})


def remove_ssh_control_dir(cluster_name: str) -> None:
    """ssh's connection-sharing sockets, which Ray keeps in /tmp/ray_ssh_<user hash>/<cluster name hash>."""
    for path in Path("/tmp").glob(f"ray_ssh_*/{hashlib.sha256(cluster_name.encode()).hexdigest()[:10]}"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(360)
def test_ray_up_over_ssh_serves_the_app_and_ray_down_stops_it(ssh_node, tmp_path):
    ports = Ports(*free_ports(9))
    cluster_name = f"msem-smoke-{os.getpid()}"  # it also names ssh's control socket: concurrent runs stay apart
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(smoke_config(ssh_node, ports, cluster_name)))
    # The launcher's cluster state, lock and config cache go to TMPDIR (the node's: as when run on the head).
    env = {**os.environ, "TMPDIR": str(ssh_node.tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        run_ray("up", "-y", "--no-config-cache", str(config_file), env=env, timeout=150)
        status = run_ray("exec", "--no-config-cache", str(config_file),
                         f"ray status --address=127.0.0.1:{ports.gcs}", env=env, timeout=60)
        assert "local.cluster.node" in status and "4.0 CPU" in status, status
        version = get_json(f"http://127.0.0.1:{ports.dashboard}/api/version")
        assert version and version["ray_version"] == ray.__version__
        synced = ssh_node.home / "msem"
        assert (synced / "cluster" / "app.py").is_file() and not (synced / ".venv").exists()

        settled = ("RUNNING", "DEPLOY_FAILED")
        wait_for(lambda: msem_app(ports.dashboard).get("status") in settled, timeout=120, interval=2)
        app = msem_app(ports.dashboard)
        assert app.get("status") == "RUNNING", app
        completion = get_json(f"http://127.0.0.1:{ports.http}/v1/completions", timeout=60,
                              body={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert completion and completion["usage"]["completion_tokens"] == 4, completion
    finally:
        run_ray("down", "-y", str(config_file), env=env, timeout=90, check=False)  # may follow a failed `up`
        remove_ssh_control_dir(cluster_name)
    stopped = wait_for(lambda: not accepts(ports.dashboard) and not accepts(ports.http), timeout=30)
    assert stopped, "Ray or the app still answers after `ray down`"
