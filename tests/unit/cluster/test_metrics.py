"""Metrics: what each hook records, that the dashboard queries only series we (or Ray Serve) export, that the
serving series are the ones Ray's Serve LLM dashboard queries, and `msem dashboard install`.

Ray's metric classes are replaced by recorders, so no Ray instance is needed; the integration test
(tests/integration/test_metrics.py) scrapes the real export.
"""

import asyncio
import importlib.util
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

import actors.metrics as metrics
from cluster import dashboard_command
from cluster.cli import main
from cluster.config import Limits
from cluster.errors import OverloadedError
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from router_service.remote_experts import LayerPathStats
from tests.unit.cluster.conftest import make_frontend

DASHBOARD = Path(dashboard_command.__file__).parent / "dashboards" / "msem.json"
FACTORIES = (metrics._serving_series, metrics._engine_series, metrics._expert_series, metrics._group_series,
             metrics._router_series)


class Recorder:
    """Stands in for ray.util.metrics' Counter, Gauge and Histogram: keeps what was recorded, per tag set."""

    def __init__(self, kind: str, name: str, description: str = "", boundaries=None, tag_keys=None):
        if kind != "histogram":  # Counter and Gauge take (name, description, tag_keys)
            tag_keys = boundaries
        self.kind, self.name, self.tag_keys = kind, name, tuple(tag_keys or ())
        self.values: dict[tuple, float] = {}
        self.observations: dict[tuple, list[float]] = {}

    def _key(self, tags) -> tuple:
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        return tuple(sorted(tags.items()))

    def inc(self, value=1.0, tags=None):
        assert self.kind == "counter" and value > 0
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0) + value

    def set(self, value, tags=None):
        assert self.kind == "gauge"
        self.values[self._key(tags)] = value

    def observe(self, value, tags=None):
        assert self.kind == "histogram"
        self.observations.setdefault(self._key(tags), []).append(value)

    def get(self, **tags):
        key = tuple(sorted(tags.items()))
        return self.observations.get(key, []) if self.kind == "histogram" else self.values.get(key)


@pytest.fixture
def recorded(monkeypatch):
    """Every series, made of recorders: name -> Recorder."""
    made: dict[str, Recorder] = {}

    def kind(name):
        def make(*args, **kwargs):
            made[args[0]] = Recorder(name, *args, **kwargs)
            return made[args[0]]
        return make

    monkeypatch.setattr(metrics, "Counter", kind("counter"))
    monkeypatch.setattr(metrics, "Gauge", kind("gauge"))
    monkeypatch.setattr(metrics, "Histogram", kind("histogram"))
    for factory in FACTORIES:
        factory.cache_clear()
    for factory in FACTORIES:
        factory()
    yield made
    for factory in FACTORIES:
        factory.cache_clear()


