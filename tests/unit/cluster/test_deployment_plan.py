"""`msem plan`: expert groups sized to a GPU's memory, the attention shard's KV room, and the command."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.deployment_plan import GIB, plan_attention, plan_groups, usable_bytes
from mistral.config import ModelConfig
from mistral.errors import ConfigError
from mistral.presets import PRESETS

MIXTRAL = PRESETS["mixtral-8x7b"].config
EXPERT = MIXTRAL.num_layers * MIXTRAL.num_expert_params * 2  # one expert, every layer, bf16


def test_mixtral_fills_each_gpu_instead_of_one_expert_per_gpu():
    a100 = plan_groups(MIXTRAL, 40 * GIB, 2)
    assert (a100.num_groups, a100.experts_per_group, a100.redundant_slots, a100.num_gpus) == (3, 3, 0, 1.0)
    assert a100.bytes_per_replica == 3 * EXPERT <= usable_bytes(40 * GIB) < 4 * EXPERT
    h100 = plan_groups(MIXTRAL, 80 * GIB, 2)
    assert (h100.num_groups, h100.experts_per_group, h100.redundant_slots, h100.num_gpus) == (2, 4, 2, 1.0)


def test_finer_groups_share_a_gpu_over_grpc_but_take_whole_gpus_over_torch():
    grpc = plan_groups(MIXTRAL, 80 * GIB, 2, "grpc", num_groups=8)
    assert grpc.num_gpus == 1 / 6 and grpc.gpus == pytest.approx(8 / 6)
    torch = plan_groups(MIXTRAL, 80 * GIB, 2, "torch", num_groups=8)
    assert (torch.num_gpus, torch.redundant_slots, torch.gpus) == (1.0, 5, 8)
    spread = plan_groups(MIXTRAL, 40 * GIB, 2, num_groups=1)  # 8 experts, 3 a GPU: a replica of 3 GPUs
    assert (spread.num_gpus, spread.redundant_slots) == (3.0, 1)


def test_what_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"one expert takes 10.5 GiB over its 32 layers; a GPU of 8 GiB holds 6.2"):
        plan_groups(MIXTRAL, 8 * GIB, 2)
    with pytest.raises(ConfigError, match="need 3 GPUs a replica, more than a node's 2"):
        plan_groups(MIXTRAL, 40 * GIB, 2, num_groups=1, gpus_per_node=2)
    with pytest.raises(ConfigError, match="the attention weights take 13.5 GiB"):
        plan_attention(PRESETS["mistral-7b"].config, 12 * GIB, 2)


def test_the_kv_room_is_the_rest_of_the_attention_gpu():
    attention = plan_attention(MIXTRAL, 48 * GIB, 2, context=4096)
    experts = MIXTRAL.num_layers * MIXTRAL.num_experts * MIXTRAL.num_expert_params
    assert attention.weight_bytes == (MIXTRAL.num_params() - experts) * 2
    assert attention.kv_bytes == usable_bytes(48 * GIB) - attention.weight_bytes
    assert attention.kv_tokens == attention.kv_bytes // MIXTRAL.kv_bytes_per_token(2)
    assert attention.sequences == attention.kv_tokens // 4096


@given(experts=st.integers(2, 64), layers=st.integers(1, 64), hidden=st.integers(1, 64).map(lambda h: 64 * h),
       gpu_gib=st.integers(8, 192), transport=st.sampled_from(["grpc", "torch"]), groups=st.integers(1, 64) | st.none())
def test_every_plan_holds_every_expert_in_the_gpus_it_asks_for(experts, layers, hidden, gpu_gib, transport, groups):
    model = ModelConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
                        num_heads=8, num_kv_heads=8, head_dim=hidden // 8, num_experts=experts, num_experts_per_tok=2)
    expert = layers * model.num_expert_params * 2
    try:
        p = plan_groups(model, gpu_gib * GIB, 2, transport, num_groups=groups, gpus_per_node=64)
    except ConfigError:  # only when one expert exceeds a GPU, or the groups asked for are impossible
        assert expert > usable_bytes(gpu_gib * GIB) or not 1 <= (groups or 1) <= experts
        return
    assert p.num_groups * p.experts_per_group >= experts > p.num_groups * (p.experts_per_group - 1)
    slots = p.experts_per_group + p.redundant_slots
    assert p.bytes_per_replica == slots * expert
    if p.num_gpus < 1:  # replicas share a GPU, each with its own reserve
        sharing = round(1 / p.num_gpus)
        assert transport == "grpc" and sharing * p.bytes_per_replica <= usable_bytes(gpu_gib * GIB, sharing)
    else:
        assert p.num_gpus == int(p.num_gpus)
        per_gpu = math.ceil(slots / p.num_gpus) * expert
        assert per_gpu <= usable_bytes(gpu_gib * GIB)
    if groups is None:
        assert p.num_gpus == 1.0  # as few groups as fill each GPU: one GPU a replica


def test_the_plan_command(capsys):
    from cluster import cli

    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "expert groups  3 of up to 3 experts (all layers), 0 redundant slot(s) each" in out
    assert '"num_groups": 3' in out and "1 expert node(s)" in out
    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "80", "--groups", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["groups"]["num_gpus"] == pytest.approx(1 / 6) and report["expert_nodes"] == 1
    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "8"]) == 2
    assert "one expert takes 10.5 GiB" in capsys.readouterr().err
    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "-1"]) == 2
    assert "--gpu-memory must be > 0" in capsys.readouterr().err
    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "40", "--groups", "9"]) == 2
    assert "num_groups must be between 1 and the 8 experts, got 9" in capsys.readouterr().err
    assert cli.main(["plan", "nonesuch", "--gpu-memory", "40"]) == 2
    assert "'nonesuch' is not a preset" in capsys.readouterr().err
