"""Fidelity metrics: real transitions replay exactly in MuJoCo, noise and wrong state layouts do not;
nearest-neighbour diversity detects copies; marginal W1 sees shifts; the report is JSON-able and printable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffrl.envs import make_env
from diffrl.errors import DatasetError, EnvError
from diffrl.eval.fidelity import (
    _nearest,
    _noised,
    _quantiles,
    diversity,
    fidelity_report,
    format_fidelity,
    marginals,
    simulator_validity,
)

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
EXACT = 1e-9  # float32 storage of s gives ~1e-13; an off-by-one qpos/qvel mapping gives O(1)


def collect(env_id: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random-action transitions through make_env, stored as float32 like a dataset."""
    env = make_env(env_id, seed=seed)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in KEYS}
    for _ in range(n):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        for k, v in zip(KEYS, (obs, a, r, nxt, term)):
            out[k].append(v)
        obs = env.reset()[0] if term or trunc else nxt
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def noised(t: dict[str, np.ndarray], keys: tuple[str, ...], scale: float = 0.1, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * v.std(0) * rng.standard_normal(v.shape)).astype(np.float32) if k in keys else v
            for k, v in t.items()}


def rows(t: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([t["observations"], t["actions"], t["rewards"][:, None], t["next_observations"]], 1)


@pytest.fixture(scope="module")
def hopper() -> dict[str, np.ndarray]:
    return collect("Hopper-v5", 400)


# ------------------------------------------------------------------------------------------------ validity
def test_real_hopper_transitions_replay_exactly_with_matching_terminations(hopper):
    v = simulator_validity("Hopper-v5", **hopper)
    assert hopper["terminals"].sum() >= 5  # random Hopper falls often: the agreement below is not vacuous
    assert v["clipped_fraction"] == 0.0
    assert v["next_obs_nmse"] < EXACT and v["reward_nmse"] < EXACT and v["next_obs_nmse_median"] < EXACT
    assert v["termination_agreement"] == 1.0
    assert v["num"] == 400 and len(v["next_obs_nmse_per_dim"]) == 11


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Swimmer-v5", "Ant-v5", "Walker2d-v5"])
def test_real_transitions_of_other_envs_replay_exactly(env_id):
    v = simulator_validity(env_id, **collect(env_id, 300))
    clips = v["clipped_fraction"] is not None
    assert v["next_obs_nmse_unclipped" if clips else "next_obs_nmse"] < EXACT
    # Ant's forward reward reads a one-sub-step-stale torso xpos, so it also depends on the previous step
    assert v["reward_nmse_unclipped" if clips else "reward_nmse"] < (1e-3 if env_id == "Ant-v5" else EXACT)
    if env_id == "Walker2d-v5":  # random Walker2d spins its joints past the observation's qvel clip of 10
        assert v["clipped_fraction"] > 0 and v["next_obs_nmse"] > 1e3 * v["next_obs_nmse_unclipped"]
    if env_id == "HalfCheetah-v5":
        assert v["termination_agreement"] is None and v["clipped_fraction"] is None


def test_noised_transitions_are_far_from_the_simulator(hopper):
    only_next = simulator_validity("Hopper-v5", **noised(hopper, ("next_observations", "rewards")), reference=hopper)
    both = simulator_validity("Hopper-v5", **noised(hopper, ("observations", "next_observations")), reference=hopper)
    assert 5e-3 < only_next["next_obs_nmse"] < 2e-2  # 0.1 std of noise on s' alone: NMSE ~ 0.1^2
    assert 5e-3 < only_next["reward_nmse"] < 2e-2
    assert both["next_obs_nmse"] > only_next["next_obs_nmse"]  # noise on s propagates through the dynamics


def test_shifted_observation_layout_is_caught(hopper):
    shifted = dict(hopper, observations=np.roll(hopper["observations"], 1, axis=1))  # qpos/qvel off by one
    assert simulator_validity("Hopper-v5", **shifted)["next_obs_nmse"] > 1e-2


def test_reference_variance_normalizes_the_errors(hopper):
    data = noised(hopper, ("next_observations", "rewards"))
    wide = {"next_observations": 2 * hopper["next_observations"], "rewards": 2 * hopper["rewards"]}
    own, ref = simulator_validity("Hopper-v5", **data), simulator_validity("Hopper-v5", **data, reference=wide)
    assert ref["next_obs_mse"] == own["next_obs_mse"]
    assert ref["reward_nmse"] == pytest.approx(own["reward_mse"] / (4 * hopper["rewards"].astype(np.float64).var()))


def test_actions_are_clipped_like_make_env(hopper):
    wild = dict(hopper, actions=np.where(hopper["actions"] > 0, 5.0, -5.0).astype(np.float32))
    tame = dict(hopper, actions=np.sign(hopper["actions"]).astype(np.float32))
    a, b = simulator_validity("Hopper-v5", **wild), simulator_validity("Hopper-v5", **tame)
    assert a["next_obs_mse"] == b["next_obs_mse"] and a["reward_mse"] == b["reward_mse"]


@pytest.mark.parametrize("env_id", ["dm_control/cheetah-run-v0", "Humanoid-v5", "FetchPush-v4", "Hopper-v4"])
def test_unsupported_env_ids_raise_one_sentence_naming_supported_envs(hopper, env_id):
    with pytest.raises(EnvError, match=r"supports Hopper-v5, Walker2d-v5, HalfCheetah-v5.*not '"):
        simulator_validity(env_id, **hopper)


def test_dimension_mismatches_raise_clear_dataset_errors(hopper):
    cheetah = collect("HalfCheetah-v5", 20)
    with pytest.raises(DatasetError, match="observations have 17 dims but Hopper-v5 observations have 11"):
        simulator_validity("Hopper-v5", **cheetah)
    with pytest.raises(DatasetError, match="actions have 2 dims but Hopper-v5 has 3 actuators"):
        simulator_validity("Hopper-v5", **dict(hopper, actions=hopper["actions"][:, :2]))
    with pytest.raises(DatasetError, match="lacks 'rewards'"):
        fidelity_report(hopper, {k: v for k, v in hopper.items() if k != "rewards"}, "Hopper-v5")
    with pytest.raises(DatasetError, match="non-finite"):
        simulator_validity("Hopper-v5", **dict(hopper, rewards=np.full(400, np.nan, dtype=np.float32)))


# ----------------------------------------------------------------------------------------------- diversity
def test_exact_copies_are_flagged_as_memorized(hopper):
    real = rows(hopper)
    copy, fresh = diversity(real, real.copy()), diversity(real, rows(noised(hopper, KEYS[:4])))
    assert copy["nn_mean"] < 1e-6 and copy["copy_fraction"] == 1.0
    assert copy["real_nn_mean"] > 0.1 and copy["real_copy_fraction"] == 0.0  # leave-one-out excludes itself
    assert fresh["nn_mean"] > 0.05 and fresh["copy_fraction"] == 0.0
    assert fresh["nn_ratio_mean"] > 100 * copy["nn_ratio_mean"]


def test_chunked_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    real, query = rng.standard_normal((50, 4)), rng.standard_normal((9, 4))
    mean, std = real.mean(0), real.std(0)
    zr, zq = (real - mean) / std, (query - mean) / std
    full = np.linalg.norm(zq[:, None] - zr[None], axis=2)  # (Q, M)
    np.testing.assert_allclose(_nearest(real, mean, std, zq, chunk=7), full.min(1), rtol=1e-12)
    idx = np.arange(0, 45, 5)  # leave-one-out: real rows queried against the others
    full = np.linalg.norm(zr[idx][:, None] - zr[None], axis=2)
    full[np.arange(9), idx] = np.inf
    np.testing.assert_allclose(_nearest(real, mean, std, zr[idx], exclude=idx, chunk=7), full.min(1), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- marginals
def test_marginals_are_zero_for_identical_data_and_see_a_shift_in_std_units(hopper):
    real = rows(hopper)
    assert marginals(real, real.copy())["w1_max"] == 0.0
    shifted = real.copy()
    shifted[:, 2] += 0.5 * real[:, 2].std()
    m = marginals(real, shifted)
    assert m["w1_argmax"] == 2 and m["w1_max"] == pytest.approx(0.5, abs=1e-4)
    assert np.delete(np.array(m["w1_per_dim"]), 2).max() == 0.0


def test_quantiles_match_numpy_linear_method():
    x = np.random.default_rng(0).standard_normal((101, 3)).astype(np.float32)
    u = (np.arange(10) + 0.5) / 10
    np.testing.assert_allclose(_quantiles(x, u), np.quantile(x.astype(np.float64), u, axis=0), rtol=1e-12)


# ------------------------------------------------------------------------------------------------- report
def test_noise_baseline_clips_actions_and_keeps_terminals(hopper):
    out = _noised(hopper, hopper, 3.0, np.random.default_rng(0))
    assert np.abs(out["actions"]).max() <= 1.0 and np.array_equal(out["terminals"], hopper["terminals"])
    assert not np.array_equal(out["observations"], hopper["observations"])


def test_report_of_copied_data_is_json_and_reads_against_real_and_noise(hopper):
    report = fidelity_report(hopper, dict(hopper, extra=np.zeros(3)), "Hopper-v5", num=300, seed=0)
    json.dumps(report, allow_nan=False)
    assert set(report) == {"real", "synthetic", "noise_baseline", "settings"}
    assert report["real"]["validity"]["next_obs_nmse"] < EXACT
    assert report["synthetic"]["diversity"]["copy_fraction"] == 1.0
    assert report["noise_baseline"]["validity"]["next_obs_nmse"] > 1e-3
    assert report["noise_baseline"]["diversity"]["copy_fraction"] == 0.0
    assert report["settings"]["num_synthetic"] == 300 and report["settings"]["real_size"] == 400
    table = format_fidelity(report).splitlines()
    assert table[2] == "| metric | real | synthetic | noise baseline |"
    assert any(line.startswith("| termination agreement | 1.000 | 1.000 |") for line in table)
    assert all(line.count("|") == 5 for line in table[2:])
