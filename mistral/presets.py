"""Named model presets: small random-weight models that just work, and the shapes of the real ones.

Two kinds:

* **Materialisable** (`tiny`, `bench`): a `ModelConfig`, a seed and a tokenizer. On first use `materialize`
  writes deterministic random weights (`random_tensors(config, seed)`) as a real Hugging Face checkpoint plus
  mistral-common's bundled tokenizer file into `<cache>/presets/<name>-<version>/`; later uses return that
  directory. Everything downstream (reader, engine, HF parity tests) then treats it like any checkpoint.
* **Config-only** (`mistral-7b`, `mixtral-8x7b`, `mixtral-8x22b`): the published shapes, for planning
  (`msem checkpoint inspect mixtral-8x7b`: parameters, memory, KV bytes). They have no weights.

Why `<version>` is a fingerprint: it hashes the config, seed, tokenizer and `_WEIGHTS_REVISION`, so editing a
preset lands in a new directory instead of silently reusing stale weights. Bump `_WEIGHTS_REVISION` when the
way weights are generated changes (e.g. `random_tensors`).

Concurrent first uses (two processes starting `msem serve`) are safe: each writes into its own temporary
directory beside the final one and renames it into place atomically; the loser of the race discards its copy
(identical, since the weights are deterministic). A reader never sees a half-written directory.
"""

import difflib
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from mistral.config import ModelConfig
from mistral.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_WEIGHTS_REVISION = 1
# Tokenizer name -> file in mistral_common/data (bundled with the package: no network).
TOKENIZER_FILES = MappingProxyType({"v1": "tokenizer.model.v1", "v7": "mistral_instruct_tokenizer_241114.model.v7"})
# Presets at least this large show a progress bar while materialising (a few seconds of work).
_PROGRESS_MIN_PARAMS = 100_000_000


class UnknownPresetError(ModelNotFoundError):
    """A bare name that is neither an existing directory nor a preset."""


class ModelDirNotFoundError(ModelNotFoundError):
    """A path-like model argument whose directory does not exist."""


class ConfigOnlyPresetError(ModelNotFoundError):
    """A preset that only describes a shape (for planning); it has no weights to run."""


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    description: str
    seed: int | None = None  # None: config-only
    tokenizer: str | None = None  # key of TOKENIZER_FILES

    @property
    def is_config_only(self) -> bool:
        return self.seed is None

    @property
    def version(self) -> str:
        """Fingerprint of everything that determines the written files (see the module docstring)."""
        spec = {"config": self.config.to_hf(), "seed": self.seed, "tokenizer": self.tokenizer,
                "revision": _WEIGHTS_REVISION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _moe(**shape) -> ModelConfig:
    return ModelConfig(architecture="MixtralForCausalLM", **shape)


PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    Preset("tiny", _moe(vocab_size=32_768, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                        head_dim=32, intermediate_size=512, num_experts=8, num_experts_per_tok=2,
                        sliding_window=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=1e6),
           "tiny Mixtral-shaped MoE with random weights (~30M params), for tests and the demo; its v7 tokenizer "
           "has tool-call tokens",
           seed=0, tokenizer="v7"),
    Preset("bench", _moe(vocab_size=32_000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                         head_dim=64, intermediate_size=1792, num_experts=8, num_experts_per_tok=2,
                         sliding_window=None, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=1e6),
           "benchmark-sized Mixtral-shaped MoE with random weights (~214M params, ~82M active)",
           seed=1, tokenizer="v1"),
    # Config-only: the published Hugging Face config.json shapes.
    Preset("mistral-7b", ModelConfig(
        vocab_size=32_000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14_336, rms_norm_eps=1e-5, rope_theta=10_000.0, sliding_window=4096,
        max_position_embeddings=32_768, architecture="MistralForCausalLM"),
           "Mistral-7B-v0.1 shape (dense; config-only, for planning)"),
    Preset("mixtral-8x7b", _moe(
        vocab_size=32_000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14_336, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, max_position_embeddings=32_768),
           "Mixtral-8x7B-v0.1 shape (config-only, for planning)"),
    Preset("mixtral-8x22b", _moe(
        vocab_size=32_768, hidden_size=6144, num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128,
        intermediate_size=16_384, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, max_position_embeddings=65_536),
           "Mixtral-8x22B-v0.1 shape (config-only, for planning)"),
)})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownPresetError(_unknown_message(name))
    return PRESETS[name]


