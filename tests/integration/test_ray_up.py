"""`ray up cluster.local.yaml` for real on two "machines": over SSH, Ray up on both, the app deployed with a role on
each and answering, `ray down`.

Each machine is a private sshd on this one, with a temporary host key and client key; nothing of the machine's
ssh setup is used:
- the head at 127.0.0.1 on a free port. Ray's local provider has no SSH port setting, so `ray up` reaches it
  through `auth.ssh_proxy_command`.
- the worker at 127.0.0.2 (also loopback) on port 22: the head's autoscaler sets workers up over SSH, and Ray
  drops `ssh_proxy_command` from the config it gives the head. The test skips when that port is taken.
- each in its own PID namespace: `ray stop` (run by the config and by `ray down`) ends every Ray process it can
  see, and must see neither the other "machine" nor other Ray instances on this one. Killing an sshd ends
  everything started over SSH to it.
- each with its own HOME and TMPDIR (sshd `SetEnv`), so the synced checkouts and Ray's sessions stay apart and
  temporary. ssh expands `~` from the user's passwd entry, not HOME, so the head runs ssh through a shim that
  expands the identity file's `~` from HOME (as on a machine where they agree): the head's autoscaler finds the
  key `ray up` gave it.
The config is cluster.local.yaml with these changes: this venv (which has msem) instead of the installing setup
commands; free ports instead of its fixed ones and Ray's defaults (GCS 6379, dashboard 8265, object and node
managers, metrics, workers, client server 10001, agent 52365), per machine; the worker's node address (both share
one network stack); the deployed Serve config copied to bind loopback on free HTTP and gRPC ports, its shard and
groups asking for the on-prem marker resources; and its `serve deploy` run once the worker is up (`smoke_config`).
Each machine takes its role as README's on-prem GPU variant says, `RAY_OVERRIDE_RESOURCES` in its ~/.bashrc: the
attention shard's marker on the head, the expert groups' on the worker.
Asserted: both nodes up with their roles, the sources synced to each and not the venv, the groups on the worker
and every other replica on the head, a completion (its layers cross to the worker's groups), nothing answering on
the head after `ray down`, and the worker's Ray gone by itself soon after. Not covered: distinct network stacks
(every server here is reachable at 127.0.0.1).
"""

import contextlib
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
HEAD_ADDRESS, WORKER_ADDRESS = "127.0.0.1", "127.0.0.2"  # both on loopback: one network stack
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

SSH_SHIM = """\
#!/bin/sh
# ssh, with a ~/ in the identity file's path (-i) taken from HOME
previous=
for arg; do
    shift
    if [ "$previous" = -i ]; then
        case $arg in "~/"*) arg="$HOME/${{arg#"~/"}}";; esac
    fi
    set -- "$@" "$arg"
    previous=$arg
done
exec {ssh} "$@"
"""


@dataclass(frozen=True)
class SSHNode:
    address: str
    home: Path
    tmp: Path  # the node's TMPDIR; Ray's sessions go to tmp/ray


@dataclass(frozen=True)
class SSHCluster:
    head: SSHNode
    worker: SSHNode
    key: Path  # the client key both authorize
    proxy_command: str  # reaches the head's sshd


@dataclass(frozen=True)
class NodePorts:
    """What each Ray node listens on, beyond random ports."""
    object_manager: int
    node_manager: int
    metrics: int
    dashboard_agent: int


@dataclass(frozen=True)
class Ports:
    gcs: int
    dashboard: int
    client_server: int
    http: int
    grpc: int
    head: NodePorts
    worker: NodePorts

    @classmethod
    def free(cls) -> "Ports":
        ports = free_ports(13)
        return cls(*ports[:5], NodePorts(*ports[5:9]), NodePorts(*ports[9:]))


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


