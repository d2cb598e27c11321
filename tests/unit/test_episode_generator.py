"""ITER-Diffusion's episode generator: row layout, consistency filter, training, inpainted sampling and exact
checkpoint round trips (tiny UNet, a few steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffrl.augment.episodes import (
    EpisodeDiffusionSettings,
    EpisodeGenerator,
    EpisodeLayout,
    consistency_filter,
    successful_contexts,
)
from diffrl.errors import ConfigError, DatasetError
from diffrl.runs.checkpoint import load_checkpoint, save_checkpoint

DO, DA, DG, T = 9, 4, 3, 6  # grip, obj, rel; 7 rows: the UNet pads them to 8
TINY = EpisodeDiffusionSettings(num_steps=10, dim=8, dim_mults=(1, 2), lr=1e-3, batch_size=16, train_steps=5,
                                tol=math.inf)


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
def test_consistency_filter_measures_metres_and_honours_tol() -> None:
    eps = line_episodes(4)
    obs, ag = eps["obs"].astype(np.float64), eps["ag"].astype(np.float64)
    ag[1, 3] += [0.03, 0.04, 0.0]         # achieved goal 0.05 m off the object at one row
    obs[2, 5, 6:9] += [0.0, 0.0, 0.2]     # object_rel_pos 0.2 m off obj - grip
    ag[3, 0] += [0.1, 0.0, 0.0]
    ag[3, 6] += [0.0, 0.3, 0.0]           # worst row counts
    keep, err = consistency_filter(obs, ag, object_task=True, tol=0.1)
    np.testing.assert_allclose(err, [0.0, 0.05, 0.2, 0.3], atol=1e-6)
    np.testing.assert_array_equal(keep, [True, True, False, False])
    assert 1 - keep.mean() == 0.5  # rejection rate
    keep, _ = consistency_filter(obs, ag, object_task=True, tol=0.04)
    np.testing.assert_array_equal(keep, [True, False, False, False])
    # Reach: the achieved goal is the gripper position, the rel-pos term does not apply
    _, err = consistency_filter(obs, obs[..., 0:3] + [0.0, 0.0, 0.01], object_task=False, tol=0.1)
    np.testing.assert_allclose(err, 0.01, atol=1e-6)


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
    assert 0.0 <= stats["synthetic_success_rate"] <= 1.0
    raw = gen.sample_rows(torch.as_tensor(ctx["obs0"]), torch.as_tensor(ctx["g"]), torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(raw[:, 0, DO + DA:DO + DA + DG].numpy(), ctx["obs0"][:, 3:6])  # ag_0 inpainted
    np.testing.assert_array_equal(raw[:, T, DO:DO + DA].numpy(), 0.0)  # act_T := 0
    many, stats = gen.generate(ctx, n=7)  # contexts drawn with replacement
    assert len(many["obs"]) == 7
    assert all(any(np.array_equal(o, c) for c in ctx["obs0"]) for o in many["obs"][:, 0])


def test_generate_rejects_episodes_beyond_tol() -> None:
    gen = generator(tol=1e-9)  # an untrained model is never this consistent
    eps = line_episodes(8)
    gen.fit(eps, steps=1)
    out, stats = gen.generate({"obs0": eps["obs"][:, 0], "g": eps["g"][:, 0]})
    assert stats == {**stats, "generated": 8.0, "accepted": 0.0, "rejection_rate": 1.0}
    assert out["obs"].shape == (0, T + 1, DO) and math.isnan(stats["synthetic_success_rate"])
    assert (gen.generated, gen.accepted) == (8, 0)


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
    assert stats_a == stats_b
    seeded = [g.generate(ctx, generator=torch.Generator().manual_seed(7))[0]["obs"] for g in (a, b)]
    np.testing.assert_array_equal(*seeded)
    assert a.fit(eps, steps=3) == b.fit(eps, steps=3)
    for pa, pb in zip(a.trainer.ema.shadow.parameters(), b.trainer.ema.shadow.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
