"""ITER-Diffusion's episode generator: row layout, the filter (consistency, Fetch dynamics on real FetchPush-v4
episodes), training, the EMA across normaliser refits, inpainted sampling and exact checkpoint round trips (tiny
UNet, a few steps)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffrl.augment.episodes import (
    FILTER_CHECKS,
    EpisodeDiffusionSettings,
    EpisodeGenerator,
    EpisodeLayout,
    consistency_error,
    filter_errors,
    first_failure,
    successful_contexts,
)
from diffrl.augment.ker import ker_augment
from diffrl.envs.make import make_env
from diffrl.errors import ConfigError, DatasetError
from diffrl.runs.checkpoint import load_checkpoint, save_checkpoint

DO, DA, DG, T = 9, 4, 3, 6  # grip, obj, rel; 7 rows: the UNet pads them to 8
TINY = EpisodeDiffusionSettings(num_steps=10, dim=8, dim_mults=(1, 2), lr=1e-3, batch_size=16, train_steps=5,
                                tol=math.inf, kinematics_tol=math.inf, contact_radius=math.inf)


def line_episodes(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Straight-line Fetch-like episodes: the gripper moves at constant velocity, the object at half of it."""
    rng = np.random.default_rng(seed)
    grip0 = rng.uniform(1.0, 1.5, (n, 1, 3))
    obj0 = grip0 + rng.uniform(-0.1, 0.1, (n, 1, 3))
    v = rng.uniform(-0.02, 0.02, (n, 1, 3))
    steps = np.arange(T + 1)[None, :, None]
    grip, obj = grip0 + v * steps, obj0 + 0.5 * v * steps
    act = np.concatenate([np.repeat(v / 0.05, T, axis=1), np.zeros((n, T, 1))], axis=2)
    g = np.repeat(rng.uniform(1.0, 1.5, (n, 1, 3)), T, axis=1)
    eps = {"obs": np.concatenate([grip, obj, obj - grip], axis=2), "act": act, "ag": obj, "g": g}
    return {k: v.astype(np.float32) for k, v in eps.items()}


def generator(seed: int = 0, **overrides: object) -> EpisodeGenerator:
    settings = EpisodeDiffusionSettings(**{**TINY.__dict__, **overrides})
    return EpisodeGenerator(DO, DA, DG, T, object_task=True, settings=settings, seed=seed)


# ---------------------------------------------------------------------------------------------------- layout
def test_rows_are_obs_act_ag_g_with_padded_last_action_and_goal() -> None:
    lay, eps = EpisodeLayout(DO, DA, DG), line_episodes(4)
    rows = lay.join(eps)
    assert rows.shape == (4, T + 1, DO + DA + 2 * DG) == (4, T + 1, lay.channels)
    np.testing.assert_array_equal(rows[:, :, :DO], eps["obs"])
    np.testing.assert_array_equal(rows[:, :T, DO:DO + DA], eps["act"])
    np.testing.assert_array_equal(rows[:, T, DO:DO + DA], 0.0)
    np.testing.assert_array_equal(rows[:, :, DO + DA:DO + DA + DG], eps["ag"])
    np.testing.assert_array_equal(rows[:, T, -DG:], eps["g"][:, -1])
    for k, v in lay.split(rows).items():
        np.testing.assert_array_equal(v, eps[k])
    assert EpisodeLayout(25, 4, 3).channels == 35


def test_default_schedule_reaches_noise_without_a_degenerate_last_step() -> None:
    """Cosine, betas capped at 0.5: alpha_bar_K ~ 1e-3 (the reference's linear schedule stops at ~0.6)."""
    sched = EpisodeGenerator(DO, DA, DG, T, object_task=True).trainer.model.schedule
    assert sched.num_steps == 50 and float(sched.betas.max()) <= 0.5 + 1e-6
    assert float(sched.alphas_cumprod[-1]) < 2e-3


