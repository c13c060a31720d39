"""AsyncLLM: concurrent streams equal the offline engine; abort frees KV; errors reach the right callers."""

import asyncio

import pytest

from engine import LLM, SamplingParams
from engine.async_llm import AsyncLLM
from engine.errors import EngineDeadError, InvalidRequestError, PromptTooLongError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture
def async_llm(mixtral_dir):
    llm = AsyncLLM.from_llm(LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", progress=False))
    yield llm
    llm.shutdown()


async def collect(stream) -> tuple[list[int], str, int]:
    tokens, text, deltas = [], "", 0
    async for delta in stream:
        deltas += 1
        tokens += delta.outputs[0].token_ids if delta.outputs else []
        text += delta.outputs[0].text if delta.outputs else ""
    return tokens, text, deltas


def free_blocks(llm: AsyncLLM) -> int:
    return llm.llm.engine.scheduler.kv.pool.num_free


def test_concurrent_streams_equal_offline_generate(async_llm, mixtral_dir):
    prompts = [[5, 17, 300, 2, 41], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    offline = LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", progress=False)
    expected = [o.outputs[0] for o in offline.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]

    async def main():
        return await asyncio.gather(*(collect(async_llm.generate(p, GREEDY)) for p in prompts))

    for (tokens, text, _), want in zip(asyncio.run(main()), expected):
        assert tokens == want.token_ids
        assert text == want.text
    assert async_llm.num_unfinished_requests == 0


def test_a_slow_reader_gets_merged_deltas(async_llm):
    async def main():
        stream = async_llm.add_request([5, 17, 300], GREEDY)
        while async_llm.num_unfinished_requests:  # the engine runs to the end while nobody reads
            await asyncio.sleep(0.01)
        return await collect(stream)

    tokens, _, deltas = asyncio.run(main())
    assert len(tokens) == GREEDY.max_tokens
    assert deltas == 1


@pytest.mark.parametrize("interval_s, sizes", [
    (0.0, [1] * GREEDY.max_tokens),  # a delta per step
    (60.0, [1, GREEDY.max_tokens - 1]),  # the first token at once, then the rest with the end
    (float("inf"), [1, GREEDY.max_tokens - 1]),
], ids=["each-step", "interval", "whole"])
def test_a_coalesced_stream_gets_the_first_token_at_once_then_merged_deltas(async_llm, interval_s, sizes):
    async def main():
        plain = await collect(async_llm.generate([5, 17, 300], GREEDY))
        deltas = [d async for d in async_llm.add_request([5, 17, 300], GREEDY, stream_interval_s=interval_s)]
        return plain, deltas

    (tokens, text, _), deltas = asyncio.run(main())
    assert [len(d.outputs[0].token_ids) for d in deltas] == sizes
    assert sum((d.outputs[0].token_ids for d in deltas), []) == tokens  # the same output, merged
    assert "".join(d.outputs[0].text for d in deltas) == text
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_abort_mid_stream_frees_kv(async_llm):
    async def main():
        before = free_blocks(async_llm)
        stream = async_llm.add_request([5, 17, 300], SamplingParams(max_tokens=500, ignore_eos=True))
        async for delta in stream:
            if sum(len(c.token_ids) for c in delta.outputs) and free_blocks(async_llm) < before:
                break  # leaving the loop aborts the request
        await asyncio.sleep(0)
        return before

    before = asyncio.run(main())
    deadline = asyncio.run(_wait_until(lambda: free_blocks(async_llm) == before))
    assert deadline, "the aborted request's blocks were not freed"
    assert async_llm.num_unfinished_requests == 0
    assert not async_llm.llm.engine.has_unfinished_requests()


async def _wait_until(predicate, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_bad_requests_raise_before_streaming(async_llm):
    async def main():
        with pytest.raises(PromptTooLongError, match=str(async_llm.max_model_len)):
            async_llm.add_request([5] * async_llm.max_model_len, GREEDY)
        with pytest.raises(InvalidRequestError, match="empty"):
            async_llm.add_request([], GREEDY)
        stream = async_llm.add_request([5, 6], GREEDY, request_id="dup")
        with pytest.raises(InvalidRequestError, match="already in use"):
            async_llm.add_request([5, 6], GREEDY, request_id="dup")
        return await collect(stream)

    tokens, _, _ = asyncio.run(main())
    assert len(tokens) == GREEDY.max_tokens  # the engine kept serving


def test_chat_stream_equals_offline_chat(tiny_llm):
    messages = [{"role": "user", "content": "Hello there, ça va ?"}]
    want = tiny_llm.chat(messages, GREEDY)[0].outputs[0]
    llm = AsyncLLM(model="tiny", dtype="float32", progress=False)

    async def main():
        return await collect(llm.chat(messages, GREEDY))

    try:
        tokens, text, _ = asyncio.run(main())
    finally:
        llm.shutdown()
    assert (tokens, text) == (want.token_ids, want.text)


def test_engine_failure_fails_every_stream_and_later_requests(async_llm, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(async_llm.llm.engine, "step", broken_step)

    async def main():
        streams = [async_llm.add_request([5, 6, 7], GREEDY) for _ in range(3)]
        for stream in streams:
            with pytest.raises(EngineDeadError, match="device lost"):
                await collect(stream)
        with pytest.raises(EngineDeadError):
            async_llm.add_request([5, 6, 7], GREEDY)

    asyncio.run(main())
    assert async_llm.dead is not None
