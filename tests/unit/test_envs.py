"""make_env (ids, spaces, action rescaling) and VecEnv (episode boundaries, seeded resets, exact resume)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from diffrl.envs import VecEnv, make_env
from diffrl.errors import CheckpointError, EnvError
from diffrl.runs.seeding import derive_seed


def rollout(venv: VecEnv, actions: np.ndarray) -> list:
    return [venv.step(a) for a in actions]


def actions_for(venv: VecEnv, n: int, seed: int = 0) -> np.ndarray:
    shape = (n, venv.num_envs, *venv.single_action_space.shape)
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --------------------------------------------------------------------------------------------- make_env
def test_halfcheetah_v5_action_space_is_unit_box():
    env = make_env("HalfCheetah-v5")
    assert isinstance(env.action_space, gym.spaces.Box) and env.action_space.shape == (6,)
    np.testing.assert_array_equal(env.unwrapped.action_space.low, -1.0)
    np.testing.assert_array_equal(env.unwrapped.action_space.high, 1.0)


@pytest.mark.filterwarnings("ignore:.*precision lowered:UserWarning")
@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Pendulum-v1"])
def test_make_env_advertises_unit_box_action_space(env_id):
    space = make_env(env_id).action_space
    np.testing.assert_array_equal(space.low, -1.0)
    np.testing.assert_array_equal(space.high, 1.0)


@pytest.mark.filterwarnings("ignore:.*precision lowered:UserWarning")
def test_make_env_rescales_actions_so_plus_one_is_the_env_maximum():
    env = make_env("Pendulum-v1", seed=0)  # native torque bounds are [-2, 2]
    inner = env.unwrapped
    env.step(np.array([1.0], dtype=np.float32))
    assert inner.last_u == pytest.approx(2.0)
    env.step(np.array([-5.0], dtype=np.float32))  # clipped to -1, then rescaled to -2
    assert inner.last_u == pytest.approx(-2.0)


@pytest.mark.parametrize("env_id,hint", [("HalfCheetah-v2", "HalfCheetah-v5"), ("Hopper-v3", "Hopper-v5"),
                                         ("FetchPush-v1", "FetchPush-v4"),
                                         ("Hoper-v5", "Did you mean Hopper-v5")])
def test_removed_or_unknown_id_raises_env_error_with_hint(env_id, hint):
    with pytest.raises(EnvError) as err:
        make_env(env_id)
    msg = str(err.value)
    assert hint in msg and env_id in msg
    assert msg.rstrip().endswith((".", "?", ")"))  # a sentence, not a traceback fragment


def test_dm_control_observation_is_flattened_box():
    env = make_env("dm_control/cheetah-run-v0", seed=0)
    assert isinstance(env.observation_space, gym.spaces.Box) and env.observation_space.shape == (17,)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (17,) and env.observation_space.contains(obs.astype(env.observation_space.dtype))
    np.testing.assert_array_equal(env.unwrapped.action_space.low, -1.0)


def test_fetch_reach_keeps_dict_observation_with_goals():
    env = make_env("FetchReach-v4", seed=0)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    assert {"observation", "achieved_goal", "desired_goal"} <= set(env.observation_space.spaces)
    obs, _ = env.reset(seed=0)
    assert obs["achieved_goal"].shape == obs["desired_goal"].shape == (3,)


# ----------------------------------------------------------------------------------------------- VecEnv
def test_episode_end_returns_true_final_obs_and_seeded_reset_obs():
    limit = 20
    venv = VecEnv("Hopper-v5", 1, seed=3, max_episode_steps=limit)
    obs = venv.reset()
    ref = make_env("Hopper-v5", max_episode_steps=limit)  # the same episode stepped by hand
    ref_obs, _ = ref.reset(seed=derive_seed(3, 0, 0))
    np.testing.assert_array_equal(obs[0], ref_obs)
    actions = np.zeros((limit + 5, 1, 3), dtype=np.float32)  # standing still: no early termination
    total = 0.0
    for t, a in enumerate(actions):
        step = venv.step(a)
        ref_next, ref_r, te, tr, _ = ref.step(a[0])
        np.testing.assert_array_equal(step.next_obs[0], ref_next)
        assert step.reward[0] == ref_r
        total += ref_r
        if te or tr:
            break
        np.testing.assert_array_equal(step.obs, step.next_obs)
        assert venv.episode[0] == 0 and venv.ep_length[0] == t + 1 and step.finished == []
    assert t == limit - 1 and tr and not te
    assert step.truncated[0] and not step.terminated[0]
    (index, ret, length, _), = step.finished
    assert (index, length) == (0, limit) and ret == pytest.approx(total)
    # next_obs is the final observation; obs is the first of episode 1, reset with its own seed
    assert not np.array_equal(step.next_obs[0], step.obs[0])
    ref_reset, _ = ref.reset(seed=derive_seed(3, 0, 1))
    np.testing.assert_array_equal(step.obs[0], ref_reset)
    assert venv.episode[0] == 1 and venv.ep_length[0] == 0 and venv.ep_return[0] == 0.0
    np.testing.assert_array_equal(venv.current_obs(), step.obs)


def test_time_limit_gives_truncated_not_terminated():
    venv = VecEnv("HalfCheetah-v5", 2, seed=0, max_episode_steps=5)
    venv.reset()
    steps = rollout(venv, actions_for(venv, 5))
    for s in steps[:4]:
        assert not s.truncated.any() and not s.terminated.any() and s.finished == []
    assert steps[4].truncated.all() and not steps[4].terminated.any()
    assert [(i, n) for i, _, n, _ in steps[4].finished] == [(0, 5), (1, 5)]
    np.testing.assert_allclose([r for _, r, _, _ in steps[4].finished],
                               np.sum([s.reward for s in steps], axis=0))


def test_same_seed_same_trajectories_other_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        venv = VecEnv("Hopper-v5", 2, seed=seed, max_episode_steps=6)
        first = venv.reset()
        steps = rollout(venv, actions_for(venv, 14))  # crosses two episode boundaries
        runs.append((first, np.stack([s.next_obs for s in steps]), np.stack([s.obs for s in steps])))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], runs[2][0])
    assert not np.array_equal(runs[0][1], runs[2][1])
    assert not np.array_equal(runs[0][0][0], runs[0][0][1])  # each env index gets its own seed


def test_reset_restarts_episode_counters_and_reproduces_first_obs():
    venv = VecEnv("Hopper-v5", 1, seed=1, max_episode_steps=3)
    first = venv.reset()
    rollout(venv, actions_for(venv, 4))
    assert venv.episode[0] == 1
    np.testing.assert_array_equal(venv.reset(), first)
    assert venv.episode[0] == 0


def test_state_dict_mid_episode_reproduces_obs_and_next_steps():
    src = VecEnv("Hopper-v5", 2, seed=5, max_episode_steps=20)
    src.reset()
    rollout(src, actions_for(src, 15, seed=1))
    state = src.state_dict()
    dst = VecEnv("Hopper-v5", 2, seed=5, max_episode_steps=20)
    dst.reset()
    obs = dst.load_state_dict(state)
    np.testing.assert_array_equal(obs, src.current_obs())
    np.testing.assert_array_equal(dst.episode, src.episode)
    np.testing.assert_array_equal(dst.ep_length, src.ep_length)
    future = actions_for(src, 10, seed=2)  # crosses the 20-step limit
    for a, b in zip(rollout(src, future), rollout(dst, future)):
        np.testing.assert_array_equal(a.next_obs, b.next_obs)
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.reward, b.reward)
        np.testing.assert_array_equal(a.terminated, b.terminated)
        np.testing.assert_array_equal(a.truncated, b.truncated)
        assert [f[:3] for f in a.finished] == [f[:3] for f in b.finished]


def test_load_state_dict_with_other_env_count_raises_checkpoint_error():
    src = VecEnv("HalfCheetah-v5", 2, seed=0)
    src.reset()
    dst = VecEnv("HalfCheetah-v5", 1, seed=0)
    with pytest.raises(CheckpointError, match="n-envs"):
        dst.load_state_dict(src.state_dict())


def test_load_state_dict_detects_a_replay_that_does_not_reproduce_the_return():
    src = VecEnv("HalfCheetah-v5", 1, seed=0)
    src.reset()
    rollout(src, actions_for(src, 3))
    state = src.state_dict()
    state["ep_return"] = state["ep_return"] + 1.0
    with pytest.raises(CheckpointError, match="not deterministic"):
        VecEnv("HalfCheetah-v5", 1, seed=0).load_state_dict(state)
