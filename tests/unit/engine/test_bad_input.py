"""Bad input is refused with a typed error whose message says what is allowed; the engine stays usable."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import ChatTemplateError, EngineConfigError, InvalidRequestError, PromptTooLongError, \
    SamplingParamsError
from mistral.errors import ModelNotFoundError
from mistral.presets import ModelDirNotFoundError, UnknownPresetError


@pytest.mark.parametrize("kwargs, field, match", [
    ({"max_tokens": -5}, "max_tokens", "at least 1"),
    ({"max_tokens": 10**9}, "max_tokens", "at most"),
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", r"\(0, 1\]"),
    ({"top_p": 1.5}, "top_p", r"\(0, 1\]"),
    ({"n": 0}, "n", "between 1"),
])
def test_bad_sampling_params(kwargs, field, match):
    with pytest.raises(SamplingParamsError, match=match) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field


def test_empty_prompt(tiny_llm):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        tiny_llm.generate(prompt_token_ids=[[]])


def test_prompt_over_max_model_len_names_both_lengths(mixtral_dir):
    llm = LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", max_model_len=64, progress=False)
    with pytest.raises(PromptTooLongError, match=r"prompt has 80 tokens.*max_model_len\) is 64") as info:
        llm.generate(prompt_token_ids=[[5] * 80])
    assert info.value.param == "prompt"
    ok = llm.generate(prompt_token_ids=[[5] * 10], sampling_params=SamplingParams(max_tokens=3))
    assert len(ok[0].outputs[0].token_ids) >= 1  # still serving


def test_generation_stops_at_the_context_length(mixtral_dir):
    llm = LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", max_model_len=40, progress=False)
    out = llm.generate(prompt_token_ids=[[5] * 30], sampling_params=SamplingParams(max_tokens=100, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 10


def test_token_ids_outside_the_vocabulary(mixtral_dir):
    llm = LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", progress=False)
    with pytest.raises(InvalidRequestError, match=r"outside the vocabulary \[0, 512\)"):
        llm.generate(prompt_token_ids=[[1, 600]])


def test_vllm_prompt_dicts_are_prompts(tiny_llm):
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = tiny_llm.tokenizer.encode("Hello there")
    want = tiny_llm.generate(prompt_token_ids=[ids], sampling_params=greedy)[0].outputs[0].token_ids
    outs = tiny_llm.generate([{"prompt_token_ids": ids}, {"prompt": "Hello there"},
                              {"prompt": "Hello there", "prompt_token_ids": ids}], greedy)
    assert [o.outputs[0].token_ids for o in outs] == [want] * 3
    assert [o.prompt for o in outs] == [None, "Hello there", "Hello there"]
    single = tiny_llm.generate({"prompt_token_ids": ids}, greedy)  # one dict, not a list of them
    assert single[0].outputs[0].token_ids == want


@pytest.mark.parametrize("prompts, match", [
    (42, "got int"),
    (b"Hello", "got bytes"),
    ([{"prompt_token_ids": [1, 2], "multi_modal_data": {}}], r"got keys \['multi_modal_data'\]"),
    ([{}], r"got keys \[\]"),
    ([{"prompt": 5}], "'prompt' is text; got int"),
    ([{"prompt_token_ids": "1 2 3"}], "got str"),
    ([[1, 2.5]], "token ids are ints; got float 2.5"),
    ([["Hello"]], "token ids are ints; got str"),
    ([None], "got NoneType"),
])
def test_what_is_not_a_prompt_is_a_type_error_naming_it(tiny_llm, prompts, match):
    with pytest.raises(TypeError, match=match):
        tiny_llm.generate(prompts)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_batch_is_refused_whole(tiny_llm):
    """One bad prompt in a batch refuses the batch before any request starts."""
    with pytest.raises(InvalidRequestError):
        tiny_llm.generate(prompt_token_ids=[[1, 2, 3], []])
    assert not tiny_llm.engine.has_unfinished_requests()


def test_bad_chat_messages(tiny_llm):
    with pytest.raises(ChatTemplateError):
        tiny_llm.chat([{"role": "assistant", "content": "hi"}])


def test_unknown_preset_and_missing_directory(tmp_path):
    with pytest.raises(UnknownPresetError, match="not a preset.*tiny"):
        LLM("tinyy")
    with pytest.raises(ModelDirNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing" / "model"))
    assert issubclass(UnknownPresetError, ModelNotFoundError)


def test_kv_cache_too_small_for_one_sequence(mixtral_full_dir):
    with pytest.raises(EngineConfigError, match="cannot hold one sequence of max_model_len 512"):
        LLM(str(mixtral_full_dir), tokenizer="v1", dtype="float32", kv_cache_memory=512 * 100, progress=False)


def test_max_model_len_beyond_the_model(mixtral_dir):
    with pytest.raises(EngineConfigError, match="exceeds the model's context"):
        LLM(str(mixtral_dir), tokenizer="v1", dtype="float32", max_model_len=10_000, progress=False)


@pytest.mark.parametrize("kwargs, match", [({"host_kv_cache_memory": -1}, "host_kv_cache_memory must be >= 0"),
                                          ({"kv_write_policy": "write-around"}, "kv_write_policy must be one of")])
def test_bad_kv_tier_settings(kwargs, match):
    from engine.config import EngineConfig

    with pytest.raises(EngineConfigError, match=match):
        EngineConfig(**kwargs)


def test_a_gpu_that_torch_does_not_see_is_named():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: "cuda:0" where there is none
    with pytest.raises(EngineConfigError, match=rf"device '{missing}': this torch .* sees \d+ CUDA device"):
        LLM("tiny", device=missing, progress=False)
