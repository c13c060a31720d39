"""`msem experts`: the view of a hand-made `/v1/experts` answer, its PNG, and the command against a stub server."""

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from cluster.cli import build_parser, main
from cluster.experts_command import ExpertsApi, ExpertsApiError, watch
from cluster.experts_view import (copy_counts, describe_rebalance, heat_colour, layer_runs, layer_shares, render,
                                  write_png)
from experts.placement import make_placement
from router_service.service import RouterService

# 3 layers, 4 experts, 2 groups of 3 slots. Layers 0 and 1 keep the config's placement (group 0: experts 0 1,
# group 1: experts 2 3, one empty slot each); a rebalance gave layer 2 a copy of the hot expert 0 in group 1.
LAYER_LOAD = [[40, 20, 20, 20], [25, 25, 25, 25], [70, 10, 10, 10]]
LAST_REBALANCE_AT = 1_700_000_000.0


def sample_info(window_load=LAYER_LOAD) -> dict:
    totals = [[tokens * 10 for tokens in row] for row in LAYER_LOAD]
    return {
        "table_version": 7, "placement_version": 1, "num_layers": 3, "num_experts": 4, "slots_per_group": 3,
        "groups": [
            {"group": 0, "experts": [0, 1], "slots": [[0, 1], [0, 1], [0, 1]],
             "replicas": [{"replica_id": "g0-a", "endpoints": {"grpc": "127.0.0.1:1"}, "tokens_served": 1200,
                           "last_heartbeat_s": 0.25},
                          {"replica_id": "g0-b", "endpoints": {"grpc": "127.0.0.1:2"}, "tokens_served": 300,
                           "last_heartbeat_s": 9.5, "alive": False}]},
            {"group": 1, "experts": [0, 2, 3], "slots": [[2, 3], [2, 3], [2, 3, 0]],
             "replicas": [{"replica_id": "g1-a", "endpoints": {"grpc": "127.0.0.1:3"}, "tokens_served": 1500,
                           "last_heartbeat_s": None}]}],
        "load": {"seconds": 120.0, "per_layer_expert": totals, "per_expert": [sum(c) for c in zip(*totals)],
                 "per_group": [1650.0, 1350.0], "window": {"seconds": 30.0, "per_layer_expert": window_load}},
        "balancedness": {"per_layer": [0.83, 1.0, 0.95], "mean": 0.93},
        "placement": {"num_experts": 4, "num_layers": 3, "version": 1},
        "rebalance": {"enabled": True, "interval_s": 60.0, "window_s": 30.0, "min_gain": 0.05, "pending_version": 2,
                      "last": {"placement_version": 1, "balancedness_before": 0.59, "balancedness_after": 0.95,
                               "moved": 1, "status": "applied", "reason": "periodic", "at": LAST_REBALANCE_AT}},
    }


def text_of(renderable, width: int = 140) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def row_starting(text: str, first_cell: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first_cell])


def test_shares_copies_and_runs():
    assert layer_shares([[1, 3], [0, 0]]) == [[25.0, 75.0], [0.0, 0.0]]
    assert copy_counts(sample_info()) == [[1, 1, 1, 1], [1, 1, 1, 1], [2, 1, 1, 1]]
    assert layer_runs([[0, 1], [0, 1], [2, 3, 0], [0, 1]]) == [(0, 1), (2, 2), (3, 3)]
    assert heat_colour(0.0, 4) == (59, 76, 192) and heat_colour(25.0, 4) == (221, 221, 221)
    assert heat_colour(50.0, 4) == heat_colour(90.0, 4) == (180, 4, 38)


def test_rebalance_line():
    result = {"placement_version": 3, "balancedness_before": 0.5, "balancedness_after": 0.91, "moved": 4,
              "status": "pending", "message": "a rebalance is already under way"}
    assert describe_rebalance(result) == ("placement v3: balancedness 0.50 -> 0.91, 4 expert copies moved, pending: "
                                          "a rebalance is already under way")


