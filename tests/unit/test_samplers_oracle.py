"""Every sampler against an independent implementation fed the same model, the same sigmas and the same noise.

The model is the exact denoiser of Gaussian data ``x0 ~ N(MU, diag(S^2))``, a closed form, so diffrl and the oracle
run the same function. The EDM oracles are written here from the papers in float64, independently of
``diffrl.diffusion.samplers``: Karras et al. 2022 (arXiv:2206.00364) Algorithm 2 for Heun / Euler with churn, and
Lu et al. 2022 (arXiv:2211.01095) DPM-Solver++(2M) and its SDE variant. (k-diffusion's ``sampling`` module is the
usual reference, but importing it imports torchvision, whose wheels pin a torch build of their own; these oracles
were checked against k-diffusion 0.1.1.post1's ``sample_heun``, ``sample_euler``, ``sample_dpmpp_2m`` and
``sample_dpmpp_2m_sde`` with the same noise, to 1e-12 in float64.) The DDPM / DDIM chains are checked against
diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (dev extra).

Noise: diffrl draws ``x_T = sigma_max z_0`` and then one ``z`` per noise injection from the generator it is given,
in order. The oracles consume the same draws (regenerated from a generator with the same seed) at the points their
papers inject noise: a sampler that drew more, fewer or in another order would fail here, as would a wrong
coefficient.

Tolerance: diffrl samples in float32, the EDM oracles in float64; the final samples (entries of order 1) must agree
to 1e-5 (measured <= 3.1e-6 over every case below and seeds 0-4). The slips tried when this test was written differ
by >= 1e-2: S_noise 1.003 -> 1 (1.1e-2), S_churn 3 -> 3.3 (8.4e-2), Heun without its correction (1.3), DPM-Solver++
without the 2M extrapolation (0.56), SDE eta 1 -> 0.9 (0.17), the SDE noise stream shifted by one draw (1.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from diffrl.diffusion.models import DDPM, EDM

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)  # data std per dim
N, D = 64, 3
ATOL = 1e-5


def exact_denoiser(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for x0 ~ N(MU, S^2) (per dim): MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    mu, s2 = MU.to(x.dtype), (S ** 2).to(x.dtype)
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return mu + s2 / (s2 + sigma ** 2) * (x - mu)


def gaussian_edm() -> EDM:
    """An EDM model whose denoiser D(x; sigma) is the closed form (the network is not used)."""
    model = EDM(nn.Identity(), [D], sigma_min=0.002, sigma_max=80.0, rho=7.0)
    model.denoise = lambda x, sigma, cond=None, guidance=1.0: exact_denoiser(x, sigma)  # type: ignore[method-assign]
    return model


def karras_sigmas64(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. (5), then sigma_N = 0."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def draws(seed: int, count: int) -> Iterator[torch.Tensor]:
    """The standard-normal (N, D) draws diffrl takes from ``Generator().manual_seed(seed)``, as float64."""
    g = torch.Generator().manual_seed(seed)
    return iter([torch.randn(N, D, generator=g).double() for _ in range(count)])


# ------------------------------------------------------------------------------------------------ EDM oracles
def oracle_karras(denoise: Callable, sigmas: list[float], noise: Iterator[torch.Tensor], *, churn: float,
                  t_min: float, t_max: float, s_noise: float, second_order: bool) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 (its Euler version without the correction of lines 9-11)."""
    n = len(sigmas) - 1
    x = sigmas[0] * next(noise)                                      # line 1: x_0 ~ N(0, t_0^2 I)
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if t_min <= t <= t_max else 0.0  # line 3
        t_hat = t + gamma * t                                         # line 5
        x_hat = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * next(noise) if gamma > 0 else x  # lines 4, 6
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat                   # line 7
        x = x_hat + (t_next - t_hat) * d                              # line 8
        if second_order and t_next != 0:                              # lines 9-11
            d_prime = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    return x