def test_bad_episode_shapes_and_settings_are_rejected() -> None:
    eps = line_episodes(2)
    with pytest.raises(DatasetError, match="'act' has shape"):
        EpisodeLayout(DO, DA, DG).join({**eps, "act": eps["act"][:, :-1]})
    with pytest.raises(DatasetError, match="T=5"):
        generator().fit({k: v[:, :-1] for k, v in eps.items()})
    with pytest.raises(ConfigError, match="schedule"):
        EpisodeDiffusionSettings(schedule="quadratic")
    with pytest.raises(ValueError, match="obs_dim"):
        EpisodeLayout(5, 4, 3, object_task=True)


# ------------------------------------------------------------------------------------------------ filter
def test_consistency_error_measures_metres() -> None:
    eps = line_episodes(4)
    obs, ag = eps["obs"].astype(np.float64), eps["ag"].astype(np.float64)
    ag[1, 3] += [0.03, 0.04, 0.0]         # achieved goal 0.05 m off the object at one row
    obs[2, 5, 6:9] += [0.0, 0.0, 0.2]     # object_rel_pos 0.2 m off obj - grip
    ag[3, 0] += [0.1, 0.0, 0.0]
    ag[3, 6] += [0.0, 0.3, 0.0]           # worst row counts
    np.testing.assert_allclose(consistency_error(obs, ag, object_task=True), [0.0, 0.05, 0.2, 0.3], atol=1e-6)
    # Reach: the achieved goal is the gripper position, the rel-pos term does not apply
    np.testing.assert_allclose(consistency_error(obs, obs[..., 0:3] + [0.0, 0.0, 0.01], object_task=False), 0.01,
                               atol=1e-6)


def test_first_failure_names_the_first_failed_check_in_order() -> None:
    errors = {"goal": np.array([0.0, 0.0, 0.0, 0.0, 1.0]), "kinematics": np.array([0.0, 0.0, 0.0, 1.0, 1.0]),
              "object": np.array([0.0, 0.0, 1.0, 1.0, 1.0]), "consistency": np.array([0.0, 1.0, 1.0, 1.0, 1.0])}
    limits = dict.fromkeys(FILTER_CHECKS, 0.5)
    np.testing.assert_array_equal(first_failure(errors, limits), [-1, 3, 2, 1, 0])
    np.testing.assert_array_equal(first_failure(errors, {**limits, "object": math.inf}), [-1, 3, 3, 1, 0])


PUSH_EPISODES, PUSH_T = 40, 50


def _push_policy(obs: dict[str, np.ndarray], phase: list[int], rng: np.random.Generator) -> np.ndarray:
    """A scripted pusher (above the block's far side, down, push towards the goal) explored as DDPG+HER does: 30%
    uniform actions, else Gaussian noise 0.2."""
    o, goal = obs["observation"], obs["desired_goal"]
    grip, obj = o[0:3], o[3:6]
    d = (goal - obj)[:2]
    u = d / max(float(np.linalg.norm(d)), 1e-6)
    behind, rel = obj[:2] - 0.07 * u, grip[:2] - obj[:2]
    if phase[0] == 2 and (abs(rel[0] * u[1] - rel[1] * u[0]) > 0.03 or rel @ u > -0.02):
        phase[0] = 0
    if phase[0] == 0:
        target = np.array([*behind, obj[2] + 0.1])
        phase[0] = 1 if np.linalg.norm(grip[:2] - behind) < 0.01 else 0
    if phase[0] == 1:
        target = np.array([*behind, obj[2]])
        phase[0] = 2 if abs(grip[2] - obj[2]) < 0.01 else (0 if np.linalg.norm(grip[:2] - behind) > 0.03 else 1)
    if phase[0] == 2:
        target = np.array([*(obj[:2] + 0.03 * u), obj[2]])
    if rng.uniform() < 0.3:
        return rng.uniform(-1, 1, 4)
    return np.clip(np.append(np.clip((target - grip) * 10, -1, 1) + rng.normal(0, 0.2, 3), 0.0), -1, 1)


