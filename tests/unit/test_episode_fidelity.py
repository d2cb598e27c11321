"""Episode fidelity: Gaussian KL and Frechet distance against closed forms, per-component statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffrl.eval.episode_fidelity import component_stats, frechet_distance, gaussian_kl

DO, DA, DG, T = 9, 4, 3, 6  # obs / action / goal dims, steps per episode


def test_kl_and_frechet_match_closed_forms_in_1d() -> None:
    m1, s1, m2, s2 = 0.3, 0.5, -1.0, 2.0
    kl = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    assert gaussian_kl([m1], [[s1 ** 2]], [m2], [[s2 ** 2]]) == pytest.approx(kl, rel=1e-12)
    assert frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]]) == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2)


def test_kl_and_frechet_match_closed_forms_for_diagonal_gaussians() -> None:
    m1, v1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 0.25, 4.0])
    m2, v2 = np.array([0.5, 1.0, 0.0]), np.array([2.0, 0.25, 1.0])
    kl = 0.5 * np.sum(v1 / v2 + (m2 - m1) ** 2 / v2 - 1 + np.log(v2 / v1))
    fd = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert gaussian_kl(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(kl, rel=1e-12)
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(fd, rel=1e-12)


def _whitened(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Samples whose pooled rows have mean exactly 0 and covariance exactly I."""
    x = rng.normal(size=(int(np.prod(shape[:-1])), shape[-1]))
    x -= x.mean(0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(x, rowvar=False, bias=True)))
    return np.linalg.solve(chol, x.T).T.reshape(shape)


def test_component_stats_are_zero_for_identical_data_and_exact_for_affine_copies() -> None:
    rng = np.random.default_rng(0)
    real = {"obs": _whitened(rng, (20, T + 1, DO)), "act": _whitened(rng, (20, T, DA)),
            "ag": _whitened(rng, (20, T + 1, DG)), "g": _whitened(rng, (20, T, DG))}
    same = component_stats(real, real)
    assert set(same) == {f"{m}/{c}" for m in ("kl", "fd") for c in ("obs", "act", "ag", "g")}
    assert all(abs(v) < 1e-9 for v in same.values())
    scale = {k: rng.uniform(0.5, 2.0, v.shape[-1]) for k, v in real.items()}
    shift = {k: rng.normal(size=v.shape[-1]) for k, v in real.items()}
    synth = {k: v * scale[k] + shift[k] for k, v in real.items()}  # N(shift, diag(scale^2)) exactly
    stats = component_stats(real, synth)
    for k in real:
        a2, b = scale[k] ** 2, shift[k]
        kl = 0.5 * np.sum(1 / a2 + b ** 2 / a2 - 1 + np.log(a2))
        fd = np.sum(b ** 2) + np.sum((1 - scale[k]) ** 2)
        assert stats[f"kl/{k}"] == pytest.approx(kl, rel=1e-4)
        assert stats[f"fd/{k}"] == pytest.approx(fd, rel=1e-4)
    assert math.isnan(component_stats(real, {k: v[:0] for k, v in real.items()})["kl/obs"])
