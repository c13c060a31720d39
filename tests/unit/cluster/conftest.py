"""A `Frontend` over one in-process engine (the tiny preset): the servers' tests run without Ray."""

import pytest

from cluster.config import Limits
from cluster.frontend import Frontend, LocalShards


def make_frontend(llm, limits: Limits = Limits(), expert_info=None, rebalance=None) -> Frontend:
    return Frontend("tiny", llm.tokenizer, llm.max_model_len, llm.llm.engine.model.config.vocab_size,
                    LocalShards(llm), limits, expert_info, rebalance)


@pytest.fixture(scope="session")
def async_llm():
    from engine import AsyncLLM

    llm = AsyncLLM(model="tiny", dtype="float32", progress=False, max_model_len=256)
    yield llm
    llm.shutdown()


@pytest.fixture
def frontend(async_llm) -> Frontend:
    return make_frontend(async_llm)
