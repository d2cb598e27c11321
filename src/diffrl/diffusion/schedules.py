"""Noise schedules: variance-preserving DDPM betas and their derived coefficients, and Karras (EDM) sigmas.

Everything is computed in float64 and stored in float32, so the coefficients of a 1000-step schedule do not
accumulate float32 rounding in the cumulative product.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "cosine", "vp")


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Ho et al. (2020): betas evenly spaced from ``beta_start`` to ``beta_end`` (float64, ``(K,)``), given for
    K = 1000 and scaled by ``1000 / K`` (Nichol & Dhariwal's improved-diffusion), so alpha_bar_K ~ 4e-5 for any
    K. Unscaled, 1e-4..2e-2 over 50 steps ends at alpha_bar ~ 0.6 while sampling starts from N(0, I) (ITER's
    DDPM)."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ``alpha_bar(t) = cos^2(((t / K) + s) / (1 + s) * pi / 2)``, betas capped.

    ``beta_k = 1 - alpha_bar((k + 1) / K) / alpha_bar(k / K)``, clipped to ``max_beta`` so the last step does not
    divide by ~0 (DPPO and Diffuser use the same schedule with the same cap).
    """
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0.0, max_beta)


def vp_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    """The continuous VP SDE's ``beta(s) = beta_min + s (beta_max - beta_min)``, ``s`` in [0, 1], integrated over
    ``K`` equal steps (Song et al. 2021; Wang et al. 2023's ``vp_beta_schedule``, their default with K = 5):
    ``beta_k = 1 - exp(-beta_min / K - (beta_max - beta_min) (2k - 1) / (2 K^2))`` for ``k = 1 .. K``, float64
    ``(K,)``. Made for few steps: K = 5 already ends at alpha_bar ~ 6e-3."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return -torch.expm1(-beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * k - 1) / num_steps ** 2)


def make_betas(kind: str, num_steps: int, **kwargs: float) -> torch.Tensor:
    if kind == "linear":
        return linear_betas(num_steps, **kwargs)
    if kind == "cosine":
        return cosine_betas(num_steps, **kwargs)
    if kind == "vp":
        return vp_betas(num_steps, **kwargs)
    raise ValueError(f"unknown beta schedule {kind!r}: choose one of {', '.join(BETA_SCHEDULES)}")


class VPSchedule(torch.nn.Module):
    """The quantities of a discrete variance-preserving diffusion ``q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t)``.

    Index ``t`` runs over ``0 .. K-1``; ``t = 0`` is the least noisy step (its posterior ends at the data).
    Registered as buffers, so the schedule follows the model across devices and into checkpoints.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not torch.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
            "posterior_variance": post_var,
            # log of the posterior variance with t = 0's zero replaced by t = 1's value (DDPM's convention)
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    def at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``buffer[t]`` shaped ``(B, 1, ..., 1)`` to broadcast against a batch with ``ndim`` dims."""
        values = getattr(self, name)[t]
        return values.reshape(-1, *([1] * (ndim - 1)))

    def abar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``alpha_bar_t``, with ``t = -1`` meaning the clean data (``alpha_bar = 1``)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        values = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones_like(self.alphas_cumprod[0]))
        return values.reshape(-1, *([1] * (ndim - 1)))


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's discretisation: ``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min``, then a final 0.

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` (Karras et al.
    2022, eq. 5); float64, shape ``(N + 1,)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64)
    inv = 1.0 / rho
    frac = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** inv + frac * (sigma_min ** inv - sigma_max ** inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ddim_timesteps(num_train_steps: int, num_steps: int) -> torch.Tensor:
    """DDIM's "leading" sub-sequence, noisiest first: ``[(S-1) r, ..., r, 0]`` with ``r = K // S``.

    The spacing of DDIM's paper, DPPO (``step_ratio = K // ddim_steps``) and diffusers' default ``leading``.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_steps}], got {num_steps}")
    ratio = num_train_steps // num_steps
    return (torch.arange(num_steps - 1, -1, -1) * ratio).long()
