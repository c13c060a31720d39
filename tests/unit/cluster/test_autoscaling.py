"""Scaling without Ray: the routed-tokens policy and its log, the autoscaling options a config becomes, and the
Serve config `msem serve` deploys (a Serve config file as written, so a later `serve deploy` of it rebuilds
nothing)."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.autoscaling import RoutedTokensPolicy
from cluster.config import ServeConfig, load_config, load_serve_file, parse_config

ROOT = Path(__file__).resolve().parents[3]


def _ctx(rates: dict, current: int, lo=1, hi=4):
    return SimpleNamespace(deployment_name="ExpertGroup1", aggregated_metrics={"routed_tokens_per_s": rates},
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
                           target_num_replicas=current)


def test_each_change_of_the_wanted_count_is_logged_once_with_its_signal(caplog):
    policy = RoutedTokensPolicy(target_tokens_per_s=1000)
    with caplog.at_level(logging.INFO, logger="ray.serve.msem.autoscaling"):
        assert policy(_ctx({"r1": 500}, current=1))[0] == 1  # as it is: nothing to say
        assert not caplog.records
        for _ in range(3):  # Serve holds the count during its upscale delay: one line, not one per tick
            assert policy(_ctx({"r1": 1500, "r2": 1400}, current=2))[0] == 3
        assert policy(_ctx({"r1": 1000, "r2": 900, "r3": 1000}, current=3))[0] == 3  # applied: quiet
        assert policy(_ctx({"r1": 10, "r2": 0, "r3": 2}, current=3))[0] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "ExpertGroup1: 2 -> 3 replicas wanted: 2900.0 routed tokens/s (1450.0 per replica over 2), "
        "target 1000.0 per replica, bounds [1, 4]",
        "ExpertGroup1: 3 -> 1 replicas wanted: 12.0 routed tokens/s (4.0 per replica over 3), "
        "target 1000.0 per replica, bounds [1, 4]",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_autoscaling_settings_become_serve_options():
    from cluster.app import _group_options, _shard_scaling

    config = parse_config({
        "attention": {"replicas": {"min": 1, "max": 3}, "target_ongoing_requests": 2,
                      "autoscaling": {"upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 12}},
        "expert_groups": {"num_groups": 2, "target_tokens_per_replica": 50, "group_replicas": {1: {"max": 2}},
                          "autoscaling": {"upscale_delay_s": 0.5, "downscale_delay_s": 3}}})
    shard = _shard_scaling(config)["autoscaling_config"]
    assert shard == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "upscale_delay_s": 1.0,
                     "downscale_delay_s": 2.0, "look_back_period_s": 12.0, "target_ongoing_requests": 2.0}
    group1 = _group_options(config.expert_groups, 1, cluster_has_gpus=False)["autoscaling_config"]
    assert (group1["upscale_delay_s"], group1["downscale_delay_s"], group1["look_back_period_s"]) == (0.5, 3.0, 30.0)
    assert group1["policy"]["policy_kwargs"] == {"target_tokens_per_s": 50.0}
    assert "autoscaling_config" not in _group_options(config.expert_groups, 0, cluster_has_gpus=False)  # fixed
    defaults = ServeConfig().attention.autoscaling  # unchanged: 5 s up, 60 s down, Serve's 30 s window
    assert (defaults.upscale_delay_s, defaults.downscale_delay_s, defaults.look_back_period_s) == (5, 60, 30)


@pytest.mark.parametrize("autoscaling, message", [
    ({"upscale_delay_s": -1}, "autoscaling.upscale_delay_s"),
    ({"look_back_period_s": 5}, "autoscaling.look_back_period_s"),
    ({"downscale_dleay_s": 1}, "autoscaling.downscale_dleay_s"),
])
def test_bad_autoscaling_settings_name_the_field(autoscaling, message):
    from mistral.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"expert_groups": {"autoscaling": autoscaling}})


def test_a_serve_config_file_is_deployed_as_written(tmp_path):
    """What `msem serve --config configs/tiny.yaml` sends is what `serve deploy configs/tiny.yaml` sends, so the
    second only applies its `deployments:` section; a CLI override changes only its own setting."""
    from cluster.app import _as_written

    path = ROOT / "configs" / "tiny.yaml"
    written = load_serve_file(path)
    assert _as_written(written, load_config(path)) == written
    moved = _as_written(written, load_config(path).model_copy(update={"http_port": 9000, "model": "bench"}))
    app = moved["applications"][0]
    assert app["args"] == {**written["applications"][0]["args"], "http_port": 9000, "model": "bench"}
    assert moved["http_options"] == {"host": "127.0.0.1", "port": 9000}
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in written["applications"][0].items()
                                                             if k != "args"}
    (tmp_path / "plain.yaml").write_text("model: tiny\n")
    assert load_serve_file(tmp_path / "plain.yaml") is None  # a plain ServeConfig: msem generates the Serve config


def test_a_plain_config_keeps_scaling_out_of_the_builder_args():
    """Deploying a plain config again with other bounds or autoscaling pace sends the same args."""
    from cluster.app import _generated

    def args_and_options(data):
        app = _generated(parse_config(data))["applications"][0]
        return app["args"], {d["name"]: d for d in app["deployments"]}

    base_args, base = args_and_options({"expert_groups": {"num_groups": 2}})
    args, options = args_and_options({"expert_groups": {
        "num_groups": 2, "group_replicas": {1: {"min": 1, "max": 3}}, "autoscaling": {"upscale_delay_s": 1}}})
    assert args == base_args
    assert options["ExpertGroup0"] == base["ExpertGroup0"]
    assert options["ExpertGroup1"]["autoscaling_config"]["upscale_delay_s"] == 1