def accepts(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def sshd(namespace: list[str], binary: str, root: Path, address: str, port: int, authorized: Path):
    """An sshd on `address`:`port` in a PID namespace of its own, with HOME and TMPDIR below `root`."""
    node = SSHNode(address, root / "home", root / "tmp")
    node.home.mkdir(parents=True)
    node.tmp.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "host_key"], check=True)
    (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress {address}
HostKey {root}/host_key
AuthorizedKeysFile {authorized}
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv HOME={node.home} TMPDIR={node.tmp} RAY_USAGE_STATS_ENABLED=0
""")
    log = root / "sshd.log"
    with open(log, "w") as out:
        # sshd is PID 1 of its namespace: when unshare dies, sshd dies, and with it every process in it.
        process = subprocess.Popen([*namespace, binary, "-D", "-e", "-f", root / "sshd_config"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_for(lambda: process.poll() is not None or accepts(address, port), timeout=15, interval=0.1):
            pytest.fail(f"sshd did not listen on {address}:{port}:\n{log.read_text()}")
        if process.poll() is not None:
            pytest.fail(f"sshd exited with {process.returncode}:\n{log.read_text()}")
        yield node
    finally:
        process.kill()  # SIGKILL: unshare ignores SIGTERM while it waits for sshd
        process.wait()


@pytest.fixture
def ssh_cluster():
    namespace = pid_namespace()
    binary = ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="msem-rayup-"))  # short: Ray's socket paths live below it
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "client_key"], check=True)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    (root / "relay.py").write_text(RELAY)
    (root / "bin").mkdir()
    (root / "bin" / "ssh").write_text(SSH_SHIM.format(ssh=shlex.quote(shutil.which("ssh"))))
    (root / "bin" / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    [port] = free_ports(1)
    proxy = shlex.join([sys.executable, str(root / "relay.py"), HEAD_ADDRESS, str(port)])
    if accepts(WORKER_ADDRESS, 22):
        pytest.skip(f"{WORKER_ADDRESS}:22 is taken, and the head's autoscaler reaches the worker on port 22 only")
    try:
        with (sshd(namespace, binary, root / "head", HEAD_ADDRESS, port, root / "authorized_keys") as head,
              sshd(namespace, binary, root / "worker", WORKER_ADDRESS, 22, root / "authorized_keys") as worker):
            (head.home / ".bashrc").write_text(f"export PATH={shlex.quote(str(root / 'bin'))}:$PATH\n")
            yield SSHCluster(head, worker, root / "client_key", proxy)
    finally:
        shutil.rmtree(root, ignore_errors=True)


WORKER_RECONNECT_S = 10

# Each machine's role (README, the on-prem GPU variant): the shard on the head, two group replicas on the worker.
ROLES = {"head": {"msem_attention": 1}, "worker": {"msem_experts": 2}}


def serve_config_on(ports: Ports, path: Path) -> dict:
    """A copy of a configs/ file whose HTTP and gRPC servers listen on loopback, on the given ports, and whose
    shard and expert groups run where their on-prem marker resources are."""
    config = yaml.safe_load(path.read_text())
    config["http_options"].update(host="127.0.0.1", port=ports.http)
    args = config["applications"][0]["args"]
    args.update(host="127.0.0.1", http_port=ports.http, grpc_port=ports.grpc)
    args["attention"] = {**args.get("attention", {}), "resources": {"msem_attention": 1}}
    args["expert_groups"]["resources"] = {"msem_experts": 1}
    return config


def start_ray_command(command: str, fixed: dict[str, str]) -> str:
    """A `ray start` command of cluster.local.yaml with its fixed ports replaced (0: workers take random ports)."""
    fixed |= {"--min-worker-port=10002": "--min-worker-port=0", "--max-worker-port=10999": "--max-worker-port=0"}
    for port, free in fixed.items():
        assert port in command, command
        command = command.replace(port, free)
    return command


def node_ports(ports: NodePorts) -> dict[str, str]:
    return {"--object-manager-port=8076": f"--object-manager-port={ports.object_manager}",
            "--node-manager-port=8077": f"--node-manager-port={ports.node_manager}",
            "--metrics-export-port=8080": f"--metrics-export-port={ports.metrics}"}


def smoke_config(cluster: SSHCluster, ports: Ports, cluster_name: str) -> tuple[dict, str]:
    """cluster.local.yaml aimed at the SSH nodes, on this venv and free ports (see the module docstring), and its
    `serve deploy` command, taken out of the head's start commands: the test runs it once the worker is up, since
    here the two machines share this one's cores (the worker's Ray agent, starting beside the head's replicas,
    can miss Ray's 30 s start deadline)."""
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = cluster_name
    config["provider"].update(head_ip=cluster.head.address, worker_ips=[cluster.worker.address])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(cluster.key),
                      "ssh_proxy_command": cluster.proxy_command}
    # The real setup ends with a venv that has msem, first on PATH; this venv has msem already.
    config["setup_commands"] = [f"echo 'export PATH=\"{VENV_BIN}:$PATH\"' >> ~/.bashrc"]
    head, deploy = [], None
    for command in config["head_start_ray_commands"]:
        if "ray start --head" in command:
            command = start_ray_command(command, {"--port=6379": f"--port={ports.gcs}",
                                                  "--dashboard-port=8265": f"--dashboard-port={ports.dashboard}",
                                                  **node_ports(ports.head)})
            command += f" --ray-client-server-port={ports.client_server}"
            command += f" --dashboard-agent-listen-port={ports.head.dashboard_agent} --num-cpus=4"
        elif command.startswith("serve deploy ~/msem/"):
            deployed = ROOT / shlex.split(command)[2].removeprefix("~/msem/")
            copy = cluster.head.tmp / deployed.name
            copy.write_text(yaml.safe_dump(serve_config_on(ports, deployed)))
            deploy = f"serve deploy -a http://127.0.0.1:{ports.dashboard} {copy}"
            continue
        head.append(command)
    worker = []
    for command in config["worker_start_ray_commands"]:
        if "ray start --address" in command:
            command = start_ray_command(command, {"--address=$RAY_HEAD_IP:6379": f"--address=$RAY_HEAD_IP:{ports.gcs}",
                                                  **node_ports(ports.worker)})
            # How long the worker's Ray outlives a lost head (60 s by default): shortened to keep the test short.
            command = f"RAY_gcs_rpc_server_reconnect_timeout_s={WORKER_RECONNECT_S} {command}"
            command += f" --node-ip-address={cluster.worker.address}"
            command += f" --dashboard-agent-listen-port={ports.worker.dashboard_agent} --num-cpus=2"
        worker.append(command)
    config["head_start_ray_commands"], config["worker_start_ray_commands"] = head, worker
    assert deploy, "cluster.local.yaml deploys no configs/ file"
    return config, deploy


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


