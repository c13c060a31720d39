"""Rotary position embeddings (RoPE) with linear and YaRN scaling.

Layout: the Hugging Face "rotate half" convention — a head's first half pairs with its second half. Mistral's
consolidated checkpoints use interleaved pairs instead; the loader permutes their wq/wk rows once at load time
(see `checkpoint.permute_for_rope`), so the math here has one layout only.

Legend: T tokens, n heads, d head_dim.
"""

import math

import torch

from mistral.config import ModelConfig, RopeScaling


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: torch.Tensor, s: RopeScaling, base: float, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): interpolate low frequencies, keep high ones, ramp in between."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / s.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if s.attention_factor is not None:
        attention = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention = _mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim)
    else:
        attention = _mscale(s.factor)
    return inv_freq, attention


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for arbitrary (non-contiguous) positions: a batch mixes sequences at any offset."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, base = config.head_dim, config.rope_theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [d/2]
        self.attention_scaling = 1.0
        scaling = config.rope_scaling
        if scaling is not None and scaling.kind == "linear":
            inv_freq = inv_freq / scaling.factor
        elif scaling is not None and scaling.kind == "yarn":
            inv_freq, self.attention_scaling = _yarn(inv_freq, scaling, base, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, 1, d] (broadcast over heads), computed in fp32 then cast
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, d]
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, n, d]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
