"""KER reflections and GER goal augmentation: algebra (milliseconds) and consistency with the Fetch v4 simulator."""

import dataclasses

import mujoco
import numpy as np
import pytest
import torch
from gymnasium_robotics.utils import rotations

from diffrl.augment.ger import SLIDE_TABLE_X, SLIDE_TABLE_Y, ger_goals, ger_minibatch
from diffrl.augment.ker import (
    MIRROR_Y,
    ker_augment,
    ker_geometry,
    plane_reflection,
    reflect_episodes,
)
from diffrl.data.batch import Batch
from diffrl.envs.make import make_env


def _random_episodes(n: int, T: int, obs_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, T + 1, obs_dim)).astype(np.float32)
    obs[..., :3] += np.array([1.3, 0.75, 0.45], np.float32)
    if obs_dim == 25:
        obs[..., 3:6] += np.array([1.3, 0.75, 0.42], np.float32)
        obs[..., 11:14] = rng.uniform(-3.1, 3.1, (n, T + 1, 3))
        obs[..., 12] /= 2.1  # Euler y in (-pi/2, pi/2): the canonical range mat2euler returns
    return {"obs": obs, "ag": rng.uniform(0.4, 1.5, (n, T + 1, 3)).astype(np.float32),
            "g": rng.uniform(0.4, 1.5, (n, T, 3)).astype(np.float32),
            "act": rng.uniform(-0.7, 0.7, (n, T, 4)).astype(np.float32)}  # |a| <= 0.7: no clipping up to 0.35 rad