def test_view_shows_window_shares_balancedness_and_slots():
    text = text_of(render(sample_info(), "http://h:1"))
    assert "the last 30 s" in text and "placement v1" in text and "routing table v7" in text
    assert row_starting(text, "layer") == ["layer", "e0", "e1", "e2", "e3", "balancedness"]
    assert row_starting(text, "0") == ["0", "40.0", "20.0", "20.0", "20.0", "0.83"]
    assert row_starting(text, "2") == ["2", "70.0+", "10.0", "10.0", "10.0", "0.95"]  # expert 0 has two copies
    assert row_starting(text, "mean") == ["mean", "0.93"]
    assert "every 60 s over the last 30 s" in text
    at = time.strftime("%H:%M:%S", time.localtime(LAST_REBALANCE_AT))
    assert ("last rebalance: placement v1: balancedness 0.59 -> 0.95, 1 expert copies moved, applied (periodic at "
            f"{at})") in text
    assert "placement v2 pending" in text
    lines = text.splitlines()
    group0 = next(i for i, line in enumerate(lines) if line.split()[:3] == ["0", "g0-a", "1,200"])
    assert lines[group0].split()[3:] == ["beat", "0.2", "s", "ago", "1,650", "L0-2", "0", "1", "·"]
    assert lines[group0 + 1].split() == ["g0-b", "300", "beat", "9.5", "s", "ago", "dead"]
    group1 = next(i for i, line in enumerate(lines) if line.split()[:3] == ["1", "g1-a", "1,500"])
    assert lines[group1].split()[3:] == ["1,350", "L0-1", "2", "3", "·"]
    assert lines[group1 + 1].split() == ["L2", "2", "3", "0+"]


def test_view_reads_what_the_router_describes():
    service = RouterService(make_placement(4, 2, 2, "linear", redundant_slots=1))
    service.record_load([[90, 5, 3, 2], [10, 10, 40, 40]])
    assert service.rebalance()["status"] == "applied"  # no replicas to wait for
    text = text_of(render(json.loads(json.dumps(service.describe()))))
    assert "placement v1" in text and "+" in text  # the hot expert got a copy


def test_view_of_a_covered_group():
    from router_service.transport import ReplicaInfo

    service = RouterService(make_placement(4, 2, 2, "linear"), is_alive=lambda info: info.group_id == 0)
    for g in (0, 1):
        service.register(ReplicaInfo(f"g{g}", g))
    service.report_failure("g1")  # its last replica: group 0 covers it once it holds experts 2 and 3
    service.heartbeat(ReplicaInfo("g0", 0), 0, 1)
    text = text_of(render(json.loads(json.dumps(service.describe()))))
    assert "groups [1] lost every replica" in text and "placement v0's slots return" in text
    assert any(line.split()[:2] == ["1", "none"] and "· · · ·" in line for line in text.splitlines())  # nor slots


def test_idle_window_falls_back_to_totals():
    text = text_of(render(sample_info(window_load=[[0] * 4] * 3)))
    assert "since start (120 s; nothing routed in the last 30 s)" in text
    assert row_starting(text, "2") == ["2", "70.0+", "10.0", "10.0", "10.0", "-"]  # no window: no balancedness
    idle = sample_info(window_load=[[0] * 4] * 3)
    idle["load"]["per_layer_expert"] = [[0] * 4] * 3
    text = text_of(render(idle))
    assert "nothing routed yet (120 s since start)" in text
    assert row_starting(text, "0") == ["0", "0.0", "0.0", "0.0", "0.0", "-"]


