"""Checkpoint reading: formats, strict key accounting, partial reads, dtypes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral.checkpoint import CheckpointReader, expert_tensor_names, save_checkpoint
from mistral.config import ModelConfig
from mistral.errors import CheckpointError, ConfigError, ModelNotFoundError
from mistral.model import reference_forward
from mistral.weights import load_model, model_tensors
from tests.conftest import write_hf_checkpoint

PROMPT = [[5, 17, 300, 2, 41, 99, 7, 8, 256, 11, 3]]


def logits_of(path, dtype=torch.float32):
    return reference_forward(load_model(CheckpointReader(path), dtype, progress=False), PROMPT)[0]


def test_hf_sharded_by_transformers_loads_identically(tmp_path, mixtral_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits_of(tmp_path / "sharded"), logits_of(mixtral_dir))


def test_consolidated_round_trip_same_logits(tmp_path, mixtral_dir):
    reader = CheckpointReader(mixtral_dir)
    tensors = reader.read(reader.names, torch.float32)
    out = save_checkpoint(tmp_path / "consolidated", reader.config, tensors, fmt="consolidated")
    assert (out / "params.json").is_file() and (out / "consolidated.safetensors").is_file()
    stored = load_file(out / "consolidated.safetensors")
    # the stored q rows really are in the interleaved layout (not a plain copy)
    assert not torch.equal(stored["layers.0.attention.wq.weight"], tensors["layers.0.attention.wq.weight"])
    assert ModelConfig.from_dir(out) == reader.config
    assert torch.allclose(logits_of(out), logits_of(mixtral_dir), atol=1e-6)


def test_own_sharded_writer_round_trip(tmp_path, mixtral_dir):
    reader = CheckpointReader(mixtral_dir)
    out = save_checkpoint(tmp_path / "s", reader.config, reader.read(reader.names, torch.float32),
                          max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(logits_of(out), logits_of(mixtral_dir))
    lost = sorted(set(index["weight_map"].values()))[1]
    (out / lost).unlink()  # a copy cut short: the index lists a file the directory lacks
    with pytest.raises(CheckpointError, match=f"lacks weight files that model.safetensors.index.json lists: {lost}$"):
        CheckpointReader(out)


def test_reading_a_subset_of_experts_reads_only_those(tmp_path, mixtral_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(mixtral_dir).save_pretrained(tmp_path / "sh", max_shard_size="50KB")
    reader = CheckpointReader(tmp_path / "sh")
    wanted = [n for pair in [(0, 1), (1, 3)] for n in expert_tensor_names(*pair)]
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    files_needed = {index["weight_map"][n.replace("layers.", "model.layers.").replace("feed_forward", "block_sparse_moe")]
                    for n in wanted}
    got = reader.read(wanted, torch.float32)
    assert sorted(got) == sorted(wanted)
    assert reader.tensors_read == wanted
    assert set(reader.files_opened) == files_needed
    assert len(files_needed) < len(set(index["weight_map"].values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(mixtral_dir, dtype):
    model = load_model(CheckpointReader(mixtral_dir), dtype, progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.experts.w1[0].dtype == dtype


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(tmp_path, mixtral_dir):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    path = _rewrite(mixtral_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"lacks .*layers\.1\.feed_forward\.experts\.2\.w3\.weight"):
        load_model(CheckpointReader(path), torch.float32, progress=False)


def test_extra_tensor_is_named(tmp_path, mixtral_dir):
    path = _rewrite(mixtral_dir, tmp_path / "x", lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensors .*model.layers.0.mystery.weight"):
        CheckpointReader(path)


def test_tensor_of_a_layer_the_config_lacks_is_named(tmp_path, mixtral_dir):
    extra = "model.layers.7.input_layernorm.weight"
    path = _rewrite(mixtral_dir, tmp_path / "l", lambda t: t.update({extra: torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"does not describe: layers\.7\.attention_norm\.weight"):
        load_model(CheckpointReader(path), torch.float32, progress=False)


def test_misshaped_tensor_is_named(tmp_path, mixtral_dir):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _rewrite(mixtral_dir, tmp_path / "s", lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wk\.weight.*\(16, 64\).*\(32, 64\)"):
        load_model(CheckpointReader(path), torch.float32, progress=False)


def test_pickle_checkpoints_are_refused(tmp_path, mixtral_dir):
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        CheckpointReader(tmp_path)


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(ConfigError, match="neither config.json"):
        CheckpointReader(tmp_path)


def test_model_tensors_round_trip(tmp_path, mixtral_dir):
    model = load_model(CheckpointReader(mixtral_dir), torch.float32, progress=False)
    out = save_checkpoint(tmp_path / "rt", model.config, model_tensors(model))
    assert torch.equal(logits_of(out), logits_of(mixtral_dir))


def test_dense_tied_checkpoint_without_lm_head(tmp_path):
    path = write_hf_checkpoint(tmp_path / "d", moe=False, tie_word_embeddings=True)
    reader = CheckpointReader(path)
    assert "output.weight" not in reader.names
    model = load_model(reader, torch.float32, progress=False)
    assert model.output.weight is model.tok_embeddings.weight
