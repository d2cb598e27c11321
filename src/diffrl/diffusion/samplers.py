"""Samplers. They work in the model's normalised space and return normalised samples (``model.sample`` wraps
them and un-normalises).

EDM (on ``EDM.denoise``, Karras sigmas):
- ``heun``: Karras et al.'s Algorithm 2, second-order Heun with "churn" noise injection (``S_churn``,
  ``S_tmin``, ``S_tmax``, ``S_noise``). SynthER's sampler: 128 steps, churn 80 (so gamma = sqrt(2) - 1 in
  [0.05, 50]), 255 network evaluations. ``S_churn=0`` is the deterministic Heun ODE solver (2N - 1 evaluations).
- ``euler``: the first-order version of the same (N evaluations), churn optional.
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), a multistep second-order ODE solver: N evaluations.
- ``dpmpp_2m_sde``: its stochastic version (noise re-injected every step, ``eta``): N evaluations.

DDPM (on ``DDPM.ddpm_step`` / ``DDPM.ddim_step``):
- ``ddpm``: ancestral sampling over all K steps.
- ``ddim``: DDIM over a "leading" sub-sequence of ``steps`` steps with ``eta`` (0: deterministic).

``sample_chain`` runs a DDPM or DDIM chain and keeps every step's input, Gaussian mean and std, so a policy
gradient method (DPPO) can re-evaluate each transition's log-probability with ``chain_log_prob``;
``sample_chain_grad`` runs the same chain with autograd on, for losses differentiated through the sampling
(Diffusion-QL).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from diffrl.diffusion.gaussian import gaussian_log_prob
from diffrl.diffusion.inpaint import Inpaint
from diffrl.diffusion.schedules import ddim_timesteps, karras_sigmas
from diffrl.runs.progress import Progress

if TYPE_CHECKING:  # annotations only: models import this module to dispatch ``sample``
    from diffrl.diffusion.models import DDPM, EDM, DiffusionModel


def _impose(x: torch.Tensor, inpaint: Inpaint | None, noised: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Replace the fixed entries by their values brought to the current noise level (``noised(values)``), or by the
    values themselves for a model trained with them held clean (``inpaint.clean``)."""
    if inpaint is None:
        return x
    return torch.where(inpaint.mask, inpaint.values if inpaint.clean else noised(inpaint.values), x)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, device=device)


