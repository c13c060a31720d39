"""`ExpertGroup`: the weights of the (layer, expert) pairs one group holds, and the compute of one dispatched batch.

A group loads alone: it reads only its own expert tensors from the checkpoint (the reader's `tensors_read`
shows it). What it holds can differ per layer (a placement with redundant copies gives a hot expert's copies to
several groups), so each layer keeps its own `LayerExperts`: the global ids it holds, ascending, and their
weights, one `DeviceExperts` per device of the group.

A group unit may reserve several devices (GPUs); `experts.device_spread.spread_experts` deals each layer's
experts over all of them. Each device stacks its share as [E_d, ...] by ascending global id, so local expert id
i there is the device's i-th expert of the layer. Where an expert sits changes no bit of its answer.

Live rebalancing changes the holdings while batches run. `extend` reads only the pairs a new placement adds and
`retain` drops the pairs it moved away; both build new `LayerExperts` aside (spreading only the layers they
change over the devices again) and swap the whole per-layer tuple in one assignment. `forward` reads that tuple
once, so a batch running in another thread sees the old holdings or the new ones, never a mix. During a switch
the group holds old and new pairs together, so it serves shards on either routing table.

`forward` takes what the router sends — the rows of the tokens that have at least one slot here, their global
expert ids with -1 for slots another group computes, and the routing weights — and returns the weighted output
of each of its slots (`mistral.moe.grouped_swiglu`, the arithmetic of the local engine). The wire's dtype may
differ from the weights' (a bf16 group behind an fp32 router): the group converts the rows on arrival, computes
in its weights' dtype and answers in the batch's.

Legend: N tokens sent, k slots per token, A slots computed here (ids >= 0), E experts, D devices of the group,
E_d / N_d / A_d the experts / tokens / slots of one device in one layer, H hidden, I intermediate.
"""

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from experts.device_spread import spread_experts
from experts.placement import Placement
from mistral.checkpoint import CheckpointReader, expert_tensor_names
from mistral.config import ModelConfig
from mistral.moe import grouped_swiglu

Device = str | torch.device


class ExpertBatchError(ValueError):
    """A batch this group cannot compute: wrong shapes, an unknown layer, an expert it does not hold."""


@dataclass
class ExpertBatch:
    """One hop of the layer path: what one group replica computes for one layer.

    hidden [N, H] in the wire's floating dtype, on any device; expert_ids [N, k] int64 global ids, -1 where
    another group computes the slot; weights [N, k] fp32 routing weights. The answer is [A, H]: the weighted
    outputs of the slots with an id >= 0, in row-major (token, slot) order, on the device and in the dtype of
    `hidden`.
    """

    layer_id: int
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class DeviceExperts:
    """The share of one layer's experts that lives on one device."""

    local_ids: torch.Tensor  # [E + 1] global id -> local id; -1 for experts not here, and at index E for id -1
    w1: torch.Tensor  # [E_d, I, H]
    w2: torch.Tensor  # [E_d, H, I]
    w3: torch.Tensor  # [E_d, I, H]

    @classmethod
    def build(cls, config: ModelConfig, weights: dict[int, tuple[torch.Tensor, ...]], dtype: torch.dtype,
              device: torch.device) -> "DeviceExperts":
        """weights: global expert id -> (w1, w2, w3), on any device; stacked on `device` by ascending id."""
        ids = sorted(weights)
        h, i = config.hidden_size, config.intermediate_size
        stacks = [torch.stack([weights[e][w].to(device) for e in ids]) if ids
                  else torch.empty((0, *shape), dtype=dtype, device=device)
                  for w, shape in enumerate(((i, h), (h, i), (i, h)))]
        return cls(_id_map(config.num_experts, {e: local for local, e in enumerate(ids)}), *stacks)


@dataclass(frozen=True)
class LayerExperts:
    """The experts a group holds in one layer; never changed in place (a change builds a new one)."""

    expert_ids: tuple[int, ...]  # global ids, ascending
    device_of: torch.Tensor  # [E + 1] global id -> index of its device; -1 for experts not held, and at index E
    shares: tuple[DeviceExperts, ...]  # [D] in the group's device order

    @classmethod
    def build(cls, config: ModelConfig, weights: dict[int, tuple[torch.Tensor, ...]], plan: dict[int, int],
              dtype: torch.dtype, devices: tuple[torch.device, ...]) -> "LayerExperts":
        """weights: global expert id -> (w1, w2, w3) of this layer; plan: global expert id -> device index."""
        shares = tuple(DeviceExperts.build(config, {e: w for e, w in weights.items() if plan[e] == d}, dtype, device)
                       for d, device in enumerate(devices))
        return cls(tuple(sorted(weights)), _id_map(config.num_experts, {e: plan[e] for e in weights}), shares)

    def weights_of(self, expert_id: int) -> tuple[torch.Tensor, ...]:
        share = self.shares[int(self.device_of[expert_id])]
        local = int(share.local_ids[expert_id])
        return share.w1[local], share.w2[local], share.w3[local]


