"""msem's metrics on Ray's metrics export: every series is defined here, once per process.

A metric made with `ray.util.metrics` under the name `x` is exported by Ray as `ray_x` (a Counter also gets
Prometheus' `_total` suffix) on each node's metrics export port. Prometheus scrapes that port, and the Grafana
that the Ray dashboard embeds reads Prometheus; `msem dashboard install` adds cluster/dashboards/msem.json there.

Names. The serving series carry vLLM's names, so that dashboards and alerts written for vLLM on Ray carry
over. vLLM calls them `vllm:<name>`, but Ray 2.60 deprecates ':' in metric names (`ray.util.metrics` warns
that it "will be an error in the future") and vLLM's own Ray stat logger writes ':' as '_'. So
`vllm:time_to_first_token_seconds` is `vllm_time_to_first_token_seconds` here and
`ray_vllm_time_to_first_token_seconds` in Prometheus: the series that Ray's own "Serve LLM" Grafana dashboard
queries, with the same `model_name` label, so its latency, token, cache and scheduler panels show msem too.
A vLLM alert rule carries over by writing `ray_vllm_` for `vllm:`. msem's own series are `msem_*`:

    serving    vllm_num_requests_running / _waiting, vllm_kv_cache_usage_perc (0..1) {model_name, engine}
               vllm_prefix_cache_queries / _hits (tokens)                             {model_name, engine}
               vllm_time_to_first_token_seconds, vllm_inter_token_latency_seconds,
               vllm_e2e_request_latency_seconds, vllm_request_time_per_output_token_seconds,
               vllm_request_prompt_tokens, vllm_prompt_tokens, vllm_generation_tokens    {model_name}
               vllm_request_success {model_name, finished_reason},
               msem_requests_rejected {reason: 400|401|404|413|429|503}
    experts    msem_expert_routed_tokens {layer, expert, group, replica}, msem_expert_balancedness {layer},
               msem_expert_dispatch_seconds {transport, group}, msem_expert_outstanding_tokens {replica},
               msem_expert_failovers, msem_expert_failover_stall_seconds, msem_expert_group_replicas {group},
               msem_expert_group_computed_tokens {group, replica}, msem_expert_group_busy_ratio {group, replica}

The expert groups' per-layer traffic goes straight to their ExpertService, not through Serve's request path,
so Serve's own replica utilisation reads 0 for them while they compute; `msem_expert_group_busy_ratio` is
their real share of time computing, shown beside Serve's panel on the msem dashboard.

Cost. Nothing here runs per layer. A shard's `RemoteExperts` hands its gathered `LayerPathStats` to
`ExpertMetrics` about once a second at a step boundary; engines and expert group replicas are sampled once a
second by a publisher thread (`publish_every`); the frontend records once per request plus one observation
per streamed delta (inter-token latency). benchmarks/metrics_overhead.py measures the cost on decode.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram

from engine.outputs import EngineStats, RequestOutput

if TYPE_CHECKING:  # the layer path (and torch) is the shards' alone: the edge and control roles import this too
    from router_service.remote_experts import LayerPathStats

logger = logging.getLogger(__name__)

# Bucket bounds follow vLLM's for the series named after it, so quantiles compare across the two.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
DISPATCH_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0]
STALL_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


# ---- the series, created lazily, once per process ----

@dataclass(frozen=True)
class _ServingSeries:
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    tpot: Histogram
    request_prompt_tokens: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    success: Counter
    rejected: Counter


@functools.cache
def _serving_series() -> _ServingSeries:
    model = ("model_name",)
    return _ServingSeries(
        ttft=Histogram("vllm_time_to_first_token_seconds", "Time to first token, from arrival at the ingress.",
                       TTFT_BUCKETS, model),
        itl=Histogram("vllm_inter_token_latency_seconds", "Time between consecutive output tokens.",
                      ITL_BUCKETS, model),
        e2e=Histogram("vllm_e2e_request_latency_seconds", "Arrival at the ingress to the last token.",
                      E2E_BUCKETS, model),
        tpot=Histogram("vllm_request_time_per_output_token_seconds", "A request's mean time per output token "
                       "after the first.", ITL_BUCKETS, model),
        request_prompt_tokens=Histogram("vllm_request_prompt_tokens", "Prompt tokens of a finished request.",
                                        TOKEN_BUCKETS, model),
        prompt_tokens=Counter("vllm_prompt_tokens", "Prompt tokens of admitted requests.", model),
        generation_tokens=Counter("vllm_generation_tokens", "Tokens generated.", model),
        success=Counter("vllm_request_success", "Finished samples, by finish reason (stop, length, abort).",
                        model + ("finished_reason",)),
        rejected=Counter("msem_requests_rejected", "Requests refused at the edge, by HTTP status (gRPC refusals "
                         "under the same meaning): 400 bad input, 401 missing or wrong API key, 404 unknown model, "
                         "413 body too large, 429 admission limits.", ("reason",)),
    )


@dataclass(frozen=True)
class _EngineSeries:
    running: Gauge
    waiting: Gauge
    kv_usage: Gauge
    prefix_queries: Counter
    prefix_hits: Counter
    tier_used: Gauge
    tier_blocks: Counter
    tier_bytes: Counter


@functools.cache
def _engine_series() -> _EngineSeries:
    tags = ("model_name", "engine")
    return _EngineSeries(
        running=Gauge("vllm_num_requests_running", "Sequences in the engine's running batch.", tags),
        waiting=Gauge("vllm_num_requests_waiting", "Sequences waiting for admission or preempted.", tags),
        kv_usage=Gauge("vllm_kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).", tags),
        prefix_queries=Counter("vllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", tags),
        prefix_hits=Counter("vllm_prefix_cache_hits", "Prompt tokens found in the prefix cache.", tags),
        tier_used=Gauge("msem_kv_tier_used_bytes", "Bytes held by a KV tier below the device pool (host: this "
                        "shard's RAM).", tags + ("tier",)),
        tier_blocks=Counter("msem_kv_tier_loaded_blocks", "KV blocks loaded into the device pool from a tier "
                            "instead of recomputed (host: this shard's RAM; store: the shared MemoryStore).",
                            tags + ("tier",)),
        tier_bytes=Counter("msem_kv_tier_bytes", "Bytes moved between this shard and a KV tier, by direction "
                           "(in: into the tier).", tags + ("tier", "direction")),
    )


@dataclass(frozen=True)
class _ExpertSeries:
    routed: Counter
    dispatch: Histogram
    outstanding: Gauge
    failovers: Counter
    stall: Histogram


@functools.cache
def _expert_series() -> _ExpertSeries:
    return _ExpertSeries(
        routed=Counter("msem_expert_routed_tokens", "Token slots routed to an expert, by the replica they went to.",
                       ("layer", "expert", "group", "replica")),
        dispatch=Histogram("msem_expert_dispatch_seconds", "One send to an expert group replica, dispatch to "
                           "answer.", DISPATCH_BUCKETS, ("transport", "group")),
        outstanding=Gauge("msem_expert_outstanding_tokens", "Tokens in flight to a replica.", ("replica",)),
        failovers=Counter("msem_expert_failovers", "Expert batches re-sent after a replica failed."),
        stall=Histogram("msem_expert_failover_stall_seconds", "Time a layer waited for its re-sent batches.",
                        STALL_BUCKETS),
    )


@dataclass(frozen=True)
class _GroupSeries:
    computed: Counter
    busy: Gauge


@functools.cache
def _group_series() -> _GroupSeries:
    tags = ("group", "replica")
    return _GroupSeries(
        computed=Counter("msem_expert_group_computed_tokens", "Token rows an expert group replica computed.", tags),
        busy=Gauge("msem_expert_group_busy_ratio", "Share of the last second an expert group replica spent "
                   "computing (Serve's utilisation cannot see this traffic).", tags),
    )


@dataclass(frozen=True)
class _RouterSeries:
    balancedness: Gauge
    replicas: Gauge


@functools.cache
def _router_series() -> _RouterSeries:
    return _RouterSeries(
        balancedness=Gauge("msem_expert_balancedness", "Mean over max of the group loads in the router's load "
                           "window (1 is perfect).", ("layer",)),
        replicas=Gauge("msem_expert_group_replicas", "Live replicas of a group in the routing table.", ("group",)),
    )


# ---- serving side ----

class ServingMetrics:
    """The per-request series of one frontend: latencies, tokens, finish and rejection reasons."""

    def __init__(self, model_name: str):
        self.series = _serving_series()
        self.tags = {"model_name": model_name}

    def rejected(self, reason: str) -> None:
        """Count a request refused at the edge; `reason` is its HTTP status ("400", "401", "429")."""
        self.series.rejected.inc(1, {"reason": reason})

    def start(self, num_prompt_tokens: int) -> "RequestTimer":
        """A timer for an admitted request, started now (its arrival)."""
        self.series.prompt_tokens.inc(num_prompt_tokens, self.tags)
        return RequestTimer(self, num_prompt_tokens)


class RequestTimer:
    """Times one request from arrival: first token, the gap per token between deltas, the end.

    A delta may carry several tokens per sample (a slow reader gets merged deltas), so the gap since the
    previous delta is spread over them: one inter-token observation per delta, not per token.
    """

    def __init__(self, metrics: ServingMetrics, num_prompt_tokens: int):
        self.metrics, self.num_prompt_tokens = metrics, num_prompt_tokens
        self.start = self.last = time.perf_counter()
        self.first: float | None = None
        self.num_steps = 0  # tokens of the longest sample
        self.num_generated = 0  # tokens of all samples
        self.num_finished = 0

    def observe(self, delta: RequestOutput) -> None:
        series, tags = self.metrics.series, self.metrics.tags
        tokens = max((len(o.token_ids) for o in delta.outputs), default=0)
        if tokens:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
                series.ttft.observe(now - self.start, tags)
            else:
                series.itl.observe((now - self.last) / tokens, tags)
            self.last = now
            self.num_steps += tokens
            self.num_generated += sum(len(o.token_ids) for o in delta.outputs)
        for out in delta.outputs:
            if out.finish_reason is not None:
                self.num_finished += 1
                series.success.inc(1, {**tags, "finished_reason": out.finish_reason})

    def close(self, num_samples: int) -> None:
        """The request ended: record its totals; samples that did not finish count as aborted."""
        series, tags = self.metrics.series, self.metrics.tags
        if self.num_generated:
            series.generation_tokens.inc(self.num_generated, tags)
        if self.num_finished < num_samples:
            series.success.inc(num_samples - self.num_finished, {**tags, "finished_reason": "abort"})
            return
        series.e2e.observe(self.last - self.start, tags)
        series.request_prompt_tokens.observe(self.num_prompt_tokens, tags)
        if self.first is not None and self.num_steps > 1:
            series.tpot.observe((self.last - self.first) / (self.num_steps - 1), tags)


class EngineMetrics:
    """One attention shard's engine load, sampled by its publisher thread."""

    def __init__(self, model_name: str, engine_id: str):
        self.series = _engine_series()
        self.tags = {"model_name": model_name, "engine": engine_id}
        self._queries = self._hits = 0
        self._totals: dict[tuple, int] = {}  # last cumulative tier figure seen, per series and tags

    def publish(self, stats: EngineStats) -> None:
        s, tags = self.series, self.tags
        s.running.set(stats.num_requests_running, tags)
        s.waiting.set(stats.num_requests_waiting, tags)
        s.kv_usage.set(stats.kv_cache_usage, tags)
        if stats.prefix_cache_queries > self._queries:
            s.prefix_queries.inc(stats.prefix_cache_queries - self._queries, tags)
        if stats.prefix_cache_hits > self._hits:
            s.prefix_hits.inc(stats.prefix_cache_hits - self._hits, tags)
        self._queries, self._hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if stats.kv_tiers is not None:
            self._publish_tiers(stats.kv_tiers)

    def _publish_tiers(self, tiers: dict) -> None:
        s, host, store = self.series, tiers["host"], tiers["store"] or {}
        s.tier_used.set(host["used_bytes"], {**self.tags, "tier": "host"})
        for tier, n in tiers["loaded_blocks"].items():
            self._inc(s.tier_blocks, n, tier=tier)
        for tier, figures in (("host", host), ("store", store)):
            for direction in ("in", "out"):
                if f"bytes_{direction}" in figures:
                    # the store client counts from the shard's side: its bytes_in came out of the store
                    flipped = {"in": "out", "out": "in"}[direction] if tier == "store" else direction
                    self._inc(s.tier_bytes, figures[f"bytes_{direction}"], tier=tier, direction=flipped)

    def _inc(self, counter: Counter, total: int, **extra: str) -> None:
        """Add what a cumulative figure grew by since the last publish."""
        key = (id(counter), *sorted(extra.items()))
        if total > self._totals.get(key, 0):
            counter.inc(total - self._totals.get(key, 0), {**self.tags, **extra})
        self._totals[key] = total