def _exported(recorder: Recorder) -> set[str]:
    """The Prometheus names Ray exports for a series."""
    name = f"ray_{recorder.name}"
    return {"counter": {f"{name}_total"}, "gauge": {name},
            "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}[recorder.kind]


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries use."""
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\bray_[a-zA-Z0-9_]+", expr)}


def _ray_dashboard_text(module: str) -> str:
    spec = importlib.util.find_spec(f"ray.dashboard.modules.metrics.dashboards.{module}")
    return Path(spec.origin).read_text()


def _ray_serve_gauges() -> set[str]:
    """The gauges Ray Serve's controller and replicas define (read from Ray's source)."""
    root = Path(importlib.util.find_spec("ray.serve").origin).parent / "_private"
    text = (root / "replica.py").read_text() + (root / "deployment_state.py").read_text()
    return set(re.findall(r"Gauge\(\s*\"(serve_[a-z_]+)\"", text))


# ---- names ----

def test_dashboard_queries_only_series_we_or_ray_serve_export(recorded):
    ours = set().union(*(_exported(r) for r in recorded.values()))
    names = dashboard_metric_names()
    serve = _ray_serve_gauges()
    foreign = {n for n in names - ours if n.removeprefix("ray_") not in serve}
    assert not foreign, f"the dashboard queries series nobody exports: {sorted(foreign)}"
    queried = {n.removesuffix("_total").removesuffix("_bucket") for n in names & ours}
    never_shown = {f"ray_{name}" for name in recorded} - queried
    # shown on Ray's own Serve LLM dashboard, or (outstanding tokens) on /v1/experts: not needed twice
    assert never_shown <= {"ray_vllm_request_time_per_output_token_seconds", "ray_vllm_request_prompt_tokens",
                           "ray_msem_expert_outstanding_tokens"}


def test_dashboard_has_the_panels_and_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("layer x expert", "balancedness", "replicas per expert group", "tokens/s per expert group",
                   "dispatch latency", "failovers", "time to first token", "inter-token latency", "kv-cache usage",
                   "running and waiting", "busy vs serve utilisation"):
        assert wanted in titles
    heatmap = next(p for p in dashboard["panels"] if p["type"] == "heatmap")
    assert "by (layer, expert)" in heatmap["targets"][0]["expr"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def test_serving_series_are_the_ones_rays_serve_llm_dashboard_queries(recorded):
    """Ray's Serve LLM dashboard queries vLLM's series as Ray exports them (':' written '_'): ours carry over."""
    queried = set(re.findall(r"ray_vllm_[a-z0-9_]+", _ray_dashboard_text("serve_llm_dashboard_panels")))
    ours = set().union(*(_exported(r) for name, r in recorded.items() if name.startswith("vllm_")))
    carried = {"ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
               "ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total",
               "ray_vllm_request_success_total", "ray_vllm_generation_tokens_total",
               "ray_vllm_request_prompt_tokens_sum", "ray_vllm_time_to_first_token_seconds",
               "ray_vllm_e2e_request_latency_seconds", "ray_vllm_request_time_per_output_token_seconds"}
    assert carried <= queried  # Ray's dashboard asks for these (histograms by their base name) ...
    assert {n for n in carried if not n.endswith("_seconds")} <= ours  # ... and we export them
    assert {f"{n}_bucket" for n in carried if n.endswith("_seconds")} <= ours
    assert all(":" not in name for name in recorded)  # Ray 2.60 deprecates ':' in metric names
    assert all(r.tag_keys[:1] == ("model_name",) for name, r in recorded.items() if name.startswith("vllm_"))


# ---- hooks ----

def test_expert_sink_turns_layer_path_stats_into_series(recorded):
    routed = torch.zeros(2, 4, dtype=torch.long)
    routed[0, 1], routed[1, 3] = 5, 7
    stats = LayerPathStats("grpc", routed={"g0-a": routed, "g1-b": torch.zeros(2, 4, dtype=torch.long)},
                           replica_groups={"g0-a": 0, "g1-b": 1}, send_seconds={0: [0.001, 0.002], 1: [0.003]},
                           outstanding={"g0-a": 0, "g1-b": 12}, failovers=2, failover_stall_seconds=[0.5])
    metrics.ExpertMetrics()(stats)
    tokens = recorded["msem_expert_routed_tokens"]
    assert tokens.values == {  # zero cells are not sent
        tuple(sorted({"layer": "0", "expert": "1", "group": "0", "replica": "g0-a"}.items())): 5,
        tuple(sorted({"layer": "1", "expert": "3", "group": "0", "replica": "g0-a"}.items())): 7}
    assert recorded["msem_expert_dispatch_seconds"].get(transport="grpc", group="0") == [0.001, 0.002]
    assert recorded["msem_expert_dispatch_seconds"].get(transport="grpc", group="1") == [0.003]
    assert recorded["msem_expert_outstanding_tokens"].get(replica="g1-b") == 12
    assert recorded["msem_expert_failovers"].get() == 2
    assert recorded["msem_expert_failover_stall_seconds"].get() == [0.5]


def test_router_metrics_set_balancedness_and_live_replicas(recorded):
    describe = {"balancedness": {"per_layer": [0.5, 1.0], "mean": 0.75},
                "groups": [{"group": 0, "replicas": [{"alive": True}, {"alive": False}]},
                           {"group": 1, "replicas": [{"alive": True}, {"alive": True}]}]}
    metrics.RouterMetrics().update(describe)
    assert recorded["msem_expert_balancedness"].get(layer="0") == 0.5
    assert recorded["msem_expert_balancedness"].get(layer="1") == 1.0
    assert recorded["msem_expert_group_replicas"].get(group="0") == 1
    assert recorded["msem_expert_group_replicas"].get(group="1") == 2


def test_engine_metrics_publish_gauges_and_counter_deltas(recorded):
    engine = metrics.EngineMetrics("tiny", "shard-1")
    engine.publish(EngineStats(3, 2, 0.25, prefix_cache_queries=100, prefix_cache_hits=32))
    engine.publish(EngineStats(1, 0, 0.5, prefix_cache_queries=150, prefix_cache_hits=32))
    tags = {"model_name": "tiny", "engine": "shard-1"}
    assert recorded["vllm_num_requests_running"].get(**tags) == 1
    assert recorded["vllm_num_requests_waiting"].get(**tags) == 0
    assert recorded["vllm_kv_cache_usage_perc"].get(**tags) == 0.5
    assert recorded["vllm_prefix_cache_queries"].get(**tags) == 150  # cumulative: 100, then +50
    assert recorded["vllm_prefix_cache_hits"].get(**tags) == 32


def test_kv_tier_figures_become_gauges_and_counter_deltas(recorded):
    def stats(used: int, loaded: int, store_in: int) -> EngineStats:
        tiers = {"host": {"used_bytes": used, "bytes_in": 2 * used, "bytes_out": 0},
                 "store": {"bytes_in": store_in, "bytes_out": 5}, "loaded_blocks": {"host": loaded, "store": 1}}
        return EngineStats(0, 0, 0.0, 0, 0, tiers)

    engine = metrics.EngineMetrics("tiny", "shard-1")
    engine.publish(stats(100, 3, 40))
    engine.publish(stats(300, 4, 40))
    tags = {"model_name": "tiny", "engine": "shard-1"}
    assert recorded["msem_kv_tier_used_bytes"].get(**tags, tier="host") == 300
    assert recorded["msem_kv_tier_loaded_blocks"].get(**tags, tier="host") == 4  # cumulative: 3, then +1
    assert recorded["msem_kv_tier_bytes"].get(**tags, tier="host", direction="in") == 600
    # the store client counts from the shard's side: what it received came out of the store
    assert recorded["msem_kv_tier_bytes"].get(**tags, tier="store", direction="out") == 40
    assert recorded["msem_kv_tier_bytes"].get(**tags, tier="store", direction="in") == 5
    metrics.MemoryStoreMetrics("tiny").publish({"ram": {"used_bytes": 7}, "disk": None})
    assert recorded["msem_kv_tier_used_bytes"].get(model_name="tiny", engine="MemoryStore", tier="store_ram") == 7


def test_busy_clock_counts_overlapping_calls_once():
    clock = metrics.BusyClock()
    work = clock.timed(lambda: time.sleep(0.2))
    threads = [threading.Thread(target=work) for _ in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    assert 0.2 <= clock.seconds() <= wall + 1e-3  # the union of three overlapping 0.2 s calls, not 0.6 s


def test_expert_group_metrics_publish_tokens_and_busy_ratio(recorded):
    clock, served = metrics.BusyClock(), [0]

    def forward():
        time.sleep(0.1)
        served[0] += 40
    group = metrics.ExpertGroupMetrics(1, "g1-x", lambda: served[0], clock)
    clock.timed(forward)()
    time.sleep(0.1)
    group.publish()
    assert recorded["msem_expert_group_computed_tokens"].get(group="1", replica="g1-x") == 40
    assert 0.3 < recorded["msem_expert_group_busy_ratio"].get(group="1", replica="g1-x") < 0.7


def test_publish_every_keeps_going_after_a_failure():
    calls = []

    def publish():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bad sample")
    stop = metrics.publish_every(0.01, publish, "test-publisher")
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    assert len(calls) >= 3


def test_request_timer_spreads_merged_tokens_and_counts_aborts(recorded):
    serving = metrics.ServingMetrics("tiny")
    timer = serving.start(num_prompt_tokens=5)

    def delta(tokens, finish=None):
        return RequestOutput("r", None, [], [CompletionOutput(0, "", tokens, finish_reason=finish)])
    timer.observe(delta([1]))
    time.sleep(0.05)
    timer.observe(delta([2, 3]))  # two tokens in one (merged) delta: one observation, half the gap each
    timer.close(num_samples=2)  # the second sample never finished
    tags = {"model_name": "tiny"}
    assert len(recorded["vllm_time_to_first_token_seconds"].get(**tags)) == 1
    [itl] = recorded["vllm_inter_token_latency_seconds"].get(**tags)
    assert 0.02 <= itl < 0.1
    assert recorded["vllm_prompt_tokens"].get(**tags) == 5
    assert recorded["vllm_generation_tokens"].get(**tags) == 3
    assert recorded["vllm_request_success"].get(**tags, finished_reason="abort") == 2
    assert recorded["vllm_e2e_request_latency_seconds"].get(**tags) == []  # aborted: no end-to-end latency


def test_frontend_records_latency_tokens_and_finish_reasons(recorded, async_llm):
    frontend = make_frontend(async_llm, Limits(max_requests=1))

    async def run():
        ids = frontend.encode("The quick brown fox")
        async for _ in frontend.generate(ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=2)):
            pass
        with pytest.raises(InvalidRequestError):
            await anext(frontend.generate([10**9], SamplingParams(max_tokens=2)))
        held = frontend.generate(ids, SamplingParams(max_tokens=50, ignore_eos=True))
        await anext(held)  # admitted: the server is at its limit of one request
        with pytest.raises(OverloadedError):
            await anext(frontend.generate(ids, SamplingParams(max_tokens=2)))
        await held.aclose()  # the client leaves: its sample is aborted
        return len(ids)
    num_prompt = asyncio.run(run())
    tags = {"model_name": "tiny"}
    assert len(recorded["vllm_time_to_first_token_seconds"].get(**tags)) == 2
    assert len(recorded["vllm_inter_token_latency_seconds"].get(**tags)) >= 1
    assert len(recorded["vllm_e2e_request_latency_seconds"].get(**tags)) == 1  # the finished request only
    assert len(recorded["vllm_request_time_per_output_token_seconds"].get(**tags)) == 1
    assert recorded["vllm_prompt_tokens"].get(**tags) == 2 * num_prompt  # two were admitted
    assert recorded["vllm_generation_tokens"].get(**tags) >= 13  # 2 x 6, and the held request's first
    assert recorded["vllm_request_success"].get(**tags, finished_reason="length") == 2
    assert recorded["vllm_request_success"].get(**tags, finished_reason="abort") == 1


def test_every_refusal_at_the_http_edge_is_counted_by_status(recorded, async_llm):
    from starlette.testclient import TestClient

    from cluster.http_api import build_http_app

    client = TestClient(build_http_app(make_frontend(async_llm), api_keys=("sk-right",)))
    key = {"Authorization": "Bearer sk-right"}
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    assert client.get("/v1/models", headers=key).status_code == 200
    assert client.post("/v1/completions", headers=key, content=b"{not json").status_code == 400  # the parser's
    assert client.post("/v1/completions", headers=key, json={"prompt": [10**9], "max_tokens": 2}).status_code == 400
    assert client.post("/v1/completions", headers=key, json={"model": "gpt", "prompt": "x"}).status_code == 404
    assert {reason: recorded["msem_requests_rejected"].get(reason=reason) for reason in ("400", "401", "404")} \
        == {"400": 2, "401": 2, "404": 1}  # 429: the integration test, with requests really in flight


def test_grpc_refusals_are_counted_under_their_http_status(recorded, async_llm):
    from cluster.client import InferenceClient, InferenceError
    from cluster.grpc_api import start_grpc_server

    async def run():
        server, port = await start_grpc_server(make_frontend(async_llm), "127.0.0.1", 0, api_keys=("sk-right",))
        try:
            for key in (None, "sk-right"):
                client = InferenceClient(f"127.0.0.1:{port}", api_key=key)
                with pytest.raises(InferenceError):
                    await asyncio.to_thread(client.generate, "x", max_tokens=0)
        finally:
            await server.stop(None)
    asyncio.run(run())
    assert recorded["msem_requests_rejected"].get(reason="401") == 1
    assert recorded["msem_requests_rejected"].get(reason="400") == 1


def test_engine_stats_count_prefix_cache_tokens(async_llm):
    before = async_llm.stats()
    prompt = list(range(1, 60))  # three full 16-token blocks, then the rest

    async def run():
        for _ in range(2):
            async for _ in async_llm.add_request(prompt, SamplingParams(max_tokens=1)):
                pass
    asyncio.run(run())
    after = async_llm.stats()
    assert after.prefix_cache_queries - before.prefix_cache_queries == 2 * len(prompt)
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 48  # the second run found the first's blocks
    assert (after.num_requests_running, after.num_requests_waiting) == (0, 0)
    assert 0.0 <= after.kv_cache_usage <= 1.0


# ---- msem dashboard install ----

def _session(root: Path, dashboards: Path | None = None) -> Path:
    """A session folder as Ray's metrics head leaves it (provisioning file pointing at the dashboard folder)."""
    session = root / "session_2026-01-01_00-00-00_000000_1"
    provisioning = session / "metrics" / "grafana" / "provisioning" / "dashboards"
    provisioning.mkdir(parents=True)
    folder = dashboards or session / "metrics" / "grafana" / "dashboards"
    (provisioning / "default.yml").write_text(
        f"apiVersion: 1\nproviders:\n  - name: Ray\n    folder: Ray\n    type: file\n    options:\n"
        f"      path: {folder}\n")
    return session