def oracle_dpmpp_2m(denoise: Callable, sigmas: list[float], noise: Iterator[torch.Tensor], *,
                    eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) for alpha_t = 1, sigma_t = sigma, lambda = -log sigma; with
    ``eta > 0`` its SDE variant (SDE-DPM-Solver++(2M), eta = 1 in the paper; eta in (0, 1) interpolates the
    ODE and the SDE as k-diffusion does). The first step (no history) is first order, and so is the last step to
    sigma = 0, where the update is the data prediction itself."""
    x = sigmas[0] * next(noise)
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, s)
        if s_next == 0:
            x = x0
            continue
        h = math.log(s) - math.log(s_next)                            # lambda_{i+1} - lambda_i
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev        # the 2M linear extrapolation in lambda
        x = (s_next / s) * math.exp(-eta * h) * x + (1 - math.exp(-(1 + eta) * h)) * d
        if eta > 0:
            x = x + s_next * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise * next(noise)
        x0_prev, h_prev = x0, h
    return x


EDM_CASES = {
    # name: (diffrl sampler, its options, the oracle on (sigmas, noise))
    "heun_synther_churn": ("heun", dict(S_churn=80.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003),
                           lambda sig, z: oracle_karras(exact_denoiser, sig, z, churn=80.0, t_min=0.05, t_max=50.0,
                                                        s_noise=1.003, second_order=True)),
    "heun_ode": ("heun", dict(S_churn=0.0),
                 lambda sig, z: oracle_karras(exact_denoiser, sig, z, churn=0.0, t_min=0.05, t_max=50.0,
                                              s_noise=1.0, second_order=True)),
    "euler_ode": ("euler", {},
                  lambda sig, z: oracle_karras(exact_denoiser, sig, z, churn=0.0, t_min=0.05, t_max=50.0,
                                               s_noise=1.0, second_order=False)),
    # churn 3 over 16 steps: gamma = 3/16 < sqrt(2) - 1, so the S_churn / N branch of the min is the one used
    "euler_churn_uncapped": ("euler", dict(S_churn=3.0, S_tmin=0.1, S_tmax=10.0, S_noise=1.0),
                             lambda sig, z: oracle_karras(exact_denoiser, sig, z, churn=3.0, t_min=0.1, t_max=10.0,
                                                          s_noise=1.0, second_order=False)),
    "dpmpp_2m": ("dpmpp_2m", {}, lambda sig, z: oracle_dpmpp_2m(exact_denoiser, sig, z)),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, lambda sig, z: oracle_dpmpp_2m(exact_denoiser, sig, z, eta=1.0)),
    "dpmpp_2m_sde_eta_half": ("dpmpp_2m_sde", dict(eta=0.5, S_noise=1.01),
                              lambda sig, z: oracle_dpmpp_2m(exact_denoiser, sig, z, eta=0.5, s_noise=1.01)),
}


@pytest.mark.parametrize("case", list(EDM_CASES))
def test_edm_samplers_equal_the_papers_recursions_with_the_same_noise(case: str) -> None:
    sampler, options, oracle = EDM_CASES[case]
    steps, seed = 16, 3
    got = gaussian_edm().sample(N, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed),
                                **options)
    want = oracle(karras_sigmas64(steps), draws(seed, steps + 1))
    err = float((got.double() - want).abs().max())
    assert err < ATOL, f"{case}: max |diffrl - oracle| = {err:.2e}"


# --------------------------------------------------------------------------------------------- DDPM / DDIM
K = 50


def cosine_alphas_cumprod64(k: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021's alpha_bar_t for t = 0..K-1 (betas capped at max_beta), float64."""
    f = [math.cos((t / k + s) / (1 + s) * math.pi / 2) ** 2 for t in range(k + 1)]
    betas = torch.tensor([min(1 - f[t + 1] / f[t], max_beta) for t in range(k)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class GaussianEpsNet(nn.Module):
    """The exact noise prediction of N(MU, S^2) data under the VP forward process with ``abar``: with
    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) n``, ``E[x0 | x_t] = MU + S^2 sqrt(abar) / (abar S^2 + 1 - abar)
    (x_t - sqrt(abar) MU)``, and ``eps = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar)``."""

    def __init__(self, abar: torch.Tensor) -> None:
        super().__init__()
        self.abar = abar

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a = self.abar[t.long()].reshape(-1, 1).to(x_t.dtype)
        mu, s2 = MU.to(x_t.dtype), (S ** 2).to(x_t.dtype)
        x0 = mu + s2 * a.sqrt() / (a * s2 + 1 - a) * (x_t - a.sqrt() * mu)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def gaussian_ddpm(clip_x0: float | None = None) -> tuple[DDPM, GaussianEpsNet]:
    model = DDPM(nn.Identity(), [D], num_steps=K, schedule="cosine", prediction="epsilon", clip_x0=clip_x0)
    net = GaussianEpsNet(cosine_alphas_cumprod64(K))
    model.net = net
    return model, net


@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddpm_ancestral_chain_equals_diffusers_ddpm_scheduler_with_the_same_noise(clip_x0: float | None) -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    model, net = gaussian_ddpm(clip_x0)
    seed = 5
    got = model.sample(N, sampler="ddpm", generator=torch.Generator().manual_seed(seed))
    ref = diffusers.DDPMScheduler(num_train_timesteps=K, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                  variance_type="fixed_small", clip_sample=clip_x0 is not None,
                                  clip_sample_range=clip_x0 or 1.0)
    ref.set_timesteps(K)
    assert ref.timesteps.tolist() == list(range(K - 1, -1, -1))
    # diffrl draws x_T, then one z per step (t = K-1 .. 0); diffusers draws one per step with t > 0 from the
    # generator it is given: the same stream, since diffrl's last draw (t = 0, std 0) comes after all of them
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    for t in ref.timesteps:
        x = ref.step(net(x, torch.full((N,), int(t))), int(t), x, generator=g).prev_sample
    err = float((got - x).abs().max())
    # float32 on both sides, coefficients computed differently: measured <= 2.0e-5 (seeds 0-2); x_T and the step
    # noise one draw out of step: >= 0.14
    assert err < 1e-4, err
    if clip_x0 is not None:
        assert got[:, 2].mean() < 1.2  # the clamp binds: the data mean of dim 2 is 2.0


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_chain_equals_diffusers_ddim_scheduler_with_the_same_noise(eta: float) -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    model, net = gaussian_ddpm()
    steps, seed = 10, 7
    got = model.sample(N, sampler="ddim", steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed))
    ref = diffusers.DDIMScheduler(num_train_timesteps=K, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                  set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                                  prediction_type="epsilon")
    ref.set_timesteps(steps)
    # diffrl draws x_T, then one z per transition (used when eta > 0): hand diffusers the same z's
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(N, D, generator=g) for _ in range(steps + 1)]
    x = z[0]
    for i, t in enumerate(ref.timesteps):
        x = ref.step(net(x, torch.full((N,), int(t))), int(t), x, eta=eta, variance_noise=z[i + 1]).prev_sample
    err = float((got - x).abs().max())
    # float32 on both sides: measured <= 1.2e-6 (seeds 0-2); eta 10% off: >= 0.17
    assert err < 1e-5, err
