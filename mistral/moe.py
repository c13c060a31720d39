"""Sparse Mixture-of-Experts: top-k gate, grouped SwiGLU expert compute, and the `ExpertBackend` seam.

Design note. The MoE layer owns only its gate. Where the experts run is the `ExpertBackend`'s business:
`LocalExperts` (here) holds every expert of every layer in this process; expert parallelism plugs in a backend
that ships tokens to other processes. Both call `grouped_swiglu`, so every layout does the same arithmetic.

Grouped compute sorts the T*k (token, slot) assignments by expert, runs one matmul chain per expert over its
contiguous slice, weights each row and scatters the rows back to (token, slot) order. There is no Python loop
over tokens. The final sum over the k slots always runs in slot order (`combine`), so the result is bitwise
the same whichever process computed which slot.

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

    def begin_step(self) -> None:
        """The engine starts a forward pass (one step): a backend may pick up a new routing table here."""
        ...

    def end_step(self) -> None:
        """The step's last layer ran: a backend may settle what it gathered per layer (load counts)."""
        ...


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert_ids [T, k]): softmax over the top-k logits, in fp32."""
    logits, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    weights = F.softmax(logits, dim=-1, dtype=torch.float32)
    return weights, expert_ids


def grouped_swiglu(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Weighted outputs of the slots this process computes.

    x [T, H]; expert_ids [T, k] index w1/w3 [E, I, H] and w2 [E, H, I], with -1 for a slot computed elsewhere;
    weights [T, k] -> [A, H], one row per slot with an id >= 0, in row-major (token, slot) order: row a is
    weights[t, j] * expert_ids[t, j](x[t]).

    Each expert sees its tokens in token order (stable sort), whichever process runs it and whatever other
    slots are masked out, so a remote expert computes exactly the bits the local one would.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [T*k]
    slots = (flat >= 0).nonzero().squeeze(1)  # [A] flat (token, slot) indices, row-major
    ids = flat[slots]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=w1.shape[0]).tolist()
    xs = x[slots[order] // k]  # [A, H], grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = xs[start:start + n]
            out[start:start + n] = linear(F.silu(linear(seg, w1[e])) * linear(seg, w3[e]), w2[e])
            start += n
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted * weights.reshape(-1)[slots].to(out.dtype)[:, None]


def combine(slot_outputs: torch.Tensor) -> torch.Tensor:
    """Weighted slot outputs [T, k, H] -> [T, H], summed in slot order, so the bits do not depend on where
    (or in which order) the experts ran."""
    return slot_outputs.sum(dim=1)


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
        t, k = expert_ids.shape
        out = grouped_swiglu(hidden, expert_ids, weights, self.w1[layer_id], self.w2[layer_id], self.w3[layer_id])
        return combine(out.view(t, k, -1))

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass


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
