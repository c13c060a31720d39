"""ModelConfig parsing from both dialects, and its validation."""

import pytest

from mistral.config import ModelConfig
from mistral.errors import ConfigError

HF_MIXTRAL = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 32768, "tie_word_embeddings": False,
}


def test_hf_mixtral_fields():
    c = ModelConfig.from_hf(HF_MIXTRAL)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert (c.num_experts, c.num_experts_per_tok, c.sliding_window, c.rope_theta) == (8, 2, None, 1e6)
    assert 46e9 < c.num_params() < 47.5e9 and 12.5e9 < c.num_params(active_only=True) < 13.2e9


def test_transformers5_rope_parameters_and_scaling():
    cfg = dict(HF_MIXTRAL, rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    del cfg["rope_theta"]
    c = ModelConfig.from_hf(cfg)
    assert c.rope_theta == 5e5
    assert (c.rope_scaling.kind, c.rope_scaling.factor, c.rope_scaling.original_max_position_embeddings) == \
        ("yarn", 4.0, 8192)


def test_params_json_dense_and_moe():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-5, "vocab_size": 32768, "rope_theta": 1e6}
    dense = ModelConfig.from_params(params)
    assert not dense.is_moe and dense.intermediate_size == 14336
    moe = ModelConfig.from_params(dict(params, moe={"num_experts": 8, "num_experts_per_tok": 2}))
    assert moe.is_moe and moe.num_experts == 8
    assert ModelConfig.from_params(moe.to_params()) == moe
    assert ModelConfig.from_hf(moe.to_hf()) == moe


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "not a Mistral-family"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "not supported"),
])
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(dict(HF_MIXTRAL, **change))


def test_missing_field_is_named():
    cfg = dict(HF_MIXTRAL)
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf(cfg)
