"""The frontend resumes requests whose shard died, so the client sees exactly a fault-free run; when nothing can
take a request it fails with `UnavailableError` (503 / UNAVAILABLE at the edges), never hangs; its health check
names what is missing, within a second."""

import asyncio
import time

import pytest

from cluster.config import Limits
from cluster.errors import OverloadedError, ShardLost, UnavailableError, as_unavailable
from cluster.frontend import Frontend, LocalShards
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import merge
from engine.sampling_params import SamplingParams
from tests.unit.cluster.conftest import make_frontend


class FlakyShards(LocalShards):
    """Kills the shard of each of the first `failures` streams after it delivered `after` deltas."""

    def __init__(self, llm, failures: int, after: int):
        super().__init__(llm)
        self.failures, self.after, self.requests = failures, after, []

    async def stream(self, request):
        self.requests.append(request)
        fail = len(self.requests) <= self.failures
        count = 0
        async for delta in super().stream(request):
            if fail and count == self.after:
                raise ShardLost("shard died")
            count += 1
            yield delta


def _collect(frontend: Frontend, params: SamplingParams, prompt: str = "The quick brown fox", every_step=True):
    async def run():
        ids = frontend.encode(prompt)
        out, deltas = None, 0
        async for delta in frontend.generate(ids, params, every_step=every_step):
            out, deltas = merge(out, delta), deltas + 1
        return out
    return asyncio.run(run())


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True, logprobs=1),
    SamplingParams(max_tokens=20, temperature=0.9, seed=5, n=3, ignore_eos=True, stop=["zz"]),
], ids=["greedy", "seeded", "n3"])
def test_lost_shard_is_invisible_to_the_client(async_llm, params):
    reference = _collect(make_frontend(async_llm), params)
    flaky = FlakyShards(async_llm, failures=2, after=4)
    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, flaky)
    out = _collect(frontend, params)
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in out.outputs] == \
        [(o.index, o.text, o.token_ids, o.finish_reason) for o in reference.outputs]
    if params.logprobs is not None:
        assert len(out.outputs[0].logprobs) == len(out.outputs[0].token_ids)
    assert frontend.num_resubmits == 2 and out.finished
    resumed = flaky.requests[1]
    assert resumed.params.n == 1 and resumed.resume is not None and len(resumed.resume.token_ids) > 0
    assert frontend.num_requests == 0 and frontend.tokens_in_flight == 0


def test_a_request_read_whole_tells_every_shard_leg_so(async_llm):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reference = _collect(make_frontend(async_llm), params)
    flaky = FlakyShards(async_llm, failures=1, after=3)
    out = _collect(Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, flaky), params,
                   every_step=False)
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert [r.every_step for r in flaky.requests] == [False, False]  # the first leg and the resumed one


def test_gives_up_after_the_resume_timeout(async_llm):
    flaky = FlakyShards(async_llm, failures=100, after=1)
    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, flaky,
                        Limits(resume_timeout_s=0.5))
    with pytest.raises(UnavailableError, match="within 0.5 s"):
        _collect(frontend, SamplingParams(max_tokens=8, ignore_eos=True))
    assert frontend.num_requests == 0


class VanishingShards(LocalShards):
    """The first stream loses its shard after one delta; later ones wait forever, as a request does in Serve's
    queue while no shard is up."""

    def __init__(self, llm):
        super().__init__(llm)
        self.requests = []

    async def stream(self, request):
        self.requests.append(request)
        if len(self.requests) > 1:
            await asyncio.Event().wait()
        async for delta in super().stream(request):
            yield delta
            raise ShardLost("shard died")


def test_a_resumed_request_that_no_shard_takes_gives_up_in_time(async_llm):
    shards = VanishingShards(async_llm)
    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, shards,
                        Limits(resume_timeout_s=0.5))
    began = time.monotonic()
    with pytest.raises(UnavailableError, match="within 0.5 s"):
        _collect(frontend, SamplingParams(max_tokens=8, ignore_eos=True))
    assert 0.5 <= time.monotonic() - began < 3 and len(shards.requests) == 2
    assert frontend.num_requests == 0 and frontend.tokens_in_flight == 0


def _ray_errors() -> dict[str, Exception]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return {"DeploymentUnavailableError": DeploymentUnavailableError(DeploymentID("AttentionShard", "msem")),
            "ReplicaUnavailableError": ReplicaUnavailableError("replica-1"),
            "ActorDiedError": ActorDiedError(),
            "ActorUnavailableError": ActorUnavailableError("connection lost to 10.0.0.7:41234", None)}


