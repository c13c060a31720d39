"""Entry point of a torch-transport member in a process of its own, for tests that kill one with SIGKILL.

Spawned (not forked), so the child loads its own group from the checkpoint like a real replica does.
"""

import threading


def serve_member(model_dir: str, num_groups: int, group_id: int, replica_id: str, store_host: str,
                 store_port: int, session: str, heartbeat_interval: float, device: str = "cpu") -> None:
    import torch

    from experts.expert_group import ExpertGroup
    from experts.placement import make_placement
    from mistral.checkpoint import CheckpointReader
    from router_service.torch_transport import TorchMember

    torch.set_num_threads(1)  # several of these share a small machine with the test itself
    # progress bars would create a multiprocessing lock that a SIGKILL leaves to the parent's resource tracker
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    reader = CheckpointReader(model_dir)
    config = reader.config
    placement = make_placement(config.num_experts, config.num_layers, num_groups, "round_robin")
    group = ExpertGroup.load(reader, placement, group_id, torch.float32, device)
    TorchMember(group, replica_id, store_host, store_port, session, heartbeat_interval=heartbeat_interval).start()
    threading.Event().wait()  # serve until killed
