"""`msem experts`: the expert load of a running server, from its `/v1/experts`, in the terminal or as a PNG.

    msem experts [--url http://127.0.0.1:8000] [--api-key KEY]   # heatmap, balancedness, groups; once
    msem experts --watch [SECONDS]                                # redrawn in place every 2 s, until Ctrl-C
    msem experts --png docs/expert_load.png                       # the heatmap and balancedness as a PNG
    msem experts rebalance                                        # POST /v1/experts/rebalance; print the result

The drawing is `cluster.experts_view`'s; this module fetches, checks what came back, and turns each way a call
can fail (nothing listening, 401 without the API key, 404 for a model without expert groups, an answer that is
not the experts JSON) into an `ExpertsApiError`, printed as `error: <message>` with exit status 2.
While watching, a failed refresh keeps the last view and shows the error under it until the server answers.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cluster.experts_view import describe_rebalance, render, write_png

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_WATCH_SECONDS = 2.0
REBALANCE_TIMEOUT_S = 180.0
USAGE_ERROR = 2
# What is read of each answer; one without these fields is not the JSON this client understands.
EXPERTS_FIELDS = ("table_version", "placement_version", "num_layers", "num_experts", "slots_per_group", "groups",
                  "load", "balancedness", "rebalance")
REBALANCE_FIELDS = ("placement_version", "balancedness_before", "balancedness_after", "moved", "status")


class ExpertsApiError(Exception):
    """The server could not be reached, refused the call, or answered something else; the message says what to do."""


class ExpertsApi:
    """`GET /v1/experts` and `POST /v1/experts/rebalance` of one server, as dicts."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 10.0):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def experts(self) -> dict:
        return self._call("GET", "/v1/experts", EXPERTS_FIELDS, self.timeout)

    def rebalance(self) -> dict:
        # The server answers once the group replicas hold the new placement (or after its own deadline).
        return self._call("POST", "/v1/experts/rebalance", REBALANCE_FIELDS, REBALANCE_TIMEOUT_S)

    def _call(self, method: str, path: str, fields: tuple[str, ...], timeout: float) -> dict:
        url = self.url + path
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                         headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise self._refused(error, url) from None
        except (urllib.error.URLError, OSError) as error:  # refused, unknown host, timed out
            reason = getattr(error, "reason", error)
            raise ExpertsApiError(f"cannot reach the server at {self.url} ({reason}): start one with `msem serve`, "
                                  "or pass --url") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ExpertsApiError(f"{method} {url} answered something other than a JSON object: {body[:80]!r}")
        missing = [name for name in fields if name not in answer]
        if missing:
            raise ExpertsApiError(f"{method} {url} answered without {', '.join(missing)}: is it an msem server of "
                                  "this version?")
        return answer

    def _refused(self, error: urllib.error.HTTPError, url: str) -> ExpertsApiError:
        message = _server_message(error)
        if error.code == 401:
            hint = ("the API key was refused" if self.api_key else
                    "it needs an API key: pass --api-key KEY or set MSEM_API_KEY")
            return ExpertsApiError(f"{self.url} answered 401 ({message}): {hint}")
        if error.code == 404:
            return ExpertsApiError(f"{url} answered 404: {message}; serve the model with expert groups "
                                   "(`msem serve --expert-groups N`)")
        return ExpertsApiError(f"{url} answered {error.code}: {message}")


def _server_message(error: urllib.error.HTTPError) -> str:
    """The message of the server's OpenAI error JSON, else the HTTP reason."""
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(error.reason)


def watch(fetch: Callable[[], dict], console: Console, interval: float, url: str = "", *,
          sleep: Callable[[float], None] = time.sleep, max_refreshes: int | None = None) -> int:
    """Draw `fetch()` and redraw it in place every `interval` seconds until Ctrl-C (or `max_refreshes`)."""
    refreshes = 0
    try:
        view = render(fetch(), url)
        with Live(view, console=console, auto_refresh=False) as live:
            while max_refreshes is None or refreshes < max_refreshes:
                sleep(interval)
                refreshes += 1
                try:
                    view = render(fetch(), url)
                    live.update(view, refresh=True)
                except ExpertsApiError as error:
                    live.update(Group(view, Text(f"refresh failed: {error}", style="red")), refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


def add_experts_command(commands) -> None:
    experts = commands.add_parser(
        "experts", help="show a running server's expert load and placement; rebalance it",
        description="Without ACTION: print a running server's expert load (a layer x expert heatmap), "
                    "balancedness per layer and expert groups, once or redrawn with --watch.")
    _add_server_options(experts, DEFAULT_URL, os.environ.get("MSEM_API_KEY"))
    output = experts.add_mutually_exclusive_group()
    output.add_argument("--watch", nargs="?", type=_positive_seconds, const=DEFAULT_WATCH_SECONDS, metavar="SECONDS",
                        help=f"redraw every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C")
    output.add_argument("--png", metavar="FILE", help="also write the heatmap and balancedness to a PNG file")
    experts.set_defaults(run=_run_experts)
    actions = experts.add_subparsers(dest="action", metavar="ACTION")
    rebalance = actions.add_parser("rebalance", help="rebalance the placement now from the load window; "
                                   "print the result")
    # Given after `rebalance` they override; absent, the values given before it (or their defaults) stand.
    _add_server_options(rebalance, argparse.SUPPRESS, argparse.SUPPRESS)
    rebalance.set_defaults(run=_run_rebalance)


def _add_server_options(parser: argparse.ArgumentParser, url: str, api_key: str | None) -> None:
    parser.add_argument("--url", default=url, help=f"the server's HTTP address (default: {DEFAULT_URL})")
    parser.add_argument("--api-key", default=api_key, metavar="KEY",
                        help="API key, when the server has keys (default: $MSEM_API_KEY)")


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return seconds


def _run_experts(args) -> int:
    api, console = ExpertsApi(args.url, args.api_key), Console()
    try:
        if args.watch is not None:
            return watch(api.experts, console, args.watch, api.url)
        info = api.experts()
        console.print(render(info, api.url))
        if args.png:
            write_png(info, args.png, api.url)
            console.print(f"wrote {args.png}", soft_wrap=True, markup=False)  # a path to copy: never broken or styled
        return 0
    except ExpertsApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _run_rebalance(args) -> int:
    try:
        print(describe_rebalance(ExpertsApi(args.url, args.api_key).rebalance()))
        return 0
    except ExpertsApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
