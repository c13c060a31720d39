"""`msem serve`: deploy the application on Ray Serve and print its endpoints once it answers.

    msem serve                               # local Ray, the embedded tiny preset, 127.0.0.1:8000 / :50051
    msem serve --config configs/tiny.yaml    # a ServeConfig, or a Serve config file (its first app's args)
    msem serve --model DIR --expert-groups 4 --http-port 8080

It joins the Ray cluster at RAY_ADDRESS or starts a local one of its own, deploys the application "msem" (`deploy`:
declaratively, like `serve deploy`, so running it again with other replica bounds rescales only the
deployments whose bounds changed; a Serve config file is deployed as written, so a later `serve deploy` of it
with an edited `deployments:` section restarts only the deployments it names), waits (with a deadline) until
`/health` answers, prints the HTTP, gRPC and experts endpoints, and serves until Ctrl-C or SIGTERM (or returns at once
with `--detach`, leaving the application on the cluster).

Stopping. SIGINT (Ctrl-C) and SIGTERM (`docker stop`, systemd, Kubernetes) stop it the same way, whether it is
serving or still deploying, and it exits with status 0 (a SIGTERM within `ray.init`, its first seconds, meets
Ray's own handlers, which stop the Ray started so far and exit with status 1 or 15):
1. drain: the application is deleted, so Serve routes no new request to it and lets each replica finish the
   requests it has (a stream runs to its end) for up to its `graceful_shutdown_timeout_s`, 20 s by default.
   A second signal skips the rest of the drain; `DRAIN_TIMEOUT_S` bounds it if Serve does not answer. A signal
   sent to the whole process group or cgroup (systemd's stop) reaches the local Ray's own processes too: its GCS
   stops answering, and the drain ends there, whether that happened before it began or during one of its Serve
   calls (a call to a stopped Ray waits for its GCS until Ray's 60 s reconnect timeout ends the process).
2. stop what this command started: a local Ray is shut down with everything in it (Serve too); on a cluster
   at RAY_ADDRESS, Serve is shut down only when no other application is left on it.
3. no process is left behind: any process started under this one (Ray's GCS, raylet, dashboard, its
   DashboardAgent and RuntimeEnvAgent, the replicas' workers) that outlives `ray.shutdown` is terminated
   (the dashboard's module processes, forked by its multiprocessing server, always do for a moment).
   Ray's agents are the raylet's children and watch it: once it is gone they report its death to the GCS and
   exit, but with the GCS gone too that report waits out a 60 s timeout, the agents re-parented to PID 1.
   That is what happens when the driver dies without `ray.shutdown`, e.g. through Ray's C++ crash handler,
   which `ray.init` installs for SIGTERM (it prints a stack dump and aborts); hence this command replaces it
   by its own handler as soon as `ray.init` returns. A SIGKILLed driver can clean up nothing.
"""

import contextlib
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from cluster.config import ExpertGroupsConfig, ServeConfig, load_config, load_serve_file

DRAIN_TIMEOUT_S = 30.0  # bounds the drain; Serve stops a replica 20 s after asking it (graceful_shutdown_timeout_s)
REAP_TIMEOUT_S = 5.0  # how long a leftover process has to exit after SIGTERM, before SIGKILL
RAY_CHECK_PERIOD_S = 0.5  # how often a drain on a local Ray checks that the Ray still answers


class DeployFailedError(RuntimeError):
    """Serve could not deploy the application (its message says why)."""


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="serve a model over HTTP (OpenAI API) and gRPC on Ray Serve")
    serve.add_argument("--config", help="YAML ServeConfig or Serve config file (default: the tiny preset)")
    serve.add_argument("--model", help="preset name or checkpoint directory (overrides the config)")
    serve.add_argument("--expert-groups", type=int, metavar="N",
                       help="expert group deployments (0: experts stay inside the attention shards)")
    serve.add_argument("--host", help="address to bind HTTP and gRPC (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be ready")
    serve.add_argument("--detach", action="store_true", help="return once ready, leaving the app running")
    serve.set_defaults(run=run_serve)


def config_from_args(args) -> ServeConfig:
    config = load_config(args.config) if args.config else ServeConfig()
    updates = {key: value for key, value in (("model", args.model), ("host", args.host),
                                             ("http_port", args.http_port), ("grpc_port", args.grpc_port))
               if value is not None}
    if args.expert_groups is not None:
        groups = config.expert_groups or ExpertGroupsConfig()
        updates["expert_groups"] = groups.model_copy(update={"num_groups": args.expert_groups}) \
            if args.expert_groups > 0 else None
    return ServeConfig.model_validate({**config.model_dump(), **updates})


