"""`msem dashboard install`: add msem's Grafana dashboard to the ones the Ray dashboard's Grafana provisions.

    msem dashboard install                          # the latest Ray session on this machine
    msem dashboard install --session-dir /tmp/ray/session_2026-01-01_00-00-00_000000_1

When its dashboard starts, Ray writes a Grafana setup into the session folder, `<session>/metrics/grafana/`:
`grafana.ini`, a Prometheus datasource, and a dashboard provider whose folder
(`provisioning/dashboards/default.yml`, key `path`) holds Ray's own dashboards. That folder is
`<session>/metrics/grafana/dashboards` unless `RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR` was set when Ray
started. The command copies cluster/dashboards/msem.json there, next to Ray's, so a Grafana started with that
`grafana.ini` shows it in the "Ray" folder. Ray rewrites `metrics/grafana` each time its dashboard starts: run
the command again after a restart.
"""

import importlib.resources
import os
import shutil
import sys
from pathlib import Path

import yaml

DASHBOARD_FILE = "msem_grafana_dashboard.json"  # named like Ray's own (default_grafana_dashboard.json, ...)
OUTPUT_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
USAGE_ERROR = 2


class NoRaySessionError(RuntimeError):
    """There is no Ray session (or no Grafana setup in it) to install into."""


def add_dashboard_command(commands) -> None:
    dashboard = commands.add_parser("dashboard", help="Grafana dashboard of expert load and serving metrics")
    actions = dashboard.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="add msem's dashboard to the Grafana of the Ray dashboard")
    install.add_argument("--session-dir", type=Path, metavar="DIR",
                         help="Ray session folder (default: session_latest under Ray's temp dir, /tmp/ray)")
    install.set_defaults(run=_run_install)


def _run_install(args) -> int:
    try:
        session, target = install(args.session_dir)
    except NoRaySessionError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"installed the msem dashboard: {target}")
    print(next_steps(session))
    return 0


def install(session_dir: Path | None = None) -> tuple[Path | None, Path]:
    """Copy the dashboard JSON into the Grafana dashboard folder -> (session folder or None, file written)."""
    session = session_dir if session_dir is not None else default_session_dir()
    folder = os.environ.get(OUTPUT_DIR_ENV)
    if folder is None:
        folder = dashboard_folder(session)
    elif not session.is_dir():
        session = None  # the folder is known without a session; the steps then cannot name its grafana.ini
    target = Path(folder) / DASHBOARD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with importlib.resources.as_file(importlib.resources.files("cluster") / "dashboards" / "msem.json") as source:
        shutil.copyfile(source, target)
    return session, target


def default_session_dir() -> Path:
    """The latest session of the Ray instances on this machine (Ray's temp dir honours RAY_TMPDIR)."""
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir()) / "session_latest"


def dashboard_folder(session: Path) -> Path:
    """Where the session's Grafana loads dashboards from (read from its provisioning file)."""
    if not session.is_dir():
        raise NoRaySessionError(f"no Ray session at {session}: start Ray first (msem serve, or ray start --head), "
                                "or name the session folder with --session-dir")
    grafana = session / "metrics" / "grafana"
    provider = grafana / "provisioning" / "dashboards" / "default.yml"
    if not provider.is_file():
        raise NoRaySessionError(f"the Ray session {session} has no Grafana setup ({provider} is missing): Ray "
                                "writes it when its dashboard starts, which needs ray[default] and is off with "
                                "--include-dashboard=false")
    for entry in (yaml.safe_load(provider.read_text()) or {}).get("providers", []):
        path = (entry.get("options") or {}).get("path")
        if path:
            return Path(path)
    return grafana / "dashboards"


def next_steps(session: Path | None) -> str:
    ini = session / "metrics" / "grafana" / "grafana.ini" if session is not None else \
        "<session>/metrics/grafana/grafana.ini"
    return f"""next, as Ray's metrics docs describe (skip what already runs):
  1. Prometheus, scraping every Ray node's metrics export (service discovery file written by Ray):
       ray metrics launch-prometheus
  2. Grafana, with the configuration Ray generated for this session (from Grafana's install folder):
       grafana-server --homepath <grafana install dir> --config {ini} web
  3. open the Ray dashboard (http://127.0.0.1:8265) -> Metrics, or Grafana (http://127.0.0.1:3000) ->
     Dashboards -> Ray -> "msem: expert load and serving".
     The Ray dashboard embeds Grafana from RAY_GRAFANA_HOST (default http://localhost:3000) and reads Prometheus
     at RAY_PROMETHEUS_HOST (default http://localhost:9090), both as set when Ray started.
  With token authentication on (Ray 2.60's default for a cluster ray.init starts), the Ray dashboard asks for
  the token once: paste the output of `ray get-auth-token`."""