class MemoryStoreMetrics:
    """The memory store's own tiers, as `msem_kv_tier_used_bytes` with tier store_ram / store_disk."""

    def __init__(self, model_name: str):
        self.series = _engine_series()
        self.tags = {"model_name": model_name, "engine": "MemoryStore"}

    def publish(self, stats: dict) -> None:
        for tier in ("ram", "disk"):
            if stats[tier] is not None:
                self.series.tier_used.set(stats[tier]["used_bytes"], {**self.tags, "tier": f"store_{tier}"})


# ---- expert side ----

class ExpertMetrics:
    """The `stats_sink` of a shard's `RemoteExperts`: one `LayerPathStats` (about a second of the layer path)
    becomes counter increments, histogram observations and gauges."""

    def __init__(self):
        self.series = _expert_series()

    def __call__(self, stats: "LayerPathStats") -> None:
        s = self.series
        for replica, routed in stats.routed.items():  # [L, E] token slots
            group = str(stats.replica_groups[replica])
            hit = routed.nonzero()
            for (layer, expert), n in zip(hit.tolist(), routed[hit[:, 0], hit[:, 1]].tolist()):
                s.routed.inc(n, {"layer": str(layer), "expert": str(expert), "group": group, "replica": replica})
        for group, seconds in stats.send_seconds.items():
            tags = {"transport": stats.transport, "group": str(group)}
            for value in seconds:
                s.dispatch.observe(value, tags)
        for replica, tokens in stats.outstanding.items():
            s.outstanding.set(tokens, {"replica": replica})
        if stats.failovers:
            s.failovers.inc(stats.failovers)
        for value in stats.failover_stall_seconds:
            s.stall.observe(value)


