"""Moving weights between a `Transformer` and canonical-named tensors.

`load_model` builds the model on the meta device (no wasted random init of billions of parameters), reads the
checkpoint with strict accounting, stacks each layer's experts into `LocalExperts`' [E, ...] tensors and
assigns everything in one go. `model_tensors` is the inverse (for writing checkpoints); `random_tensors` makes
the deterministic weights of a preset.
"""

import re

import torch

from mistral.checkpoint import CheckpointReader, expected_shapes, expert_tensor_names
from mistral.config import ModelConfig
from mistral.model import Transformer
from mistral.moe import ExpertBackend, LocalExperts
from mistral.rope import RotaryEmbedding

_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")


def load_model(reader: CheckpointReader, dtype: torch.dtype, device: str | torch.device = "cpu",
               experts: ExpertBackend | None = None, progress: bool = True) -> Transformer:
    """Load a checkpoint. With `experts` given, expert tensors are not read: that backend owns them."""
    config = reader.config
    reader.check_complete()
    names = [n for n in expected_shapes(config) if experts is None or not _EXPERT.match(n)]
    tensors = reader.read(names, dtype, progress=progress)
    with torch.device("meta"):
        model = Transformer(config, experts)
    state = {n: t for n, t in tensors.items() if not _EXPERT.match(n)}
    if isinstance(model.experts, LocalExperts):
        state.update(_stack_experts(config, tensors))
    if config.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = RotaryEmbedding(config)
    return model.to(device).eval()


def _stack_experts(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(config.num_layers):
        per_expert = [expert_tensor_names(layer, e) for e in range(config.num_experts)]
        for slot, w in enumerate(("w1", "w2", "w3")):
            state[f"experts.{w}.{layer}"] = torch.stack([tensors.pop(names[slot]) for names in per_expert])
    return state


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Canonical-named tensors of a model with local experts (experts unstacked again)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("experts."):
            continue
        if name == "output.weight" and model.config.tie_word_embeddings:
            continue
        out[name] = t
    if isinstance(model.experts, LocalExperts):
        for layer in range(model.config.num_layers):
            for e in range(model.config.num_experts):
                w1, w2, w3 = expert_tensor_names(layer, e)
                out[w1] = model.experts.w1[layer][e]
                out[w2] = model.experts.w2[layer][e]
                out[w3] = model.experts.w3[layer][e]
    return out


def random_tensors(config: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random weights (normal(0, std), norms at 1) for every tensor of `config`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.empty(shape).normal_(0.0, std, generator=gen)
    return out