def autoscaler_log(head: SSHNode, lines: int = 60) -> str:
    """The end of the head's autoscaler log, where it reports setting up the workers over SSH."""
    logs = sorted((head.tmp / "ray").glob("session_*/logs/monitor.*"))
    return "\n".join(f"{path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                     for path in logs if path.suffix in (".log", ".out", ".err"))


def alive_nodes(dashboard_port: int) -> list[str]:
    """The addresses of the cluster's live nodes, from Ray's state API."""
    nodes = ((get_json(f"http://127.0.0.1:{dashboard_port}/api/v0/nodes") or {}).get("data") or {}).get("result")
    return [n["node_ip"] for n in (nodes or {}).get("result", []) if n["state"] == "ALIVE"]


def replica_addresses(app: dict) -> dict[str, set[str]]:
    """Deployment -> the node addresses its running replicas are on."""
    return {name: {replica["node_ip"] for replica in deployment["replicas"] if replica["state"] == "RUNNING"}
            for name, deployment in app.get("deployments", {}).items()}


@pytest.mark.timeout(420)
def test_ray_up_on_two_machines_serves_the_app_and_ray_down_stops_it(ssh_cluster, tmp_path):
    head, worker = ssh_cluster.head, ssh_cluster.worker
    ports = Ports.free()
    cluster_name = f"msem-smoke-{os.getpid()}"  # it also names ssh's control socket: concurrent runs stay apart
    config_file = tmp_path / "cluster.yaml"
    config, deploy = smoke_config(ssh_cluster, ports, cluster_name)
    config_file.write_text(yaml.safe_dump(config))
    # Each machine's role, as the README has users give a machine its marker resources.
    for node, role in ((head, ROLES["head"]), (worker, ROLES["worker"])):
        with open(node.home / ".bashrc", "a") as bashrc:
            bashrc.write(f"export RAY_OVERRIDE_RESOURCES='{json.dumps(role)}'\n")
    # The launcher's cluster state, lock and config cache go to TMPDIR (the head's: as when run on the head).
    env = {**os.environ, "TMPDIR": str(head.tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        run_ray("up", "-y", "--no-config-cache", str(config_file), env=env, timeout=150)
        version = get_json(f"http://127.0.0.1:{ports.dashboard}/api/version")
        assert version and version["ray_version"] == ray.__version__
        # The head's autoscaler sets the worker up over SSH after `ray up` returns.
        joined = wait_for(lambda: len(alive_nodes(ports.dashboard)) == 2, timeout=150, interval=2)
        assert joined, f"the worker did not join: {alive_nodes(ports.dashboard)}\n{autoscaler_log(head)}"
        run_ray("exec", "--no-config-cache", str(config_file), deploy, env=env, timeout=60)
        settled = ("RUNNING", "DEPLOY_FAILED")
        wait_for(lambda: msem_app(ports.dashboard).get("status") in settled, timeout=180, interval=2)
        app = msem_app(ports.dashboard)
        assert app.get("status") == "RUNNING", "\n".join([app.get("message", "")] + [
            f"{name}: {d['status']} {d['message']}" for name, d in app.get("deployments", {}).items()]
            + ["the head's autoscaler (it starts the worker):", autoscaler_log(head)])
        status = run_ray("exec", "--no-config-cache", str(config_file),
                         f"ray status --address=127.0.0.1:{ports.gcs}", env=env, timeout=60)
        assert "6.0 CPU" in status and "2.0 msem_experts" in status and "1.0 msem_attention" in status, status
        for node in (head, worker):
            synced = node.home / "msem"
            assert (synced / "cluster" / "app.py").is_file() and not (synced / ".venv").exists(), node

        placed = replica_addresses(app)
        groups = {name for name in placed if name.startswith("ExpertGroup")}
        assert groups and all(placed[name] == {worker.address} for name in groups), placed
        on_head = set().union(*(placed[name] for name in placed.keys() - groups))  # the head's address, as Ray saw it
        assert len(on_head) == 1 and worker.address not in on_head, placed
        completion = get_json(f"http://127.0.0.1:{ports.http}/v1/completions", timeout=60,
                              body={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert completion and completion["usage"]["completion_tokens"] == 4, completion
    finally:
        run_ray("down", "-y", str(config_file), env=env, timeout=90, check=False)  # may follow a failed `up`
        remove_ssh_control_dir(cluster_name)
    stopped = wait_for(lambda: not any(accepts("127.0.0.1", port) for port in (ports.dashboard, ports.http)),
                       timeout=30)
    assert stopped, "Ray or the app still answers after `ray down`"
    # `ray down` stops Ray on the head only (the local provider has no worker to terminate); the worker's Ray
    # stops by itself once it has lost the head for its GCS reconnect timeout.
    worker_stopped = wait_for(lambda: not accepts(worker.address, ports.worker.node_manager),
                              timeout=WORKER_RECONNECT_S + 60)
    assert worker_stopped, f"the worker's Ray still runs {WORKER_RECONNECT_S + 60} s after `ray down`"
