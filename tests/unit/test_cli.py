import json

import pytest

from cluster.cli import main
from mistral.checkpoint import CheckpointReader


@pytest.mark.parametrize("fmt, files", [("hf", {"config.json", "model.safetensors"}),
                                        ("consolidated", {"params.json", "consolidated.safetensors"})])
def test_create_then_inspect(fmt, files, tmp_path, capsys):
    out = tmp_path / f"tiny-{fmt}"
    assert main(["checkpoint", "create", "--preset", "tiny", "--out", str(out), "--format", fmt]) == 0
    assert "wrote preset tiny" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == files | {"tokenizer.model.v7"}

    assert main(["checkpoint", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"format                    {fmt}" in text
    assert "tensors                   127" in text  # 2 + 1 + 4 layers x (6 + gate + 8 experts x 3)
    assert "30.03M (30,025,984)" in text and "per layer               8 (top-2" in text
    assert "tokenizer.model.v7" in text


def test_create_sharded_hf(tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(["checkpoint", "create", "--preset", "tiny", "--out", str(out), "--max-shard-size", "50"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert CheckpointReader(out).check_complete() is None


def test_inspect_config_only_preset(capsys):
    assert main(["checkpoint", "inspect", "mixtral-8x7b"]) == 0
    text = capsys.readouterr().out
    assert "46.70B (46,702,792,704)" in text  # total
    assert "12.88B (12,879,925,248)" in text  # active per token
    assert "none (config-only)" in text
    assert "bf16 86.99 GiB" in text  # weights
    assert "bf16 128.00 KiB" in text  # kv cache per token: 2 x 32 layers x 8 heads x 128 x 2 bytes


def test_inspect_json(capsys):
    assert main(["checkpoint", "inspect", "mistral-7b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["sliding_window"] == 4096 and "experts" not in report
    assert report["kv_bytes_per_sequence"]["tokens"] == 4096
    assert report["params"]["total"] == report["params"]["active_per_token"]


def test_inspect_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSEM_CACHE_DIR", str(tmp_path))
    assert main(["checkpoint", "inspect", "bench"]) == 0
    assert "214.21M" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["checkpoint", "create", "--preset", "tinyy", "--out", "{tmp}/x"], "'tinyy' is not a preset"),
    (["checkpoint", "create", "--preset", "mixtral-8x7b", "--out", "{tmp}/x"], "config-only"),
    (["checkpoint", "inspect", "nope"], "presets: tiny, bench"),
    (["checkpoint", "inspect", "{tmp}/missing"], "does not exist"),
    (["checkpoint", "inspect", "{tmp}"], "neither config.json"),
])
def test_user_errors_exit_2_without_traceback(argv, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_create_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["checkpoint", "create", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_incomplete_checkpoint_is_described_then_reported(tmp_path, capsys):
    out = tmp_path / "tiny"
    main(["checkpoint", "create", "--preset", "tiny", "--out", str(out), "--max-shard-size", "50"])
    (out / "model-00003-of-00003.safetensors").unlink()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not v.startswith("model-00003")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(out)]) == 2
    captured = capsys.readouterr()
    assert "parameters:" in captured.out and "lacks tensors" in captured.err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["checkpoint", "create", "--preset", "tiny", "--out", "x", "--format", "consolidated",
              "--max-shard-size", "10"])
    assert err.value.code == 2 and "--format hf only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2


def test_generate_streams_to_stdout(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "6", "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[finish_reason: length]" in err


def test_generate_interactive_reads_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("One\n\nTwo\n"))
    assert main(["generate", "--model", "tiny", "--interactive", "--chat", "--max-tokens", "3"]) == 0
    _, err = capsys.readouterr()
    assert err.count("[finish_reason:") == 2


def test_generate_bad_input_is_a_clear_error(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny"]) == 2
    assert "--prompt" in capsys.readouterr().err


@pytest.mark.parametrize("placement,message", [
    ("0,0,0", "experts [3, 4, 5, 6, 7] are unplaced"),
    ("0,x", "expected linear, round_robin or comma-separated group ids"),
    ("spiral", "unknown placement strategy 'spiral'"),
])
def test_generate_bad_placement_is_a_clear_error(placement, message, capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "x", "--expert-groups", "2", "--transport", "local",
            "--placement", placement]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_with_local_expert_groups_streams(capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "4", "--expert-groups", "2",
            "--transport", "local"]
    assert main(argv) == 0
    assert "[finish_reason: length]" in capsys.readouterr().err
