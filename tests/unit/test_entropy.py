"""Entropy estimators: k-NN recovers Gaussian, box and mixture entropies, is scale-equivariant, batched, finite on
duplicates and strict on bad input; its small-sample bias in 12 dims is pinned; the port's GMM-on-rows is not.

Measured bias of ``knn_entropy`` (k=1, mean of estimate - truth, nats) for Gaussians in D = 12 (Ta=4, Da=3), from
1000 / 500 / 100 / 40 repeated draws at M = 32 / 64 / 256 / 512 (standard error <= 0.02 each); ``sd`` is the spread
of ONE estimate at M = 32 (0.56 to 0.7):

    covariance                                   M=32    M=64   M=256   M=512
    isotropic                                   +0.63   +0.46   +0.29   +0.14
    rotated, stds 0.5..1.5 (condition 9)        +1.14   +0.92   +0.54   +0.49
    rotated, stds 0.1..1 (condition 100)        +2.92   +2.47   +1.80   +1.52
    chunk: AR(1) rho=0.9 over Ta, std 0.1 (57)  +3.32   +2.71   +1.73   +1.44
    same chunk, policy_entropy(whiten=True)     +0.65   +0.49   +0.24      -

The bias is positive, shrinks slowly with M and grows with the covariance's condition number (the estimator is not
affine-invariant); k=3 is worse at every M (e.g. +1.11 isotropic, +5.01 chunk at M=32). In D = 3 it is below 0.07
in size at every M. Whitening with the batch-pooled covariance brings a correlated chunk back to the isotropic bias.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.eval.entropy import MIN_DIST, gmm_rows_entropy, knn_entropy, policy_entropy

F64 = torch.float64
TA, DA = 4, 3


def gaussian_entropy(cov: torch.Tensor) -> float:
    d = cov.shape[0]
    return 0.5 * (d * (1 + math.log(2 * math.pi)) + torch.logdet(cov).item())


def gaussian_samples(cov: torch.Tensor, b: int, m: int, seed: int) -> torch.Tensor:
    """(B, M, D) draws from N(0, cov)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, cov.shape[0], generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T


