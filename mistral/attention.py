"""The attention seam: the model computes q/k/v and RoPE; an `AttentionBackend` turns them into outputs.

The model does not know where keys and values live. `CausalAttention` (here) is the reference: whole sequences
packed back to back, no cache. The engine plugs in a paged-KV backend with the same contract, and the tests hold
the two equal.

Legend: T tokens (all sequences of a batch, concatenated), n query heads, g kv heads, d head_dim.
"""

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels on a GPU, cuDNN's left out: it builds an execution plan for each new shape, about 5 ms of CPU
# time per call on an H200 host, and a decode step's key lengths change every step (it made the GPU idle 97% of
# a step: docs/PERFORMANCE.md, "On a GPU"). Flash and memory-efficient attention need no plan.
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class AttentionBackend(Protocol):
    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, n, d], k/v [T, g, d] (RoPE applied) -> out [T, n, d]."""
        ...


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [Q, K] mask: key j is visible to query i iff k_j <= q_i and q_i - k_j < sliding_window.

    A window of W therefore covers the token itself and the W - 1 before it (the Hugging Face and
    mistral-inference convention).
    """
    diff = q_pos[:, None] - k_pos[None, :]  # [Q, K]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention of one sequence. q [Q, n, d], k/v [K, g, d] -> [Q, n, d].

    mask [Q, K] bool, or None for plain causal attention between aligned queries and keys (Q == K, both from
    position 0, no window cut). None lets SDPA take its fused causal kernel, several times faster than an
    explicit mask. The batch dimension matters too: on 3-D inputs SDPA falls back to its slow math path.
    """
    out = sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, n, Q, d], [1, g, K, d]
               None if mask is None else mask[None, None])
    return out[0].transpose(0, 1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA, grouped-query when g < n: q [B, n, Q, d], k/v [B, g, K, d], mask broadcastable to [B, n, Q, K] or
    None for plain causal attention -> [B, n, Q, d]. On a GPU, among `GPU_SDPA_BACKENDS` only."""
    with sdpa_kernel(GPU_SDPA_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor | None:
    """The mask for `attend`: None when it is plain causal over aligned positions, else `window_mask`."""
    n = len(q_pos)
    plain = len(k_pos) == n and (sliding_window is None or sliding_window >= n)
    if plain and int(k_pos[0]) == int(q_pos[0]) == 0:
        return None
    return window_mask(q_pos, k_pos, sliding_window)


class CausalAttention:
    """Reference backend: each sequence attends to itself from position 0, nothing is cached."""

    def __init__(self, seq_lens: list[int], sliding_window: int | None):
        self.seq_lens = seq_lens
        self.sliding_window = sliding_window

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for qs, ks, vs in zip(q.split(self.seq_lens), k.split(self.seq_lens), v.split(self.seq_lens)):
            pos = torch.arange(qs.shape[0])
            outs.append(attend(qs, ks, vs, causal_mask(pos, pos, self.sliding_window)))
        return torch.cat(outs)