class BusyClock:
    """Seconds during which at least one timed call was running: the union of concurrent calls, so a replica
    serving four shards at once is busy for the wall time it computed, not four times that."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self._busy = 0.0

    def timed(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()
        return timed_call

    def seconds(self) -> float:
        with self._lock:
            return self._busy + (time.monotonic() - self._since if self._active else 0.0)

    def _enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = time.monotonic()
            self._active += 1

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._busy += time.monotonic() - self._since


class ExpertGroupMetrics:
    """One expert group replica's work, sampled by its publisher thread: tokens computed since the last
    sample and the share of that interval it spent computing."""

    def __init__(self, group_id: int, replica_id: str, tokens_served: Callable[[], int], clock: BusyClock):
        self.series = _group_series()
        self.tags = {"group": str(group_id), "replica": replica_id}
        self._tokens_served, self.clock = tokens_served, clock
        self._last = (time.monotonic(), tokens_served(), clock.seconds())

    def publish(self) -> None:
        now, tokens, busy = time.monotonic(), self._tokens_served(), self.clock.seconds()
        (then, tokens_before, busy_before), self._last = self._last, (now, tokens, busy)
        if tokens > tokens_before:
            self.series.computed.inc(tokens - tokens_before, self.tags)
        self.series.busy.set(min(1.0, (busy - busy_before) / max(now - then, 1e-3)), self.tags)


class RouterMetrics:
    """The router's view: balancedness per layer over its load window and live replicas per group."""

    def __init__(self):
        self.series = _router_series()

    def update(self, describe: dict) -> None:
        """Set the gauges from `RouterService.describe()`."""
        for layer, value in enumerate(describe["balancedness"]["per_layer"]):
            self.series.balancedness.set(value, {"layer": str(layer)})
        for group in describe["groups"]:
            alive = sum(1 for replica in group["replicas"] if replica["alive"])
            self.series.replicas.set(alive, {"group": str(group["group"])})


def publish_every(interval_s: float, publish: Callable[[], None], name: str,
                  stop: threading.Event | None = None) -> threading.Event:
    """Call `publish` every `interval_s` seconds in a daemon thread until `stop` (returned; a new event when
    not given) is set. A failing sample is logged and the next one is tried: metrics never take a replica down."""
    stop = stop or threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                publish()
            except Exception:  # noqa: BLE001 - see the docstring
                logger.warning("publishing metrics (%s) failed", name, exc_info=True)

    threading.Thread(target=run, name=name, daemon=True).start()
    return stop
