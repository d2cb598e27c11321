"""Rollout drift: the simulator restarted from an observation continues the real episode, drift against itself is
zero, drift matches a hand computation, termination stops a rollout as documented, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from diffrl.envs import make_env
from diffrl.envs.termination import termination_rule
from diffrl.errors import ConfigError
from diffrl.eval.rollout_fidelity import (
    SimulatedRollouts,
    drift,
    drift_table,
    plot_drift,
    simulate,
    supports_state_reset,
)

EXACT = 1e-9  # measured ~1e-12; a wrong qpos/qvel mapping or action convention gives O(0.1) after a few steps


def real_episode(env_id: str, warmup: int, steps: int, seed: int = 0, action: float | None = None):
    """Obs after ``warmup`` random steps of a make_env episode, then ``steps`` more actions and what they gave."""
    env = make_env(env_id, seed=seed)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    da = env.action_space.shape[0]
    for _ in range(warmup):
        obs, _, term, _, _ = env.step(rng.uniform(-1, 1, da))
        assert not term, "the warm-up must not end the episode"
    start = obs.copy()
    acts = np.full((steps, da), action) if action is not None else rng.uniform(-1, 1, (steps, da))
    traj, rews, terms = [start], [], []
    for a in acts:
        obs, r, term, _, _ = env.step(a)
        traj.append(obs)
        rews.append(r)
        terms.append(term)
        if term:
            break
    env.close()
    return start, acts, np.asarray(traj), np.asarray(rews), np.asarray(terms)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Swimmer-v5"])
def test_simulator_started_from_an_observation_continues_the_real_episode(env_id):
    start, acts, traj, rews, terms = real_episode(env_id, warmup=3, steps=8)
    assert not terms.any(), "pick a seed whose continuation does not terminate"
    sim = simulate(env_id, start[None], acts[None])
    assert not sim.start_clipped[0]  # else the start state is not the real one and the test proves nothing
    np.testing.assert_allclose(sim.obs[0], traj, atol=EXACT, rtol=0)
    np.testing.assert_allclose(sim.rewards[0], rews, atol=EXACT, rtol=0)
    assert sim.alive.all() and not sim.terminated.any()


def test_rollouts_do_not_depend_on_their_order():
    start, acts, _, _, _ = real_episode("Walker2d-v5", warmup=3, steps=10)
    other, other_acts, _, _, _ = real_episode("Walker2d-v5", warmup=4, steps=10, seed=1)
    alone = simulate("Walker2d-v5", start[None], acts[None])
    after = simulate("Walker2d-v5", np.stack([other, start]), np.stack([other_acts, acts]))
    np.testing.assert_array_equal(after.obs[1], alone.obs[0])  # MuJoCo's warm start is reset between rollouts


def test_hopper_fall_stops_the_rollout_at_the_real_termination_step():
    # Full backward torque on every joint makes the hopper fall within a few dozen steps.
    start, acts, traj, rews, terms = real_episode("Hopper-v5", warmup=2, steps=60, action=-1.0)
    assert terms[-1], "the forced actions must make the hopper fall"
    t_end = len(rews) - 1  # the step that terminated
    h = len(acts)
    sim = simulate("Hopper-v5", start[None], acts[None])
    assert sim.terminated[0].nonzero()[0].tolist() == [t_end]
    assert sim.alive[0, :t_end + 2].all() and not sim.alive[0, t_end + 2:].any()  # the terminal next state is valid
    np.testing.assert_allclose(sim.obs[0, :t_end + 2], traj, atol=EXACT, rtol=0)
    assert np.isnan(sim.obs[0, t_end + 2:]).all()
    np.testing.assert_allclose(sim.rewards[0, :t_end + 1], rews, atol=EXACT, rtol=0)
    assert (sim.rewards[0, t_end + 1:] == 0).all() and sim.rewards.shape == (1, h)
    rule = termination_rule("Hopper-v5")
    assert rule(sim.obs[0, t_end + 1:t_end + 2])[0] and not rule(sim.obs[0, 1:t_end + 1]).any()


def test_unhealthy_hopper_start_terminates_at_the_first_step():
    start, acts, _, _, _ = real_episode("Hopper-v5", warmup=0, steps=5)
    fallen = start.copy()
    fallen[0] = 0.3  # torso height far below healthy_z_range's 0.7
    sim = simulate("Hopper-v5", fallen[None], acts[None])
    assert sim.terminated[0].tolist() == [True, False, False, False, False]
    assert sim.alive[0].tolist() == [True, True, False, False, False, False]
    assert (sim.rewards[0, 1:] == 0).all()


def test_drift_of_the_simulator_against_itself_is_zero():
    start, acts, _, _, _ = real_episode("Hopper-v5", warmup=2, steps=30, seed=4)
    falls = real_episode("Hopper-v5", warmup=2, steps=30, action=-1.0)
    sim = simulate("Hopper-v5", np.stack([start, falls[0]]), np.stack([acts, falls[1]]))
    assert not sim.alive[1].all() and sim.alive[0].all()  # one rollout terminated: the mask is exercised
    out = drift(sim, sim.obs, sim.rewards, scale=np.full(11, 0.5))
    assert out["state_error"].shape == (30,)
    np.testing.assert_array_equal(out["state_error"], 0.0)  # NaN rows past termination are masked, not averaged
    assert out["return_error"] == 0.0
    np.testing.assert_array_equal(out["alive"], sim.alive[:, 1:].sum(axis=0))
    assert out["sim_return"] == pytest.approx(sim.rewards.sum(axis=1).mean())


def test_drift_equals_a_hand_computation():
    nan = np.nan
    # N=2 rollouts, H=2 steps, Do=2; rollout 1 terminates at step 0, so its row 2 is invalid.
    sim_obs = np.array([[[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]],
                        [[0.0, 0.0], [1.0, 1.0], [nan, nan]]])
    sim = SimulatedRollouts(obs=sim_obs, rewards=np.array([[1.0, 2.0], [5.0, 0.0]]),
                            terminated=np.array([[False, False], [True, False]]),
                            alive=np.array([[True, True, True], [True, True, False]]),
                            start_clipped=np.array([True, False]))
    pred_obs = np.array([[[0.0, 0.0], [1.0, 4.0], [3.0, 4.0]],
                         [[0.0, 0.0], [4.0, 1.0], [100.0, 100.0]]])  # row 2 of rollout 1 must be ignored
    pred_rew = np.array([[2.0, 4.0], [5.5, 99.0]])  # step 1 of rollout 1 was not taken: ignored
    scale = np.array([1.0, 2.0])
    out = drift(sim, pred_obs, pred_rew, scale=scale)
    # h=1: rollout 0 diff/scale (0, 1) -> sqrt(1/2); rollout 1 (3, 0) -> sqrt(9/2); h=2: rollout 0 only, 0.
    np.testing.assert_allclose(out["state_error"], [(np.sqrt(0.5) + np.sqrt(4.5)) / 2, 0.0])
    np.testing.assert_array_equal(out["alive"], [2, 1])
    assert out["return_error"] == pytest.approx((abs(6.0 - 3.0) + abs(5.5 - 5.0)) / 2)
    assert out["sim_return"] == pytest.approx(4.0) and out["pred_return"] == pytest.approx(5.75)
    assert out["start_clipped_fraction"] == 0.5
    unscaled = drift(sim, pred_obs)
    np.testing.assert_allclose(unscaled["state_error"], [(np.sqrt(2.0) + np.sqrt(4.5)) / 2, 0.0])
    assert np.isnan(unscaled["return_error"])
    three_d = drift(sim, pred_obs, pred_rew[..., None], scale=scale)  # (N, H, 1) rewards, as models emit them
    assert three_d["return_error"] == out["return_error"]


def test_unsupported_env_is_a_config_error():
    assert supports_state_reset("HalfCheetah-v5") and not supports_state_reset("Ant-v5")
    with pytest.raises(ConfigError, match="Hopper-v5"):
        simulate("Ant-v5", np.zeros((1, 105)), np.zeros((1, 3, 8)))


@pytest.mark.parametrize("obs_shape, act_shape", [((2, 16), (2, 3, 6)), ((2, 17), (3, 3, 6)),
                                                  ((2, 17), (2, 3, 5)), ((17,), (2, 3, 6)), ((2, 17), (2, 0, 6))])
def test_simulate_refuses_mismatched_shapes(obs_shape, act_shape):
    with pytest.raises(ValueError, match="shape"):
        simulate("HalfCheetah-v5", np.zeros(obs_shape), np.zeros(act_shape))


def test_drift_refuses_mismatched_shapes():
    start, acts, _, _, _ = real_episode("HalfCheetah-v5", warmup=0, steps=4)
    sim = simulate("HalfCheetah-v5", start[None], acts[None])
    with pytest.raises(ValueError, match="pred_obs"):
        drift(sim, sim.obs[:, :-1])
    with pytest.raises(ValueError, match="pred_rewards"):
        drift(sim, sim.obs, np.zeros((1, 5)))
    with pytest.raises(ValueError, match="scale"):
        drift(sim, sim.obs, scale=np.ones(16))


def fake_result(h: int, level: float) -> dict:
    return {"state_error": level * np.arange(1, h + 1, dtype=float), "alive": np.full(h, 4),
            "return_error": 10 * level, "sim_return": 100.0}


def test_drift_table_has_a_row_per_model_and_only_horizons_up_to_h():
    table = drift_table({"dydiff": fake_result(30, 0.01), "single-step": fake_result(30, 0.1)})
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["model", "h=1", "h=5", "h=10", "h=25", "return", "err"]
    assert lines[1].split()[0] == "dydiff" and lines[2].split()[0] == "single-step"
    assert lines[2].split()[1:] == ["0.1", "0.5", "1", "2.5", "1"]


def test_plot_drift_writes_a_png(tmp_path):
    path = plot_drift({"dydiff": fake_result(20, 0.01), "single-step": fake_result(20, 0.1)},
                      tmp_path / "sub" / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
