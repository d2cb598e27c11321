"""Fidelity of generated episodes: per-component Gaussian KL and Frechet distance to the real episodes.

ITER-Diffusion judges its episode model by fitting a Gaussian to each component of the real and of the generated
episodes and logging their KL divergence and Frechet distance; :func:`component_stats` computes both for two
episode dicts (keys as in :mod:`diffrl.data.episodes`). Generated transitions are judged by
:mod:`diffrl.eval.fidelity`.

Shapes: ``N`` episodes, ``T`` steps, ``k`` dims of a fitted Gaussian.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

COMPONENTS = ("obs", "act", "ag", "g")
"""the components of an episode dict compared, in the order their figures are reported"""


def gaussian_kl(mu_p: np.ndarray, cov_p: np.ndarray, mu_q: np.ndarray, cov_q: np.ndarray) -> float:
    """``KL(N(mu_p, cov_p) || N(mu_q, cov_q)) = 0.5 [tr(Sq^-1 Sp) + d^T Sq^-1 d - k + ln det Sq - ln det Sp]``."""
    mu_p, mu_q = np.atleast_1d(np.asarray(mu_p, np.float64)), np.atleast_1d(np.asarray(mu_q, np.float64))
    cov_p, cov_q = np.atleast_2d(np.asarray(cov_p, np.float64)), np.atleast_2d(np.asarray(cov_q, np.float64))
    d = mu_q - mu_p
    trace = np.trace(np.linalg.solve(cov_q, cov_p))
    quad = d @ np.linalg.solve(cov_q, d)
    logdet_p, logdet_q = np.linalg.slogdet(cov_p)[1], np.linalg.slogdet(cov_q)[1]
    return max(0.5 * float(trace + quad - len(mu_p) + logdet_q - logdet_p), 0.0)


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (as in FID), with ``tr (S1 S2)^{1/2}`` computed as
    ``tr (S1^{1/2} S2 S1^{1/2})^{1/2}`` from two symmetric eigen-decompositions (no complex ``sqrtm``)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    r = _sqrt_psd(cov1)
    m = r @ cov2 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    d = mu1 - mu2
    return max(float(d @ d + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt), 0.0)


def _fit_gaussian(x: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    cov = np.atleast_2d(np.cov(x, rowvar=False, bias=True))
    return x.mean(0), cov + ridge * np.eye(x.shape[1])


def component_stats(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray], *,
                    ridge: float = 1e-6) -> dict[str, float]:
    """Gaussian-fit KL ``KL(N_real || N_synth)`` and Frechet distance per component (obs, act, ag, g).

    Each component's rows of all episodes are pooled and fitted by a Gaussian (covariances get ``ridge * I``, so
    constant dims, such as a desired goal shared by every episode, stay invertible). ITER-Diffusion logs the same
    figures as ``ddpm/kl_*`` and ``ddpm/fid_*``. Keys ``kl/<component>``, ``fd/<component>``; NaN when either
    side has fewer than two rows.
    """
    out: dict[str, float] = {}
    for key in COMPONENTS:
        a, b = np.asarray(real[key]), np.asarray(synthetic[key])
        rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        if len(rows_a) < 2 or len(rows_b) < 2:
            out[f"kl/{key}"] = out[f"fd/{key}"] = float("nan")
            continue
        (mu_r, cov_r), (mu_s, cov_s) = _fit_gaussian(rows_a, ridge), _fit_gaussian(rows_b, ridge)
        out[f"kl/{key}"] = gaussian_kl(mu_r, cov_r, mu_s, cov_s)
        out[f"fd/{key}"] = frechet_distance(mu_r, cov_r, mu_s, cov_s)
    return out
