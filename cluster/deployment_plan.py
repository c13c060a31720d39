"""A deployment plan for a model on a GPU type: how many expert groups, how many experts each holds, how many GPUs a
replica asks for, and the KV-cache room an attention shard has left (`msem plan`).

An expert group holds its experts for every layer, so a group of k experts takes k x layers x one expert's weights.
The planner fills each GPU: a group takes as many experts as fit a GPU's usable memory (what is left after a
reserve for the CUDA context and activations), and the groups split the experts as evenly as the placement does;
slots left over on a GPU become `redundant_slots`, room for copies of hot experts that rebalancing places there.
Asked for more groups than that (finer scaling), the groups are smaller: with the gRPC transport several replicas
share one GPU (fractional `num_gpus`, each with its own reserve); the torch transport needs a whole GPU per replica,
as NCCL refuses two ranks of one communicator on the same GPU. A group none of whose experts fits one GPU spreads
them over several GPUs of a node (one expert never spans two).

The attention shard holds everything but the experts (attention, embeddings, norms, gates); the rest of its GPU is
its KV cache, counted in tokens and in sequences of the model's context.

    msem plan mixtral-8x7b --gpu-memory 40 --gpus-per-node 8
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

from mistral.config import ModelConfig
from mistral.errors import ConfigError
from mistral.presets import PRESETS, model_not_found

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
RESERVE_FRACTION = 0.1  # of a GPU, for activations and the allocator's slack
RESERVE_BYTES = 1 * GIB  # per process on a GPU, for its CUDA context


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    num_groups: int
    experts_per_group: int  # the largest group's; the others hold one fewer at most
    redundant_slots: int  # per group and layer, room for copies of hot experts
    num_gpus: float  # per replica: a fraction when replicas share a GPU, several when one does not suffice
    bytes_per_replica: int  # its slots' weights
    replicas: int  # per group

    @property
    def gpus(self) -> float:
        return self.num_groups * self.replicas * self.num_gpus


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    weight_bytes: int
    kv_bytes: int  # what is left of the GPU for the KV cache
    kv_tokens: int
    sequences: int  # of `context` tokens each
    context: int


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    gpu_bytes: int
    gpus_per_node: int
    transport: str
    groups: GroupPlan | None
    attention: AttentionPlan

    @property
    def expert_nodes(self) -> int:
        return math.ceil(self.groups.gpus / self.gpus_per_node) if self.groups is not None else 0


def usable_bytes(gpu_bytes: int, processes: int = 1) -> int:
    """What `processes` sharing a GPU of `gpu_bytes` may hold in weights and KV cache, together."""
    return int(gpu_bytes * (1 - RESERVE_FRACTION)) - processes * RESERVE_BYTES


def plan_groups(model: ModelConfig, gpu_bytes: int, dtype_bytes: int, transport: str = "grpc",
                num_groups: int | None = None, gpus_per_node: int = 8, replicas: int = 1) -> GroupPlan:
    """The expert groups for `model` on GPUs of `gpu_bytes`: as few as fill each GPU, or `num_groups`."""
    expert = model.num_layers * model.num_expert_params * dtype_bytes  # one expert, every layer
    if expert > usable_bytes(gpu_bytes):
        raise ConfigError(f"one expert takes {expert / GIB:.1f} GiB over its {model.num_layers} layers; a GPU of "
                          f"{gpu_bytes / GIB:.0f} GiB holds {usable_bytes(gpu_bytes) / GIB:.1f} GiB of weights: use "
                          "larger GPUs or a smaller dtype")
    fit = min(usable_bytes(gpu_bytes) // expert, model.num_experts)  # experts one GPU holds
    asked = num_groups is not None
    if not asked:
        num_groups = math.ceil(model.num_experts / fit)
    if not 1 <= num_groups <= model.num_experts:
        raise ConfigError(f"num_groups must be between 1 and the {model.num_experts} experts, got {num_groups}")
    size = math.ceil(model.num_experts / num_groups)
    if size > fit:  # fewer groups than fit one GPU each: a replica spreads its experts over several GPUs
        num_gpus = math.ceil(size / fit)
        if num_gpus > gpus_per_node:
            raise ConfigError(f"{num_groups} groups of {size} experts need {num_gpus} GPUs a replica, more than a "
                              f"node's {gpus_per_node}: use more groups")
        return GroupPlan(num_groups, size, num_gpus * fit - size, float(num_gpus), num_gpus * fit * expert, replicas)
    sharing = 1
    if asked and transport != "torch":  # finer groups than fill a GPU: several replicas on one, each with its reserve
        while size * (sharing + 1) * expert <= usable_bytes(gpu_bytes, sharing + 1):
            sharing += 1
    slots = (usable_bytes(gpu_bytes, sharing) // sharing) // expert
    slots = min(slots, model.num_experts)
    return GroupPlan(num_groups, size, slots - size, 1 / sharing, slots * expert, replicas)


def plan_attention(model: ModelConfig, gpu_bytes: int, dtype_bytes: int, context: int | None = None) -> AttentionPlan:
    """An attention shard on one GPU of `gpu_bytes`: its weights, and the KV cache in the rest."""
    experts = model.num_layers * model.num_experts * model.num_expert_params if model.is_moe else 0
    weights = (model.num_params() - experts) * dtype_bytes
    kv = usable_bytes(gpu_bytes) - weights
    if kv <= 0:
        raise ConfigError(f"the attention weights take {weights / GIB:.1f} GiB; a GPU of {gpu_bytes / GIB:.0f} GiB "
                          f"holds {usable_bytes(gpu_bytes) / GIB:.1f} GiB: use larger GPUs")
    context = context or model.max_position_embeddings
    per_sequence = min(context, model.sliding_window or context)  # a sliding window keeps only its own KV
    tokens = kv // model.kv_bytes_per_token(dtype_bytes)
    return AttentionPlan(weights, kv, tokens, tokens // per_sequence, context)


def plan(model_name: str, model: ModelConfig, gpu_bytes: int, *, dtype: str = "bfloat16", transport: str = "grpc",
         num_groups: int | None = None, gpus_per_node: int = 8, replicas: int = 1,
         attention_gpu_bytes: int | None = None, context: int | None = None) -> Plan:
    dtype_bytes = DTYPE_BYTES[dtype]
    groups = plan_groups(model, gpu_bytes, dtype_bytes, transport, num_groups, gpus_per_node, replicas) \
        if model.is_moe else None
    attention = plan_attention(model, attention_gpu_bytes or gpu_bytes, dtype_bytes, context)
    return Plan(model_name, dtype, gpu_bytes, gpus_per_node, transport, groups, attention)


def format_plan(p: Plan) -> str:
    nodes = f" ({p.gpus_per_node} per expert node), transport {p.transport}" if p.groups is not None else ""
    lines = [f"{p.model} in {p.dtype} on GPUs of {p.gpu_bytes / GIB:.0f} GiB{nodes}"]
    if (g := p.groups) is not None:
        share = f"{g.num_gpus:g} GPU" if g.num_gpus >= 1 else f"1/{round(1 / g.num_gpus)} of a GPU"
        lines += [f"expert groups  {g.num_groups} of up to {g.experts_per_group} experts (all layers), "
                  f"{g.redundant_slots} redundant slot(s) each",
                  f"  per replica  {share}, {g.bytes_per_replica / GIB:.1f} GiB of weights",
                  f"  in all       {g.gpus:g} GPUs at {g.replicas} replica(s) a group: {p.expert_nodes} expert node(s)"]
    a = p.attention
    lines += [f"attention      {a.weight_bytes / GIB:.1f} GiB of weights a shard; KV cache {a.kv_bytes / GIB:.1f} GiB "
              f"= {a.kv_tokens:,} tokens = {a.sequences:,} sequences of {a.context:,} tokens"]
    config = {"dtype": p.dtype, "attention": {"num_gpus": 1, "kv_cache_memory": a.kv_bytes}}
    if g is not None:
        config["expert_groups"] = {"num_groups": g.num_groups, "num_gpus": g.num_gpus,
                                   "redundant_slots": g.redundant_slots, "transport": p.transport}
    lines += ["config (args of a Serve config, or a msem serve --config file):",
              *(f"  {line}" for line in json.dumps(config, indent=2).splitlines())]
    return "\n".join(lines)


def add_plan_command(commands) -> None:
    command = commands.add_parser("plan", help="size expert groups and the KV cache to a GPU type")
    command.add_argument("model", metavar="MODEL",
                         help=f"checkpoint directory or preset name ({', '.join(PRESETS)}); reads its config only")
    command.add_argument("--gpu-memory", required=True, type=float, metavar="GIB", help="memory of one GPU, GiB")
    command.add_argument("--attention-gpu-memory", type=float, metavar="GIB",
                         help="memory of an attention node's GPU, GiB (default: --gpu-memory)")
    command.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of an expert node (default: 8)")
    command.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    command.add_argument("--transport", choices=("grpc", "torch"), default="grpc",
                         help="the per-layer hop; torch (NCCL) needs a whole GPU per replica (default: grpc)")
    command.add_argument("--groups", type=int, help="this many expert groups (default: as few as fill each GPU)")
    command.add_argument("--replicas", type=int, default=1, help="replicas per group (default: 1)")
    command.add_argument("--max-model-len", type=int, help="context of a sequence (default: the model's)")
    command.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    command.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    path = Path(args.model).expanduser()
    if path.is_dir():
        model = ModelConfig.from_dir(path)
    elif args.model in PRESETS:
        model = PRESETS[args.model].config
    else:
        raise model_not_found(args.model)
    for name in ("gpu_memory", "attention_gpu_memory", "gpus_per_node", "replicas", "max_model_len"):
        if (value := getattr(args, name)) is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
    result = plan(args.model, model, int(args.gpu_memory * GIB), dtype=args.dtype, transport=args.transport,
                  num_groups=args.groups, gpus_per_node=args.gpus_per_node, replicas=args.replicas,
                  attention_gpu_bytes=int(args.attention_gpu_memory * GIB) if args.attention_gpu_memory else None,
                  context=args.max_model_len)
    print(json.dumps(dataclasses.asdict(result) | {"expert_nodes": result.expert_nodes}, indent=2) if args.json
          else format_plan(result))
    return 0
