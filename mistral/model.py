"""The Mistral / Mixtral transformer as plain modules with its collaborators injected.

`Transformer.forward(token_ids, positions, attention)` runs a flat batch of tokens — any mix of sequences at
any positions — and returns final hidden states; `compute_logits` projects only the rows a caller needs
(the last token of each sequence while decoding, every row for prompt logprobs). Where keys/values live is the
`AttentionBackend`'s business, where experts run the `ExpertBackend`'s; `reference_forward` plugs in the
simplest of each.

Legend: T tokens, H hidden, V vocab.
"""

import torch
from torch import nn

from mistral.attention import AttentionBackend, CausalAttention
from mistral.config import ModelConfig
from mistral.layers import Attention, FeedForward, RMSNorm, linear
from mistral.moe import ExpertBackend, LocalExperts, MoE
from mistral.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe:
            self.feed_forward = MoE(config, layer_id)
        else:
            self.feed_forward = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attention: AttentionBackend, experts: ExpertBackend | None):
        h = x + self.attention(self.attention_norm(x), cos, sin, attention)
        normed = self.ffn_norm(h)
        ffn = self.feed_forward(normed, experts) if experts is not None else self.feed_forward(normed)
        return h + ffn


class Transformer(nn.Module):
    """Weights of everything but the experts; `experts` is the backend that runs them (None: dense model).

    When no backend is given for a MoE model, the model builds `LocalExperts` and owns them as a submodule.
    """

    def __init__(self, config: ModelConfig, experts: ExpertBackend | None = None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(config)
        if config.is_moe and experts is None:
            experts = LocalExperts(config)
        self.experts = experts

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                attention: AttentionBackend) -> torch.Tensor:
        # token_ids, positions [T] -> hidden [T, H]
        x = self.tok_embeddings(token_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention, self.experts)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [S, H] -> fp32 logits [S, V]
        return linear(hidden, self.output.weight).float()


@torch.inference_mode()
def reference_forward(model: Transformer, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits [L, V] of every position of each whole sequence, no cache: the yardstick for every fast path."""
    device = next(model.parameters()).device
    tokens = torch.tensor([t for seq in sequences for t in seq], device=device)
    positions = torch.cat([torch.arange(len(seq), device=device) for seq in sequences])
    attention = CausalAttention([len(seq) for seq in sequences], model.config.sliding_window)
    logits = model.compute_logits(model(tokens, positions, attention))
    return list(logits.split([len(seq) for seq in sequences]))