@pytest.fixture(scope="module")
def push_episodes() -> dict[str, np.ndarray]:
    """Real FetchPush-v4 episodes: half scripted pushes with exploration noise, half uniformly random actions."""
    env, rng = make_env("FetchPush-v4"), np.random.default_rng(0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "act", "ag", "g")}
    for i in range(PUSH_EPISODES):
        obs, _ = env.reset(seed=i)
        o, ag, g, a, phase = [obs["observation"]], [obs["achieved_goal"]], [], [], [0]
        for _ in range(PUSH_T):
            act = _push_policy(obs, phase, rng) if i % 2 == 0 else rng.uniform(-1, 1, 4)
            g.append(obs["desired_goal"])
            a.append(act)
            obs, *_ = env.step(act)
            o.append(obs["observation"])
            ag.append(obs["achieved_goal"])
        for k, v in zip(("obs", "ag", "g", "act"), (o, ag, g, a), strict=True):
            out[k].append(np.stack(v))
    env.close()
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def _reasons(episodes: dict[str, np.ndarray], raw: dict[str, np.ndarray] | None = None) -> np.ndarray:
    s = EpisodeDiffusionSettings()
    errors = filter_errors(raw or episodes, episodes, object_task=True, object_still=s.object_still)
    return first_failure(errors, {"goal": s.goal_tol, "kinematics": s.kinematics_tol, "object": s.contact_radius,
                                  "consistency": s.tol})


def test_the_default_filter_accepts_real_push_episodes_and_their_ker_reflections(push_episodes) -> None:
    real = push_episodes
    ker = ker_augment({k: v[::2] for k, v in real.items()}, 2, np.random.default_rng(0), "FetchPush-v4")
    for episodes in (real, ker):
        reasons = _reasons(episodes)
        assert (reasons >= 0).mean() <= 0.01, {c: int((reasons == i).sum()) for i, c in enumerate(FILTER_CHECKS)}
    # the contact check was exercised: the block moved (more than object_still in a step) in most pushes
    moved = np.linalg.norm(np.diff(real["obs"][::2, :, 3:6], axis=1), axis=-1).max(1) > 0.005
    assert moved.mean() >= 0.5


