"""Integration fixtures: one local Ray instance per test module, on this machine only; the reference engine."""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from cluster.app import init_local_ray

    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """`reference(prompt, max_tokens, temperature=0, seed=None)`: the text of the single-process engine on the
    tiny preset (greedy by default)."""
    from engine import LLM, SamplingParams
    from tests.integration.serving import MAX_MODEL_LEN

    llm = LLM("tiny", dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)

    def complete(prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True)
        return llm.generate(prompt, params)[0].outputs[0].text
    return complete
