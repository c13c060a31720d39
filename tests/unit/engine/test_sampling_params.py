"""SamplingParams: every bad value is refused with a SamplingParamsError naming the field."""

import pytest

from engine.errors import InvalidRequestError, SamplingParamsError
from engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_SEED, MAX_TOKENS_LIMIT, SamplingParams


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.top_k) == (1, 16, 1.0, 1.0, 0)
    assert params.min_p == 0.0 and params.seed is None and params.logprobs is None
    assert params.stop == () and params.stop_token_ids == ()
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not params.is_greedy


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -5), ("max_tokens", 0), ("max_tokens", MAX_TOKENS_LIMIT + 1), ("max_tokens", 10**12),
    ("max_tokens", "16"), ("max_tokens", 16.0), ("max_tokens", True), ("max_tokens", None),
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", None),
    ("top_k", -2), ("top_k", 1.0), ("top_k", False),
    ("min_p", -0.1), ("min_p", 1.01),
    ("n", 0), ("n", -1), ("n", MAX_N + 1), ("n", 2.0),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.5), ("logprobs", True),
    ("prompt_logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", -3.0),
    ("frequency_penalty", "0"),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 100.0),
    ("seed", -1), ("seed", MAX_SEED), ("seed", 1.0), ("seed", "42"), ("seed", True),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", 3]), ("stop", ["s"] * 17), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", 7), ("stop_token_ids", "7"),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
])
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert field in str(info.value)
    assert isinstance(info.value, InvalidRequestError)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": -5}, "max_tokens must be at least 1, got -5"),
    ({"temperature": -0.5}, "temperature must be >= 0 (0 means greedy), got -0.5"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"n": 0}, "n must be between 1 and 128"),
    ({"logprobs": 21}, "logprobs must be between 0 and 20"),
    ({"max_tokens": "16"}, "max_tokens must be an integer, got str"),
])
def test_messages_say_what_is_allowed(kwargs, message):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": 0.0}, {"temperature": 2}, {"top_p": 1}, {"top_p": 1e-9},
    {"top_k": -1}, {"top_k": 0}, {"top_k": 50}, {"min_p": 0}, {"min_p": 1.0},
    {"n": MAX_N}, {"max_tokens": MAX_TOKENS_LIMIT}, {"logprobs": 0}, {"logprobs": MAX_LOGPROBS},
    {"prompt_logprobs": 0}, {"presence_penalty": -2}, {"frequency_penalty": 2.0},
    {"repetition_penalty": 0.5}, {"seed": 0}, {"seed": MAX_SEED - 1},
    {"stop": ["a"] * 16}, {"stop_token_ids": [0, 2]}, {"ignore_eos": True},
])
def test_valid_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_floats_are_stored_as_float_and_hash_alike():
    assert SamplingParams(temperature=0) == SamplingParams(temperature=0.0)
    assert isinstance(SamplingParams(top_p=1).top_p, float)
    assert hash(SamplingParams(stop=["x"])) == hash(SamplingParams(stop=("x",)))


def test_stop_and_stop_token_ids_are_normalised_to_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)


def test_is_greedy_for_zero_and_tiny_temperature():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_sample_seed_keeps_seed_for_first_and_derives_distinct_seeds():
    params = SamplingParams(n=8, seed=1234)
    seeds = [params.sample_seed(i) for i in range(8)]
    assert seeds[0] == 1234
    assert len(set(seeds)) == 8
    assert all(0 <= s < MAX_SEED for s in seeds)
    assert seeds == [SamplingParams(n=8, seed=1234).sample_seed(i) for i in range(8)]
    assert SamplingParams(n=8, seed=1235).sample_seed(1) != seeds[1]


def test_sample_seed_is_none_without_seed_and_checks_the_index():
    params = SamplingParams(n=2)
    assert params.sample_seed(0) is None and params.sample_seed(1) is None
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        params.sample_seed(2)


def test_is_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5