def test_install_copies_the_dashboard_where_grafana_provisions_from(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(dashboard_command.OUTPUT_DIR_ENV, raising=False)
    session = _session(tmp_path)
    assert main(["dashboard", "install", "--session-dir", str(session)]) == 0
    target = session / "metrics" / "grafana" / "dashboards" / dashboard_command.DASHBOARD_FILE
    assert json.loads(target.read_text()) == json.loads(DASHBOARD.read_text())
    out = capsys.readouterr().out
    assert str(target) in out and "ray metrics launch-prometheus" in out
    assert str(session / "metrics" / "grafana" / "grafana.ini") in out


def test_install_follows_the_sessions_provisioning_and_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(dashboard_command.OUTPUT_DIR_ENV, raising=False)
    custom = tmp_path / "custom"
    session = _session(tmp_path, dashboards=custom)  # Ray started with RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR
    _, target = dashboard_command.install(session)
    assert target == custom / dashboard_command.DASHBOARD_FILE and target.is_file()
    monkeypatch.setenv(dashboard_command.OUTPUT_DIR_ENV, str(tmp_path / "from-env"))
    _, target = dashboard_command.install(tmp_path / "no-session")
    assert target == tmp_path / "from-env" / dashboard_command.DASHBOARD_FILE and target.is_file()


def test_install_explains_a_missing_session(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(dashboard_command.OUTPUT_DIR_ENV, raising=False)
    assert main(["dashboard", "install", "--session-dir", str(tmp_path / "none")]) == 2
    assert "no Ray session" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()  # a session whose dashboard never started
    assert main(["dashboard", "install", "--session-dir", str(tmp_path / "bare")]) == 2
    assert "no Grafana setup" in capsys.readouterr().err
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))  # the default session follows Ray's temp dir
    assert dashboard_command.default_session_dir() == tmp_path / "tmp" / "ray" / "session_latest"


def test_msem_serve_says_how_to_reach_ray_with_token_authentication(monkeypatch):
    from cluster.serve_command import ray_access

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what ray.init sets when it starts a cluster with tokens on
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    text = ray_access("127.0.0.1:8265")
    assert "http://127.0.0.1:8265" in text and "export RAY_AUTH_MODE=token" in text
    assert "~/.ray/auth_token" in text and "ray get-auth-token" in text and "msem dashboard install" in text
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE" not in ray_access("127.0.0.1:8265")