def test_png_is_written(tmp_path):
    path = tmp_path / "load.png"
    write_png(sample_info(), path, "http://h:1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_watch_redraws_until_the_limit_or_ctrl_c():
    answers = [sample_info(), sample_info(window_load=[[10, 30, 30, 30]] * 3)]
    slept: list[float] = []
    console = Console(record=True, width=140, file=io.StringIO())
    assert watch(lambda: answers.pop(0), console, 5.0, sleep=slept.append, max_refreshes=1) == 0
    assert slept == [5.0] and not answers
    assert row_starting(console.export_text(), "0") == ["0", "10.0", "30.0", "30.0", "30.0", "0.83"]

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    console = Console(record=True, width=140, file=io.StringIO())
    assert watch(sample_info, console, 5.0, sleep=interrupted) == 0
    assert "40.0" in console.export_text()


def test_watch_keeps_the_view_when_a_refresh_fails():
    def fetch():
        if calls.append(1) or len(calls) > 1:
            raise ExpertsApiError("cannot reach the server")
        return sample_info()

    calls: list[int] = []
    console = Console(record=True, width=140, file=io.StringIO())
    assert watch(fetch, console, 1.0, sleep=lambda s: None, max_refreshes=2) == 0
    text = console.export_text()
    assert "40.0" in text and "refresh failed: cannot reach the server" in text


def test_parser():
    parse = build_parser().parse_args
    assert parse(["experts", "--watch"]).watch == 2.0
    assert parse(["experts", "--watch", "0.5"]).watch == 0.5
    for argv in (["experts", "--url", "http://h:9", "rebalance"], ["experts", "rebalance", "--url", "http://h:9"]):
        args = parse(argv)
        assert args.action == "rebalance" and args.url == "http://h:9"
    assert parse(["experts", "rebalance"]).url == "http://127.0.0.1:8000"
    with pytest.raises(SystemExit):
        parse(["experts", "--watch", "--png", "x.png"])
    with pytest.raises(SystemExit):
        parse(["experts", "--watch", "0"])


# ---- the command against a stub server ----

class StubHandler(BaseHTTPRequestHandler):
    answers: dict  # (method, path) -> (status, body); set per server

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def _answer(self, method: str) -> None:
        self.server.seen.append((method, self.path, self.headers.get("Authorization")))
        status, body = self.server.answers.get((method, self.path), (404, {"error": {"message": "no route"}}))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.answers, server.seen = {}, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_experts_command(stub, tmp_path, capsys):
    stub.answers[("GET", "/v1/experts")] = (200, sample_info())
    png = tmp_path / ("docs" * 20) / "load.png"  # longer than a line: still printed whole, to be copied
    png.parent.mkdir()
    assert main(["experts", "--url", stub.url, "--api-key", "sk-1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "balancedness" in out and f"wrote {png}\n" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stub.seen == [("GET", "/v1/experts", "Bearer sk-1")]


def test_rebalance_command(stub, capsys):
    stub.answers[("POST", "/v1/experts/rebalance")] = (200, {
        "placement_version": 2, "balancedness_before": 0.61, "balancedness_after": 0.97, "moved": 3,
        "status": "applied"})
    assert main(["experts", "rebalance", "--url", stub.url]) == 0
    assert capsys.readouterr().out == "placement v2: balancedness 0.61 -> 0.97, 3 expert copies moved, applied\n"
    assert stub.seen == [("POST", "/v1/experts/rebalance", None)]


@pytest.mark.parametrize("status, body, expected", [
    (401, {"error": {"message": "missing or wrong API key"}}, "pass --api-key KEY or set MSEM_API_KEY"),
    (404, {"error": {"message": "'tiny' has no expert groups"}}, "'tiny' has no expert groups"),
    (200, b"<html>not json</html>", "answered something other than a JSON object"),
    (200, {"groups": []}, "answered without table_version"),
    (500, {"error": {"message": "internal error"}}, "answered 500: internal error"),
])
def test_refusals_are_errors(stub, capsys, status, body, expected):
    stub.answers[("GET", "/v1/experts")] = (status, body)
    assert main(["experts", "--url", stub.url]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and expected in captured.err and "Traceback" not in captured.err


def test_unreachable_server(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)  # a free port that nothing listens on
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()
    assert main(["experts", "rebalance", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the server at {url}") and "msem serve" in err
    with pytest.raises(ExpertsApiError, match="cannot reach"):
        ExpertsApi(url).experts()