class ExpertGroup:
    def __init__(self, config: ModelConfig, group_id: int, layers: Iterable[LayerExperts], dtype: torch.dtype,
                 device: Device | Sequence[Device]):
        self.config, self.group_id, self.dtype = config, group_id, dtype
        self.devices = _devices(device)  # [D] each layer's experts are spread over all of them
        self.device = self.devices[0]  # the first: the device of a single-device group
        self.layers = tuple(layers)  # [L]; replaced whole, never mutated (see the module docstring)
        self._changing = threading.Lock()  # one extend or retain at a time; forward never waits for it
        self.tokens_served = 0  # token rows computed (a token routed to two of our experts counts twice)

    @classmethod
    def load(cls, reader: CheckpointReader, placement: Placement, group_id: int, dtype: torch.dtype,
             device: Device | Sequence[Device] = "cpu", progress: bool = False) -> "ExpertGroup":
        """device: one device, or the several devices of a group unit (each layer's experts spread over them)."""
        _check_fits(reader.config, placement, group_id)
        devices = _devices(device)
        weights = _read(reader, placement.layer_experts_of(group_id), dtype, progress)
        held = {layer: weights.get(layer, {}) for layer in range(reader.config.num_layers)}
        layers = _build_layers(reader.config, held, dtype, devices)
        return cls(reader.config, group_id, layers.values(), dtype, devices)

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
            if pairs:
                added = _read(reader, pairs, self.dtype, progress=False)
                self._replace({layer: {e: current[layer].weights_of(e) for e in current[layer].expert_ids} | new
                               for layer, new in added.items()})
            return len(pairs)

    def retain(self, placement: Placement) -> int:
        """Drop the pairs `placement` does not give this group; -> the number of pairs dropped."""
        _check_fits(self.config, placement, self.group_id)
        with self._changing:
            changed, dropped = {}, 0
            for layer, held in enumerate(self.layers):
                keep = set(placement.experts_of(self.group_id, layer))
                if not keep.issuperset(held.expert_ids):
                    dropped += len(set(held.expert_ids) - keep)
                    changed[layer] = {e: held.weights_of(e) for e in held.expert_ids if e in keep}
            self._replace(changed)
            return dropped

    def _replace(self, weights: dict[int, dict[int, tuple[torch.Tensor, ...]]]) -> None:
        """Rebuild the layers in `weights` (layer -> expert -> (w1, w2, w3)) and swap them in with one assignment.
        Only these layers are spread again over the devices; no expert of another layer moves."""
        layers = list(self.layers)
        for layer, held in _build_layers(self.config, weights, self.dtype, self.devices).items():
            layers[layer] = held
        self.layers = tuple(layers)

    def validate(self, batch: ExpertBatch) -> None:
        """Raise `ExpertBatchError` for a batch that does not fit this group (checked before any compute)."""
        self._validate(batch, batch.expert_ids.cpu(), self.layers)

    def _validate(self, batch: ExpertBatch, ids: torch.Tensor, layers: tuple[LayerExperts, ...]) -> None:
        """ids: batch.expert_ids on the CPU, where the id maps live."""
        h, k = self.config.hidden_size, self.config.num_experts_per_tok
        if not 0 <= batch.layer_id < self.config.num_layers:
            raise ExpertBatchError(f"unknown layer {batch.layer_id}: the model has {self.config.num_layers}")
        n = batch.hidden.shape[0]
        if batch.hidden.dim() != 2 or batch.hidden.shape[1] != h:
            raise ExpertBatchError(f"hidden must be [N, {h}], got {list(batch.hidden.shape)}")
        if not batch.hidden.is_floating_point():
            raise ExpertBatchError(f"hidden must be a floating-point tensor, got {batch.hidden.dtype}")
        for name, t in (("expert_ids", ids), ("weights", batch.weights)):
            if list(t.shape) != [n, k]:
                raise ExpertBatchError(f"{name} must be [{n}, {k}], got {list(t.shape)}")
        if ids.dtype != torch.long or batch.weights.dtype != torch.float32:
            raise ExpertBatchError("expert_ids must be int64 and weights float32")
        outside = ids[(ids < -1) | (ids >= self.config.num_experts)]
        if len(outside):
            raise ExpertBatchError(f"expert id {int(outside[0])} is outside [0, {self.config.num_experts})")
        held = layers[batch.layer_id]
        foreign = ids[(ids >= 0) & (held.device_of[ids] < 0)]
        if len(foreign):
            raise ExpertBatchError(f"expert {int(foreign[0])} does not live in group {self.group_id} in layer "
                                   f"{batch.layer_id} (it holds {list(held.expert_ids)} there)")

    @torch.inference_mode()
    def forward(self, batch: ExpertBatch, count: bool = True) -> torch.Tensor:
        """-> [A, H] weighted slot outputs (see `ExpertBatch`), on the batch's device and in its dtype.
        `count`: add the batch to `tokens_served` (the load signal); health probes do not.

        Each device computes the rows of the tokens with a slot there, converted to the weights' dtype; every
        device is started before any answer is awaited. Each expert sees the same rows in the same order as on a
        single device, and the answers go back in row-major slot order, so the bits do not depend on the spread.
        """
        layers = self.layers  # one read: validation and compute see the same holdings
        ids = batch.expert_ids.cpu()  # [N, k]
        self._validate(batch, ids, layers)
        held = layers[batch.layer_id]
        if count:
            self.tokens_served += int((ids >= 0).sum())
        answers = [self._compute(batch, share.local_ids[ids], share, device)  # -1 stays -1: entry E is -1
                   for share, device in zip(held.shares, self.devices)]  # [A_d, H] each, on its device
        if len(answers) == 1:
            return answers[0].to(batch.hidden.device, batch.hidden.dtype)
        flat = held.device_of[ids].reshape(-1)  # [N*k]
        slot_device = flat[flat >= 0]  # [A] the device of each slot, row-major
        out = batch.hidden.new_empty(len(slot_device), self.config.hidden_size)  # [A, H]
        for d, answer in enumerate(answers):
            out[slot_device == d] = answer.to(out.device, out.dtype)
        return out

    def _compute(self, batch: ExpertBatch, local: torch.Tensor, share: DeviceExperts,
                 device: torch.device) -> torch.Tensor:
        """local [N, k] local ids on this device, -1 for other slots -> [A_d, H] in row-major slot order."""
        rows = (local >= 0).any(dim=1).nonzero().squeeze(1)  # [N_d] tokens with a slot on this device
        return grouped_swiglu(batch.hidden[rows].to(device, self.dtype), local[rows].to(device),
                              batch.weights[rows].to(device), share.w1, share.w2, share.w3)


