import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral.checkpoint import CheckpointReader
from mistral.errors import ModelNotFoundError
from mistral.model import reference_forward
from mistral.presets import (
    PRESETS,
    ConfigOnlyPresetError,
    ModelDirNotFoundError,
    UnknownPresetError,
    cache_root,
    materialize,
    preset_config,
    resolve_model,
    write_preset,
)
from mistral.weights import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return materialize("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def test_tiny_materialises_into_msem_cache_dir_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MSEM_CACHE_DIR", str(tmp_path))
    first = resolve_model("tiny")
    assert first.parent == tmp_path / "presets" and first.name.startswith("tiny-")
    assert {p.name for p in first.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model.v7"}
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "temporary dir left behind"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize("tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_loads_and_runs(tiny_dir):
    reader = CheckpointReader(tiny_dir)
    assert reader.config == preset_config("tiny")
    model = load_model(reader, torch.float32, progress=False)
    (logits,) = reference_forward(model, [[1, 415, 2936, 9060]])
    assert logits.shape == (4, 32_768) and torch.isfinite(logits).all()


def test_tiny_tokenizer_is_mistral_common_v7_with_tool_calls(tiny_dir):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(tiny_dir / "tokenizer.model.v7")).instruct_tokenizer.tokenizer
    assert tokenizer.n_words == preset_config("tiny").vocab_size
    assert tokenizer.is_special(tokenizer.get_special_token("[TOOL_CALLS]"))  # the demo can show tool calls


def test_materialisation_is_deterministic(tiny_dir, tmp_path):
    other = materialize("tiny", cache_dir=tmp_path)
    assert other != tiny_dir
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_write_preset_consolidated_reads_back_equal(tiny_dir, tmp_path):
    out = write_preset("tiny", tmp_path / "tiny-consolidated", fmt="consolidated")
    hf, consolidated = CheckpointReader(tiny_dir), CheckpointReader(out)
    assert consolidated.format == "consolidated" and consolidated.config == hf.config
    names = ["layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "tok_embeddings.weight",
             "layers.3.feed_forward.experts.7.w2.weight"]
    a, b = hf.read(names, torch.float32), consolidated.read(names, torch.float32)
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_write_preset_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_preset("tiny", tmp_path)


def test_config_only_preset_cannot_be_materialised(tmp_path):
    with pytest.raises(ConfigOnlyPresetError, match=r"msem checkpoint inspect mixtral-8x7b.*--model DIR"):
        resolve_model("mixtral-8x7b", cache_dir=tmp_path)
    assert not (tmp_path / "presets").exists()


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(UnknownPresetError) as err:
        resolve_model("mixtral", cache_dir=tmp_path)
    assert isinstance(err.value, ModelNotFoundError)
    assert all(name in str(err.value) for name in PRESETS) and "directory" in str(err.value)


@pytest.mark.parametrize("model", ["./missing", "~/no/such/msem/model", f"some{os.sep}dir"])
def test_missing_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelDirNotFoundError, match=f"model directory {model} does not exist"):
        resolve_model(model, cache_dir=tmp_path)


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MSEM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "msem"
    monkeypatch.setenv("MSEM_CACHE_DIR", str(tmp_path / "msem"))
    assert cache_root() == tmp_path / "msem"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("MSEM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "msem"


def test_preset_shapes():
    bench = preset_config("bench")
    # The brief's shape (hidden 512, intermediate 1792, 8 layers, 8 experts) has 214.2M parameters.
    assert bench.num_params() == 214_213_120 and bench.sliding_window is None
    assert preset_config("mixtral-8x7b").num_params() == 46_702_792_704
    assert preset_config("mixtral-8x22b").num_params() == 140_630_071_296
    assert preset_config("mistral-7b").num_params() == 7_241_732_096
    assert all(p.is_config_only == (p.seed is None) for p in PRESETS.values())


def test_version_changes_with_the_config():
    from dataclasses import replace

    tiny = PRESETS["tiny"]
    assert replace(tiny, seed=tiny.seed + 1).version != tiny.version
    assert replace(tiny, config=replace(tiny.config, num_layers=2)).version != tiny.version


def test_losing_a_concurrent_first_use_race_keeps_the_winner(tmp_path, monkeypatch):
    import mistral.presets as presets

    real_write = presets._write

    def write_after_a_rival_finished(preset, out, *args):
        monkeypatch.setattr(presets, "_write", real_write)
        rival = materialize(preset.name, cache_dir=tmp_path)  # another process wins the race
        real_write(preset, out, *args)
        return rival

    monkeypatch.setattr(presets, "_write", write_after_a_rival_finished)
    path = materialize("tiny", cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "presets").iterdir()] == [path.name]
    assert CheckpointReader(path).check_complete() is None
