"""`ExpertGroup`: the weights of the (layer, expert) pairs one group holds, and the compute of one dispatched batch.

A group loads alone: it reads only its own expert tensors from the checkpoint (the reader's `tensors_read`
shows it). What it holds can differ per layer (a placement with redundant copies gives a hot expert's copies to
several groups), so each layer keeps its own `LayerExperts`: the global ids it holds, ascending, and their
weights stacked as [E_l, ...] in that order, so local expert id i is the layer's i-th expert.

Live rebalancing changes the holdings while batches run. `extend` reads only the pairs a new placement adds and
`retain` drops the pairs it moved away; both build new `LayerExperts` aside and swap the whole per-layer tuple in
one assignment. `forward` reads that tuple once, so a batch running in another thread sees the old holdings or
the new ones, never a mix. During a switch the group holds old and new pairs together, so it serves shards on
either routing table.

`forward` takes what the router sends — the rows of the tokens that have at least one slot here, their global
expert ids with -1 for slots another group computes, and the routing weights — and returns the weighted output
of each of its slots (`mistral.moe.grouped_swiglu`, the arithmetic of the local engine).

Legend: N tokens sent, k slots per token, A slots computed here (ids >= 0), E experts, E_l experts held in a
layer, H hidden, I intermediate.
"""

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from experts.placement import Placement
from mistral.checkpoint import CheckpointReader, expert_tensor_names
from mistral.config import ModelConfig
from mistral.moe import grouped_swiglu


class ExpertBatchError(ValueError):
    """A batch this group cannot compute: wrong shapes, an unknown layer, an expert it does not hold."""


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


@dataclass(frozen=True)
class LayerExperts:
    """The experts a group holds in one layer; never changed in place (a change builds a new one)."""

    expert_ids: tuple[int, ...]  # global ids, ascending: position = local expert id
    local_ids: torch.Tensor  # [E + 1] global id -> local id; -1 for experts not held, and at index E for id -1
    w1: torch.Tensor  # [E_l, I, H]
    w2: torch.Tensor  # [E_l, H, I]
    w3: torch.Tensor  # [E_l, I, H]

    @classmethod
    def build(cls, config: ModelConfig, weights: dict[int, tuple[torch.Tensor, ...]], dtype: torch.dtype,
              device: torch.device) -> "LayerExperts":
        """weights: global expert id -> (w1, w2, w3) of this layer."""
        ids = tuple(sorted(weights))
        local_ids = torch.full((config.num_experts + 1,), -1, dtype=torch.long)
        local_ids[list(ids)] = torch.arange(len(ids))
        h, i = config.hidden_size, config.intermediate_size
        stacks = [torch.stack([weights[e][w] for e in ids]) if ids
                  else torch.empty((0, *shape), dtype=dtype, device=device)
                  for w, shape in enumerate(((i, h), (h, i), (i, h)))]
        return cls(ids, local_ids, *stacks)

    def weights_of(self, expert_id: int) -> tuple[torch.Tensor, ...]:
        local = self.expert_ids.index(expert_id)
        return self.w1[local], self.w2[local], self.w3[local]


