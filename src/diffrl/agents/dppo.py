"""DPPO: PPO over the denoising MDP of a diffusion policy (Ren et al. 2024, arXiv:2409.00588). The PPO update itself,
the critic and the paper's Gaussian baseline are :mod:`diffrl.agents.ppo`'s; this module adds the diffusion chain
as a :class:`~diffrl.agents.ppo.ChunkPolicy` and DPPO's clip schedule and denoising discount.

Shapes: ``B`` batch, ``K`` denoising steps of the pre-trained DDPM, ``S`` transitions of a sampling chain (``K``,
or ``ddim_steps`` with DDIM), ``K'`` fine-tuned transitions (the last ``K'`` of the chain), ``To`` / ``Do``
observation history length / dim, ``Ta`` / ``Da`` action chunk length / action dim (``act_steps <= Ta`` of a
chunk are executed).

The two-level MDP (paper section 4; brief section 1 "Denoising MDP"): an env step samples a chain
``x_S -> ... -> x_0`` conditioned on the observation history; the last ``K'`` transitions are Gaussian policy
steps of a fine-tuned copy of the network, the earlier ones stay with the frozen pre-trained network. The
recorded ``K' + 1`` states (``chain[i] -> chain[i + 1]`` is fine-tuned transition ``i``) are what PPO re-scores.
Sampling for training rollouts AND deterministic evaluation route through the same :class:`DiffusionPolicy`, so
evaluating the pre-trained instead of the fine-tuned network (DPPO issue #29) cannot happen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from diffrl.agents.ppo import ChunkPPO, ChunkSample, PPOParams, check_optional_positive
from diffrl.config import check, check_positive, check_unit_interval
from diffrl.diffusion.gaussian import gaussian_log_prob
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.samplers import Chain, sample_chain
from diffrl.diffusion.schedules import ddim_timesteps
from diffrl.errors import ConfigError

EVAL_MIN_STD = 1e-3
"""std floor of DPPO's DDPM evaluation chain (its ``deterministic=True`` sampling)"""

__all__ = ["DPPOParams", "DiffusionPolicy", "DPPO", "dppo_model_spec"]


