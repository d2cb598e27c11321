"""The off-policy loop's env factory hook: a goal-conditioned Fetch task with its dict observations flattened by a
factory trains SAC through the same loop, with exact resume (the loop sees only the factory's spaces)."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

from diffrl.envs import VecEnv, make_env
from diffrl.errors import ConfigError
from diffrl.pipelines import online
from diffrl.runs.checkpoint import load_checkpoint
from diffrl.runs.logger import read_metrics

ENV = "FetchReach-v4"


def flat_goal_envs(cfg: online.OnlineConfig) -> tuple[VecEnv, gym.Env]:
    """Fetch's {observation, achieved_goal, desired_goal} as one flat vector (a goal-conditioned SAC baseline)."""
    return (VecEnv(cfg.env, cfg.n_envs, cfg.seed, wrap=gym.wrappers.FlattenObservation),
            gym.wrappers.FlattenObservation(make_env(cfg.env)))


def _cfg(tmp_path, name: str, steps: int) -> online.SACConfig:
    return online.SACConfig(env=ENV, steps=steps, learning_starts=50, batch_size=32, eval_every=100, eval_episodes=1,
                            log_every=50, checkpoint_every=100, hidden=(32, 32), progress=False, device="cpu",
                            run_dir=tmp_path / name)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "perf/env_steps_per_s")} for r in read_metrics(run_dir)]


def test_the_default_factory_refuses_dict_observations_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"dict \(goal-conditioned\) observations"):
        online.run(_cfg(tmp_path, "plain", 100))
    assert not (tmp_path / "plain" / "config.yaml").exists()


def test_a_flattening_factory_trains_sac_on_a_goal_env_and_resumes_exactly(tmp_path):
    whole = online.run(_cfg(tmp_path, "whole", 200), env_factory=flat_goal_envs)
    split = online.run(_cfg(tmp_path, "split", 100), env_factory=flat_goal_envs)
    online.run(dataclasses.replace(_cfg(tmp_path, "split", 200), resume=split, run_dir=None),
               env_factory=flat_goal_envs)
    assert _rows(whole) == _rows(split) and len(_rows(whole)) == 4
    manifest, parts = load_checkpoint(whole, parts=("buffer",))
    flat = sum(int(np.prod(s.shape)) for s in make_env(ENV).observation_space.spaces.values())  # 10 + 3 + 3
    assert manifest["meta"]["env"]["env_id"] == ENV
    assert parts["buffer"]["data"]["obs"].shape[-1] == flat  # the agent saw the factory's (flat) spaces