def random_cov(d: int, condition: float, seed: int) -> torch.Tensor:
    """A rotated diagonal covariance whose stds run log-evenly from 1 / sqrt(condition) to 1."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    stds = torch.logspace(-0.5 * math.log10(condition), 0, d, dtype=F64)
    return q @ torch.diag(stds**2) @ q.T


def chunk_cov(rho: float = 0.9, std: float = 0.1) -> torch.Tensor:
    """(Ta * Da)^2 covariance of a chunk: AR(1) correlation over the Ta steps, independent action dims."""
    steps = torch.arange(TA, dtype=F64)
    over_time = rho ** (steps[:, None] - steps[None, :]).abs()
    return std**2 * torch.kron(over_time, torch.eye(DA, dtype=F64))


def gaussian_policy(cov: torch.Tensor, seed: int):
    """sample_fn of a policy whose chunk is N(mean(obs), cov), flattened row-major as (Ta, Da)."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)

    def sample_fn(obs: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(obs.shape[0], TA * DA, generator=g, dtype=F64) @ chol.T
        return (obs.flatten(1).mean(1, keepdim=True) + noise).reshape(-1, TA, DA)

    return sample_fn


# D = 3, full covariance (condition 10), M = 1024: |bias| < 0.07 and one estimate's sd ~0.06, so the mean of 8 is
# within 0.07 + 4 * 0.02 of the truth. D = 12 isotropic (scale 0.3), M = 512: bias +0.14..+0.19 (two measurements),
# sd 0.13, mean of 16 within 0.19 + 3 * 0.033 < 0.3. A wrong constant (psi, V_D, D/M) or squared distances move
# the estimate by whole nats.
@pytest.mark.parametrize(("d", "cov_scale", "m", "b", "tol"), [(3, None, 1024, 8, 0.15), (12, 0.3, 512, 16, 0.3)])
def test_knn_recovers_gaussian_entropy(d: int, cov_scale: float | None, m: int, b: int, tol: float) -> None:
    cov = random_cov(d, condition=10, seed=0) if cov_scale is None else cov_scale**2 * torch.eye(d, dtype=F64)
    h = knn_entropy(gaussian_samples(cov, b, m, seed=1))
    assert h.shape == (b,)
    assert abs(h.mean().item() - gaussian_entropy(cov)) < tol


def test_knn_bias_at_32_samples_in_12_dims_is_positive_and_grows_with_correlation() -> None:
    # the module docstring's table: +0.63 isotropic, +3.32 for a time-correlated chunk, +0.65 whitened (se 0.03 for
    # 400 states); the bands are 5 se wide on each side
    iso = torch.eye(TA * DA, dtype=F64)
    bias_iso = knn_entropy(gaussian_samples(iso, 400, 32, seed=2)).mean().item() - gaussian_entropy(iso)
    assert 0.45 < bias_iso < 0.85
    cov = chunk_cov()
    obs = torch.zeros(400, 1, 2, dtype=F64)
    bias_chunk = policy_entropy(gaussian_policy(cov, seed=3), obs, 32).mean().item() - gaussian_entropy(cov)
    assert 2.9 < bias_chunk < 3.8
    whitened = policy_entropy(gaussian_policy(cov, seed=3), obs, 32, whiten=True)
    assert 0.45 < whitened.mean().item() - gaussian_entropy(cov) < 0.85


def test_knn_recovers_uniform_box_entropy() -> None:
    # H = sum log widths = 0 here; the box's faces bias k-NN upwards, +0.11 measured at M = 512 (sd 0.06)
    widths = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    x = torch.rand(16, 512, 3, generator=torch.Generator().manual_seed(4), dtype=F64) * widths
    assert abs(knn_entropy(x).mean().item() - widths.log().sum().item()) < 0.2


def test_knn_sees_both_modes_of_a_separated_mixture() -> None:
    # two equal-weight components 100 stds apart: H = log 2 + H(component); measured bias -0.04 (sd 0.08) at M = 512,
    # so 0.15 separates it from H(component) alone (log 2 = 0.69 lower)
    g = torch.Generator().manual_seed(5)
    mode = (torch.rand(16, 512, 1, generator=g) < 0.5).to(F64)
    x = 0.5 * torch.randn(16, 512, 3, generator=g, dtype=F64) + 50.0 * mode
    component = gaussian_entropy(0.25 * torch.eye(3, dtype=F64))
    assert abs(knn_entropy(x).mean().item() - (math.log(2) + component)) < 0.15


@pytest.mark.parametrize("c", [1e-3, 0.37, 5.0, 1e4])
def test_knn_is_exactly_scale_equivariant_and_rotation_invariant(c: float) -> None:
    x = gaussian_samples(torch.eye(5, dtype=F64), 3, 64, seed=6)
    h = knn_entropy(x, k=2)
    torch.testing.assert_close(knn_entropy(c * x, k=2), h + 5 * math.log(c), rtol=0, atol=1e-10)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(7), dtype=F64))
    torch.testing.assert_close(knn_entropy(c * x @ q.T, k=2), h + 5 * math.log(c), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_batched_call_equals_per_distribution_calls(k: int) -> None:
    x = gaussian_samples(torch.eye(4, dtype=F64), 5, 40, seed=8) * torch.arange(1, 6, dtype=F64)[:, None, None]
    batched = knn_entropy(x, k=k)
    single = torch.stack([knn_entropy(x[i], k=k) for i in range(5)])
    assert single.shape == (5,) and knn_entropy(x[0], k=k).dim() == 0
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)
    assert (batched.diff() > 0).all()  # wider distributions get larger entropies


def test_knn_is_float32_close_to_float64_and_differentiable() -> None:
    x = gaussian_samples(torch.eye(12, dtype=F64), 4, 64, seed=9)
    x32 = x.float().requires_grad_()
    h32 = knn_entropy(x32)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), knn_entropy(x), rtol=0, atol=1e-4)
    h32.sum().backward()
    assert torch.isfinite(x32.grad).all() and x32.grad.abs().sum() > 0


def test_knn_duplicate_points_give_a_finite_floored_estimate() -> None:
    x = gaussian_samples(torch.eye(3, dtype=F64), 2, 32, seed=10)
    x[:, 1] = x[:, 0]  # one duplicated pair per distribution
    for dtype in (F64, torch.float32):
        assert torch.isfinite(knn_entropy(x.to(dtype))).all()
    # a fully collapsed distribution: every distance is floored, so H = psi(M) - psi(1) + log V_3 + 3 log(MIN_DIST)
    collapsed = knn_entropy(torch.ones(32, 3, dtype=F64))
    digamma = torch.special.digamma(torch.tensor([32.0, 1.0], dtype=F64))
    floored = (digamma[0] - digamma[1]).item() + math.log(4 / 3 * math.pi) + 3 * math.log(MIN_DIST)
    assert abs(collapsed.item() - floored) < 1e-9
    assert collapsed < knn_entropy(x[0]) - 50