def run_serve(args) -> int:
    import ray

    from cluster.app import init_local_ray

    config = config_from_args(args)
    address = os.environ.get("RAY_ADDRESS")
    print(f"starting Ray {'at ' + address if address else 'locally'} ...", flush=True)
    keep_running = False
    # Ctrl-C's path even where SIGINT came ignored (a background job of a script), as uvicorn does
    signal.signal(signal.SIGINT, _interrupt)
    try:
        context = ray.init(address=address, namespace="msem", log_to_driver=False) if address else \
            init_local_ray(log_to_driver=False, num_cpus=max(4, os.cpu_count() or 1))
        signal.signal(signal.SIGTERM, _interrupt)  # replaces Ray's crash handler at once (module docstring)
        _deploy_and_announce(config, args, context.dashboard_url)
        if args.detach:
            keep_running = True
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, while serving or still starting
        pass
    finally:
        if not keep_running:  # after an error too: what this command started does not outlive it
            stop(is_local=address is None)
    return 0


def _deploy_and_announce(config: ServeConfig, args, dashboard_url: str | None) -> None:
    from cluster.app import deploy

    print(f"deploying {config.model} ({_layout(config)}) ...", flush=True)
    deploy(config, load_serve_file(args.config) if args.config else None)
    base = f"http://{_display_host(config.host)}:{config.http_port}"
    wait_until_healthy(base, args.timeout)
    print(f"ready: model {config.model_name!r}\n"
          f"  OpenAI HTTP  {base}/v1   (GET /v1/models, POST /v1/completions, /v1/chat/completions)\n"
          f"  health       {base}/health\n"
          f"  experts      {base}/v1/experts" +
          (f"\n  gRPC         {_display_host(config.host)}:{config.grpc_port} (msem.inference.v1.Inference)"
           if config.grpc_port is not None else ""), flush=True)
    print(ray_access(dashboard_url), flush=True)


def stop(is_local: bool) -> None:
    """Drain the application, then stop what `msem serve` started and every process it left (module docstring).

    `is_local`: this process started the Ray it runs on.
    """
    import ray

    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a second signal skips the rest of the drain
        signal.signal(stop_signal, _interrupt)
    try:
        print("shutting down: requests in flight may finish (Ctrl-C again to stop at once) ...", flush=True)
        if ray.is_initialized():  # not when interrupted inside ray.init (Serve's calls would start Ray)
            with _interrupted_when(_gcs_stopped) if is_local else contextlib.nullcontext():
                _drain(DRAIN_TIMEOUT_S, stop_idle_serve=not is_local)
    except RayStopped:
        print("Ray has stopped too (the signal reached its processes): nothing is left to drain", flush=True)
    except KeyboardInterrupt:
        print("stopping at once ...", flush=True)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # nothing may cut the rest short
        signal.signal(stop_signal, signal.SIG_IGN)
    started = _descendants()  # while they still hang under this process: the raylet's children included
    ray.shutdown()  # a local Ray: its GCS, raylet and workers, Serve with them
    _terminate(started, REAP_TIMEOUT_S)