def _check_fits(config: ModelConfig, placement: Placement, group_id: int) -> None:
    if placement.num_experts != config.num_experts or placement.num_layers != config.num_layers:
        raise ValueError(f"the placement is for {placement.num_experts} experts x {placement.num_layers} "
                         f"layers; the checkpoint has {config.num_experts} x {config.num_layers}")
    if not 0 <= group_id < placement.num_groups:
        raise ValueError(f"group {group_id} is not in the placement, which has groups 0..{placement.num_groups - 1}")


def _devices(device: Device | Sequence[Device]) -> tuple[torch.device, ...]:
    devices = (device,) if isinstance(device, (str, torch.device)) else tuple(device)
    if not devices:
        raise ValueError("a group needs at least one device: pass a device or a list of them")
    return tuple(torch.device(d) for d in devices)


def _id_map(num_experts: int, values: dict[int, int]) -> torch.Tensor:
    """-> [E + 1] global id -> values[id]; -1 for the other ids and at index E, where id -1 lands."""
    table = torch.full((num_experts + 1,), -1, dtype=torch.long)
    table[list(values)] = torch.tensor(list(values.values()), dtype=torch.long)
    return table


def _build_layers(config: ModelConfig, weights: dict[int, dict[int, tuple[torch.Tensor, ...]]], dtype: torch.dtype,
                  devices: tuple[torch.device, ...]) -> dict[int, LayerExperts]:
    """layer -> expert -> (w1, w2, w3) -> layer -> its experts, spread over `devices` by `spread_experts`."""
    plan = spread_experts(weights, len(devices))
    return {layer: LayerExperts.build(config, held, plan[layer], dtype, devices) for layer, held in weights.items()}


def _read(reader: CheckpointReader, pairs: list[tuple[int, int]], dtype: torch.dtype,
          progress: bool) -> dict[int, dict[int, tuple[torch.Tensor, ...]]]:
    """Read the tensors of (layer, expert) pairs -> layer -> expert -> (w1, w2, w3) on the CPU."""
    names = {pair: expert_tensor_names(*pair) for pair in pairs}
    tensors = reader.read([n for triple in names.values() for n in triple], dtype, progress=progress)
    out: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
    for (layer, e), triple in names.items():
        out.setdefault(layer, {})[e] = tuple(tensors.pop(n) for n in triple)
    return out