# --------------------------------------------------------------------------------------------------------- EDM
def _edm_setup(model: EDM, shape: Sequence[int], steps: int, inpaint: Inpaint | None,
               generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = karras_sigmas(steps, model.sigma_min, model.sigma_max, model.rho).to(device=device, dtype=torch.float32)
    x = sigmas[0] * _randn(shape, generator, device)
    x = _impose(x, inpaint, lambda v: v + sigmas[0] * _randn(shape, generator, device))
    return sigmas, x


def edm_heun(model: EDM, shape: Sequence[int], cond: torch.Tensor | None = None, *, steps: int = 128,
             S_churn: float = 80.0, S_tmin: float = 0.05, S_tmax: float = 50.0, S_noise: float = 1.003,  # noqa: N803
             second_order: bool = True, inpaint: Inpaint | None = None, guidance: float = 1.0,
             generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Karras et al. (2022) Algorithm 2 (``second_order=False``: its Euler version)."""
    device = device or torch.device("cpu")
    sigmas, x = _edm_setup(model, shape, steps, inpaint, generator, device)
    gamma_max = min(S_churn / steps, math.sqrt(2) - 1)
    clean = inpaint is not None and inpaint.clean
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = gamma_max if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * S_noise * _randn(shape, generator, device)
            if clean:  # the churn noise leaves clean conditions alone
                x = _impose(x, inpaint, lambda v: v)
        d = (x - model.denoise(x, sigma_hat, cond, guidance)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if second_order and sigma_next > 0:
            if clean:  # the second evaluation sees them clean too, as in training
                x_next = _impose(x_next, inpaint, lambda v: v)
            d_next = (x_next - model.denoise(x_next, sigma_next, cond, guidance)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = _impose(x_next, inpaint, lambda v, s=sigma_next: v + s * _randn(shape, generator, device))
    return x


def edm_euler(model: EDM, shape: Sequence[int], cond: torch.Tensor | None = None, *, steps: int = 64,
              S_churn: float = 0.0, **options: Any) -> torch.Tensor:  # noqa: N803
    return edm_heun(model, shape, cond, steps=steps, S_churn=S_churn, second_order=False, **options)


def dpmpp_2m(model: EDM, shape: Sequence[int], cond: torch.Tensor | None = None, *, steps: int = 32,
             **options: Any) -> torch.Tensor:
    """DPM-Solver++(2M) on the Karras sigmas, data prediction, in ``lambda = -log sigma`` (Lu et al. 2022).

    The first step (no history) and the last (to sigma = 0) are first order; the others extrapolate the
    denoised estimate linearly in lambda from the previous one. It is ``dpmpp_2m_sde`` without noise.
    """
    return dpmpp_2m_sde(model, shape, cond, steps=steps, eta=0.0, **options)


def dpmpp_2m_sde(model: EDM, shape: Sequence[int], cond: torch.Tensor | None = None, *, steps: int = 32,
                 eta: float = 1.0, S_noise: float = 1.0, inpaint: Inpaint | None = None,  # noqa: N803
                 guidance: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Stochastic DPM-Solver++(2M) (Lu et al. 2022, SDE variant; midpoint second-order correction).

    With ``h = lambda_{i+1} - lambda_i`` (``lambda = -log sigma``) and ``eta`` scaling the injected noise:
    ``x <- (s_{i+1} / s_i) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D_i [+ 0.5 (1 - e^{-(1 + eta) h}) (D_i - D_{i-1}) / r]
    + s_{i+1} sqrt(1 - e^{-2 eta h}) z``. ``eta = 0`` is the deterministic solver. N evaluations.
    """
    device = device or torch.device("cpu")
    sigmas, x = _edm_setup(model, shape, steps, inpaint, generator, device)
    old_denoised, h_last = None, None
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoise(x, sigma, cond, guidance)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            coef = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + coef * denoised
            if old_denoised is not None and h_last is not None:
                x = x + 0.5 * coef * (h / h_last) * (denoised - old_denoised)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * S_noise * _randn(shape, generator, device)
            h_last = h
        old_denoised = denoised
        x = _impose(x, inpaint, lambda v, s=sigma_next: v + s * _randn(shape, generator, device))
    return x


# -------------------------------------------------------------------------------------------------------- DDPM
@dataclasses.dataclass
class Chain:
    """A recorded DDPM/DDIM chain of ``S`` transitions for ``n`` samples.

    ``xs[i]`` is the input of transition ``i`` (``xs[0]`` the initial noise, ``xs[S]`` the final sample);
    transition ``i`` goes from step ``timesteps[i]`` to ``prev_timesteps[i]`` (``-1``: clean) with Gaussian
    ``N(means[i], stds[i]^2)`` (stds after any floor used for sampling). All normalised space.
    """

    xs: torch.Tensor          # (S + 1, n, *event)
    means: torch.Tensor       # (S, n, *event)
    stds: torch.Tensor        # (S, n or 1, *1)
    timesteps: torch.Tensor   # (S,)
    prev_timesteps: torch.Tensor  # (S,)
    eta: float                # DDIM eta (1.0 for ancestral DDPM transitions)
    ddim: bool


def _step(model: DDPM, x: torch.Tensor, t: int, t_prev: int, ddim: bool, eta: float, cond: torch.Tensor | None,
          guidance: float, net: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    if ddim:
        tp = torch.full_like(tt, t_prev)
        return model.ddim_step(x, tt, tp, eta, cond, guidance, net)
    return model.ddpm_step(x, tt, cond, guidance, net)


def sample_chain(model: DDPM, shape: Sequence[int], cond: torch.Tensor | None = None, *, ddim: bool = False,
                 steps: int | None = None, eta: float = 1.0, min_std: float = 0.0, noise_clip: float | None = None,
                 deterministic: bool = False, inpaint: Inpaint | None = None, guidance: float = 1.0,
                 generator: torch.Generator | None = None, device: torch.device | None = None,
                 record: bool = True, noiseless_last: bool = False,
                 net_for_step: Callable[[int], nn.Module | None] | None = None) -> Chain | torch.Tensor:
    """Run a DDPM (all K steps) or DDIM (``steps`` steps, ``eta``) chain from pure noise.

    - ``min_std`` floors each transition's std when sampling (DPPO: 0.1 in training rollouts); transitions with
      std 0 (DDPM's last step, DDIM with eta 0) then also get noise.
    - ``noise_clip`` clamps the standard-normal noise (DPPO: 3).
    - ``deterministic``: no noise at all (the mean path; exact for DDIM with eta 0, but for ancestral DDPM it
      collapses every sample towards a conditional mean and feeds the network inputs off its training noise
      levels).
    - ``noiseless_last``: the last transition takes its mean (DPPO's DDPM evaluation: noise except at t = 0).
    - ``net_for_step(i)`` may return another network for transition ``i`` (DPPO's fine-tuned copy).
    Returns the recorded ``Chain`` (``record=True``) or just the final sample. It runs in the caller's grad mode
    (``model.sample`` and DPPO's ``sample`` call it under ``torch.no_grad``; ``sample_chain_grad`` turns grad on).
    """
    device = device or torch.device("cpu")
    if ddim:
        ts = ddim_timesteps(model.num_steps, steps or model.num_steps).tolist()
    else:
        if steps not in (None, model.num_steps):
            raise ValueError(f"ancestral DDPM runs all {model.num_steps} steps; use the ddim sampler for {steps}")
        ts = list(range(model.num_steps - 1, -1, -1))
    prev = ts[1:] + [-1]
    x = _randn(shape, generator, device)
    x = _impose(x, inpaint, lambda v: model.schedule.abar(ts[0], 1).sqrt() * v
                + (1 - model.schedule.abar(ts[0], 1)).sqrt() * _randn(shape, generator, device))
    xs, means, stds = [x], [], []
    for i, (t, t_prev) in enumerate(zip(ts, prev, strict=True)):
        net = net_for_step(i) if net_for_step is not None else None
        mean, std = _step(model, x, t, t_prev, ddim, eta if ddim else 1.0, cond, guidance, net)
        std = std.expand(x.shape[0], *std.shape[1:]).clamp(min=min_std) if min_std > 0 else std
        if deterministic or (noiseless_last and i == len(ts) - 1):
            x = mean
        else:
            z = _randn(shape, generator, device)
            if noise_clip is not None:
                z = z.clamp(-noise_clip, noise_clip)
            x = mean + std * z
        abar_prev = model.schedule.abar(t_prev, 1)
        x = _impose(x, inpaint, lambda v, a=abar_prev: a.sqrt() * v + (1 - a).sqrt() * _randn(shape, generator, device))
        if record:
            xs.append(x)
            means.append(mean)
            stds.append(std.expand(x.shape[0], *std.shape[1:]))
    if not record:
        return x
    return Chain(torch.stack(xs), torch.stack(means), torch.stack(stds), torch.tensor(ts), torch.tensor(prev),
                 eta if ddim else 1.0, ddim)


def sample_chain_grad(model: DDPM, shape: Sequence[int], cond: torch.Tensor | None = None,
                      **options: Any) -> torch.Tensor:
    """The final sample of ``sample_chain(model, shape, cond, **options)`` with gradients through every transition.

    Diffusion-QL's actor loss ``-Q(s, a)`` with ``a`` drawn from the policy (Wang et al. 2023, arXiv:2208.06193)
    back-propagates through all denoising steps. The same loop and draws as ``sample_chain``: with the same
    generator and options (``min_std``, ``noise_clip``, ``ddim``, ``eta``, ...) the sample is bit-identical to the
    no-grad chain's. Grad mode is on even inside ``torch.no_grad``. Memory: autograd keeps every transition's
    network activations, ``S`` (K for DDPM, ``steps`` for DDIM) forward passes on the batch, until ``backward``.
    Returns the ``(n, *event)`` sample in normalised space.
    """
    with torch.enable_grad():
        return sample_chain(model, shape, cond, record=False, **options)


def chain_log_prob(model: DDPM, chain: Chain, cond: torch.Tensor | None = None, *, min_std: float = 0.0,
                   indices: Sequence[int] | None = None, net_for_step: Callable[[int], nn.Module | None] | None = None,
                   guidance: float = 1.0) -> torch.Tensor:
    """Element-wise log-probability of each recorded transition under the model's CURRENT network.

    Returns ``(len(indices), n, *event)`` with stds floored at ``min_std`` (a density needs std > 0). With the
    network unchanged since sampling this equals ``gaussian_log_prob(xs[i+1], means[i], stds[i])``.
    """
    out = []
    for i in (range(len(chain.timesteps)) if indices is None else indices):
        t, t_prev = int(chain.timesteps[i]), int(chain.prev_timesteps[i])
        net = net_for_step(i) if net_for_step is not None else None
        mean, std = _step(model, chain.xs[i], t, t_prev, chain.ddim, chain.eta, cond, guidance, net)
        std = std.expand_as(mean).clamp(min=min_std) if min_std > 0 else std.expand_as(mean)
        out.append(gaussian_log_prob(chain.xs[i + 1], mean, std))
    return torch.stack(out)


def ddpm(model: DDPM, shape: Sequence[int], cond: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    return sample_chain(model, shape, cond, ddim=False, record=False, **options)


def ddim(model: DDPM, shape: Sequence[int], cond: torch.Tensor | None = None, *, eta: float = 0.0,
         **options: Any) -> torch.Tensor:
    return sample_chain(model, shape, cond, ddim=True, eta=eta, record=False, **options)


SAMPLERS: dict[str, Callable[..., Any]] = {"heun": edm_heun, "euler": edm_euler, "dpmpp_2m": dpmpp_2m,
                                           "dpmpp_2m_sde": dpmpp_2m_sde, "ddpm": ddpm, "ddim": ddim}
DEFAULT_STEPS = {"heun": 128, "euler": 64, "dpmpp_2m": 32, "dpmpp_2m_sde": 32, "ddpm": None, "ddim": 10}


def generate(model: DiffusionModel, num: int, *, batch_size: int = 100_000, seed: int = 0, progress: bool = False,
             **options: Any) -> tuple[np.ndarray, float]:
    """``num`` samples (data units, NumPy) drawn ``batch_size`` at a time from one generator seeded with ``seed``;
    returns ``(samples, samples per second)``. ``options`` go to ``model.sample``."""
    gen = torch.Generator(device=model.normalizer.shift.device).manual_seed(seed)
    out, t0 = [], time.perf_counter()
    bar = Progress(num, desc="sampling", unit="sample", enabled=progress)
    done = 0
    while done < num:
        n = min(batch_size, num - done)
        out.append(model.sample(n, generator=gen, **options).cpu().numpy())
        done += n
        bar.update(n)
    bar.close()
    return np.concatenate(out), num / max(time.perf_counter() - t0, 1e-9)


def network_evaluations(sampler: str, steps: int | None, num_train_steps: int | None = None) -> int:
    """Network evaluations per sample (guidance aside): Heun ``2N - 1``, the others one per step."""
    steps = steps or DEFAULT_STEPS.get(sampler) or num_train_steps or 0
    return 2 * steps - 1 if sampler == "heun" else steps


def run(model: DiffusionModel, sampler: str, shape: Sequence[int], cond: torch.Tensor | None, *,
        steps: int | None = None, **options: Any) -> torch.Tensor:
    """Dispatch ``model.sample`` to a sampler (``steps=None``: the sampler's default)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps is not None:
        options["steps"] = steps
    elif DEFAULT_STEPS[sampler] is not None:
        options["steps"] = DEFAULT_STEPS[sampler]
    return SAMPLERS[sampler](model, shape, cond, **options)
