"""The variational bound on a DDPM's negative log-likelihood (Ho et al. 2020, arXiv:2006.11239, eq. 5).

    -log p(x_0) <= L_T + sum_{n=2..K} L_{n-1} + L_0
    L_T     = KL(q(x_K | x_0) || N(0, I))
    L_{n-1} = E_q KL(q(x_{n-1} | x_n, x_0) || p(x_{n-1} | x_n))
    L_0     = E_q [-log p(x_0 | x_1)]

Steps ``n = 1 .. K`` are the schedule's indices ``t = n - 1`` (``t = 0`` the least noisy). The reverse
transitions are the model's own (:meth:`DDPM.ddpm_step`: the posterior at the predicted, possibly clamped x0, with
the posterior variance), so the bound is on the density of the chain the model samples, with one change:

The decoder ``p(x_0 | x_1)``. The sampler's last step adds no noise (posterior variance 0 at ``t = 0``), so its
output has no density to bound; Ho et al.'s discretised decoder is for 8-bit images. We use a continuous Gaussian
decoder ``N(x_0; mu_1(x_1), beta_1 I)``: the last transition's mean (the predicted, clamped x0) with Ho et al.'s
other variance choice ``sigma_1^2 = beta_1``. For data of variance ``s^2`` the true ``Var[x_0 | x_1]`` is
``beta_1 s^2 / (s^2 + beta_1 (1 - s^2))``, i.e. ``beta_1`` once ``beta_1 << s^2`` (normalised data, any usual
schedule); the clipped posterior variance ``beta~_2`` (``posterior_log_variance_clipped``) is about half of it on a
linear schedule and, on a Gaussian with its exact denoiser, mostly gives the looser bound. With any decoder that
is a proper density (std > 0) and Gaussian transitions, eq. 5 is Jensen's inequality on
``log E_q[p(x_{0:K}) / q(x_{1:K} | x_0)]``: a valid upper bound on ``-log p(x_0)`` of that chain, the DDPM sampler
with noise ``sqrt(beta_1)`` at its last step. Even with a perfect denoiser the bound stays above the true NLL by
the cost of the fixed reverse variances (Nichol & Dhariwal 2021 learn them for this reason).

The expectations over ``x_n ~ q(x_n | x_0)`` are estimated with one draw per term (as in training), so a call
returns an unbiased estimate of the bound, not the bound itself; average calls (or repeat ``x0``) to shrink it.
The model's normaliser ``z = (x - shift) / scale`` adds ``sum log scale`` (its log-Jacobian) so the bound is on
the density of ``x`` in data units.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffrl.diffusion.models import DDPM

__all__ = ["ddpm_nll_bound", "gaussian_kl"]


def gaussian_kl(mean_q: torch.Tensor, var_q: torch.Tensor, mean_p: torch.Tensor, var_p: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(mean_q, var_q) || N(mean_p, var_p))`` (the caller sums over dims)."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def ddpm_nll_bound(model: DDPM, x0: torch.Tensor, cond: torch.Tensor | None = None, *, net: nn.Module | None = None,
                   generator: torch.Generator | None = None, num_t: int | None = None) -> torch.Tensor:
    """Variational upper bound on ``-log p(x0 | cond)`` in nats per sample, in data units (module docstring).

    Args:
        model: the DDPM (its schedule, normaliser, prediction type and ``clip_x0`` define the transitions).
        x0: ``(B, *event_shape)`` samples in data units (e.g. action chunks ``(B, Ta, Da)``).
        cond: ``(B, cond_dim)`` condition vectors, or None for an unconditional model.
        net: a denoiser in place of the model's own (a fine-tuned or LoRA-adapted copy), as in ``DDPM.network``.
        generator: for the noise draws ``x_n ~ q(x_n | x_0)`` (and the steps of ``num_t``).
        num_t: None sums all ``K`` step terms; an integer draws that many steps per sample uniformly (with
            replacement) and scales their sum by ``K / num_t`` (Ho et al.'s uniform-``t`` estimator): unbiased,
            ``num_t`` network calls per sample instead of ``K``. ``L_T`` is closed-form and always exact.
    Returns:
        ``(B,)`` nats. Differentiable in the network's parameters (and in ``x0``); use under
        ``torch.no_grad()`` when only the value is needed.
    """
    if not isinstance(model, DDPM):
        raise TypeError(f"ddpm_nll_bound needs a DDPM, got {type(model).__name__}")
    model._check_inputs(x0, cond)
    if num_t is not None and num_t < 1:
        raise ValueError(f"num_t must be a positive number of sampled steps or None (all steps), got {num_t}")
    sched, k_steps = model.schedule, model.num_steps
    n, device = x0.shape[0], x0.device
    z0 = model.normalizer(x0)  # (B, *event) normalised space, where the chain lives

    # L_T = KL(N(sqrt(abar_K) z0, 1 - abar_K) || N(0, 1)), per element, closed form
    abar_k = sched.alphas_cumprod[-1].double()
    prior_kl = 0.5 * (abar_k * (z0.double() ** 2 - 1) - torch.log1p(-abar_k))  # (B, *event)
    total = prior_kl.flatten(1).sum(1).float()  # (B,)

    # the step terms: every t = 0 .. K-1 for each sample (M = K), or num_t uniform draws (M = num_t)
    if num_t is None:
        t = torch.arange(k_steps, device=device).repeat(n)  # (B * M,)
        m, weight = k_steps, 1.0
    else:
        t = torch.randint(0, k_steps, (n * num_t,), device=device, generator=generator)
        m, weight = num_t, k_steps / num_t
    z0_rep = z0.repeat_interleave(m, dim=0)  # (B * M, *event)
    cond_rep = None if cond is None else cond.repeat_interleave(m, dim=0)
    noise = torch.randn(z0_rep.shape, device=device, generator=generator, dtype=z0_rep.dtype)
    z_t = model.q_sample(z0_rep, t, noise)  # x_{t+1} in Ho et al.'s numbering
    mean_p, std_p = model.ddpm_step(z_t, t, cond_rep, net=net)  # the model's own transition p(x_{t-1} | x_t)

    # t >= 1: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), the posterior at the true z0 vs the model's
    nd = z_t.ndim
    mean_q = sched.at("posterior_mean_coef1", t, nd) * z0_rep + sched.at("posterior_mean_coef2", t, nd) * z_t
    var_q = sched.at("posterior_variance", t, nd)
    is_last = (t == 0).reshape(-1, *([1] * (nd - 1)))
    safe = torch.where(is_last, torch.ones_like(var_q), var_q)  # t = 0's zero variance would give NaN gradients
    kl = gaussian_kl(mean_q, safe, mean_p, torch.where(is_last, torch.ones_like(var_q), std_p ** 2).expand_as(mean_p))
    # t = 0: the Gaussian decoder -log N(z0; mu_1(x_1), beta_1), mu_1 the predicted (clamped) x0 (docstring)
    var_0 = sched.betas[0]
    decoder_nll = 0.5 * ((z0_rep - mean_p) ** 2 / var_0 + torch.log(2 * math.pi * var_0))
    terms = torch.where(is_last, decoder_nll, kl).flatten(1).sum(1)  # (B * M,)
    total = total + weight * terms.view(n, m).sum(1)

    # change of variables: p_x(x) = p_z(z) / prod(scale)
    log_jacobian = torch.log(model.normalizer.scale).expand(model.event_shape).sum()
    return total + log_jacobian