class ExpertGroup:
    def __init__(self, config: ModelConfig, group_id: int, layers: Iterable[LayerExperts], dtype: torch.dtype,
                 device: torch.device):
        self.config, self.group_id, self.dtype, self.device = config, group_id, dtype, torch.device(device)
        self.layers = tuple(layers)  # [L]; replaced whole, never mutated (see the module docstring)
        self._changing = threading.Lock()  # one extend or retain at a time; forward never waits for it
        self.tokens_served = 0  # token rows computed (a token routed to two of our experts counts twice)

    @classmethod
    def load(cls, reader: CheckpointReader, placement: Placement, group_id: int, dtype: torch.dtype,
             device: str | torch.device = "cpu", progress: bool = False) -> "ExpertGroup":
        _check_fits(reader.config, placement, group_id)
        pairs = placement.layer_experts_of(group_id)
        weights = _read(reader, pairs, dtype, torch.device(device), progress)
        layers = [LayerExperts.build(reader.config, weights.pop(layer, {}), dtype, torch.device(device))
                  for layer in range(reader.config.num_layers)]
        return cls(reader.config, group_id, layers, dtype, device)

    @property
    def experts(self) -> tuple[int, ...]:
        """Every global expert id held in some layer, ascending."""
        return tuple(sorted({e for layer in self.layers for e in layer.expert_ids}))

    def holds(self, layer: int) -> tuple[int, ...]:
        """Global expert ids held in `layer`, ascending."""
        return self.layers[layer].expert_ids

    def extend(self, reader: CheckpointReader, placement: Placement) -> int:
        """Load the pairs `placement` gives this group that it does not hold yet (reading only those tensors)
        and swap them in; -> the number of pairs loaded."""
        _check_fits(self.config, placement, self.group_id)
        with self._changing:
            current = self.layers
            pairs = [(layer, e) for layer, e in placement.layer_experts_of(self.group_id)
                     if e not in current[layer].expert_ids]
            if not pairs:
                return 0
            added = _read(reader, pairs, self.dtype, self.device, progress=False)
            layers = list(current)
            for layer, new in added.items():
                held = {e: current[layer].weights_of(e) for e in current[layer].expert_ids}
                layers[layer] = LayerExperts.build(self.config, held | new, self.dtype, self.device)
            self.layers = tuple(layers)
            return len(pairs)

    def retain(self, placement: Placement) -> int:
        """Drop the pairs `placement` does not give this group; -> the number of pairs dropped."""
        _check_fits(self.config, placement, self.group_id)
        with self._changing:
            layers, dropped = list(self.layers), 0
            for layer, held in enumerate(self.layers):
                keep = set(placement.experts_of(self.group_id, layer))
                if not keep.issuperset(held.expert_ids):
                    dropped += len(set(held.expert_ids) - keep)
                    weights = {e: held.weights_of(e) for e in held.expert_ids if e in keep}
                    layers[layer] = LayerExperts.build(self.config, weights, self.dtype, self.device)
            self.layers = tuple(layers)
            return dropped

    def validate(self, batch: ExpertBatch) -> None:
        """Raise `ExpertBatchError` for a batch that does not fit this group (checked before any compute)."""
        self._validate(batch, self.layers)

    def _validate(self, batch: ExpertBatch, layers: tuple[LayerExperts, ...]) -> None:
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
        held = layers[batch.layer_id]
        foreign = ids[(ids >= 0) & (held.local_ids[ids] < 0)]
        if len(foreign):
            raise ExpertBatchError(f"expert {int(foreign[0])} does not live in group {self.group_id} in layer "
                                   f"{batch.layer_id} (it holds {list(held.expert_ids)} there)")

    @torch.inference_mode()
    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        """-> [A, H] weighted slot outputs (see `ExpertBatch`)."""
        layers = self.layers  # one read: validation and compute see the same holdings
        self._validate(batch, layers)
        held = layers[batch.layer_id]
        local = held.local_ids[batch.expert_ids]  # -1 stays -1 (index -1 is entry E, which is -1)
        self.tokens_served += int((local >= 0).sum())
        return grouped_swiglu(batch.hidden.to(self.device), local.to(self.device), batch.weights.to(self.device),
                              held.w1, held.w2, held.w3)


def _check_fits(config: ModelConfig, placement: Placement, group_id: int) -> None:
    if placement.num_experts != config.num_experts or placement.num_layers != config.num_layers:
        raise ValueError(f"the placement is for {placement.num_experts} experts x {placement.num_layers} "
                         f"layers; the checkpoint has {config.num_experts} x {config.num_layers}")
    if not 0 <= group_id < placement.num_groups:
        raise ValueError(f"group {group_id} is not in the placement, which has groups 0..{placement.num_groups - 1}")


def _read(reader: CheckpointReader, pairs: list[tuple[int, int]], dtype: torch.dtype, device: torch.device,
          progress: bool) -> dict[int, dict[int, tuple[torch.Tensor, ...]]]:
    """Read the tensors of (layer, expert) pairs -> layer -> expert -> (w1, w2, w3) on `device`."""
    names = {pair: expert_tensor_names(*pair) for pair in pairs}
    tensors = reader.read([n for triple in names.values() for n in triple], dtype, progress=progress)
    out: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
    for (layer, e), triple in names.items():
        out.setdefault(layer, {})[e] = tuple(tensors.pop(n).to(device) for n in triple)
    return out
