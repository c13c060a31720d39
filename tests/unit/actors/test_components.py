"""The components of actors/ without Ray: the attention shard over an injected engine, the router's torch
sessions, and the one device/dtype decision."""

import asyncio
import time

import pytest

from actors.attention_shard import AttentionShard
from actors.compute import Compute, compute_for
from actors.router import Router
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from experts.placement import make_placement
from router_service.transport import ReplicaInfo


class FakeEngine:
    """Stands in for AsyncLLM: answers each request with its prompt's tokens, one delta per token."""

    def __init__(self, **kwargs):
        self.kwargs, self.dead, self.stopped = kwargs, None, False

    async def _deltas(self, ids, request_id):
        for i, token in enumerate(ids):
            finished = i == len(ids) - 1
            yield RequestOutput(request_id, None, list(ids), [CompletionOutput(0, str(token), [token],
                                finish_reason="length" if finished else None)], None, finished=finished)

    def add_request(self, ids, params, request_id, resume=None, stream_interval_s=0.0):
        if self.dead is not None:
            raise self.dead
        self.stream_interval_s = stream_interval_s
        return self._deltas(ids, request_id)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0)

    num_unfinished_requests = 0

    def shutdown(self):
        self.stopped = True


async def _shard() -> AttentionShard:
    shard = object.__new__(AttentionShard)  # a component's constructor is async (Ray and Serve await it)
    await shard.__init__(FakeEngine, {"model": "tiny", "max_num_seqs": 4}, Compute("cpu", "float32"),
                         shard_id="shard-test")
    return shard


def test_the_shard_builds_the_engine_it_is_given_with_the_compute_it_is_told():
    async def main():
        shard = await _shard()
        engine = shard.llm
        assert engine.kwargs == {"model": "tiny", "max_num_seqs": 4, "dtype": "float32", "device": "cpu",
                                 "experts": None, "memory_store_call": None, "progress": False}
        outs = await shard.generate([[3, 4], [7]], SamplingParams(max_tokens=2))
        assert [o.outputs[0].token_ids for o in outs] == [[3, 4], [7]]
        deltas = [d async for d in shard.stream([5, 6], SamplingParams(), "r1")]
        assert [d.outputs[0].token_ids for d in deltas] == [[5], [6]] and deltas[0].prompt_token_ids == []
        assert engine.stream_interval_s == 0.0
        # the engine coalesces (tests/unit/engine/test_async_llm.py): over the interval, or all after the first
        # token when the caller reads the request whole
        [d async for d in shard.stream([5, 6], SamplingParams(), "r2", interval_s=0.1)]
        assert engine.stream_interval_s == 0.1
        [d async for d in shard.stream([5, 6], SamplingParams(), "r3", every_step=False, interval_s=0.1)]
        assert engine.stream_interval_s == float("inf")
        assert shard.healthy()
        engine.dead = RuntimeError("boom")
        assert not shard.healthy()
        with pytest.raises(RuntimeError, match="boom"):
            shard.check_health()
        shard.shutdown()
        shard.shutdown()  # idempotent
        assert engine.stopped
    asyncio.run(main())


def test_torch_sessions_are_listed_for_replicas_until_their_shard_stops_renewing():
    router = Router(make_placement(4, 2, 2), session_timeout_s=5.0)
    try:
        router.open_session("shard-a", ("127.0.0.1", 1234))
        router.open_session("shard-b", ("127.0.0.1", 1235))
        answer = router.heartbeat(ReplicaInfo("g0-r0", 0, {"grpc": "127.0.0.1:1"}), 0)
        assert answer["sessions"] == {"shard-a": ("127.0.0.1", 1234), "shard-b": ("127.0.0.1", 1235)}
        address, _ = router._sessions["shard-a"]
        router._sessions["shard-a"] = (address, time.monotonic() - 6.0)  # not renewed for longer than the timeout
        router.open_session("shard-b", ("127.0.0.1", 1235))  # renewed
        router._expire_sessions()
        assert list(router.heartbeat(ReplicaInfo("g0-r0", 0, {"grpc": "127.0.0.1:1"}), 0)["sessions"]) == ["shard-b"]
        assert router.describe()["sessions"] == ["shard-b"]
    finally:
        router._stop.set()


@pytest.mark.parametrize("dtype,gpus,expected", [
    ("auto", 0, Compute("cpu", "float32")),
    ("auto", 1, Compute("cuda", "bfloat16")),
    ("auto", 0.5, Compute("cuda", "bfloat16")),
    ("float16", 2, Compute("cuda", "float16")),
    ("bfloat16", 0, Compute("cpu", "bfloat16")),  # asked for: honoured, even where it is slow
])
def test_one_decision_of_device_and_dtype(dtype, gpus, expected):
    assert compute_for(dtype, gpus) == expected


def test_a_bad_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp8'"):
        compute_for("fp8", 0)
    assert Compute("cpu", "float32").devices(3) == Compute("cpu", "float32").devices(1)
