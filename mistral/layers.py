"""Dense building blocks of the Mistral family: RMSNorm, grouped-query attention, SwiGLU feed-forward.

Parameter names follow Mistral's own checkpoints (`wq wk wv wo`, `w1 w2 w3`) so the Hugging Face key map in
`checkpoint.py` is a short table.

Legend: T tokens, H hidden, I intermediate, n query heads, g kv heads, d head_dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mistral.attention import AttentionBackend
from mistral.config import ModelConfig
from mistral.rope import apply_rotary

# Up to this many rows, `linear` computes on CPU as weight @ x.T (see there); beyond it plain F.linear is as fast.
FEW_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ weight[out, in].T -> [M, out], the product every layer uses.

    On CPU, with few rows, MKL is 1.5-4x faster computing the same product as `weight @ x.T` (gemm with a
    transposed right operand) than as `x @ weight.T`, and a single row is fastest padded to two: on the bench
    shapes, 32000x512 at one row takes 1.7 ms instead of 6.5 ms, which is the whole of decode. The result is a
    transposed view; callers reshape, never view. Large batches and CUDA take F.linear unchanged.
    """
    m = x.shape[0]
    if x.device.type != "cpu" or m > FEW_ROWS:
        return F.linear(x, weight)
    if m == 1:
        return torch.mm(weight, x.repeat(2, 1).T)[:, :1].T
    return torch.mm(weight, x.T).T


class RMSNorm(nn.Module):
    """Normalises in fp32 whatever the weights' dtype, as the reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.wq = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: AttentionBackend) -> torch.Tensor:
        # x [T, H]
        t = x.shape[0]
        q = linear(x, self.wq.weight).reshape(t, self.num_heads, self.head_dim)  # [T, n, d]
        k = linear(x, self.wk.weight).reshape(t, self.num_kv_heads, self.head_dim)  # [T, g, d]
        v = linear(x, self.wv.weight).reshape(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(self.layer_id, q, k, v)  # [T, n, d]
        return linear(out.reshape(t, self.num_heads * self.head_dim), self.wo.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). One dense layer, or the math of one expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.w1.weight)) * linear(x, self.w3.weight), self.w2.weight)
