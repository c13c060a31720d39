"""`msem serve`: deploy the application on Ray Serve and print its endpoints once it answers.

    msem serve                               # local Ray, the embedded tiny preset, 127.0.0.1:8000 / :50051
    msem serve --config configs/tiny.yaml    # a ServeConfig, or a Serve config file (its first app's args)
    msem serve --model DIR --expert-groups 4 --http-port 8080

It joins the Ray cluster at RAY_ADDRESS or starts a local one, deploys the application "msem" (`deploy`:
declaratively, like `serve deploy`, so running it again with other replica bounds rescales only the
deployments whose bounds changed; a Serve config file is deployed as written, so a later `serve deploy` of it
with an edited `deployments:` section restarts only the deployments it names), waits (with a deadline) until
`/health` answers, prints the HTTP, gRPC and experts endpoints, and serves until Ctrl-C or SIGTERM (or returns at once
with `--detach`, leaving the application on the cluster).
"""

import os
import signal
import time
import urllib.error
import urllib.request

from cluster.config import ExpertGroupsConfig, ServeConfig, load_config, load_serve_file


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
    from ray import serve

    from cluster.app import deploy

    config = config_from_args(args)
    address = os.environ.get("RAY_ADDRESS")
    print(f"starting Ray {'at ' + address if address else 'locally'} ...", flush=True)
    context = ray.init(address=address, namespace="msem", log_to_driver=False,
                       **({} if address else {"num_cpus": max(4, os.cpu_count() or 1)}))
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
    print(ray_access(context.dashboard_url), flush=True)
    if args.detach:
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop shuts down like Ctrl-C (Ray's own
    try:                                        # handler would end the process and leave Ray's agents behind)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the shutdown short
            signal.signal(stop, signal.SIG_IGN)
        print("shutting down ...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


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
