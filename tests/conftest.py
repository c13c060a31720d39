"""Shared fixtures: tiny real checkpoints written by Hugging Face transformers, and the v1 tokenizer."""

import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch

V1_TOKENIZER = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
INTEGRATION = "tests/integration/"
# Whole `ray up` / `msem serve` runs, bounded in minutes rather than seconds: first, while the unit tests run too.
INTEGRATION_FIRST = ("test_ray_up.py", "test_shutdown.py")


def pytest_collection_modifyitems(config, items):
    """The integration tests first, `INTEGRATION_FIRST` at their head: under `make test` (below) they start at
    once on one worker and the unit tests run on the other meanwhile."""
    def order(item) -> int:
        if not item.nodeid.startswith(INTEGRATION):
            return len(INTEGRATION_FIRST) + 1
        name = item.path.name
        return INTEGRATION_FIRST.index(name) if name in INTEGRATION_FIRST else len(INTEGRATION_FIRST)
    items.sort(key=order)  # stable: each module's tests stay together and in order


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs pytest-xdist with two workers and `--dist loadscope`, where every integration test is
    one unit of work: they run in order on one worker, one local Ray at a time, and the unit tests run on the
    other, on the CPU the integration tests leave idle while they wait for processes, faults and health checks.
    (`--no-loadscope-reorder` keeps the collection's order, so that the integration tests start first.) Any
    other `--dist` mode is xdist's own. Not xdist's `loadgroup`: it marks groups in `item._nodeid`, which pytest
    9.2 no longer reads, so it would not keep the integration tests on one worker."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationAsOneScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return INTEGRATION if nodeid.startswith(INTEGRATION) else super()._split_scope(nodeid)
    return IntegrationAsOneScope(config, log)


def write_hf_checkpoint(path: Path, *, moe: bool = True, seed: int = 0, **overrides) -> Path:
    """A random-init Mixtral (or dense Mistral) checkpoint saved by transformers itself, plus a tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  rope_theta=10_000.0, sliding_window=None, tie_word_embeddings=False)
    if moe:
        fields.update(num_local_experts=4, num_experts_per_tok=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    config = (MixtralConfig if moe else MistralConfig)(**fields)
    model = (MixtralForCausalLM if moe else MistralForCausalLM)(config).eval()
    model.save_pretrained(path)
    shutil.copy(V1_TOKENIZER, path / "tokenizer.model.v1")
    return path


@pytest.fixture(scope="session", autouse=True)
def preset_cache(tmp_path_factory):
    """Presets materialise into a per-session cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("msem-cache")
        mp.setenv("MSEM_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_llm():
    """The embedded tiny preset (real v7 tokenizer, vocab 32768) for tests that start from text."""
    from engine import LLM

    return LLM("tiny", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    """The default small Mixtral (4 experts, top-2, GQA 4, sliding window 24) shared by engine tests."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("mixtral"), sliding_window=24)


@pytest.fixture(scope="session")
def mixtral_full_dir(tmp_path_factory) -> Path:
    """The same shapes without a sliding window."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("mixtral_full"), seed=1)


def same_greedy_outputs(outs, reference, tol: float) -> None:
    """Assert each output has the reference's tokens and, per token, a logprob within `tol` of it."""
    assert len(outs) == len(reference)
    for out, ref in zip(outs, reference):
        got, want = out.outputs[0], ref.outputs[0]
        assert (got.finish_reason, got.token_ids) == (want.finish_reason, want.token_ids)
        for lp_got, lp_want, token in zip(got.logprobs, want.logprobs, want.token_ids):
            assert abs(lp_got[token].logprob - lp_want[token].logprob) <= tol


def small_llm(model_dir, **kwargs):
    """An fp32 engine over a test checkpoint with the v1 tokenizer, no progress bar."""
    from engine import LLM

    return LLM(str(model_dir), tokenizer="v1", dtype="float32", progress=False, **kwargs)
