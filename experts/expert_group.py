"""`ExpertGroup`: the weights of one group's (layer, expert) pairs and the compute of one dispatched batch.

A group loads alone: it reads only its own expert tensors from the checkpoint (the reader's `tensors_read`
shows it), stacked per layer as [E_g, ...] in ascending global id, so local expert id i is the group's i-th
expert. `forward` takes what the router sends — the rows of the tokens that have at least one slot here, their
global expert ids with -1 for slots another group computes, and the routing weights — and returns the weighted
output of each of its slots (`mistral.moe.grouped_swiglu`, the arithmetic of the local engine).

Legend: N tokens sent, k slots per token, A slots computed here (ids >= 0), H hidden, I intermediate.
"""

from dataclasses import dataclass

import torch

from experts.placement import Placement
from mistral.checkpoint import CheckpointReader, expert_tensor_names
from mistral.config import ModelConfig
from mistral.moe import grouped_swiglu


class ExpertBatchError(ValueError):
    """A batch this group cannot compute: wrong shapes, an unknown layer, an expert that lives elsewhere."""


@dataclass
class ExpertBatch:
    """One hop of the layer path: what one group replica computes for one layer.

    hidden [N, H] in the model dtype; expert_ids [N, k] int64 global ids, -1 where another group computes the
    slot; weights [N, k] fp32 routing weights. The answer is [A, H]: the weighted outputs of the slots with an
    id >= 0, in row-major (token, slot) order.
    """

    layer_id: int
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


class ExpertGroup:
    def __init__(self, config: ModelConfig, group_id: int, experts: tuple[int, ...],
                 tensors: dict[str, torch.Tensor]):
        self.config, self.group_id, self.experts = config, group_id, experts
        self.tokens_served = 0  # token rows computed (a token routed to two of our experts counts twice)
        self.dtype = next(iter(tensors.values())).dtype
        # global expert id -> local index, -1 for experts of other groups
        self.local_ids = torch.full((config.num_experts + 1,), -1, dtype=torch.long)
        self.local_ids[list(experts)] = torch.arange(len(experts))
        self.w1, self.w2, self.w3 = [], [], []
        for layer in range(config.num_layers):
            names = [expert_tensor_names(layer, e) for e in experts]
            for slot, stack in enumerate((self.w1, self.w2, self.w3)):
                stack.append(torch.stack([tensors.pop(n[slot]) for n in names]))  # [E_g, ...]

    @classmethod
    def load(cls, reader: CheckpointReader, placement: Placement, group_id: int, dtype: torch.dtype,
             device: str | torch.device = "cpu", progress: bool = False) -> "ExpertGroup":
        config = reader.config
        if placement.num_experts != config.num_experts or placement.num_layers != config.num_layers:
            raise ValueError(f"the placement is for {placement.num_experts} experts x {placement.num_layers} "
                             f"layers; the checkpoint has {config.num_experts} x {config.num_layers}")
        experts = placement.experts_of(group_id)
        names = [n for layer, e in placement.layer_experts_of(group_id) for n in expert_tensor_names(layer, e)]
        tensors = {n: t.to(device) for n, t in reader.read(names, dtype, progress=progress).items()}
        return cls(config, group_id, experts, tensors)

    def validate(self, batch: ExpertBatch) -> None:
        """Raise `ExpertBatchError` for a batch that does not fit this group (checked before any compute)."""
        h, k = self.config.hidden_size, self.config.num_experts_per_tok
        if not 0 <= batch.layer_id < self.config.num_layers:
            raise ExpertBatchError(f"unknown layer {batch.layer_id}: the model has {self.config.num_layers}")
        n = batch.hidden.shape[0]
        if batch.hidden.dim() != 2 or batch.hidden.shape[1] != h:
            raise ExpertBatchError(f"hidden must be [N, {h}], got {list(batch.hidden.shape)}")
        if batch.hidden.dtype != self.dtype:
            raise ExpertBatchError(f"hidden must be {self.dtype}, got {batch.hidden.dtype}")
        for name, t in (("expert_ids", batch.expert_ids), ("weights", batch.weights)):
            if list(t.shape) != [n, k]:
                raise ExpertBatchError(f"{name} must be [{n}, {k}], got {list(t.shape)}")
        if batch.expert_ids.dtype != torch.long or batch.weights.dtype != torch.float32:
            raise ExpertBatchError("expert_ids must be int64 and weights float32")
        ids = batch.expert_ids
        outside = ids[(ids < -1) | (ids >= self.config.num_experts)]
        if len(outside):
            raise ExpertBatchError(f"expert id {int(outside[0])} is outside [0, {self.config.num_experts})")
        foreign = ids[(ids >= 0) & (self.local_ids[ids] < 0)]
        if len(foreign):
            raise ExpertBatchError(f"expert {int(foreign[0])} does not live in group {self.group_id} "
                                   f"(it holds {list(self.experts)})")

    @torch.inference_mode()
    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        """-> [A, H] weighted slot outputs (see `ExpertBatch`)."""
        self.validate(batch)
        device = self.w1[0].device
        local = self.local_ids[batch.expert_ids]  # -1 stays -1 (index E maps to -1 too)
        layer = batch.layer_id
        self.tokens_served += int((local >= 0).sum())
        return grouped_swiglu(batch.hidden.to(device), local.to(device), batch.weights.to(device),
                              self.w1[layer], self.w2[layer], self.w3[layer])