@pytest.mark.parametrize(("samples", "k", "match"), [
    (torch.zeros(8), 1, "shape"),
    (torch.zeros(2, 3, 8, 4), 1, "shape"),
    (torch.zeros(8, 3, dtype=torch.int64), 1, "float tensor"),
    ([[0.0, 1.0], [1.0, 0.0]], 1, "float tensor"),
    (torch.randn(3, 2), 3, "more samples than k"),
    (torch.randn(1, 2), 1, "more samples than k"),
    (torch.randn(8, 2), 0, "k >= 1"),
    (torch.randn(8, 2), 1.5, "k >= 1"),
    (torch.randn(8, 0), 1, "D >= 1"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), 1, "NaN or inf"),
    (torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [1.0, 1.0]]), 1, "NaN or inf"),
])
def test_knn_rejects_bad_input_with_value_error(samples, k, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        knn_entropy(samples, k=k)


def test_policy_entropy_and_gmm_reject_bad_input() -> None:
    obs = torch.zeros(3, 1, 2, dtype=F64)
    with pytest.raises(ValueError, match="one chunk per input row"):
        policy_entropy(lambda o: torch.zeros(o.shape[0] + 1, TA, DA), obs, 8)
    with pytest.raises(ValueError, match="more samples than k"):
        policy_entropy(gaussian_policy(torch.eye(TA * DA, dtype=F64), seed=0), obs, 1)
    with pytest.raises(ValueError, match="components <= Ta"):
        gmm_rows_entropy(torch.randn(2, 2, DA))
    with pytest.raises(ValueError, match=r"\(B, Ta, Da\)"):
        gmm_rows_entropy(torch.randn(TA, DA))
    with pytest.raises(ValueError, match="NaN or inf"):
        gmm_rows_entropy(torch.full((2, TA, DA), float("nan")))


def test_policy_entropy_recovers_chunk_entropy_per_state() -> None:
    # states 0 and 1 differ in spread by x10, so by Ta*Da*log(10) = 27.6 nats; each is a 12-dim Gaussian with
    # isotropic std 0.1 (bias +0.14..+0.19 at M = 512, sd 0.13): tol 0.5 = bias + 2.5 sd of one estimate
    cov = 0.01 * torch.eye(TA * DA, dtype=F64)
    g = torch.Generator().manual_seed(11)
    spread = torch.tensor([1.0, 10.0], dtype=F64)

    def sample_fn(obs: torch.Tensor) -> torch.Tensor:  # obs (2 * N, 1, 1) holds each row's state's spread
        return (obs.reshape(-1, 1) * 0.1 * torch.randn(obs.shape[0], TA * DA, generator=g, dtype=F64)).reshape(
            -1, TA, DA)

    h = policy_entropy(sample_fn, spread.reshape(2, 1, 1), num_samples=512)
    truth = gaussian_entropy(cov) + TA * DA * spread.log()
    assert h.shape == (2,)
    assert (h - truth).abs().max() < 0.5  # a state-mixing bug would put both near the wider state's entropy


def test_policy_entropy_whitened_recovers_a_time_correlated_chunk() -> None:
    # whitened bias +0.24 at M = 256 (sd 0.19); unwhitened it would be +1.73
    cov = chunk_cov()
    obs = torch.randn(8, 1, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    h = policy_entropy(gaussian_policy(cov, seed=13), obs, num_samples=256, whiten=True)
    assert abs(h.mean().item() - gaussian_entropy(cov)) < 0.45


def test_gmm_em_fits_a_well_posed_mixture() -> None:
    # with enough rows, the EM is a real GMM fit: sum_k w_k H_k of the fitted mixture matches the generating one
    g = torch.Generator().manual_seed(14)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    stds = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    label = torch.multinomial(weights, 3000, replacement=True, generator=g)
    rows = means[label] + stds[label, None] * torch.randn(3000, 2, generator=g, dtype=F64)  # shuffled, not by mode
    truth = (weights * (1 + math.log(2 * math.pi) + 2 * stds.log())).sum().item()
    assert abs(gmm_rows_entropy(rows[None]).item() - truth) < 0.05


def test_gmm_rows_entropy_is_finite_but_does_not_measure_the_policy() -> None:
    cov = chunk_cov()
    truth = gaussian_entropy(cov)
    obs = torch.zeros(64, 1, 2, dtype=F64)
    narrow = gaussian_policy(cov, seed=15)(obs)  # (64, Ta, Da), one chunk per state as the port draws
    wide = gaussian_policy(100 * cov, seed=15)(obs)  # the same draws x10: true entropy + 27.6 nats
    h_narrow, h_wide = gmm_rows_entropy(narrow), gmm_rows_entropy(wide)
    assert torch.isfinite(h_narrow).all() and torch.isfinite(h_wide).all()
    # 4 rows, 3 components: two components sit on one row each with covariance reg_covar * I (entropy
    # Da/2 * log(2 pi e * 1e-6) = -16.5), so a x10 wider policy barely moves the value, and it cannot be right for
    # both policies (here it is -14.7 on average for the narrow one, truth -18.1; the wide one's truth is +9.5)
    true_change = TA * DA * math.log(10)
    assert (h_wide - h_narrow).mean() < 0.2 * true_change
    assert (h_wide - (truth + true_change)).abs().min() > 15
    knn_change = (policy_entropy(gaussian_policy(100 * cov, seed=16), obs[:8], 64)
                  - policy_entropy(gaussian_policy(cov, seed=16), obs[:8], 64)).mean()
    assert abs(knn_change - true_change) < 1e-6  # same draws scaled x10: k-NN tracks it exactly
