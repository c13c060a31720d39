"""`ExpertProbe`: a health check that goes through an expert group's compute.

A replica process can be alive and answer RPCs while its experts cannot compute: a wedged device, a kernel
that never returns, a lock that is never released. Answering "alive" from such a replica keeps it in the
routing table and every layer that needs it stalls. So the check runs real work: a 1-token batch through the
group (layer 0, the first expert it holds there; a later layer if it holds none in layer 0) on a thread of its
own, and waits at most `timeout_s` for the answer.

A probe that is still running when the next check comes is shared, not doubled: a wedged group holds one
stuck thread however often it is checked, and every check fails within its own deadline while it stays
wedged. The probe batch does not count in `tokens_served`: checks run every second, and the routed-token load
that autoscaling reads must not see them.

One probe serves every health path of a replica: the ExpertService's Health RPC, the Serve replica's
`check_health` and the Ray actor's `health`.
"""

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from experts.expert_group import ExpertBatch, ExpertGroup

PROBE_TIMEOUT_S = 5.0


class ExpertProbeFailed(RuntimeError):
    """The group did not compute the probe batch in time, or computed garbage."""


class ExpertProbe:
    def __init__(self, group: ExpertGroup, timeout_s: float = PROBE_TIMEOUT_S):
        self.group, self.timeout_s = group, timeout_s
        self._lock = threading.Lock()
        self._running: Future | None = None

    def check(self, timeout_s: float | None = None) -> None:
        """Return once the group has computed a 1-token probe; raise `ExpertProbeFailed` if it did not within
        `timeout_s` (default: the probe's own), or failed."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._running is None or self._running.done():
                self._running = Future()
                threading.Thread(target=self._run, args=(self._running,), name="msem-expert-probe",
                                 daemon=True).start()
            running = self._running
        try:
            running.result(timeout=timeout_s)
        except FutureTimeout:
            raise ExpertProbeFailed(f"expert group {self.group.group_id} did not compute a 1-token probe "
                                    f"within {timeout_s:g} s") from None
        except Exception as error:  # noqa: BLE001 - any failure of the compute fails the check
            raise ExpertProbeFailed(f"expert group {self.group.group_id} failed a 1-token probe: {error!r}"
                                    ) from error

    def _run(self, result: Future) -> None:
        try:
            self._probe()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting check
            result.set_exception(error)
        else:
            result.set_result(None)

    def _probe(self) -> None:
        group, config = self.group, self.group.config
        found = next(((layer, held[0]) for layer in range(config.num_layers) if (held := group.holds(layer))), None)
        if found is None:
            raise ExpertProbeFailed(f"expert group {group.group_id} holds no expert to probe")
        layer, expert = found
        k, h = config.num_experts_per_tok, config.hidden_size
        expert_ids = torch.full((1, k), -1, dtype=torch.long)  # [1, k]: one slot here, the rest elsewhere
        expert_ids[0, 0] = expert
        weights = torch.zeros(1, k)  # [1, k]
        weights[0, 0] = 1.0
        hidden = torch.full((1, h), 0.01, dtype=group.dtype)  # [1, H]
        out = group.forward(ExpertBatch(layer, hidden, expert_ids, weights), count=False)  # [1, H]
        if tuple(out.shape) != (1, h) or not bool(torch.isfinite(out).all()):
            raise ExpertProbeFailed(f"the answer is {list(out.shape)} with non-finite values or the wrong "
                                    f"shape; expected [1, {h}] finite values")
