"""The checkpoint a replica reads on its own node. Every node that runs shards or expert groups must hold it (a
shared file system, or a copy made when the node starts: README, "Clusters"); the head needs only its config and
tokenizer, which is all building the application reads. A replica whose node lacks the weights fails at start with
an error that names the node and the path, which `serve status` shows."""

import socket

import ray

from mistral.checkpoint import CheckpointReader
from mistral.errors import CheckpointError, ConfigError, ModelNotFoundError
from mistral.presets import resolve_model


def local_checkpoint(model: str) -> CheckpointReader:
    """`model` (a preset name, materialised here, or a directory) read on this node, its weight files present."""
    try:
        return CheckpointReader(resolve_model(model))
    except (ModelNotFoundError, CheckpointError, ConfigError) as err:
        node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        raise type(err)(f"node {node} cannot read the model {model}: {err}") from err
