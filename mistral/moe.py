"""Sparse Mixture-of-Experts: top-k gate, grouped SwiGLU expert compute, and the `ExpertBackend` seam.

Design note. The MoE layer owns only its gate. Where the experts run is the `ExpertBackend`'s business:
`LocalExperts` (here) holds every expert of every layer in this process; expert parallelism plugs in a backend
that ships tokens to other processes. Both call `grouped_swiglu`, so every layout does the same arithmetic.

Grouped compute sorts the T*k (token, expert) assignments by expert, runs one matmul chain per expert over its
contiguous slice, and scatters the results back to [T, k, H] before the weighted sum. There is no Python loop
over tokens; the sum over the k slots always runs in slot order, so the combine is bitwise stable whatever the
order in which experts ran.

Legend: T tokens, H hidden, I intermediate, E experts (of a layer, or of a group), k experts per token.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mistral.config import ModelConfig
from mistral.layers import linear


class ExpertBackend(Protocol):
    def __call__(self, layer_id: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], expert_ids [T, k] (global ids), weights [T, k] -> weighted expert sum [T, H]."""
        ...


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert_ids [T, k]): softmax over the top-k logits, in fp32."""
    logits, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    weights = F.softmax(logits, dim=-1, dtype=torch.float32)
    return weights, expert_ids


def grouped_swiglu(x: torch.Tensor, expert_ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w3: torch.Tensor) -> torch.Tensor:
    """Per-assignment expert outputs. x [T, H], expert_ids [T, k] indexing w1/w3 [E, I, H], w2 [E, H, I]
    -> [T, k, H], unweighted: row (t, j) is expert expert_ids[t, j] applied to x[t]."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    xs = x[order // k]  # [T*k, H], grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = xs[start:start + n]
            out[start:start + n] = linear(F.silu(linear(seg, w1[e])) * linear(seg, w3[e]), w2[e])
            start += n
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(t, k, -1)


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """expert_out [T, k, H], weights [T, k] -> [T, H], summed in slot order."""
    return (expert_out * weights.to(expert_out.dtype)[:, :, None]).sum(dim=1)


class LocalExperts(nn.Module):
    """Every expert of every MoE layer, in this process; weights stacked per layer as [E, ...]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.w1 = nn.ParameterList(torch.empty(e, i, h) for _ in range(config.num_layers))
        self.w2 = nn.ParameterList(torch.empty(e, h, i) for _ in range(config.num_layers))
        self.w3 = nn.ParameterList(torch.empty(e, i, h) for _ in range(config.num_layers))

    def __call__(self, layer_id: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        out = grouped_swiglu(hidden, expert_ids, self.w1[layer_id], self.w2[layer_id], self.w3[layer_id])
        return combine(out, weights)


class MoE(nn.Module):
    """The sparse feed-forward of one layer: gate here, experts behind the backend handed to `forward`."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, experts: ExpertBackend) -> torch.Tensor:
        weights, expert_ids = route(linear(x, self.gate.weight), self.top_k)  # [T, k] each
        return experts(self.layer_id, x, expert_ids, weights)
