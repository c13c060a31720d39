"""`ModelConfig`: the shape of a Mistral-family model, read from the checkpoint's own config file.

Two dialects describe the same models:

* Hugging Face `config.json` (`MistralForCausalLM`, `MixtralForCausalLM`): `hidden_size`,
  `num_attention_heads`, `num_local_experts`, rope either as `rope_theta` + `rope_scaling` (transformers 4)
  or as one `rope_parameters` dict (transformers 5).
* Mistral's consolidated `params.json`: `dim`, `n_heads`, `moe: {num_experts, num_experts_per_tok}`,
  `rope_theta`, `yarn` / `rope_scaling`.

Both parse into one frozen `ModelConfig` whose names follow the rest of msem. A dense model has
`num_experts == 0`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mistral.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Rotary position scaling. `kind` is "linear" or "yarn" (the ones Mistral models ship with)."""

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ("linear", "yarn"):
            raise ConfigError(f"rope scaling type {self.kind!r} is not supported; use 'linear' or 'yarn'")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "yarn" and not self.original_max_position_embeddings:
            raise ConfigError("yarn rope scaling needs original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    max_position_embeddings: int = 32_768
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    architecture: str = field(default="", compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads}) for grouped-query attention")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be null or >= 1, got {self.sliding_window}")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in [1, {self.num_experts}], "
                              f"got {self.num_experts_per_tok}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ---- parameter accounting (used by `msem checkpoint inspect` and the planners) ----

    @property
    def num_expert_params(self) -> int:
        """Parameters of one expert's SwiGLU FFN (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size

    def num_params(self, active_only: bool = False) -> int:
        """Total parameters, or the ones one token touches (`active_only`: top-k experts per layer)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.is_moe:
            experts = self.num_experts_per_tok if active_only else self.num_experts
            ffn = experts * self.num_expert_params + h * self.num_experts
        else:
            ffn = self.num_expert_params
        per_layer = attn + ffn + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- parsing ----

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` (Hugging Face) or `params.json` (Mistral consolidated) from a model directory."""
        path = Path(path)
        if (path / "config.json").is_file():
            return cls.from_hf(json.loads((path / "config.json").read_text()))
        if (path / "params.json").is_file():
            return cls.from_params(json.loads((path / "params.json").read_text()))
        raise ConfigError(f"{path} has neither config.json (Hugging Face) nor params.json (Mistral)")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Parse a Hugging Face `config.json` of MistralForCausalLM or MixtralForCausalLM."""
        model_type = cfg.get("model_type")
        if model_type not in ("mistral", "mixtral"):
            raise ConfigError(f"model_type {model_type!r} is not a Mistral-family model; "
                              "expected 'mistral' or 'mixtral'")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; Mistral models use 'silu'")
        heads = _require(cfg, "num_attention_heads")
        hidden = _require(cfg, "hidden_size")
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        max_pos = cfg.get("max_position_embeddings", 32_768)
        experts = cfg.get("num_local_experts", 0) if model_type == "mixtral" else 0
        return cls(
            vocab_size=_require(cfg, "vocab_size"),
            hidden_size=hidden,
            num_layers=_require(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=_require(cfg, "intermediate_size"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=_hf_rope_scaling(scaling, max_pos),
            sliding_window=cfg.get("sliding_window"),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if experts else 0,
            bos_token_id=_first(cfg.get("bos_token_id"), 1),
            eos_token_id=_first(cfg.get("eos_token_id"), 2),
            architecture="MixtralForCausalLM" if experts else "MistralForCausalLM",
        )

    @classmethod
    def from_params(cls, params: dict) -> "ModelConfig":
        """Parse Mistral's consolidated `params.json`."""
        dim = _require(params, "dim")
        heads = _require(params, "n_heads")
        moe = params.get("moe") or {}
        scaling = None
        if params.get("yarn"):
            y = params["yarn"]
            scaling = RopeScaling("yarn", float(y["factor"]), y.get("original_max_position_embeddings"),
                                  y.get("beta", 32.0), y.get("alpha", 1.0))
        elif params.get("rope_scaling"):
            scaling = _hf_rope_scaling(params["rope_scaling"], params.get("max_seq_len", 32_768))
        window = params.get("sliding_window")
        return cls(
            vocab_size=_require(params, "vocab_size"),
            hidden_size=dim,
            num_layers=_require(params, "n_layers"),
            num_heads=heads,
            num_kv_heads=params.get("n_kv_heads") or heads,
            head_dim=params.get("head_dim") or dim // heads,
            intermediate_size=_require(params, "hidden_dim"),
            rms_norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10_000.0)),
            rope_scaling=scaling,
            sliding_window=window[0] if isinstance(window, list) else window,
            max_position_embeddings=params.get("max_seq_len", params.get("max_position_embeddings", 32_768)),
            tie_word_embeddings=bool(params.get("tied_embeddings", False)),
            num_experts=moe.get("num_experts", 0),
            num_experts_per_tok=moe.get("num_experts_per_tok", 0),
            architecture="MixtralForCausalLM" if moe else "MistralForCausalLM",
        )

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` for this model (what `save_checkpoint` writes)."""
        cfg = {
            "architectures": [self.architecture or ("MixtralForCausalLM" if self.is_moe else "MistralForCausalLM")],
            "model_type": "mixtral" if self.is_moe else "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_scaling_to_hf(self.rope_scaling),
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.is_moe:
            cfg.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        return cfg

    def to_params(self) -> dict:
        """Mistral's consolidated `params.json` for this model."""
        params = {
            "dim": self.hidden_size, "n_layers": self.num_layers, "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size, "n_heads": self.num_heads, "n_kv_heads": self.num_kv_heads,
            "norm_eps": self.rms_norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "max_seq_len": self.max_position_embeddings, "tied_embeddings": self.tie_word_embeddings,
        }
        if self.sliding_window is not None:
            params["sliding_window"] = self.sliding_window
        if self.rope_scaling is not None:
            params["rope_scaling"] = _rope_scaling_to_hf(self.rope_scaling)
        if self.is_moe:
            params["moe"] = {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok}
        return params

    def summary(self) -> dict:
        return asdict(self)


def _require(cfg: dict, key: str):
    if key not in cfg:
        raise ConfigError(f"model config lacks required field {key!r}")
    return cfg[key]


def _first(value, default: int) -> int:
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def _hf_rope_scaling(scaling: dict | None, max_pos: int) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    factor = float(scaling.get("factor", 1.0))
    original = scaling.get("original_max_position_embeddings")
    if kind == "yarn" and original is None:
        original = int(max_pos / factor)
    return RopeScaling(
        kind=kind,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast", 32.0)),
        beta_slow=float(scaling.get("beta_slow", 1.0)),
        mscale=float(scaling.get("mscale") or 0.0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        attention_factor=scaling.get("attention_factor"),
    )


def _rope_scaling_to_hf(scaling: RopeScaling | None) -> dict | None:
    if scaling is None:
        return None
    out = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "yarn":
        out.update(original_max_position_embeddings=scaling.original_max_position_embeddings,
                   beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
        if scaling.attention_factor is not None:
            out["attention_factor"] = scaling.attention_factor
    return out