# ----------------------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class DPPOParams(PPOParams):
    """DPPO hyper-parameters (defaults: the paper's Gym settings, `cfg/gym/finetune/hopper-v2`, and brief 8)."""

    denoising_steps: int = 20
    """K, denoising steps of the pre-trained DDPM (must match the model)"""
    ft_denoising_steps: int = 10
    """K', the last transitions of the chain that are fine-tuned (and scored by PPO)"""
    use_ddim: bool = False
    """sample with DDIM over ddim_steps instead of ancestral DDPM over K"""
    ddim_steps: int | None = None
    """DDIM transitions S (required with use_ddim; DPPO's Furniture setting: K = 100, ddim_steps = K' = 5)"""
    ddim_eta: float = 1.0
    """DDIM eta in training rollouts (DPPO: 1; evaluation always uses 0)"""
    min_sampling_std: float = 0.1
    """floor of each transition's std when sampling training rollouts (exploration noise)"""
    min_logprob_std: float = 0.1
    """floor of each transition's std when scoring it (a density needs std > 0)"""
    clip_x0: float | None = 1.0
    """clamp of the predicted clean sample (data min-max normalised to [-1, 1])"""
    gamma_denoising: float = 0.99
    """denoising discount: the advantage of transition i is scaled by gamma_denoising^(K' - 1 - i)"""
    clip_ploss_coef_base: float = 1e-3
    """PPO clip at the noisiest fine-tuned transition (robomimic 1e-3; DPPO's Gym configs use 0.01: no schedule)"""
    clip_ploss_coef_rate: float = 3.0
    """rate of the exponential clip schedule from clip_ploss_coef_base (i = 0) to clip_ploss_coef (i = K' - 1)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("denoising_steps", "ft_denoising_steps", "min_sampling_std", "min_logprob_std",
                     "clip_ploss_coef_base", "clip_ploss_coef_rate"):
            check_positive(name, getattr(self, name))
        check_optional_positive("clip_x0", self.clip_x0)
        check_unit_interval("gamma_denoising", self.gamma_denoising)
        check(0.0 <= self.ddim_eta <= 1.0, "ddim_eta", self.ddim_eta, "in [0, 1]")
        if self.use_ddim:
            check(self.ddim_steps is not None and 1 <= self.ddim_steps <= self.denoising_steps, "ddim_steps",
                  self.ddim_steps, f"in [1, denoising_steps={self.denoising_steps}] with use_ddim")
        else:
            check(self.ddim_steps is None, "ddim_steps", self.ddim_steps, "None unless use_ddim is set")
        chain = self.ddim_steps if self.use_ddim else self.denoising_steps
        check(self.ft_denoising_steps <= chain, "ft_denoising_steps", self.ft_denoising_steps,
              f"<= the {chain} transitions of the sampling chain")
        # a DDPM transition's std is fixed by the noise schedule: an entropy bonus would have no gradient
        check(self.ent_coef == 0, "ent_coef", self.ent_coef, "0 for DPPO (a denoising step's entropy is fixed by the "
              "noise schedule, so it has no gradient)")

    @property
    def chain_steps(self) -> int:
        """S, the transitions of the sampling chain."""
        return int(self.ddim_steps) if self.use_ddim else self.denoising_steps



# ------------------------------------------------------------------------------------------------ the policy
class DiffusionPolicy(nn.Module):
    """A pre-trained DDPM as a :class:`~diffrl.agents.ppo.ChunkPolicy` whose last ``K'`` chain transitions run a
    fine-tuned copy.

    The base model is deep-copied and frozen; ``ft_net`` is a trainable copy of its denoiser. Chain transition
    ``i`` (of ``S``: ``K`` ancestral steps, or ``ddim_steps``) uses ``ft_net`` iff ``i >= S - K'`` (DPPO's
    ``actor_ft`` for ``t < K'``); the same routing serves training rollouts, deterministic evaluation and
    log-probabilities. The chain lives in the model's normalised space (identity for DPPO's pre-normalised
    data); actions are un-normalised by the model's normaliser.

    Args:
        model: the pre-trained DDPM over chunks ``(Ta, Da)`` conditioned on the flattened history ``To * Do``.
        ft_denoising_steps: ``K'``.
        use_ddim, ddim_steps, ddim_eta: DDIM sampling over ``ddim_steps`` with ``ddim_eta`` in training (eval: 0).
        min_sampling_std: std floor of training samples (0.1).
        min_logprob_std: std floor of log-probabilities (0.1).
        noise_clip: clamp of the standard-normal noise (3).
        clip_x0: clamp of the predicted clean sample (1); replaces the model's own setting.
    """

    def __init__(self, model: DDPM, ft_denoising_steps: int, *, use_ddim: bool = False, ddim_steps: int | None = None,
                 ddim_eta: float = 1.0, min_sampling_std: float = 0.1, min_logprob_std: float = 0.1,
                 noise_clip: float | None = 3.0, clip_x0: float | None = 1.0) -> None:
        super().__init__()
        if not isinstance(model, DDPM):
            raise ConfigError(f"DPPO fine-tunes a DDPM (ancestral/DDIM chain), got a {type(model).__name__}.")
        if len(model.event_shape) != 2:
            raise ConfigError(f"DPPO's diffusion model samples action chunks (Ta, Da), got event shape "
                              f"{model.event_shape}.")
        steps = ddim_steps if use_ddim else model.num_steps
        if steps is None or not 1 <= ft_denoising_steps <= steps:
            raise ConfigError(f"ft_denoising_steps={ft_denoising_steps} must be in [1, {steps}], the transitions of "
                              "the sampling chain.")
        self.base = copy.deepcopy(model).requires_grad_(False)  # frozen pre-trained DDPM (high-noise steps)
        self.base.clip_x0 = clip_x0
        self.ft_net = copy.deepcopy(model.net).requires_grad_(True)  # fine-tuned copy (last K' steps)
        self.use_ddim, self.ddim_steps, self.ddim_eta = use_ddim, ddim_steps, ddim_eta
        self.min_sampling_std, self.min_logprob_std, self.noise_clip = min_sampling_std, min_logprob_std, noise_clip
        self.chain_steps, self.ft_steps = int(steps), int(ft_denoising_steps)
        self.first_ft = self.chain_steps - self.ft_steps
        if use_ddim:
            ts = ddim_timesteps(model.num_steps, self.chain_steps)
        else:
            ts = torch.arange(model.num_steps - 1, -1, -1)
        prev = torch.cat([ts[1:], ts.new_full((1,), -1)])
        # DDPM timestep t and its target t_prev (-1: clean) of fine-tuned transition i: t = K' - 1 - i for DDPM
        self.register_buffer("ft_timesteps", ts[self.first_ft:].long().clone(), persistent=False)
        self.register_buffer("ft_prev_timesteps", prev[self.first_ft:].long().clone(), persistent=False)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.base.event_shape

    @property
    def num_transitions(self) -> int:
        """Transitions PPO scores per env step (``K'``)."""
        return self.ft_steps

    def net_for_step(self, i: int) -> nn.Module | None:
        """Network of chain transition ``i`` of ``S``: the fine-tuned copy iff ``i >= S - K'`` (None: the base)."""
        return self.ft_net if i >= self.first_ft else None

    def _cond(self, obs: torch.Tensor) -> torch.Tensor:
        cond = obs.flatten(1)  # (B, To * Do)
        if cond.shape[1] != self.base.cond_dim:
            raise ValueError(f"the diffusion policy is conditioned on {self.base.cond_dim} values (To * Do) but got "
                             f"observations of shape {tuple(obs.shape)}")
        return cond

    def chain(self, obs: torch.Tensor, deterministic: bool = False,
              generator: torch.Generator | None = None, mean_path: bool = False) -> Chain:
        """The full recorded chain of ``S`` transitions (means and stds included), routed as above.

        Training (``deterministic=False``): DDPM, or DDIM with ``ddim_eta``; stds floored at ``min_sampling_std``,
        noise clamped to ``noise_clip``. Evaluation (DPPO's): DDIM with eta 0, or DDPM with its own posterior
        stds (floored at ``EVAL_MIN_STD``), noise clamped, and no noise at the last step.

        ``mean_path`` (evaluation only, not DPPO's protocol) takes every DDPM transition's mean from the initial
        noise on. That is not a sample of the policy PPO trains: it collapses samples towards a conditional mean
        (on a 1-D Gaussian with an exact denoiser, K = 20: final std 0.0002 instead of 0.25) and feeds the network
        inputs off the noise levels it was trained on; yet it can be the better deterministic controller
        (diffrl's Walker2d BC policies: 56-58 vs 16-35 with DPPO's sampling). DDIM's eta-0 path already is one.
        """
        shape = (obs.shape[0], *self.event_shape)
        options: dict[str, Any] = dict(ddim=self.use_ddim, steps=self.ddim_steps, generator=generator,
                                       device=obs.device, net_for_step=self.net_for_step)
        if deterministic and (self.use_ddim or mean_path):
            return sample_chain(self.base, shape, self._cond(obs), eta=0.0, deterministic=True, **options)
        if deterministic:
            return sample_chain(self.base, shape, self._cond(obs), min_std=EVAL_MIN_STD, noise_clip=self.noise_clip,
                                noiseless_last=True, **options)
        # DPPO's exploration: std floored at min_sampling_denoising_std, noise clamped to randn_clip_value; DDIM
        # training uses EtaFixed(1)
        return sample_chain(self.base, shape, self._cond(obs), eta=self.ddim_eta, min_std=self.min_sampling_std,
                            noise_clip=self.noise_clip, **options)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Action chunks ``(B, Ta, Da)`` for observation histories ``(B, To, Do)``, and (training only) the
        recorded ``(B, K' + 1, Ta, Da)`` chain whose step ``i -> i + 1`` is fine-tuned transition ``i``
        (``mean_path``: see :meth:`chain`)."""
        if mean_path and not deterministic:
            raise ValueError("mean_path is an evaluation path: it needs deterministic=True")
        chain = self.chain(obs, deterministic, generator, mean_path)
        action = self.base.normalizer.unnormalize(chain.xs[-1])
        if deterministic:
            return ChunkSample(action, None)
        return ChunkSample(action, chain.xs[self.first_ft:].transpose(0, 1).contiguous())  # (B, K' + 1, Ta, Da)

    def transition(self, obs: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``mu_ft(x, t_i, s)`` ``(B, Ta, Da)`` and unfloored std (broadcastable to it) of fine-tuned transition
        ``idx`` ``(B,)`` from ``x`` under the current weights; mixed indices go through the network in one batch (the
        DDPM step and the denoiser take a timestep per sample)."""
        t, t_prev = self.ft_timesteps[idx], self.ft_prev_timesteps[idx]
        cond = self._cond(obs)
        if self.use_ddim:
            return self.base.ddim_step(x, t, t_prev, self.ddim_eta, cond, net=self.ft_net)
        return self.base.ddpm_step(x, t, cond, net=self.ft_net)

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        """Element-wise ``log N(x_next; mu_ft(x, t_i, s), max(std_i, min_logprob_std)^2)``, ``(B, Ta, Da)``, of the
        recorded transitions ``x -> x_next`` with indices ``idx`` ``(B,)`` (:meth:`transition`)."""
        mean, std = self.transition(obs, x, idx)
        std = std.expand_as(mean).clamp(min=self.min_logprob_std)  # DPPO's min_logprob_denoising_std
        return gaussian_log_prob(x_next, mean, std)

    def entropy(self) -> torch.Tensor | None:
        return None  # fixed by the schedule (no gradient): DPPO's ent_coef is 0


# ----------------------------------------------------------------------------------------------------- agent
class DPPO(ChunkPPO):
    """Diffusion Policy Policy Optimization: PPO over the last ``K'`` denoising steps of a pre-trained DDPM.

    Args:
        model: the pre-trained (EMA) DDPM: event shape ``(horizon_steps, Da)``, ``cond_dim = cond_steps * Do``,
            ``denoising_steps`` steps. It is copied; the copy is frozen.
        obs_dim: ``Do``.
        params: :class:`DPPOParams`.
        device: torch device.
    """

    policy: DiffusionPolicy

    def __init__(self, model: DDPM, obs_dim: int, params: DPPOParams, device: torch.device | str = "cpu") -> None:
        check_chunk_model(model, params.horizon_steps, params.cond_steps, obs_dim, "DPPO")
        if model.num_steps != params.denoising_steps:
            raise ConfigError(f"the pre-trained model has {model.num_steps} denoising steps but denoising_steps="
                              f"{params.denoising_steps}; set it to the model's (DPPO keeps K from pre-training).")
        policy = DiffusionPolicy(model, params.ft_denoising_steps, use_ddim=params.use_ddim,
                                 ddim_steps=params.ddim_steps, ddim_eta=params.ddim_eta,
                                 min_sampling_std=params.min_sampling_std, min_logprob_std=params.min_logprob_std,
                                 noise_clip=params.noise_clip, clip_x0=params.clip_x0)
        super().__init__(policy, obs_dim, params, device)

    def clip_coef(self, i: torch.Tensor) -> torch.Tensor:
        """Exponential schedule over the fine-tuned chain: ``base`` at ``i = 0`` (noisiest), ``clip_ploss_coef`` at
        ``i = K' - 1``: ``base + (coef - base) (e^{rate i / (K' - 1)} - 1) / (e^rate - 1)`` (DPPO)."""
        p: DPPOParams = self.p  # type: ignore[assignment]
        k = self.num_transitions
        if k == 1:  # a single fine-tuned step is the final one
            return torch.full(i.shape, p.clip_ploss_coef, device=i.device)
        frac = i.float() / (k - 1)
        growth = torch.expm1(p.clip_ploss_coef_rate * frac) / math.expm1(p.clip_ploss_coef_rate)
        return p.clip_ploss_coef_base + (p.clip_ploss_coef - p.clip_ploss_coef_base) * growth

    def denoising_discount(self, i: torch.Tensor) -> torch.Tensor:
        """``gamma_denoising^(K' - 1 - i)``: the final denoising step is undiscounted (DPPO)."""
        p: DPPOParams = self.p  # type: ignore[assignment]
        return p.gamma_denoising ** (self.num_transitions - 1 - i).float()


def check_chunk_model(model: Any, horizon_steps: int, cond_steps: int, obs_dim: int, who: str) -> None:
    """What every agent built on a pre-trained chunk model checks first (DPPO and its baselines): a DDPM over chunks
    ``(horizon_steps, Da)`` conditioned on ``cond_steps * obs_dim`` values; anything else is one ConfigError."""
    if not isinstance(model, DDPM):
        raise ConfigError(f"{who} fine-tunes a DDPM chain, got a {type(model).__name__}.")
    if len(model.event_shape) != 2 or model.event_shape[0] != horizon_steps:
        raise ConfigError(f"the model samples chunks of shape {model.event_shape} but horizon_steps={horizon_steps}; "
                          "use the pre-trained model's horizon.")
    if model.cond_dim != cond_steps * obs_dim:
        raise ConfigError(f"the model is conditioned on {model.cond_dim} values but cond_steps * obs_dim = "
                          f"{cond_steps} * {obs_dim}; use the pre-trained model's cond_steps and env.")


def dppo_model_spec(obs_dim: int, act_dim: int, params: DPPOParams, *, hidden: int = 512, blocks: int = 1,
                    time_dim: int = 16, activation: str = "relu") -> dict[str, Any]:
    """Spec (:func:`diffrl.diffusion.spec.build_model`) of DPPO's pre-trained model: an epsilon-predicting cosine
    DDPM over ``(Ta, Da)`` chunks with ``ChunkMLPDenoiser`` (Hopper: ``[512] * 3`` residual, ReLU, time_dim 16),
    conditioned on ``To * Do`` values. No normaliser inside: the data are min-max normalised beforehand."""
    return {"type": "ddpm", "event_shape": [params.horizon_steps, act_dim], "cond_dim": params.cond_steps * obs_dim,
            "denoiser": {"type": "chunk_mlp", "hidden": hidden, "blocks": blocks, "time_dim": time_dim,
                         "activation": activation},
            "normalizer": {"kind": "none"},
            "diffusion": {"num_steps": params.denoising_steps, "schedule": "cosine", "prediction": "epsilon",
                          "clip_x0": params.clip_x0},
            "sampler": {"sampler": "ddpm"}}
