"""Whether a config's replicas fit the machines: the node types of a Ray cluster launcher config (`cluster.yaml`,
or `~/ray_bootstrap_config.yaml`, the copy `ray up` leaves on the head).

Each role the config deploys (attention shards, each expert group, the memory store) asks per replica for CPUs,
GPUs and its `resources`; a node type can hold a replica when it has every one of them. At their upper replica
bounds the roles must fit, each alone in the node types that can hold it, and all together in every resource,
counting each node type at its `max_workers` (the head once). Ingress and Router run on the head without
reserved CPUs, so they ask for nothing here; the memory store is counted on the head, where it is pinned.
`problems` names what does not fit, with the numbers.

    msem capacity --config configs/mixtral-8x7b.yaml --cluster cluster.yaml   # exit 1 when it does not fit
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.config import HEAD, ServeConfig, load_config
from mistral.errors import ConfigError

AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class Role:
    name: str
    max_replicas: int
    demand: dict[str, float]  # per replica, only what is above 0


@dataclass(frozen=True)
class NodeType:
    name: str
    count: int  # nodes at most
    resources: dict[str, float]

    def holds(self, demand: dict[str, float]) -> int:
        """How many replicas of `demand` one node of this type holds."""
        return min(math.floor(self.resources.get(key, 0) / need + 1e-9) for key, need in demand.items()) \
            if demand else 0


def node_types(launcher_config: dict) -> list[NodeType]:
    """The node types of a cluster launcher config, with their declared resources (the head's with Ray's own
    head marker, which pins Ingress, Router and the memory store there)."""
    types = []
    for name, spec in launcher_config.get("available_node_types", {}).items():
        resources = dict(spec.get("resources") or {})
        if name == launcher_config.get("head_node_type"):
            types.append(NodeType(name, 1, {**resources, HEAD: 1} if resources else {}))
        else:
            types.append(NodeType(name, int(spec.get("max_workers", 0)), resources))
    return types


def declared(types: list[NodeType]) -> bool:
    """Whether the node types say what they hold (the local provider's list none, or none with resources)."""
    return bool(types) and all(t.resources for t in types)


def roles(config: ServeConfig, has_gpus: bool) -> list[Role]:
    """What each role asks for at its upper bound; a role's GPUs default as `cluster.app` decides them."""
    def demand(cpus: float, gpus: float | None, resources: dict[str, float]) -> dict[str, float]:
        asked = {"CPU": cpus, "GPU": gpus if gpus is not None else float(has_gpus), **resources}
        return {key: value for key, value in asked.items() if value > 0}

    attention = config.attention
    out = [Role("AttentionShard", attention.replicas.max,
                demand(attention.num_cpus, attention.num_gpus, attention.resources))]
    if (eg := config.expert_groups) is not None:
        out += [Role(f"ExpertGroup{g}", eg.bounds(g).max, demand(eg.num_cpus, eg.num_gpus, eg.resources))
                for g in range(eg.num_groups)]
    if config.memory is not None and (store := config.memory.store) is not None:
        out.append(Role("MemoryStore", 1, demand(store.num_cpus, 0, store.resources)))
    return out


def problems(config: ServeConfig, types: list[NodeType]) -> list[str]:
    """What of `config` at its upper replica bounds the node types cannot hold (empty when it fits, and when a
    node type declares no resources: the local provider's, whose machines Ray measures when it starts them)."""
    if not declared(types):
        return []
    has_gpus = any(t.resources.get("GPU", 0) > 0 for t in types)
    found = []
    by_demand: dict[tuple, list[Role]] = {}
    for role in roles(config, has_gpus):
        by_demand.setdefault(tuple(sorted(role.demand.items())), []).append(role)
    for demand, same in by_demand.items():  # roles asking alike share the same nodes: count them together
        wanted = sum(role.max_replicas for role in same)
        hosts = [t for t in types if t.holds(dict(demand)) > 0]
        room = sum(t.count * t.holds(dict(demand)) for t in hosts)
        if wanted > room:
            names = _names([role.name for role in same])
            where = ", ".join(f"{t.name}: {t.count} x {t.holds(dict(demand))}" for t in hosts) or "none"
            found.append(f"{names} may run {wanted} replicas of {_format(dict(demand))} at their upper bounds; "
                         f"the node types that hold one ({where}) hold {room}")
    all_roles = [role for same in by_demand.values() for role in same]
    for key in sorted({key for role in all_roles for key in role.demand}):
        wanted = sum(role.max_replicas * role.demand[key] for role in all_roles if key in role.demand)
        room = sum(t.count * t.resources.get(key, 0) for t in types)
        if wanted > room + 1e-9:
            found.append(f"all roles at their upper bounds ask for {wanted:g} {key}; the node types have {room:g} "
                         "at their max_workers")
    return found


def check_file(config: ServeConfig, launcher_config: Path) -> list[str]:
    """`problems` against the node types of a cluster launcher config file."""
    return problems(config, read_node_types(launcher_config))


def read_node_types(launcher_config: Path) -> list[NodeType]:
    try:
        return node_types(yaml.safe_load(launcher_config.expanduser().read_text()))
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(f"{launcher_config} is not a readable cluster launcher config: {err}") from None


def add_capacity_command(commands) -> None:
    command = commands.add_parser("capacity", help="check that a config's replica bounds fit a cluster's node types")
    command.add_argument("--config", required=True, type=Path, help="a ServeConfig or Serve config file")
    command.add_argument("--cluster", default=Path("cluster.yaml"), type=Path,
                         help="a Ray cluster launcher config (default: cluster.yaml)")
    command.set_defaults(run=_run_capacity)


def _run_capacity(args: argparse.Namespace) -> int:
    config, types = load_config(args.config), read_node_types(args.cluster)
    has_gpus = any(t.resources.get("GPU", 0) > 0 for t in types)
    print(f"{'role':<16}{'max replicas':>13}  per replica{'':<34}nodes that hold them (type: nodes x per node)")
    for role in roles(config, has_gpus):
        hosts = ", ".join(f"{t.name}: {t.count} x {n}" for t in types if (n := t.holds(role.demand))) or "none"
        print(f"{role.name:<16}{role.max_replicas:>13}  {_format(role.demand):<45}{hosts}")
    found = problems(config, types)
    for problem in found:
        print(f"does not fit: {problem}")
    if not declared(types):
        print(f"{args.cluster} does not declare its node types' resources (Ray measures those machines when it "
              "starts them): not checked")
    elif not found:
        print(f"{args.config} fits {args.cluster} at its upper replica bounds")
    return 1 if found else 0


def _names(names: list[str]) -> str:
    groups = [n for n in names if n.startswith("ExpertGroup")]
    if len(groups) > 2:
        names = [n for n in names if n not in groups] + [f"{groups[0]}..{groups[-1].removeprefix('ExpertGroup')}"]
    return ", ".join(names)


def _format(demand: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in demand.items()) + "}"
