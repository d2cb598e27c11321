"""Config validation (bad values fail at construction, naming field and value), dict round-trips, devices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffrl.config import diff_fields, from_dict, load_yaml, save_yaml, to_dict
from diffrl.errors import ConfigError
from diffrl.pipelines.online import REDQConfig, SACConfig, TD3Config
from diffrl.runs.device import resolve_device

CONFIGS = [SACConfig, REDQConfig, TD3Config]

# (overrides, field named in the message, value as it appears in the message)
BAD_VALUES = [
    ({"steps": -5}, "steps", "-5"),
    ({"gamma": 0.0}, "gamma", "0.0"),
    ({"gamma": 1.5}, "gamma", "1.5"),
    ({"tau": 0.0}, "tau", "0.0"),
    ({"batch_size": 512, "buffer_size": 256}, "batch_size", "512"),
    ({"utd": 0}, "utd", "0"),
    ({"hidden": ()}, "hidden", "()"),
    ({"eval_episodes": 0}, "eval_episodes", "0"),
    ({"learning_starts": -1}, "learning_starts", "-1"),
    ({"max_episode_steps": 0}, "max_episode_steps", "0"),
]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("overrides,field,value", BAD_VALUES, ids=[f"{f}={v}" for _, f, v in BAD_VALUES])
def test_invalid_value_raises_config_error_naming_field_and_value(cls, overrides, field, value):
    with pytest.raises(ConfigError) as err:
        cls(**overrides)
    assert f"{field}={value}" in str(err.value)


@pytest.mark.parametrize("cls", [SACConfig, REDQConfig], ids=lambda c: c.__name__)
def test_target_subset_larger_than_num_critics_raises(cls):
    with pytest.raises(ConfigError, match=r"target_subset=5.*num_critics=3"):
        cls(num_critics=3, target_subset=5)


def test_unknown_actor_q_choice_raises():
    with pytest.raises(ConfigError, match="actor_q='max'.*min, mean"):
        SACConfig(actor_q="max")


def test_td3_negative_noise_and_zero_policy_delay_raise():
    with pytest.raises(ConfigError, match="policy_noise=-0.1"):
        TD3Config(policy_noise=-0.1)
    with pytest.raises(ConfigError, match="policy_delay=0"):
        TD3Config(policy_delay=0)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        SACConfig(steps=0)


def test_boundary_values_are_accepted():
    cfg = SACConfig(gamma=1.0, tau=1.0, batch_size=64, buffer_size=64, learning_starts=0, eval_every=0)
    assert cfg.gamma == 1.0 and cfg.batch_size == cfg.buffer_size


def test_defaults_follow_the_papers():
    assert REDQConfig().num_critics == 10 and REDQConfig().target_subset == 2 and REDQConfig().utd == 20
    assert REDQConfig().actor_q == "mean" and SACConfig().actor_q == "min"
    assert TD3Config().policy_delay == 2


@pytest.mark.parametrize("cfg", [
    SACConfig(hidden=(32, 16), steps=123, run_dir=Path("/tmp/x"), max_episode_steps=50, target_entropy=-3.0),
    REDQConfig(hidden=(64,), num_critics=4, target_subset=3, actor_update_every=7),
    TD3Config(policy_delay=3, resume=Path("runs/a"), device="cpu"),
], ids=["sac", "redq", "td3"])
def test_to_dict_from_dict_round_trip_equals_original(cfg, tmp_path):
    data = to_dict(cfg)
    assert isinstance(data["hidden"], list) and isinstance(data["runs_root"], str)
    back = from_dict(type(cfg), data)
    assert back == cfg
    assert isinstance(back.hidden, tuple) and isinstance(back.runs_root, Path)
    save_yaml(data, tmp_path / "c.yaml")  # and through YAML, as run directories store it
    assert from_dict(type(cfg), load_yaml(tmp_path / "c.yaml")) == cfg


def test_from_dict_with_unknown_key_raises_config_error_naming_it():
    data = {**to_dict(SACConfig()), "gama": 0.9}
    with pytest.raises(ConfigError, match="gama"):
        from_dict(SACConfig, data)


def test_from_dict_validates_values():
    with pytest.raises(ConfigError, match="tau=0"):
        from_dict(SACConfig, {"tau": 0})


def test_diff_fields_lists_only_changed_fields():
    a = SACConfig()
    b = dataclasses.replace(a, steps=7, seed=3)
    assert diff_fields(a, b) == {"steps": (a.steps, 7), "seed": (0, 3)}


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_gpu_raises_config_error(name):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device(name)


def test_resolve_device_unknown_name_raises_config_error():
    with pytest.raises(ConfigError, match="device='bogus'"):
        resolve_device("bogus")
