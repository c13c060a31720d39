"""Reading and writing Mistral-family checkpoints (safetensors only; never pickle).

Formats:
* Hugging Face: `config.json` + `model.safetensors`, or shards listed by `model.safetensors.index.json`.
* Mistral consolidated: `params.json` + `consolidated.safetensors` (or `consolidated-*.safetensors`).

Inside msem every tensor has its *canonical* name, Mistral's own vocabulary (`layers.3.attention.wq.weight`,
`layers.3.feed_forward.experts.5.w1.weight`); `HF_KEY_MAP` translates Hugging Face names. Consolidated
checkpoints store wq/wk rows in interleaved RoPE order; Hugging Face ones, and msem's math, in rotate-half
order, so reading a consolidated checkpoint permutes them once (`permute_for_rope`), and writing one undoes it.

The reader indexes names without reading data and opens only the files that hold the tensors asked for, so an
expert group can load just its experts.
"""

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mistral.config import ModelConfig
from mistral.errors import CheckpointError, ModelNotFoundError

HF_KEY_MAP = [  # (Hugging Face pattern, canonical replacement)
    (r"^model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$", r"layers.\1.attention.w\2.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$", r"layers.\1.feed_forward.gate.weight"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$",
     r"layers.\1.feed_forward.experts.\2.\3.weight"),
]
# Buffers some older exports carry; they are recomputed, never loaded.
IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLE = 1 << 20  # bytes read per sample of a weight file for `CheckpointReader.identity`


def hf_to_canonical(name: str) -> str | None:
    for pattern, repl in HF_KEY_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def canonical_to_hf(name: str) -> str:
    """Inverse of `hf_to_canonical` (used when writing Hugging Face checkpoints)."""
    fixed = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    layer, rest = re.match(r"^layers\.(\d+)\.(.+)$", name).groups()
    rest = re.sub(r"^attention\.w([qkvo])\.", r"self_attn.\1_proj.", rest)
    rest = rest.replace("attention_norm.", "input_layernorm.").replace("ffn_norm.", "post_attention_layernorm.")
    rest = re.sub(r"^feed_forward\.(gate|experts)", r"block_sparse_moe.\1", rest)
    dense = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    rest = re.sub(r"^feed_forward\.(w[123])\.", lambda m: f"mlp.{dense[m.group(1)]}.", rest)
    return f"model.layers.{layer}.{rest}"