def _gcs_stopped(timeout_s: float = 1.0) -> bool:
    """Whether the GCS of the Ray this process runs on no longer answers. A signal sent to the whole process
    group (or cgroup, as systemd sends it) reaches the Ray that `msem serve` started too: its GCS stops
    answering at once, and every Serve call would then wait a minute for it before failing."""
    import ray

    try:
        ray._private.worker.global_worker.gcs_client.internal_kv_get(b"msem", None, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - Ray's RpcError: timed out waiting for the GCS
        return True
    return False


def _drain(timeout: float, stop_idle_serve: bool) -> None:
    """Delete the application and wait until Serve has stopped its replicas (at most `timeout` seconds); with
    `stop_idle_serve`, then shut Serve down if no other application is left on it.

    All on the main thread, so that a second signal interrupts it and no Ray call can outlive `ray.shutdown`
    (one would start a new Ray: Serve's client calls `ray.init` when Ray is not running).
    """
    from ray import serve

    from cluster.app import APP_NAME

    def applications() -> set[str]:
        return set(serve.status().applications)

    try:
        if APP_NAME in applications():
            serve.delete(APP_NAME, _blocking=False)
            deadline = time.monotonic() + timeout
            while APP_NAME in applications():
                if time.monotonic() > deadline:
                    print(f"the application did not stop within {timeout:g} s; stopping it at once", flush=True)
                    return
                time.sleep(0.2)
        if stop_idle_serve and not applications():
            serve.shutdown()
    except Exception as error:  # noqa: BLE001 - stopping goes on; the user learns why it did not drain
        print(f"could not drain the application ({type(error).__name__}: {error}); stopping it at once",
              flush=True)


class RayStopped(BaseException):
    """The Ray under the application stopped while it was being drained (a BaseException, as the
    KeyboardInterrupt it replaces: the drain's `except Exception` does not swallow it)."""


@contextlib.contextmanager
def _interrupted_when(stopped, period_s: float = RAY_CHECK_PERIOD_S):
    """Run the body (on the main thread) while a thread checks `stopped()` every `period_s`; once it is true,
    the body is interrupted as a second Ctrl-C would interrupt it, and raises `RayStopped`.

    A Serve call blocked on a Ray whose GCS has stopped returns only when Ray's 60 s reconnect timeout ends the
    whole process (exit status 1); Ray checks for signals while it waits, so a SIGINT to the main thread ends
    the call. Checking before each call would not do: the GCS can stop between the check and the call.
    """
    if stopped():
        raise RayStopped
    main, done, lock, seen = threading.main_thread().ident, threading.Event(), threading.Lock(), threading.Event()

    def watch() -> None:
        while not done.wait(period_s):
            if stopped():
                with lock:
                    if not done.is_set():
                        seen.set()
                        signal.pthread_kill(main, signal.SIGINT)
                return

    watcher = threading.Thread(target=watch, name="msem-ray-watch", daemon=True)
    watcher.start()
    try:
        try:
            yield
        finally:
            with lock:  # no signal from the watcher after this
                done.set()
    except KeyboardInterrupt:
        if seen.is_set():
            raise RayStopped from None
        raise
    finally:
        watcher.join()


def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _terminate(processes: list, timeout: float) -> None:
    """Terminate those of `processes` still running after `ray.shutdown`; kill any that outlive `timeout`."""
    import psutil

    alive = [p for p in processes if _is_running(p)]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=timeout)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=timeout)


def _is_running(process) -> bool:
    import psutil

    try:  # is_running() also checks that the pid was not reused; a zombie has exited already
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ray_access(dashboard_url: str | None) -> str:
    """How to reach the Ray side: the dashboard, Ray 2.60's token authentication, the metrics.

    A cluster that `ray.init` starts has token authentication on unless RAY_AUTH_MODE says otherwise (Ray then
    writes a token to ~/.ray/auth_token if there is none, and sets RAY_AUTH_MODE=token in this process only);
    `ray start --head` turns it on when a token already exists. Ray's CLIs send the token only when
    RAY_AUTH_MODE=token is set in their own shell, so `serve status` and `ray list actors` fail without it.
    """
    lines = [f"  Ray dashboard http://{dashboard_url}   (Serve tab: deployments, replicas, logs)" if dashboard_url
             else "  Ray dashboard not running (install ray[default] for it and for the metrics)"]
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or (
            "the RAY_AUTH_TOKEN variable" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token")
        lines += [f"  Ray token    this cluster requires Ray's authentication token (from {token}):",
                  "               export RAY_AUTH_MODE=token   in a shell before `serve status`, `ray list actors`",
                  "               dashboard API: header 'Authorization: Bearer <token>' (ray get-auth-token "
                  "prints it);",
                  "               the dashboard page asks for the token once"]
    lines.append("  metrics      ray_msem_* and ray_vllm_* on Ray's metrics export; for the Grafana panels run "
                 "`msem dashboard install`")
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    """SIGINT, SIGTERM and a second signal while draining: the Ctrl-C path."""
    raise KeyboardInterrupt


def wait_until_healthy(base_url: str, timeout: float) -> None:
    """Poll `/health` until it answers 200; raise at once if Serve reports that the deployment failed."""
    from ray import serve

    from cluster.app import APP_NAME

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise DeployFailedError(f"the application failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the application did not answer {base_url}/health within {timeout:.0f} s")
        time.sleep(0.5)


def _layout(config: ServeConfig) -> str:
    groups = config.expert_groups
    experts = f"{groups.num_groups} expert groups over {groups.transport}" if groups else "experts in the shards"
    return f"{config.attention.replicas.start} attention shard(s), {experts}"


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host
