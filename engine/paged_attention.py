"""Attention over the paged KV cache: the engine's `AttentionBackend`.

The cache of each layer is one flat tensor of slots [S, g, d] (S = num_blocks * block_size); position p of a
sequence lives in slot `block_ids[p // block_size] * block_size + p % block_size`. Per step the runner builds
one `AttentionMetadata` (slot indices and masks, shared by all layers); each layer then

1. writes the step's new keys/values into their slots, and
2. attends: all decode tokens (one query each) in one batched, padded SDPA call; each prefill chunk in its
   own call over its visible context (cached prefix + the chunk), masked causally and by the sliding window.

Splitting decodes from prefills keeps padding small: a 2,000-token chunk next to 30 decodes would otherwise pad
every decode to 2,000 queries.

Long contexts: a request whose KV outgrew the pool has its oldest blocks in host RAM (`Request.host_blocks`,
spilled by the KV cache manager). Its chunk, even a single decode token, gets a call of its own whose keys are
those host blocks, copied to the device one layer at a time as that layer runs, followed by its resident
slots. Attention stays exact; the context is bounded by host memory, and each step pays one host-to-device
copy of the spilled part per layer.

Legend: T new tokens this step, B decode sequences, L longest decode context, Q/K one chunk's queries/keys,
n query heads, g kv heads, d head_dim.
"""

from dataclasses import dataclass, field

import torch

from mistral.attention import attend, causal_mask, sdpa, window_mask


@dataclass
class PrefillSpan:
    rows: slice  # rows of this chunk in the step's T tokens
    slots: torch.Tensor  # [K] cache slots of its visible context, oldest first (after `host`'s keys)
    mask: torch.Tensor | None  # [Q, H + K] bool, or None for plain causal (see `attend`)
    host: list[torch.Tensor] = field(default_factory=list)  # spilled blocks [L, 2, B, g, d] before the slots


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's key/value goes
    decode_rows: torch.Tensor  # [B] rows of the decode tokens
    decode_slots: torch.Tensor  # [B, L] context slots (padded with slot 0)
    decode_mask: torch.Tensor  # [B, 1, 1, L] bool, False on padding
    prefills: list[PrefillSpan]


def build_metadata(spans: list[tuple[list[int | None], int, int, dict[int, torch.Tensor]]], block_size: int,
                   sliding_window: int | None, device: torch.device) -> AttentionMetadata:
    """spans: per chunk (block table, first position, number of tokens, spilled blocks), in row order."""
    slot_mapping, decodes, prefills, row = [], [], [], 0
    for block_ids, start, n, host_blocks in spans:
        table = torch.tensor([-1 if b is None else b for b in block_ids])
        k_start = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        spilled = sorted(i for i in host_blocks if (i + 1) * block_size > k_start)  # the visible ones
        if spilled:
            k_start = max(k_start, (spilled[-1] + 1) * block_size)  # the resident part follows them
            assert spilled == list(range(spilled[0], spilled[-1] + 1)), "spilled blocks are the oldest, contiguous"
        k_pos = torch.arange(k_start, start + n)
        k_slots = table[k_pos // block_size] * block_size + k_pos % block_size  # [K]
        slot_mapping.append(k_slots[start - k_start:])
        if spilled:
            q_pos = torch.arange(start, start + n)
            all_pos = torch.cat([torch.arange(spilled[0] * block_size, k_start), k_pos])
            prefills.append(PrefillSpan(slice(row, row + n), k_slots.to(device),
                                        window_mask(q_pos, all_pos, sliding_window).to(device),
                                        [host_blocks[i] for i in spilled]))
        elif n == 1:
            decodes.append((row, k_slots))
        else:
            q_pos = torch.arange(start, start + n)
            mask = causal_mask(q_pos, k_pos, sliding_window)
            prefills.append(PrefillSpan(slice(row, row + n), k_slots.to(device),
                                        None if mask is None else mask.to(device)))
        row += n
    longest = max((len(s) for _, s in decodes), default=0)
    decode_slots = torch.zeros(len(decodes), longest, dtype=torch.long)
    decode_mask = torch.zeros(len(decodes), 1, 1, longest, dtype=torch.bool)
    for i, (_, slots) in enumerate(decodes):
        decode_slots[i, :len(slots)] = slots
        decode_mask[i, ..., :len(slots)] = True
    return AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping).to(device),
        decode_rows=torch.tensor([r for r, _ in decodes], dtype=torch.long, device=device),
        decode_slots=decode_slots.to(device),
        decode_mask=decode_mask.to(device),
        prefills=prefills,
    )


class PagedAttention:
    """Backend for one step: writes into and reads from the layers' slot caches."""

    def __init__(self, kv_cache: torch.Tensor, metadata: AttentionMetadata):
        self.kv_cache = kv_cache  # [layers, 2, S, g, d]
        self.meta = metadata

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache[layer_id]  # [S, g, d] each
        k_cache.index_copy_(0, self.meta.slot_mapping, k)
        v_cache.index_copy_(0, self.meta.slot_mapping, v)
        out = torch.empty_like(q)  # [T, n, d]
        m = self.meta
        if len(m.decode_rows):
            qd = q[m.decode_rows][:, :, None, :]  # [B, n, 1, d]
            kd = k_cache[m.decode_slots].transpose(1, 2)  # [B, g, L, d]
            vd = v_cache[m.decode_slots].transpose(1, 2)
            od = sdpa(qd, kd, vd, m.decode_mask)
            out[m.decode_rows] = od[:, :, 0, :]
        for p in m.prefills:
            k_ctx, v_ctx = k_cache[p.slots], v_cache[p.slots]
            if p.host:  # this layer's part of the spilled blocks, streamed in now: [H, g, d] each
                host = torch.cat([block[layer_id] for block in p.host], dim=1).to(q.device, non_blocking=True)
                k_ctx, v_ctx = torch.cat([host[0], k_ctx]), torch.cat([host[1], v_ctx])
            out[p.rows] = attend(q[p.rows], k_ctx, v_ctx, p.mask)
        return out
