"""Known termination rules agree with the simulator's own ``terminated`` on the next observation."""

from __future__ import annotations

import numpy as np
import pytest

from diffrl.envs import make_env
from diffrl.envs.termination import TERMINATION_RULES, termination_rule
from diffrl.errors import ConfigError


@pytest.mark.parametrize("env_id", sorted(TERMINATION_RULES))
def test_rule_matches_the_simulator_on_healthy_and_unhealthy_states(env_id) -> None:
    env = make_env(env_id)
    core = env.unwrapped
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    rule = termination_rule(env_id)
    dones, said = [], []
    for _ in range(300):
        qpos = core.init_qpos + rng.normal(0.0, 0.1, core.model.nq)
        qvel = core.init_qvel + rng.normal(0.0, 1.0, core.model.nv)
        zi = 2 if env_id == "Ant-v5" else 1  # height: qpos[1] (planar walkers) or qpos[2] (Ant)
        qpos[zi] += rng.choice([0.0, -0.8, 1.2])  # a third too low, a third too high (where that ends the episode)
        if env_id in ("Hopper-v5", "Walker2d-v5"):
            qpos[2] += rng.choice([0.0, 0.0, 1.5])  # torso angle
        core.set_state(qpos, qvel)
        obs, _, terminated, _, _ = env.step(env.action_space.sample())
        dones.append(bool(terminated))
        said.append(bool(rule(obs[None].astype(np.float32))[0]))
    env.close()
    np.testing.assert_array_equal(said, dones)
    if env_id in ("Hopper-v5", "Walker2d-v5", "Ant-v5"):
        assert 0.2 < np.mean(dones) < 0.9  # both branches were exercised


def test_an_env_without_a_known_rule_gets_one_sentence() -> None:
    with pytest.raises(ConfigError, match="no termination rule is known for 'dm_control/cheetah-run-v0'"):
        termination_rule("dm_control/cheetah-run-v0")
