"""`ExpertProbe`: a group that computes passes; a wedged or failing group fails within the deadline."""

import threading
import time

import pytest
import torch

from experts.expert_group import ExpertGroup
from experts.placement import make_placement
from experts.probe import ExpertProbe, ExpertProbeFailed
from mistral.checkpoint import CheckpointReader


class WedgedGroup:
    """An `ExpertGroup` whose forward blocks until `release` is set (or raises `error`), like a hung device."""

    def __init__(self, group: ExpertGroup, error: Exception | None = None):
        self.group, self.error = group, error
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.group, name)

    def forward(self, batch, count=True):
        self.calls += 1
        if self.error is not None:
            raise self.error
        self.release.wait()
        return self.group.forward(batch, count)


@pytest.fixture(scope="module")
def group(mixtral_dir) -> ExpertGroup:
    reader = CheckpointReader(mixtral_dir)
    placement = make_placement(reader.config.num_experts, reader.config.num_layers, 2, "round_robin")
    return ExpertGroup.load(reader, placement, 1, torch.float32)


def test_a_group_that_computes_passes(group):
    before = group.tokens_served
    ExpertProbe(group).check()
    assert group.tokens_served == before  # checks are not load: autoscaling reads tokens_served


def test_a_wedged_group_fails_within_the_deadline_and_recovers(group):
    wedged = WedgedGroup(group)
    probe = ExpertProbe(wedged, timeout_s=0.3)
    for _ in range(3):  # each check fails in time; the stuck probe is shared, not started again
        began = time.monotonic()
        with pytest.raises(ExpertProbeFailed, match="expert group 1 did not compute a 1-token probe within 0.3 s"):
            probe.check()
        assert time.monotonic() - began < 2.0  # 0.3 s, with room for a loaded machine
    assert wedged.calls == 1
    wedged.release.set()
    probe.check(timeout_s=5.0)
    probe.check()  # a new probe once the stuck one finished
    assert wedged.calls == 2


def test_a_group_whose_compute_fails_fails_the_check(group):
    probe = ExpertProbe(WedgedGroup(group, error=RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(ExpertProbeFailed, match="failed a 1-token probe: RuntimeError.*illegal memory access"):
        probe.check()