def test_the_filter_rejects_corrupted_push_episodes_for_the_right_reason(push_episodes) -> None:
    real, rng = push_episodes, np.random.default_rng(1)
    n = len(real["obs"])
    kinematics, obj, goal, consistency = (FILTER_CHECKS.index(c) for c in ("kinematics", "object", "goal",
                                                                           "consistency"))
    noisy = {**real, "act": rng.uniform(-1, 1, real["act"].shape).astype(np.float32)}  # actions replaced by noise
    np.testing.assert_array_equal(_reasons(noisy), kinematics)
    moved_goal = {**real, "g": real["g"].copy()}
    moved_goal["g"][:, 30:, 0] += 0.1  # the desired goal jumps 10 cm mid-episode
    np.testing.assert_array_equal(_reasons(moved_goal), goal)
    bad_ag = {**real, "ag": real["ag"] + np.float32(0.1)}  # raw achieved goals off their observation
    np.testing.assert_array_equal(_reasons(real, raw=bad_ag), consistency)
    # the block jumps 5 cm in x and y after REST_STEPS still steps, with the gripper > 0.2 m away before and after
    # the jump; object_rel_pos and the achieved goal follow it
    jump = np.array([0.05, 0.05, 0.0])
    grip, block = real["obs"][..., 0:3].astype(np.float64), real["obs"][..., 3:6].astype(np.float64)
    still = np.linalg.norm(np.diff(block, axis=1), axis=-1) <= 0.005  # (N, T)
    far_before = np.linalg.norm(block[:, :-1] - grip[:, :-1], axis=-1) > 0.2  # (N, T)
    far_after = np.linalg.norm(block[:, 1:] + jump - grip[:, 1:], axis=-1) > 0.2
    teleported = {k: v.copy() for k, v in real.items()}
    hit = []
    for i in range(n):
        steps = [t for t in range(3, PUSH_T) if still[i, t - 3:t + 1].all() and far_before[i, t] and far_after[i, t]]
        if steps:
            t = steps[len(steps) // 2]
            teleported["obs"][i, t + 1:, 3:6] += jump.astype(np.float32)
            teleported["obs"][i, t + 1:, 6:9] += jump.astype(np.float32)
            teleported["ag"][i, t + 1:] += jump.astype(np.float32)
            hit.append(i)
    assert len(hit) >= n // 3
    np.testing.assert_array_equal(_reasons(teleported)[hit], obj)


def test_successful_contexts_pick_succeeding_episodes_and_fall_back_to_all() -> None:
    eps = line_episodes(5)
    eps["g"][2] = eps["ag"][2, 4]  # episode 2 reaches its goal at step 4 (ag_4 vs g_3)
    ctx, info = successful_contexts(eps)
    np.testing.assert_array_equal(ctx["obs0"], eps["obs"][[2], 0])
    np.testing.assert_array_equal(ctx["g"], eps["g"][[2], 0])
    assert info == {"successful_episodes": 1.0, "success_fraction": 0.2, "fallback": 0.0}
    ctx, info = successful_contexts(eps, threshold=0.0)  # nothing reaches its goal
    assert info["fallback"] == 1.0 and len(ctx["obs0"]) == 5


# ----------------------------------------------------------------------------------------- train, sample
def test_fit_reduces_the_denoising_loss_on_straight_lines() -> None:
    gen = generator(batch_size=32, dim=16, dim_mults=(1,), lr=1e-2)
    eps = line_episodes(64)
    first = gen.fit(eps, steps=20)
    gen.fit(eps, steps=80)
    last = gen.fit(eps, steps=20)
    assert first["steps"] == 20 and gen.trainer.step == 120 and gen.fits == 3
    assert set(first) == {"loss_mean", "loss_std", "steps"}
    assert last["loss_mean"] < 0.75 * first["loss_mean"]  # ~0.97 -> ~0.57 over seeds 0-2


def test_fit_uses_at_most_n_train_episodes_and_refits_or_keeps_the_normaliser() -> None:
    for refit in (True, False):
        gen = generator(n_train_episodes=10, refit_normalizer=refit)
        gen.fit(line_episodes(30), steps=1)
        assert len(gen.trainer.data) == 10
        shift = gen.trainer.model.normalizer.shift.clone()
        shifted = line_episodes(30, seed=1)
        shifted["obs"] += 5.0
        gen.fit(shifted, steps=1)
        new = gen.trainer.model.normalizer.shift
        if refit:  # the statistics follow the data (obs channels moved by 5), in the EMA model too
            assert torch.allclose(new[gen.layout.obs] - shift[gen.layout.obs], torch.tensor(5.0), atol=0.5)
        else:
            torch.testing.assert_close(new, shift, rtol=0, atol=0)
        torch.testing.assert_close(gen.sampling_model.normalizer.shift, new, rtol=0, atol=0)


def test_a_refit_restarts_the_ema_from_the_live_weights() -> None:
    eps, shifted = line_episodes(16), line_episodes(16, seed=1)
    shifted["obs"] += 1.0

    def weights(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def trained(refit: bool) -> EpisodeGenerator:
        gen = generator(refit_normalizer=refit, ema_decay=0.9)
        gen.trainer.ema.start_step = 0  # no copy phase (100 steps by default): the average departs at once
        gen.fit(eps, steps=5)
        assert not same(weights(gen.trainer.ema.shadow), weights(gen.trainer.model))
        return gen

    kept = trained(refit=False)
    kept.fit(shifted, steps=0)
    assert not same(weights(kept.trainer.ema.shadow), weights(kept.trainer.model))
    gen = trained(refit=True)
    gen.fit(shifted, steps=0)  # refitted: no weights trained under the old statistics remain in the average
    assert same(weights(gen.trainer.ema.shadow), weights(gen.trainer.model))
    # and the average restarts as from scratch: a copy, then the decay ramp 1 - (1 + k)^(-2/3)
    expected: list[torch.Tensor] = []
    for k in range(4):
        gen.trainer.train_step()
        decay = 0.0 if k == 0 else min(0.9, 1 - (1 + k) ** (-2 / 3))
        w = weights(gen.trainer.model)
        expected = w if not expected else [decay * e + (1 - decay) * x for e, x in zip(expected, w, strict=True)]
    for e, p in zip(expected, gen.trainer.ema.shadow.parameters(), strict=True):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


def test_generated_episodes_keep_the_context_and_are_repaired() -> None:
    gen = generator()
    eps = line_episodes(16)
    gen.fit(eps, steps=5)
    ctx = {"obs0": eps["obs"][:3, 0], "g": eps["g"][:3, 0]}
    out, stats = gen.generate(ctx)  # one episode per context, in order
    assert out["obs"].shape == (3, T + 1, DO) and out["act"].shape == (3, T, DA)
    assert out["ag"].shape == (3, T + 1, DG) and out["g"].shape == (3, T, DG)
    np.testing.assert_array_equal(out["obs"][:, 0], ctx["obs0"])  # inpainted, exact
    np.testing.assert_array_equal(out["g"], np.repeat(ctx["g"][:, None], T, axis=1))  # constant per episode
    assert np.all(np.abs(out["act"]) <= 1.0)
    np.testing.assert_array_equal(out["ag"], out["obs"][..., 3:6])
    np.testing.assert_allclose(out["obs"][..., 6:9], out["obs"][..., 3:6] - out["obs"][..., 0:3], atol=1e-6)
    assert stats["generated"] == stats["accepted"] == 3 and stats["rejection_rate"] == 0.0
    assert stats["consistency_error_median"] > 0  # an untrained model's ag disagrees with its obs
    raw = gen.sample_rows(torch.as_tensor(ctx["obs0"]), torch.as_tensor(ctx["g"]), torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(raw[:, 0, DO + DA:DO + DA + DG].numpy(), ctx["obs0"][:, 3:6])  # ag_0 inpainted
    np.testing.assert_array_equal(raw[:, T, DO:DO + DA].numpy(), 0.0)  # act_T := 0
    many, stats = gen.generate(ctx, n=7)  # contexts drawn with replacement
    assert len(many["obs"]) == 7
    assert all(any(np.array_equal(o, c) for c in ctx["obs0"]) for o in many["obs"][:, 0])


def test_synthetic_success_rate_is_the_share_of_accepted_episodes_ending_within_the_threshold() -> None:
    gen = generator()
    eps = line_episodes(16)
    gen.fit(eps, steps=5)
    ctx = {"obs0": eps["obs"][:7, 0], "g": eps["g"][:7, 0]}
    out, _ = gen.generate(ctx, generator=torch.Generator().manual_seed(3))
    final = np.linalg.norm(out["obs"][:, -1, 3:6].astype(np.float64) - ctx["g"], axis=-1)  # object vs goal, metres
    threshold = float(np.sort(final)[3])  # 3 of the 7 final distances lie below it
    again, stats = gen.generate(ctx, generator=torch.Generator().manual_seed(3), success_threshold=threshold)
    np.testing.assert_array_equal(again["obs"], out["obs"])
    assert stats["synthetic_success_rate"] == 3 / 7


def test_generate_counts_each_rejected_episode_under_its_first_failed_check() -> None:
    gen = generator()
    eps = line_episodes(24)
    gen.fit(eps, steps=5)
    ctx = {"obs0": eps["obs"][:, 0], "g": eps["g"][:, 0]}
    rows = gen.sample_rows(torch.as_tensor(ctx["obs0"]), torch.as_tensor(ctx["g"]), torch.Generator().manual_seed(5))
    raw = gen.layout.split(rows.numpy())
    fixed = gen.repair(raw)
    errors = filter_errors(raw, fixed, object_task=True, object_still=gen.settings.object_still)
    # thresholds at each measure's median, so several checks reject episodes
    limits = {"goal": 1e-3, **{c: float(np.median(errors[c])) for c in ("kinematics", "object", "consistency")}}
    gen.settings = dataclasses.replace(gen.settings, goal_tol=limits["goal"], kinematics_tol=limits["kinematics"],
                                       contact_radius=limits["object"], tol=limits["consistency"])
    counts, kept = dict.fromkeys(FILTER_CHECKS, 0), []
    for i in range(len(ctx["g"])):  # each episode's first failed check, one at a time
        failed = [c for c in FILTER_CHECKS if errors[c][i] > limits[c]]
        if failed:
            counts[failed[0]] += 1
        else:
            kept.append(i)
    out, stats = gen.generate(ctx, generator=torch.Generator().manual_seed(5))
    assert sum(v > 0 for v in counts.values()) >= 2
    for c in FILTER_CHECKS:
        assert stats[f"reject_{c}"] == counts[c] / 24
    assert stats["accepted"] == len(kept) and stats["rejection_rate"] == 1 - len(kept) / 24
    assert sum(stats[f"reject_{c}"] for c in FILTER_CHECKS) == pytest.approx(stats["rejection_rate"], abs=1e-12)
    np.testing.assert_array_equal(out["obs"], fixed["obs"][kept])
    assert stats["kinematics_error_median"] == float(np.median(errors["kinematics"]))


def test_generate_rejects_episodes_beyond_tol() -> None:
    gen = generator(tol=1e-9)  # an untrained model is never this consistent
    eps = line_episodes(8)
    gen.fit(eps, steps=1)
    out, stats = gen.generate({"obs0": eps["obs"][:, 0], "g": eps["g"][:, 0]})
    assert stats == {**stats, "generated": 8.0, "accepted": 0.0, "rejection_rate": 1.0, "reject_consistency": 1.0,
                     "reject_kinematics": 0.0, "reject_object": 0.0, "reject_goal": 0.0}
    assert out["obs"].shape == (0, T + 1, DO) and math.isnan(stats["synthetic_success_rate"])
    assert (gen.generated, gen.accepted) == (8, 0)
    assert gen.totals() == {"generated": 8, "accepted": 0, "rejected_goal": 0, "rejected_kinematics": 0,
                            "rejected_object": 0, "rejected_consistency": 8,
                            "last_consistency_error_median": stats["consistency_error_median"],
                            "last_kinematics_error_median": stats["kinematics_error_median"]}


def test_generation_totals_survive_a_checkpoint_and_are_unknown_from_one_that_did_not_count_them() -> None:
    eps = line_episodes(8)
    a = generator(tol=1e-9)
    assert a.totals() == {}  # nothing generated yet
    a.fit(eps, steps=1)
    a.generate({"obs0": eps["obs"][:, 0], "g": eps["g"][:, 0]})
    b = generator(tol=1e-9)
    b.load_state_dict(a.state_dict())
    assert b.totals() == a.totals() and a.totals()["rejected_consistency"] == 8
    old = {k: v for k, v in a.state_dict().items() if k not in ("rejected", "last_errors")}
    c = generator(tol=1e-9)
    c.load_state_dict(old)  # generated 8, but not why: no rejection totals rather than zeros
    assert c.totals() == {"generated": 8, "accepted": 0}


def test_state_dict_round_trip_gives_identical_samples_and_training(tmp_path) -> None:
    eps = line_episodes(16)
    ctx = {"obs0": eps["obs"][:4, 0], "g": eps["g"][:4, 0]}
    a = generator(seed=0, ema_decay=0.9)
    a.fit(eps, steps=8)
    save_checkpoint(tmp_path, 8, {"episodes": a.state_dict()})
    b = generator(seed=123, ema_decay=0.9)
    b.load_state_dict(load_checkpoint(tmp_path)[1]["episodes"])
    out_a, stats_a = a.generate(ctx, n=5)
    out_b, stats_b = b.generate(ctx, n=5)
    for k in out_a:
        np.testing.assert_array_equal(out_a[k], out_b[k])
    assert stats_a == stats_b and a.totals() == b.totals()
    seeded = [g.generate(ctx, generator=torch.Generator().manual_seed(7))[0]["obs"] for g in (a, b)]
    np.testing.assert_array_equal(*seeded)
    assert a.fit(eps, steps=3) == b.fit(eps, steps=3)
    for pa, pb in zip(a.trainer.ema.shadow.parameters(), b.trainer.ema.shadow.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