def _assert_same_episodes(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Equal episodes, comparing object orientations as rotation matrices (Euler angles may wrap)."""
    for k in ("ag", "g", "act"):
        np.testing.assert_allclose(a[k], b[k], atol=atol)
    oa, ob = a["obs"], b["obs"]
    if oa.shape[-1] == 25:
        np.testing.assert_allclose(rotations.euler2mat(oa[..., 11:14]), rotations.euler2mat(ob[..., 11:14]), atol=atol)
        oa, ob = np.delete(oa, np.s_[11:14], -1), np.delete(ob, np.s_[11:14], -1)
    np.testing.assert_allclose(oa, ob, atol=atol)


# ---- reflections ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.05, 0.1443, -0.3])
def test_plane_reflection_is_a_reflection_fixing_its_plane(theta):
    M = plane_reflection(theta)
    assert np.isclose(np.linalg.det(M), -1.0)
    np.testing.assert_allclose(M @ M.T, np.eye(3), atol=1e-12)
    along, normal = np.array([np.cos(theta), np.sin(theta), 0.0]), np.array([-np.sin(theta), np.cos(theta), 0.0])
    np.testing.assert_allclose(M @ along, along, atol=1e-12)
    np.testing.assert_allclose(M @ normal, -normal, atol=1e-12)
    np.testing.assert_allclose(M @ [0, 0, 1.0], [0, 0, 1.0])
    assert plane_reflection(np.array([0.1, 0.2])).shape == (2, 3, 3)


@pytest.mark.parametrize("obs_dim", [25, 10])
@pytest.mark.parametrize("theta,pivot", [(0.0, (0.0, MIRROR_Y)), (0.1443, (0.695, 0.75)), (0.0697, (0.34, 0.75))])
def test_reflecting_twice_is_the_identity(obs_dim, theta, pivot):
    ep = _random_episodes(3, 5, obs_dim)
    twice = reflect_episodes(reflect_episodes(ep, plane_reflection(theta), pivot), plane_reflection(theta), pivot)
    _assert_same_episodes(twice, ep)


def test_per_episode_matrices_equal_one_reflection_per_episode():
    ep = _random_episodes(3, 4, 25)
    thetas = np.array([0.0, 0.07, 0.14])
    batched = reflect_episodes(ep, plane_reflection(thetas), (0.695, 0.75))
    for i, th in enumerate(thetas):
        one = reflect_episodes({k: v[i:i + 1] for k, v in ep.items()}, plane_reflection(th), (0.695, 0.75))
        _assert_same_episodes({k: v[i:i + 1] for k, v in batched.items()}, one, atol=1e-6)


def test_y_mirror_follows_iter_rules_per_index():
    ep = _random_episodes(2, 4, 25)
    m = reflect_episodes(ep, plane_reflection(0.0), (0.0, MIRROR_Y))
    o, r = ep["obs"], m["obs"]
    for sl in (np.s_[0:3], np.s_[3:6]):  # positions: y -> 1.5 - y
        np.testing.assert_allclose(r[..., sl], o[..., sl] * [1, -1, 1] + [0, 1.5, 0], atol=1e-6)
    for k in ("ag", "g"):
        np.testing.assert_allclose(m[k], ep[k] * [1, -1, 1] + [0, 1.5, 0], atol=1e-6)
    for sl in (np.s_[6:9], np.s_[14:17], np.s_[20:23]):  # relative positions and velocities: negate y
        np.testing.assert_allclose(r[..., sl], o[..., sl] * [1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(r[..., 17:20], o[..., 17:20] * [-1, 1, -1], atol=1e-6)  # pseudovector: x and z
    wrapped = (r[..., 11:14] - o[..., 11:14] * [-1, 1, -1] + np.pi) % (2 * np.pi) - np.pi  # ITER: Euler x, z negate
    np.testing.assert_allclose(wrapped, 0.0, atol=1e-5)
    np.testing.assert_array_equal(r[..., 9:11], o[..., 10:8:-1])  # fingers swap (ITER: unchanged)
    np.testing.assert_array_equal(r[..., 23:25], o[..., 24:22:-1])
    np.testing.assert_allclose(m["act"], ep["act"] * [1, -1, 1, 1], atol=1e-7)


def test_reach_layout_reflects_grip_and_velocity_only():
    ep = _random_episodes(2, 3, 10)
    m = reflect_episodes(ep, plane_reflection(0.0), (0.0, MIRROR_Y), task="Reach")
    np.testing.assert_allclose(m["obs"][..., 0:3], ep["obs"][..., 0:3] * [1, -1, 1] + [0, 1.5, 0], atol=1e-6)
    np.testing.assert_allclose(m["obs"][..., 5:8], ep["obs"][..., 5:8] * [1, -1, 1], atol=1e-6)
    np.testing.assert_array_equal(m["obs"][..., 3:5], ep["obs"][..., 4:2:-1])


def test_reflection_keeps_goal_distances_so_rewards_are_unchanged():
    ep = _random_episodes(4, 6, 25)
    ep["obs"][..., 6:9] = ep["obs"][..., 3:6] - ep["obs"][..., 0:3]
    m = reflect_episodes(ep, plane_reflection(0.1), (0.695, 0.75))
    d = np.linalg.norm(ep["ag"][:, 1:] - ep["g"], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(m["ag"][:, 1:] - m["g"], axis=-1), d, atol=1e-5)
    np.testing.assert_allclose(m["obs"][..., 3:6] - m["obs"][..., 0:3], m["obs"][..., 6:9], atol=1e-5)


@pytest.mark.parametrize("theta", [0.0, 0.1, 0.1443])
def test_angular_velocity_reflects_as_a_pseudovector(theta):
    # If R(t) turns with world angular velocity w (dR = [w]x R dt), the mirrored M R M turns with M [w]x M, which is
    # the cross matrix of -M w: the rule the module uses. ITER's Euler-like rule agrees only at theta = 0.
    def cross(v):
        return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])

    M, w = plane_reflection(theta), np.array([0.3, -1.2, 0.7])
    np.testing.assert_allclose(M @ cross(w) @ M, cross(-M @ w), atol=1e-12)
    ep = _random_episodes(1, 1, 25)
    ep["obs"][..., 17:20] = w
    np.testing.assert_allclose(reflect_episodes(ep, M, (0.695, 0.75))["obs"][0, 0, 17:20], -M @ w, atol=1e-6)


def test_reflected_actions_are_clipped_to_the_box_and_keep_the_gripper_command():
    ep = _random_episodes(1, 1, 25)
    ep["act"][:] = [1.0, 1.0, -1.0, 0.3]
    a = reflect_episodes(ep, plane_reflection(0.1), (0.695, 0.75))["act"][0, 0]
    unclipped = plane_reflection(0.1) @ [1.0, 1.0, -1.0]
    assert unclipped.max() > 1.0  # the reflected vector leaves the box ...
    np.testing.assert_allclose(a[:3], np.clip(unclipped, -1, 1), atol=1e-6)  # ... and is clipped back
    assert a[3] == np.float32(0.3)


def test_reflect_rejects_unknown_observation_sizes_and_non_reflections():
    with pytest.raises(ValueError, match="size 25"):
        reflect_episodes(_random_episodes(1, 2, 31), plane_reflection(0.0), (0, 0.75))
    with pytest.raises(ValueError, match="reflection"):
        reflect_episodes(_random_episodes(1, 2, 25), np.eye(3), (0, 0.75))
    with pytest.raises(ValueError, match="size 10"):
        reflect_episodes(_random_episodes(1, 2, 25), plane_reflection(0.0), (0, 0.75), task="Reach")


# ---- KER ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ker", [1, 3])
def test_ker_augment_returns_originals_then_reflections_in_blocks(n_ker):
    ep, N = _random_episodes(4, 5, 25), 4
    out = ker_augment(ep, n_ker, np.random.default_rng(0), "FetchPush-v4")
    assert {k: v.shape[0] for k, v in out.items()} == {k: 2 * n_ker * N for k in ("obs", "ag", "g", "act")}
    assert all(out[k].dtype == np.float32 for k in out)
    for k in ep:
        np.testing.assert_array_equal(out[k][:N], ep[k])  # block 0: the input, unchanged
    for b in range(n_ker):  # block n_ker + b: the y-mirror of block b
        mirrored, source = out["g"][(n_ker + b) * N:(n_ker + b + 1) * N], out["g"][b * N:(b + 1) * N]
        np.testing.assert_allclose(mirrored, source * [1, -1, 1] + [0, 1.5, 0], atol=1e-6)


def test_ker_rotated_planes_turn_about_the_pivot_by_at_most_the_max_angle():
    geo = ker_geometry("FetchPush-v4")
    ep, N, n_ker = _random_episodes(50, 2, 25), 50, 4
    out = ker_augment(ep, n_ker, np.random.default_rng(1), "FetchPush-v4")
    px, py = geo.pivot
    phi = np.arctan2(ep["g"][:, 0, 1] - py, ep["g"][:, 0, 0] - px)
    thetas = []
    for b in range(1, n_ker):
        g = out["g"][b * N:(b + 1) * N, 0]
        np.testing.assert_allclose(np.hypot(g[:, 0] - px, g[:, 1] - py), np.hypot(*(ep["g"][:, 0, :2] - [px, py]).T),
                                   atol=1e-5)
        thetas.append((np.arctan2(g[:, 1] - py, g[:, 0] - px) + phi) / 2)  # a mirror maps angle phi to 2 theta - phi
    thetas = (np.concatenate(thetas) + np.pi / 2) % np.pi - np.pi / 2
    assert thetas.min() >= -1e-5 and thetas.max() <= geo.max_z_theta + 1e-5
    assert thetas.max() > 0.8 * geo.max_z_theta and len(np.unique(thetas.round(6))) == len(thetas)  # per episode


def test_ker_n_ker_zero_is_a_no_op_and_rng_makes_it_deterministic():
    ep = _random_episodes(2, 3, 10)
    same = ker_augment(ep, 0, np.random.default_rng(0), "FetchReach-v4")
    for k in ep:
        np.testing.assert_array_equal(same[k], ep[k])
    a = ker_augment(ep, 3, np.random.default_rng(5), "FetchReachDense-v4")
    b = ker_augment(ep, 3, np.random.default_rng(5), "FetchReach-v4")
    for k in ep:
        np.testing.assert_array_equal(a[k], b[k])


def test_ker_geometry_is_iters_and_serialisable():
    push, slide, reach = (ker_geometry(f"Fetch{t}-v4") for t in ("Push", "Slide", "Reach"))
    assert (push.pivot, push.max_z_theta, push.mirror_y) == ((0.695, 0.75), 0.1443, 0.75)
    assert (slide.pivot, slide.max_z_theta) == ((0.34, 0.75), 0.0697)
    assert (reach.obs_dim, ker_geometry("FetchPickAndPlaceDense-v5").task) == (10, "PickAndPlace")
    assert dataclasses.asdict(push)["pivot"] == (0.695, 0.75)


@pytest.mark.parametrize("env_id", ["FetchPush-v1", "FetchPush-v2", "HalfCheetah-v5", "FetchPushObstacle-v4",
                                    "HandManipulateBlock-v1", "fetchpush-v4"])
def test_unsupported_env_ids_raise_value_error_naming_the_supported_ones(env_id):
    ep = _random_episodes(1, 2, 25)
    for call in (lambda: ker_geometry(env_id), lambda: ker_augment(ep, 2, np.random.default_rng(0), env_id),
                 lambda: ger_goals(np.zeros((2, 3)), 2, np.random.default_rng(0), env_id)):
        with pytest.raises(ValueError, match="FetchPush, FetchSlide"):
            call()


# ---- GER ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["FetchPush-v4", "FetchReach-v4", "FetchPickAndPlace-v4"])
def test_ger_goals_are_uniform_in_the_ball(env_id):
    g = np.random.default_rng(0).uniform(1.0, 1.4, (5000, 3)).astype(np.float32)
    moved = ger_goals(g, 4, np.random.default_rng(1), env_id, radius=0.05)
    assert moved.shape == (4, 5000, 3) and moved.dtype == np.float32
    off = (moved - g).astype(np.float64)
    r = np.linalg.norm(off, axis=-1)
    assert r.max() <= 0.05 + 1e-6
    assert abs(((r / 0.05) ** 3).mean() - 0.5) < 0.01  # uniform in volume: (r/R)^3 ~ U(0, 1)
    np.testing.assert_allclose(off.mean(axis=(0, 1)), 0.0, atol=1e-3)  # no preferred direction
    assert abs(off[..., 2].std() - off[..., 0].std()) < 1e-3  # z moves like x


def test_ger_slide_goals_stay_on_the_table_plane_and_are_clipped():
    rng = np.random.default_rng(0)
    g = np.stack([rng.uniform(0.6, 2.0, 4000), rng.uniform(0.25, 1.25, 4000), np.full(4000, 0.42)], -1)
    moved = ger_goals(g, 3, np.random.default_rng(2), "FetchSlideDense-v4")
    np.testing.assert_array_equal(moved[..., 2], np.broadcast_to(g[:, 2], (3, 4000)))
    assert moved[..., 0].min() >= SLIDE_TABLE_X[0] and moved[..., 0].max() <= SLIDE_TABLE_X[1]
    assert moved[..., 1].min() >= SLIDE_TABLE_Y[0] and moved[..., 1].max() <= SLIDE_TABLE_Y[1]
    assert (moved[..., 0] == SLIDE_TABLE_X[1]).any()  # some were clipped
    inside = (g[:, 0] > 0.75) & (g[:, 0] < 1.89) & (g[:, 1] > 0.35) & (g[:, 1] < 1.15)  # far from the edges
    assert np.linalg.norm(moved[:, inside] - g[inside], axis=-1).max() <= 0.05 + 1e-9


@pytest.fixture(scope="module")
def push_env():
    env = make_env("FetchPush-v4", seed=0)
    yield env
    env.close()


def test_ger_minibatch_stacks_copies_and_recomputes_rewards_with_the_env(push_env):
    rng = np.random.default_rng(0)
    B = 64
    arrays = {"obs": rng.normal(size=(B, 25)), "act": rng.uniform(-1, 1, (B, 4)),
              "achieved_goal": rng.uniform(1.2, 1.4, (B, 3)), "rew": np.zeros(B),
              "next_achieved_goal": rng.uniform(1.2, 1.4, (B, 3)), "done": np.zeros(B)}
    arrays["goal"] = arrays["next_achieved_goal"] + rng.uniform(-0.04, 0.04, (B, 3))
    batch = Batch({k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()})

    def reward_fn(ag, g):
        return push_env.unwrapped.compute_reward(ag, g, None)

    out = {k: v.numpy() for k, v in ger_minibatch(batch, 4, np.random.default_rng(1), "FetchPush-v4",
                                                  reward_fn).items()}
    batch = {k: v.numpy() for k, v in batch.items()}
    assert {k: v.shape[0] for k, v in out.items()} == {k: 5 * B for k in batch}
    for k in ("obs", "act", "achieved_goal", "next_achieved_goal", "goal"):
        np.testing.assert_array_equal(out[k][:B], batch[k])
    for k in ("obs", "act", "next_achieved_goal", "done"):
        np.testing.assert_array_equal(out[k][3 * B:4 * B], batch[k])
    np.testing.assert_array_equal(out["rew"], push_env.unwrapped.compute_reward(out["next_achieved_goal"],
                                                                               out["goal"], None))
    assert out["rew"].dtype == np.float32 and 0 < (out["rew"] == 0).mean() < 1  # both outcomes occur
    assert np.abs(out["goal"][B:] - np.tile(batch["goal"], (4, 1))).max() > 0.01  # the copies' goals moved
    with pytest.raises(ValueError, match="next_achieved_goal"):
        ger_minibatch(Batch({k: torch.as_tensor(v) for k, v in batch.items() if k != "next_achieved_goal"}), 2, rng,
                      "FetchPush-v4", reward_fn)


# ---- consistency with the simulator ---------------------------------------------------------------------------


def _rollout(env, acts: np.ndarray, seed: int, setup=None) -> dict[str, np.ndarray]:
    """One episode from ``reset(seed)``; ``setup(unwrapped_env)`` may change the initial state first."""
    o, _ = env.reset(seed=seed)
    if setup is not None:
        setup(env.unwrapped)
        o = env.unwrapped._get_obs()
    obs, ag, g = [o["observation"]], [o["achieved_goal"]], []
    for a in acts:
        g.append(o["desired_goal"])
        o, *_ = env.step(a)
        obs.append(o["observation"])
        ag.append(o["achieved_goal"])
    return {"obs": np.array(obs)[None], "ag": np.array(ag)[None], "g": np.array(g)[None], "act": np.array(acts)[None]}


def _swap_fingers(u) -> None:
    r = u._utils.get_joint_qpos(u.model, u.data, "robot0:r_gripper_finger_joint").copy()
    l = u._utils.get_joint_qpos(u.model, u.data, "robot0:l_gripper_finger_joint").copy()
    u._utils.set_joint_qpos(u.model, u.data, "robot0:r_gripper_finger_joint", l)
    u._utils.set_joint_qpos(u.model, u.data, "robot0:l_gripper_finger_joint", r)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_y_mirrored_push_episode_matches_the_simulator(push_env, seed):
    # Measured (seeds 0-9, 10 actions ~ U(-1, 1)): the gripper y trails the reflection by a constant 1.800 mm, twice
    # its start's offset from the mirror (0.7491 vs 0.75), as the mirrored start cannot move the gripper. Beyond that
    # offset the gripper positions differ by <= 0.22 mm, its velocities (x dt) by <= 2.3 mm per step (0.29 mm for
    # seeds 0-2) and the swapped finger velocities by <= 1.1 mm: the arm is not mirror-symmetric (base at y = 0.7441)
    # and the blocked fingers scrape the table. Keeping the fingers in place (ITER) instead gives finger-velocity
    # errors up to 16.8 mm and gripper errors up to 0.79 mm. The block is out of reach here, so it, the goals and the
    # achieved goals match to 1e-15. With contact (scripted 8-22 cm pushes, 30 seeds, mirror through the gripper's
    # own start) the block drifts from the reflection by 5 mm (median) to 27 mm: contacts amplify the sub-mm
    # asymmetry, so no test asserts them.
    acts = np.random.default_rng(seed).uniform(-1, 1, (10, 4)).astype(np.float32)
    ep = _rollout(push_env, acts, seed)
    assert np.abs(ep["obs"][0, :, 3:6] - ep["obs"][0, 0, 3:6]).max() < 1e-6  # the block was not touched
    ref = reflect_episodes(ep, plane_reflection(0.0), (0.0, MIRROR_Y), task="Push")

    def mirror_start(u):
        q = u._utils.get_joint_qpos(u.model, u.data, "object0:joint").copy()
        q[:3] = ref["obs"][0, 0, 3:6]  # the block starts unrotated, and M I M = I
        u._utils.set_joint_qpos(u.model, u.data, "object0:joint", q)
        _swap_fingers(u)
        mujoco.mj_forward(u.model, u.data)
        u.goal = ref["g"][0, 0].astype(np.float64)

    sim = _rollout(push_env, ref["act"][0], seed, mirror_start)
    s, r = sim["obs"][0].astype(np.float64), ref["obs"][0].astype(np.float64)
    offset = 1.5 - 2 * ep["obs"][0, 0, 1]  # mirrored start y minus the real start y
    assert 1.7e-3 < offset < 1.9e-3
    grip_err = s[:, 0:3] - r[:, 0:3] + [0, offset, 0]
    assert np.abs(grip_err).max() < 1.5e-3
    np.testing.assert_allclose(s[:, 6:9] - r[:, 6:9] - [0, offset, 0], 0.0, atol=1.5e-3)  # object_rel_pos
    np.testing.assert_allclose(s[:, 3:6], r[:, 3:6], atol=1e-6)
    np.testing.assert_allclose(s[:, 11:14], r[:, 11:14], atol=1e-6)  # resting block: Euler ~ 0, no wrap
    np.testing.assert_allclose(s[:, 14:17], r[:, 14:17], atol=3e-3)
    np.testing.assert_allclose(s[:, 20:23], r[:, 20:23], atol=3e-3)
    np.testing.assert_allclose(s[:, [9, 10, 23, 24]], r[:, [9, 10, 23, 24]], atol=2e-3)
    np.testing.assert_allclose(sim["ag"], ref["ag"], atol=1e-6)
    np.testing.assert_allclose(sim["g"], ref["g"], atol=1e-6)


@pytest.mark.parametrize("theta", [0.05, 0.1443])
def test_rotated_plane_reach_episode_matches_the_simulator(theta):
    # Reach has no object; the reflected start (6.6 cm / 18.8 cm from the real one) is built by moving the mocap and
    # letting the arm settle for 10 control steps, which leaves the grip 0.21 mm off. Measured (4 action seeds, both
    # angles, ~30 cm paths): grip positions within 0.21 mm of the reflection for the whole episode (drift after the
    # start <= 0.07 mm), grip velocities (x dt) within 0.02 mm per step, finger state/velocity within 0.4 mm (the
    # settle zeroes the blocked fingers). The env's gripper cannot turn with the plane; Reach only sees its grip site.
    env = make_env("FetchReach-v4", seed=0)
    geo = ker_geometry("FetchReach-v4")
    acts = np.random.default_rng(3).uniform(-0.7, 0.7, (10, 4)).astype(np.float32)  # reflections stay in the box
    ep = _rollout(env, acts, 0)
    ref = reflect_episodes(ep, plane_reflection(theta), geo.pivot, task="Reach")
    assert np.abs(ref["act"]).max() < 1.0

    def reflected_start(u):
        target = ref["obs"][0, 0, :3].astype(np.float64)
        u._utils.reset_mocap2body_xpos(u.model, u.data)  # the mocap sits on the gripper, as in every env step
        mocap = u.model.body_mocapid[mujoco.mj_name2id(u.model, mujoco.mjtObj.mjOBJ_BODY, "robot0:mocap")]
        u.data.mocap_pos[mocap] += target - u._utils.get_site_xpos(u.model, u.data, "robot0:grip")
        for _ in range(10):
            mujoco.mj_step(u.model, u.data, nstep=u.n_substeps)
            u._step_callback()
        u.goal = ref["g"][0, 0].astype(np.float64)

    sim = _rollout(env, ref["act"][0], 0, reflected_start)
    env.close()
    s, r = sim["obs"][0], ref["obs"][0]
    assert np.linalg.norm(r[0, :3] - ep["obs"][0, 0, :3]) > 0.05  # the start really moved
    np.testing.assert_allclose(s[:, 0:3], r[:, 0:3], atol=5e-4)
    np.testing.assert_allclose(s[:, 5:8], r[:, 5:8], atol=1e-4)
    np.testing.assert_allclose(s[:, [3, 4, 8, 9]], r[:, [3, 4, 8, 9]], atol=2e-3)
    np.testing.assert_allclose(sim["ag"], ref["ag"], atol=5e-4)
    np.testing.assert_allclose(sim["g"], ref["g"], atol=1e-6)