def expert_tensor_names(layer_id: int, expert_id: int) -> tuple[str, str, str]:
    """Canonical names of one expert's w1, w2, w3."""
    return tuple(f"layers.{layer_id}.feed_forward.experts.{expert_id}.{w}.weight" for w in ("w1", "w2", "w3"))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of `config` holds, with its shape (canonical names)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes.update({
            p + "attention.wq.weight": (config.num_heads * d, h),
            p + "attention.wk.weight": (config.num_kv_heads * d, h),
            p + "attention.wv.weight": (config.num_kv_heads * d, h),
            p + "attention.wo.weight": (h, config.num_heads * d),
            p + "attention_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
        })
        if config.is_moe:
            shapes[p + "feed_forward.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                w1, w2, w3 = expert_tensor_names(layer, e)
                shapes.update({w1: (i, h), w2: (h, i), w3: (i, h)})
        else:
            shapes.update({p + "feed_forward.w1.weight": (i, h), p + "feed_forward.w2.weight": (h, i),
                           p + "feed_forward.w3.weight": (i, h)})
    return shapes


def permute_for_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (consolidated) -> rotate-half rows (Hugging Face), per head."""
    out_dim, in_dim = w.shape
    return w.view(num_heads, out_dim // num_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def unpermute_for_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_rope`."""
    out_dim, in_dim = w.shape
    return w.view(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_ALIGN = 64  # bytes; torch's CPU allocator aligns every fresh tensor to this


class CheckpointReader:
    """Index of a checkpoint directory's tensors by canonical name; reads only what it is asked for.

    `files_opened` and `tensors_read` count the work done, so callers (and tests) can check that an expert
    group touched only its own shards and tensors.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model directory {self.path} does not exist")
        self.config = ModelConfig.from_dir(self.path)
        self.format = "hf" if (self.path / "config.json").is_file() else "consolidated"
        self.files_opened: list[str] = []
        self.tensors_read: list[str] = []
        self._index = self._build_index()  # canonical name -> (file name, stored name)

    def _build_index(self) -> dict[str, tuple[str, str]]:
        if self.format == "hf":
            index_file = self.path / "model.safetensors.index.json"
            if index_file.is_file():
                weight_map = json.loads(index_file.read_text())["weight_map"]
                if missing := sorted({f for f in weight_map.values() if not (self.path / f).is_file()}):
                    raise CheckpointError(f"{self.path} lacks weight files that {index_file.name} lists: "
                                          f"{_preview(missing)}")
            else:
                weight_map = self._keys_of(sorted(p.name for p in self.path.glob("*.safetensors")))
        else:
            weight_map = self._keys_of(sorted(p.name for p in self.path.glob("consolidated*.safetensors")))
        index, unknown = {}, []
        for stored, file in weight_map.items():
            if IGNORED_KEYS.search(stored):
                continue
            name = hf_to_canonical(stored) if self.format == "hf" else stored
            if name is None:
                unknown.append(stored)
            else:
                index[name] = (file, stored)
        if unknown:
            raise CheckpointError(f"{self.path}: unexpected tensors not in the Mistral/Mixtral layout: "
                                  f"{_preview(unknown)}")
        return index

    def _keys_of(self, files: list[str]) -> dict[str, str]:
        if not files:
            raise CheckpointError(f"{self.path} holds no .safetensors weights (pickled .bin/.pt checkpoints are "
                                  "not loaded; convert them to safetensors)")
        weight_map = {}
        for file in files:
            with safe_open(self.path / file, "pt") as f:
                weight_map.update({k: file for k in f.keys()})
        return weight_map

    @property
    def names(self) -> set[str]:
        return set(self._index)

    @functools.cached_property
    def identity(self) -> str:
        """A name for these weights that two hosts agree on: sha256 over the config file and, per weight file,
        its name, size and three 1 MiB samples (start, middle, end). Two fine-tunes of one architecture have
        the same sizes but differ in the samples; reading 3 MiB a file keeps this cheap for 90 GB checkpoints.
        Shared KV blocks are named under it, so blocks of different weights never mix."""
        digest = hashlib.sha256()
        for name in ("config.json", "params.json"):
            if (self.path / name).is_file():
                digest.update((self.path / name).read_bytes())
        for file in sorted({file for file, _ in self._index.values()}):
            path = self.path / file
            size = path.stat().st_size
            digest.update(f"{file}:{size}".encode())
            with path.open("rb") as f:
                for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE))
        return digest.hexdigest()

    def check_complete(self) -> None:
        """Strict key accounting against the config: a missing or unexpected tensor is an error naming it."""
        expected = expected_shapes(self.config)
        missing = sorted(set(expected) - self.names)
        # A tied model's checkpoint may still carry the (identical) output matrix: allowed, not loaded.
        unexpected = sorted(self.names - set(expected) - {"output.weight"})
        if missing:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensors the config requires: {_preview(missing)}")
        if unexpected:
            raise CheckpointError(f"{self.path}: checkpoint has tensors the config does not describe: "
                                  f"{_preview(unexpected)}")

    def read(self, names: Iterable[str], dtype: torch.dtype, progress: bool = False) -> dict[str, torch.Tensor]:
        """Read the named tensors (canonical names), cast to `dtype`, shape-checked against the config."""
        names = list(names)
        expected = expected_shapes(self.config)
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._index:
                raise CheckpointError(f"{self.path}: checkpoint has no tensor {name!r}")
            by_file.setdefault(self._index[name][0], []).append(name)
        out = {}
        bar = tqdm(total=len(names), desc=f"loading {self.path.name}", unit="tensor", disable=not progress,
                   leave=False)
        for file, file_names in by_file.items():
            self.files_opened.append(file)
            with safe_open(self.path / file, "pt") as f:
                for name in file_names:
                    out[name] = self._convert(name, f.get_tensor(self._index[name][1]), expected, dtype)
                    self.tensors_read.append(name)
                    bar.update()
        bar.close()
        return out

    def _convert(self, name: str, tensor: torch.Tensor, expected: dict, dtype: torch.dtype) -> torch.Tensor:
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config requires {want}")
        if self.format == "consolidated":
            if name.endswith("attention.wq.weight"):
                tensor = permute_for_rope(tensor, self.config.num_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = permute_for_rope(tensor, self.config.num_kv_heads)
        tensor = tensor.to(dtype)
        # safetensors may hand out tensors at any byte offset; MKL's result for a product depends on its
        # operands' alignment, so an unaligned weight would make the same checkpoint compute different bits.
        return tensor if tensor.data_ptr() % _ALIGN == 0 else tensor.clone()


def save_checkpoint(out_dir: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                    fmt: str = "hf", max_shard_bytes: int | None = None) -> Path:
    """Write canonical-named `tensors` as a Hugging Face (optionally sharded) or consolidated checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "consolidated":
        stored = {}
        for name, t in tensors.items():
            if name.endswith("attention.wq.weight"):
                t = unpermute_for_rope(t, config.num_heads)
            elif name.endswith("attention.wk.weight"):
                t = unpermute_for_rope(t, config.num_kv_heads)
            stored[name] = t.contiguous()
        save_file(stored, out / "consolidated.safetensors")
        (out / "params.json").write_text(json.dumps(config.to_params(), indent=2))
        return out
    if fmt != "hf":
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'hf' or 'consolidated'")
    stored = {canonical_to_hf(n): t.contiguous() for n, t in tensors.items()}
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    shards = _shard(stored, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]


def _preview(names: list[str], limit: int = 5) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