def preset_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a preset (any kind); nothing is written."""
    return get_preset(name).config


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$MSEM_CACHE_DIR`, else `$XDG_CACHE_HOME/msem`, else `~/.cache/msem`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MSEM_CACHE_DIR"):
        return Path(os.environ["MSEM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "msem"
    return Path.home() / ".cache" / "msem"


def materialize(name: str, cache_dir: str | Path | None = None, progress: bool | None = None) -> Path:
    """The directory of preset `name`'s checkpoint, writing it on first use.

    `progress=None` shows a progress bar only for presets big enough to take a few seconds (`bench`).
    """
    preset = _materialisable(name)
    final = cache_root(cache_dir) / "presets" / f"{name}-{preset.version}"
    if final.is_dir():
        return final
    logger.info("materialising preset %r (%s params) into %s", name, f"{preset.config.num_params():,}", final)
    return _write_atomically(preset, final, "hf", None, progress)


def write_preset(name: str, out_dir: str | Path, fmt: str = "hf", max_shard_bytes: int | None = None,
                 progress: bool | None = None) -> Path:
    """Write preset `name` as a checkpoint (`fmt`: "hf" or "consolidated") into a new or empty `out_dir`."""
    preset = _materialisable(name)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; choose a new --out")
    return _write_atomically(preset, out, fmt, max_shard_bytes, progress)


def resolve_model(model: str, cache_dir: str | Path | None = None) -> Path:
    """A `--model` argument -> checkpoint directory: an existing directory as is, a preset materialised."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in PRESETS:
        return materialize(model, cache_dir)
    raise model_not_found(model)


def model_not_found(model: str) -> ModelNotFoundError:
    """The error for a `--model` argument that is neither an existing directory nor a preset name."""
    if Path(model).expanduser().exists():
        return ModelDirNotFoundError(f"{model} is a file, not a model directory; pass the directory holding "
                                     "config.json (Hugging Face) or params.json (Mistral)")
    looks_like_path = any(sep and sep in model for sep in (os.sep, os.altsep)) or model.startswith((".", "~"))
    if looks_like_path:
        return ModelDirNotFoundError(f"model directory {model} does not exist; pass a directory holding a "
                                     "Hugging Face or Mistral checkpoint, or a preset name "
                                     f"({', '.join(PRESETS)})")
    return UnknownPresetError(_unknown_message(model))


def _materialisable(name: str) -> Preset:
    preset = get_preset(name)
    if preset.is_config_only:
        raise ConfigOnlyPresetError(
            f"preset {name!r} is config-only: it describes the published shape for planning "
            f"(`msem checkpoint inspect {name}`) and has no weights; to run this model pass --model DIR "
            "with a directory holding the real checkpoint")
    return preset


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{name!r} is not a preset{hint} nor an existing directory; presets: {', '.join(PRESETS)}; "
            "or pass a checkpoint directory (config.json or params.json plus .safetensors weights)")


def _write_atomically(preset: Preset, final: Path, fmt: str, max_shard_bytes: int | None,
                      progress: bool | None) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        _write(preset, tmp, fmt, max_shard_bytes, progress)
        try:
            os.rename(tmp, final)  # atomic; onto a missing (or, POSIX, empty) directory only
        except OSError:
            if not (final.is_dir() and any(final.iterdir())):
                raise
            # Another process finished first; its files are identical (deterministic weights).
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write(preset: Preset, out: Path, fmt: str, max_shard_bytes: int | None, progress: bool | None) -> None:
    # torch only here: resolving a preset already on disk (what the Ingress replicas do) loads none
    from mistral.checkpoint import save_checkpoint
    from mistral.weights import random_tensors

    if progress is None:
        progress = preset.config.num_params() >= _PROGRESS_MIN_PARAMS
    with tqdm(total=3, desc=f"materialising preset {preset.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("random weights")
        tensors = random_tensors(preset.config, preset.seed)
        bar.update()
        bar.set_postfix_str("writing safetensors")
        save_checkpoint(out, preset.config, tensors, fmt=fmt, max_shard_bytes=max_shard_bytes)
        bar.update()
        bar.set_postfix_str("tokenizer")
        _copy_tokenizer(preset.tokenizer, out)
        bar.update()


def _copy_tokenizer(tokenizer: str, out: Path) -> None:
    file_name = TOKENIZER_FILES[tokenizer]
    resource = importlib.resources.files("mistral_common") / "data" / file_name
    if not resource.is_file():
        raise FileNotFoundError(f"mistral-common has no bundled {file_name}; reinstall 'mistral-common"
                                "[sentencepiece]' (>= 1.5)")
    with importlib.resources.as_file(resource) as src:
        shutil.copyfile(src, out / f"tokenizer.model.{tokenizer}")  # the name checkpoints ship it under