@pytest.mark.parametrize("name", list(_ray_errors()))
def test_a_replica_ray_cannot_reach_means_unavailable(async_llm, name):
    error = _ray_errors()[name]
    unavailable = as_unavailable(error)
    assert isinstance(unavailable, UnavailableError)
    assert str(unavailable) == f"the server cannot reach a replica to run the request now ({name}); retry later"

    class UnreachableShards(LocalShards):  # as a Serve handle raises it, before any delta
        async def stream(self, request):
            raise error
            yield

    frontend = Frontend("tiny", async_llm.tokenizer, async_llm.max_model_len, 32000, UnreachableShards(async_llm))
    with pytest.raises(UnavailableError, match=name):
        _collect(frontend, SamplingParams(max_tokens=4))
    assert frontend.num_requests == 0


def test_only_unavailability_is_unavailable():
    stopped = EngineDeadError("the engine stopped")
    assert str(as_unavailable(stopped)) == "the engine stopped"
    already = UnavailableError("no shard")
    assert as_unavailable(already) is already
    for other in (RuntimeError("boom"), ShardLost("resumable"), TimeoutError(), InvalidRequestError("bad")):
        assert as_unavailable(other) is None


def test_admission_limits_refuse_instead_of_queueing(async_llm):
    frontend = make_frontend(async_llm, Limits(max_requests=1, max_tokens_in_flight=64, retry_after_s=3))

    async def run():
        ids = frontend.encode("Hello")
        first = frontend.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True))
        await first.__anext__()  # admitted and running
        with pytest.raises(OverloadedError) as err:
            await frontend.generate(ids, SamplingParams(max_tokens=4)).__anext__()
        assert err.value.retry_after == 3 and "1 requests in flight" in str(err.value)
        await first.aclose()
        assert frontend.num_requests == 0
        # Alone, a request larger than the token budget still runs (it could never run otherwise) ...
        big = frontend.generate(ids, SamplingParams(max_tokens=100, ignore_eos=True))
        await big.__anext__()
        await big.aclose()

    asyncio.run(run())


def test_edge_checks_before_any_shard(async_llm):
    frontend = make_frontend(async_llm, Limits(max_n=4))
    with pytest.raises(InvalidRequestError, match="between 1 and 4"):
        frontend.check([1, 2], SamplingParams(n=5))
    with pytest.raises(InvalidRequestError, match="256"):
        frontend.check([1] * 300, SamplingParams())


# --- health -----------------------------------------------------------------------------------------------------

HANG = "hang"


async def _answer(answer):
    """`answer` as an async check would give it: a value, an exception raised, or no answer at all."""
    if answer == HANG:
        await asyncio.Event().wait()
    if isinstance(answer, Exception):
        raise answer
    return answer


class StubShards(LocalShards):
    def __init__(self, llm, healthy):
        super().__init__(llm)
        self.answer = healthy

    async def healthy(self) -> bool:
        return await _answer(self.answer)


def health_frontend(llm, shards_healthy=True, missing_groups=None) -> Frontend:
    """A frontend whose shards answer `shards_healthy` and whose router answers `missing_groups` (None: the
    model has no expert groups)."""
    expert_health = None if missing_groups is None else (lambda: _answer(missing_groups))
    return Frontend("tiny", llm.tokenizer, llm.max_model_len, 32000, StubShards(llm, shards_healthy),
                    record_metrics=False, expert_health=expert_health)


@pytest.mark.parametrize("shards, groups, reason", [
    (True, None, None),
    (True, [], None),
    (True, [0], "expert group 0 has no live replica"),
    (True, [0, 2], "expert groups 0, 2 have no live replica"),
    (False, [], "no attention shard can take requests: the engine stopped"),
    (HANG, None, "no attention shard answered within 0.7 s"),
    (RuntimeError("no replica"), None, "the attention shards are unreachable: RuntimeError: no replica"),
    (True, HANG, "the expert router did not answer within 0.7 s"),
    (True, RuntimeError("the actor died\n  traceback ..."), "the expert router is unreachable: RuntimeError: "
                                                            "the actor died"),
    (HANG, [1], "no attention shard answered within 0.7 s; expert group 1 has no live replica"),
    (HANG, HANG, "no attention shard answered within 0.7 s; the expert router did not answer within 0.7 s"),
])
def test_health_names_what_is_missing_within_its_deadline(async_llm, shards, groups, reason):
    frontend = health_frontend(async_llm, shards, groups)
    began = time.monotonic()
    assert asyncio.run(frontend.unavailable_reason()) == reason  # a hung part never answers: this is the deadline
    assert time.monotonic() - began < 2.5  # 0.7 s, with room for a loaded machine (once 1.0 s failed under load)
    assert asyncio.run(frontend.healthy()) is (reason is None)
