"""Diffusion models: EDM (Karras et al. 2022) and variance-preserving DDPM (Ho et al. 2020), one interface.

``model.loss(x, cond=None, weights=None, reduction="mean")`` (a scalar, or the ``(B,)`` per-sample losses) and
``model.sample(n, cond=None, sampler=..., steps=..., inpaint=...)`` take and return data in its own units:
normalisation happens inside (``model.normalizer``), so it is saved and loaded with the weights. The network
works in normalised space.

Conditioning:
- a global condition vector ``cond`` ``(B, cond_dim)`` given to the denoiser;
- classifier-free guidance: with ``cond_drop_prob > 0`` training replaces the condition by a learned null
  vector with that probability, and ``sample(..., guidance=w)`` mixes ``D_uncond + w (D_cond - D_uncond)``;
- inpainting: ``Inpaint(mask, values)`` (:mod:`diffrl.diffusion.inpaint`) fixes entries (e.g. the first state of
  a trajectory, or given actions); they are re-imposed at every sampler step at the current noise level and are
  exact in the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffrl.diffusion import samplers
from diffrl.diffusion.inpaint import Inpaint
from diffrl.diffusion.normalize import DataNormalizer
from diffrl.diffusion.schedules import VPSchedule, make_betas


class DiffusionModel(nn.Module):
    """What EDM and DDPM share: the denoiser, the normaliser, the condition handling and ``sample``."""

    samplers: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, event_shape: Sequence[int], cond_dim: int = 0,
                 normalizer: DataNormalizer | None = None, cond_drop_prob: float = 0.0,
                 sampler_defaults: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob > 0 and cond_dim == 0:
            raise ValueError("classifier-free guidance (cond_drop_prob > 0) needs a condition (cond_dim > 0)")
        self.net = net
        self.event_shape = tuple(int(s) for s in event_shape)
        self.cond_dim = int(cond_dim)
        self.normalizer = normalizer if normalizer is not None else DataNormalizer(self.event_shape[-1], "none")
        self.cond_drop_prob = float(cond_drop_prob)
        self.null_cond = nn.Parameter(torch.zeros(cond_dim)) if cond_drop_prob > 0 else None
        self.sampler_defaults = dict(sampler_defaults or {})
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: run the network under autocast

    # ----------------------------------------------------------------------------------------------- helpers
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def _check_inputs(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected samples of shape (B, {', '.join(map(str, self.event_shape))}), "
                             f"got {tuple(x.shape)}")
        self._check_cond(cond, x.shape[0])

    def _check_cond(self, cond: torch.Tensor | None, n: int) -> None:
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(f"this model {'needs' if self.cond_dim else 'takes no'} condition vectors"
                             + (f" of size {self.cond_dim}" if self.cond_dim else ""))
        if cond is not None and tuple(cond.shape) != (n, self.cond_dim):
            raise ValueError(f"expected cond of shape ({n}, {self.cond_dim}), got {tuple(cond.shape)}")

    def _drop_cond(self, cond: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if cond is None or self.null_cond is None or not self.training:
            return cond
        drop = torch.rand(cond.shape[0], 1, device=cond.device, generator=generator) < self.cond_drop_prob
        return torch.where(drop, self.null_cond.expand_as(cond), cond)

    def network(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float = 1.0,
                net: nn.Module | None = None) -> torch.Tensor:
        """Raw network output (float32) at noise input ``t``; classifier-free guidance when ``guidance != 1``.

        ``net`` replaces the model's own denoiser (DPPO routes the last steps to a fine-tuned copy).
        """
        net = self.net if net is None else net
        with self._autocast(x.device):
            if guidance != 1.0 and cond is not None:
                if self.null_cond is None:
                    raise ValueError("guidance needs a model trained with cond_drop_prob > 0")
                out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, self.null_cond.expand_as(cond)]))
                out_c, out_u = out.float().chunk(2)
                return out_u + guidance * (out_c - out_u)
            return net(x, t, cond).float()

    @staticmethod
    def _check_weights(weights: torch.Tensor, n: int) -> None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n,):
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a tensor of shape ({n},), one per sample of the batch, got {got}")
        bad = ~(torch.isfinite(weights) & (weights >= 0))
        if bool(bad.any()):
            raise ValueError(f"weights must be finite and non-negative, got {weights[bad][:3].tolist()} among them")

    # ------------------------------------------------------------------------------------------- interface
    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None, generator: torch.Generator | None = None, *,
             weights: torch.Tensor | None = None, reduction: str = "mean", net: nn.Module | None = None,
             fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss of a batch ``x`` ``(B, *event)`` in data units.

        Args:
            weights: ``(B,)``, finite and non-negative, one per sample (DPPO's DRWR / DAWR weighted regression);
                used as given, so pass them detached. The result is ``mean_i w_i l_i`` with ``l_i`` sample
                ``i``'s loss averaged over its event dims.
            reduction: ``"mean"`` (a scalar) or ``"none"`` (the ``(B,)`` per-sample losses, weighted if given).
            net: a denoiser in place of the model's own, as in :meth:`network` (a fine-tuned copy: DPPO's
                baselines train one while the model keeps the pre-trained weights).
            fixed: a bool mask broadcastable to ``x`` of entries given as conditions: they are held at their clean
                values in the noised input (Diffuser's ``apply_conditioning``, Dydiff's ``cond_on_action``) and left
                out of the loss, as Diffuser does by re-conditioning its output (Dydiff's EDM loss averages over
                them too, which only adds the task of copying given values through). Sample such a model with
                ``Inpaint(mask, values, clean=True)``.
        Returns the loss. Without weights, ``"mean"`` is the mean over all (free) elements (the mean of the
        per-sample losses up to rounding).
        """
        self._check_inputs(x, cond)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if weights is not None:
            self._check_weights(weights, x.shape[0])
        if fixed is not None:
            fixed = torch.as_tensor(fixed, dtype=torch.bool, device=x.device).expand_as(x)
        errors = self._loss(self.normalizer(x), self._drop_cond(cond, generator), generator, net,
                            fixed)  # (B, *event)
        if fixed is not None:  # the mean over the free entries only
            free = (~fixed).flatten(1).float()  # (B, n)
            per_sample = (errors.flatten(1) * free).sum(1) / free.sum(1).clamp(min=1.0)
            if weights is None and reduction == "mean":
                return (errors.flatten(1) * free).sum() / free.sum().clamp(min=1.0)
        elif weights is None and reduction == "mean":
            return errors.mean()  # the element mean, as before: seeded losses keep their exact values
        else:
            per_sample = errors.flatten(1).mean(1)  # (B,)
        if weights is not None:
            per_sample = weights.to(per_sample) * per_sample
        return per_sample if reduction == "none" else per_sample.mean()

    def _loss(self, x: torch.Tensor, cond: torch.Tensor | None, generator: torch.Generator | None,
              net: nn.Module | None = None, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Element-wise loss ``(B, *event)`` of a normalised batch, through ``net`` if given, with the ``fixed``
        entries held clean in the noised input; ``loss`` reduces it (and drops the fixed entries)."""
        raise NotImplementedError

    def resolve_sampler(self, sampler: str | None = None, steps: int | None = None,
                        options: dict[str, Any] | None = None) -> tuple[str, int | None, dict[str, Any]]:
        """The sampler, steps and options ``sample`` will use: ``sampler_defaults`` fill what is not given, but
        only for the default sampler (another sampler starts from its own defaults)."""
        defaults = dict(self.sampler_defaults)
        default_sampler = defaults.pop("sampler", self.samplers[0])
        default_steps = defaults.pop("steps", None)
        if sampler is None or sampler == default_sampler:
            sampler, settings = default_sampler, {**defaults, **(options or {})}
            steps = steps if steps is not None else default_steps
        else:
            settings = dict(options or {})
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not apply to a {type(self).__name__} model: choose one of "
                             f"{', '.join(self.samplers)}")
        return sampler, steps, settings

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, *, sampler: str | None = None,
               steps: int | None = None, inpaint: Inpaint | None = None, guidance: float = 1.0,
               clip: float | None = None, generator: torch.Generator | None = None,
               **options: Any) -> torch.Tensor:
        """``n`` samples in data units. ``sampler`` / ``steps`` / ``options`` default to ``sampler_defaults``.

        ``clip`` clamps the normalised sample to ``[-clip, clip]`` before un-normalising (use 1 with a min-max
        normaliser). Samplers: EDM ``heun`` (stochastic with churn), ``euler``, ``dpmpp_2m``, ``dpmpp_2m_sde``;
        DDPM ``ddpm``, ``ddim`` (``eta``).
        """
        sampler, steps, settings = self.resolve_sampler(sampler, steps, options)
        device = self.normalizer.shift.device
        self._check_cond(cond, n)
        cond = cond.to(device) if cond is not None else None
        shape = (n, *self.event_shape)
        fixed = None
        if inpaint is not None:
            fixed = inpaint.expand(shape, device)
            fixed = Inpaint(fixed.mask, self.normalizer(fixed.values), fixed.clean)
        x = samplers.run(self, sampler, shape, cond, steps=steps, inpaint=fixed, guidance=guidance,
                         generator=generator, device=device, **settings)
        if clip is not None:
            x = x.clamp(-clip, clip)
        x = self.normalizer.unnormalize(x)
        if inpaint is not None:
            full = inpaint.expand(shape, device)
            x = torch.where(full.mask, full.values, x)
        return x


class EDM(DiffusionModel):
    """Karras et al. (2022) preconditioning and training; SynthER's diffusion model.

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
    ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``.
    Training draws ``ln sigma ~ N(P_mean, P_std^2)`` and weights the squared error by
    ``(sigma^2 + sd^2) / (sigma sd)^2``.
    """

    samplers = ("heun", "euler", "dpmpp_2m", "dpmpp_2m_sde")

    def __init__(self, net: nn.Module, event_shape: Sequence[int], cond_dim: int = 0,
                 normalizer: DataNormalizer | None = None, *, sigma_data: float = 1.0, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, p_mean: float = -1.2, p_std: float = 1.2,
                 cond_drop_prob: float = 0.0, sampler_defaults: dict[str, Any] | None = None) -> None:
        super().__init__(net, event_shape, cond_dim, normalizer, cond_drop_prob, sampler_defaults)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None,
                guidance: float = 1.0, net: nn.Module | None = None) -> torch.Tensor:
        """The preconditioned denoiser ``D(x; sigma)`` in normalised space; ``sigma`` ``(B,)`` or a scalar; ``net`` as
        in :meth:`network`."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.network(c_in * x, c_noise, cond, guidance, net)

    def _loss(self, x: torch.Tensor, cond: torch.Tensor | None, generator: torch.Generator | None,
              net: nn.Module | None = None, fixed: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        sigma = (self.p_mean + self.p_std * torch.randn(n, device=x.device, generator=generator)).exp()
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        weight = (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        noised = x + s * noise if fixed is None else torch.where(fixed, x, x + s * noise)
        return weight * (self.denoise(noised, sigma, cond, net=net) - x) ** 2  # (B, *event)


class DDPM(DiffusionModel):
    """Variance-preserving discrete diffusion with ``num_steps`` steps (DPPO, Diffuser, ITER-Diffusion).

    ``prediction``: the network predicts the noise (``epsilon``) or the clean sample (``x0``). ``clip_x0``
    clamps the predicted clean sample to ``[-clip_x0, clip_x0]`` (DPPO: 1 with min-max normalised data); the
    noise is then recomputed from the clamped value so DDIM stays consistent with it.
    """

    samplers = ("ddpm", "ddim")

    def __init__(self, net: nn.Module, event_shape: Sequence[int], cond_dim: int = 0,
                 normalizer: DataNormalizer | None = None, *, num_steps: int = 100, schedule: str = "cosine",
                 prediction: str = "epsilon", clip_x0: float | None = None, cond_drop_prob: float = 0.0,
                 sampler_defaults: dict[str, Any] | None = None, **schedule_options: float) -> None:
        super().__init__(net, event_shape, cond_dim, normalizer, cond_drop_prob, sampler_defaults)
        if prediction not in ("epsilon", "x0"):
            raise ValueError(f"prediction must be 'epsilon' or 'x0', got {prediction!r}")
        self.schedule = VPSchedule(make_betas(schedule, num_steps, **schedule_options))
        self.prediction, self.clip_x0 = prediction, clip_x0

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def _denoised(self, x: torch.Tensor, cond: torch.Tensor | None, generator: torch.Generator | None,
                  net: nn.Module | None = None, fixed: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training draw on a normalised batch: steps ``t`` ``(B,)`` uniform in ``[0, K)`` (drawn first), the
        noise, ``x_t = q_sample(x, t, noise)`` (``fixed`` entries held clean in the network's input), the network's
        output and its regression target (the noise or ``x``): ``(t, x_t, out, target)``."""
        t = torch.randint(0, self.num_steps, (x.shape[0],), device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        x_t = self.q_sample(x, t, noise)
        out = self.network(x_t if fixed is None else torch.where(fixed, x, x_t), t.float(), cond, net=net)
        return t, x_t, out, noise if self.prediction == "epsilon" else x

    def _loss(self, x: torch.Tensor, cond: torch.Tensor | None, generator: torch.Generator | None,
              net: nn.Module | None = None, fixed: torch.Tensor | None = None) -> torch.Tensor:
        _, _, out, target = self._denoised(x, cond, generator, net, fixed)
        return (out - target) ** 2  # (B, *event)

    def loss_and_x0(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, *,
                    net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoising loss of ``x`` ``(B, *event)`` (data units; :meth:`loss` with its defaults, the same draws)
        and the clean-sample estimate of the same network call on the same noised input, ``(B, *event)`` in
        normalised space, clamped as :meth:`predict` clamps it, with gradients through ``net``: one network call
        for both (DyDiff's Diffusion-QL, ``use_pred_start``, raises the critic's value of this estimate instead of
        a full chain sample's)."""
        self._check_inputs(x, cond)
        x, cond = self.normalizer(x), self._drop_cond(cond, generator)  # the draws in loss()'s order
        t, x_t, out, target = self._denoised(x, cond, generator, net)
        return ((out - target) ** 2).mean(), self._x0_eps(x_t, t, out)[0]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process ``q(x_t | x_0)`` at steps ``t`` ``(B,)`` (normalised space; Ho et al. 2020, eq. 4):
        ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``, shaped like ``x0``."""
        sched = self.schedule
        return (sched.at("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + sched.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, guidance: float = 1.0,
                net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's clean-sample and noise estimates ``(x0, eps)`` at step ``t`` ``(B,)`` (x0 clamped)."""
        return self._x0_eps(x_t, t, self.network(x_t, t.float(), cond, guidance, net))

    def _x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` from the network's output ``out`` at ``(x_t, t)`` (x0 clamped to ``clip_x0``)."""
        sched = self.schedule
        sa = sched.at("sqrt_alphas_cumprod", t, x_t.ndim)
        s1a = sched.at("sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
        if self.prediction == "epsilon":
            x0, eps = (x_t - s1a * out) / sa, out
        else:
            x0, eps = out, (x_t - sa * out) / s1a
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x_t - sa * x0) / s1a
        return x0, eps

    def ddpm_step(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, guidance: float = 1.0,
                  net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the ancestral transition ``p(x_{t-1} | x_t)`` (the posterior at the predicted x0).

        The std is ``sqrt(posterior_variance_t)``, exactly 0 at ``t = 0``; callers that need a density there
        (DPPO) floor it.
        """
        x0, _ = self.predict(x_t, t, cond, guidance, net)
        sched = self.schedule
        mean = sched.at("posterior_mean_coef1", t, x_t.ndim) * x0 + sched.at("posterior_mean_coef2", t, x_t.ndim) * x_t
        return mean, sched.at("posterior_variance", t, x_t.ndim).sqrt()

    def ddim_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eta: float = 0.0,
                  cond: torch.Tensor | None = None, guidance: float = 1.0,
                  net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of DDIM's transition from ``t`` to ``t_prev`` (``-1``: the clean sample), Song et al. eq. 12.

        ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``;
        ``mean = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps``.
        """
        x0, eps = self.predict(x_t, t, cond, guidance, net)
        abar_t = self.schedule.abar(t, x_t.ndim)
        abar_prev = self.schedule.abar(t_prev, x_t.ndim)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return mean, sigma

