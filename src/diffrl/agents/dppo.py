"""DPPO: PPO over the denoising MDP of a diffusion policy (Ren et al. 2024, arXiv:2409.00588), and the paper's
Gaussian baseline on the same PPO update.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden
from diffrl.agents.nets import mlp
from diffrl.agents.ppo_utils import PPOBatch
from diffrl.config import check, check_non_negative, check_positive, check_unit_interval
from diffrl.diffusion.models import DDPM, gaussian_log_prob
from diffrl.diffusion.nets import ACTIVATIONS, PreActBlock
from diffrl.diffusion.samplers import Chain, sample_chain
from diffrl.diffusion.schedules import ddim_timesteps
from diffrl.errors import ConfigError

EVAL_MIN_STD = 1e-3
"""std floor of DPPO's DDPM evaluation chain (its ``deterministic=True`` sampling)"""

__all__ = ["PPOParams", "DPPOParams", "GaussianPPOParams", "DiffusionPolicy", "GaussianPolicy", "ValueCritic",
           "ChunkPPO", "DPPO", "GaussianPPO", "dppo_model_spec"]


# ----------------------------------------------------------------------------------------------- parameters
def _check_optional_positive(name: str, value: float | None) -> None:
    check(value is None or value > 0, name, value, "> 0 or None")


@dataclasses.dataclass(frozen=True)
class PPOParams(Params):
    """What DPPO and the Gaussian baseline share: chunking, the PPO objective, the critic and optimisers."""

    horizon_steps: int = 4
    """predicted action chunk length Ta"""
    act_steps: int = 4
    """actions of a chunk executed in the env (and kept in the log-prob), <= horizon_steps"""
    cond_steps: int = 1
    """observation history length To"""
    noise_clip: float | None = 3.0
    """clamp of the standard-normal sampling noise (DPPO's randn_clip_value in fine-tuning)"""
    logprob_clamp: tuple[float, float] = (-5.0, 2.0)
    """element-wise clamp of log-probabilities before the ratio (DPPO)"""
    clip_ploss_coef: float = 0.01
    """PPO ratio clip (DPPO: at the final denoising step)"""
    clip_vloss_coef: float | None = None
    """value clip around the rollout values; None: plain 0.5 * MSE"""
    actor_lr: float = 1e-4
    """actor learning rate (AdamW, its own optimiser)"""
    critic_lr: float = 1e-3
    """critic learning rate (AdamW, its own optimiser)"""
    actor_weight_decay: float = 0.0
    """AdamW weight decay of the actor"""
    critic_weight_decay: float = 0.0
    """AdamW weight decay of the critic"""
    vf_coef: float = 0.5
    """weight of the value loss in the one backward pass on pg + vf_coef * v_loss"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    target_kl: float | None = None
    """stop the epoch once a minibatch's approx_kl exceeds this (see should_stop); None: never"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    max_grad_norm: float | None = None
    """clip the actor's gradient norm (DPPO clips the actor only); None: no clipping"""
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of the V(s) critic"""
    critic_residual: bool = True
    """residual critic (DPPO's CriticObs): Linear, (len - 1) / 2 two-layer residual blocks, Linear; equal widths"""
    critic_activation: str = "mish"
    """activation of the critic"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon_steps", "act_steps", "cond_steps", "clip_ploss_coef", "actor_lr", "critic_lr"):
            check_positive(name, getattr(self, name))
        check(self.act_steps <= self.horizon_steps, "act_steps", self.act_steps,
              f"<= horizon_steps={self.horizon_steps}")
        _check_optional_positive("noise_clip", self.noise_clip)
        _check_optional_positive("clip_vloss_coef", self.clip_vloss_coef)
        _check_optional_positive("target_kl", self.target_kl)
        _check_optional_positive("max_grad_norm", self.max_grad_norm)
        check(len(self.logprob_clamp) == 2 and self.logprob_clamp[0] < self.logprob_clamp[1], "logprob_clamp",
              self.logprob_clamp, "a pair (low, high) with low < high")
        for name in ("actor_weight_decay", "critic_weight_decay", "vf_coef", "ent_coef"):
            check_non_negative(name, getattr(self, name))
        check_hidden(self.critic_hidden)
        if self.critic_residual:
            _check_residual("critic_hidden", self.critic_hidden)
        check(self.critic_activation in ACTIVATIONS, "critic_activation", self.critic_activation,
              "one of " + ", ".join(ACTIVATIONS))


def _check_residual(name: str, hidden: tuple[int, ...]) -> None:
    check(len(set(hidden)) == 1 and len(hidden) % 2 == 1, name, hidden,
          "an odd number of equal widths for a residual MLP (e.g. (256, 256, 256): Linear, one two-layer block, "
          "Linear), or set the residual flag to False")


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
        _check_optional_positive("clip_x0", self.clip_x0)
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


@dataclasses.dataclass(frozen=True)
class GaussianPPOParams(PPOParams):
    """The paper's Gaussian baseline: tanh mean over the chunk, learnable state-independent std (brief 3)."""

    hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the mean network (DPPO's Gaussian_MLP mlp_dims)"""
    residual: bool = True
    """residual mean network (equal widths, odd count) or a plain MLP"""
    activation: str = "mish"
    """activation of the mean network"""
    std_init: float = 0.1
    """initial std of every action dimension"""
    std_min: float = 0.01
    """lower bound of the std"""
    std_max: float = 0.2
    """upper bound of the std"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        if self.residual:
            _check_residual("hidden", self.hidden)
        check(self.activation in ACTIVATIONS, "activation", self.activation, "one of " + ", ".join(ACTIVATIONS))
        check(0 < self.std_min <= self.std_init <= self.std_max, "std_init", self.std_init,
              f"within [std_min={self.std_min}, std_max={self.std_max}] with 0 < std_min")


# ------------------------------------------------------------------------------------------------- networks
def residual_mlp(d_in: int, hidden: Sequence[int], d_out: int, activation: str) -> nn.Sequential:
    """DPPO's ``ResidualMLP``: ``Linear(d_in, h)``, ``(len(hidden) - 1) / 2`` pre-activation blocks,
    ``Linear(h, d_out)`` (``hidden = (256, 256, 256)``: one block; no activation before the output layer)."""
    h = hidden[0]
    return nn.Sequential(nn.Linear(d_in, h), *[PreActBlock(h, activation) for _ in range((len(hidden) - 1) // 2)],
                         nn.Linear(h, d_out))


def _trunk(d_in: int, hidden: Sequence[int], d_out: int, residual: bool, activation: str) -> nn.Sequential:
    return residual_mlp(d_in, hidden, d_out, activation) if residual else mlp(d_in, hidden, d_out,
                                                                              ACTIVATIONS[activation])


class ValueCritic(nn.Module):
    """``V(s)`` of the flattened observation history: ``(B, To, Do) -> (B,)`` (DPPO's ``CriticObs``)."""

    def __init__(self, obs_dim: int, cond_steps: int, hidden: Sequence[int], residual: bool = True,
                 activation: str = "mish") -> None:
        super().__init__()
        self.net = _trunk(obs_dim * cond_steps, hidden, 1, residual, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.flatten(1)).squeeze(-1)


class DiffusionPolicy(nn.Module):
    """A pre-trained DDPM as a chunk policy whose last ``K'`` chain transitions run a fine-tuned copy.

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
    def act(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
            mean_path: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Action chunks ``(B, Ta, Da)`` for observation histories ``(B, To, Do)``, and (training only) the
        recorded ``(B, K' + 1, Ta, Da)`` chain whose step ``i -> i + 1`` is fine-tuned transition ``i``
        (``mean_path``: see :meth:`chain`)."""
        if mean_path and not deterministic:
            raise ValueError("mean_path is an evaluation path: it needs deterministic=True")
        chain = self.chain(obs, deterministic, generator, mean_path)
        action = self.base.normalizer.unnormalize(chain.xs[-1])
        if deterministic:
            return action, None
        return action, chain.xs[self.first_ft:].transpose(0, 1).contiguous()  # (B, K' + 1, Ta, Da)

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        """Element-wise ``log N(x_next; mu_ft(x, t_i, s), max(std_i, min_logprob_std)^2)``, ``(B, Ta, Da)``.

        ``idx`` ``(B,)`` holds each pair's fine-tuned transition; mixed indices go through the network in one
        batch (the DDPM step and the denoiser take a timestep per sample).
        """
        t, t_prev = self.ft_timesteps[idx], self.ft_prev_timesteps[idx]
        cond = self._cond(obs)
        if self.use_ddim:
            mean, std = self.base.ddim_step(x, t, t_prev, self.ddim_eta, cond, net=self.ft_net)
        else:
            mean, std = self.base.ddpm_step(x, t, cond, net=self.ft_net)
        std = std.expand_as(mean).clamp(min=self.min_logprob_std)  # DPPO's min_logprob_denoising_std
        return gaussian_log_prob(x_next, mean, std)

    def entropy(self) -> torch.Tensor | None:
        return None  # fixed by the schedule (no gradient): DPPO's ent_coef is 0


class GaussianPolicy(nn.Module):
    """The paper's Gaussian chunk policy: ``N(tanh(MLP(s)), std^2)`` over ``(Ta, Da)``, learnable std per ``Da``.

    The std is initialised at ``std_init`` and kept in ``[std_min, std_max]`` (DPPO's ``Gaussian_MLP`` with
    ``learn_fixed_std``: 0.1 in [0.01, 0.2]). It is a one-transition "chain": ``act`` returns ``(B, 2, Ta, Da)``
    with the mean at index 0 (informative only; log-probs use the current mean) and the sample at index 1.
    """

    def __init__(self, obs_dim: int, act_dim: int, horizon_steps: int, cond_steps: int = 1, *,
                 hidden: Sequence[int] = (512, 512, 512), residual: bool = True, activation: str = "mish",
                 std_init: float = 0.1, std_min: float = 0.01, std_max: float = 0.2,
                 noise_clip: float | None = 3.0) -> None:
        super().__init__()
        self.event_shape = (horizon_steps, act_dim)
        self.mean_net = _trunk(obs_dim * cond_steps, hidden, horizon_steps * act_dim, residual, activation)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(std_init)))
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)
        self.noise_clip = noise_clip

    @property
    def num_transitions(self) -> int:
        return 1

    def std(self) -> torch.Tensor:
        """``(Da,)``, clamped to ``[std_min, std_max]``."""
        return self.log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Mean chunk ``(B, Ta, Da)`` in [-1, 1]."""
        return torch.tanh(self.mean_net(obs.flatten(1))).view(-1, *self.event_shape)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
            mean_path: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunks ``(B, Ta, Da)`` (the mean when deterministic, whatever ``mean_path``) and, when sampling,
        ``(B, 2, Ta, Da)``."""
        mean = self(obs)
        if deterministic:
            return mean, None
        z = torch.randn(mean.shape, generator=generator, device=mean.device)
        if self.noise_clip is not None:  # DPPO's randn_clip_value (3 in its fine-tuning configs)
            z = z.clamp(-self.noise_clip, self.noise_clip)
        action = mean + self.std() * z
        return action, torch.stack([mean, action], dim=1)

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        """Element-wise ``log N(x_next; mean(s), std^2)``, ``(B, Ta, Da)`` (``x`` and ``idx`` unused)."""
        return gaussian_log_prob(x_next, self(obs), self.std().expand(*x_next.shape))

    def entropy(self) -> torch.Tensor:
        """Mean per-dimension entropy of the Gaussian."""
        return (0.5 + 0.5 * math.log(2 * math.pi) + self.std().log()).mean()

    def bc_loss(self, obs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Behaviour-cloning NLL of dataset chunks ``(B, Ta, Da)`` given histories ``(B, To, Do)``, mean over
        elements. The std is held fixed (DPPO pre-trains its Gaussian with a fixed std of 0.1), so this trains
        the mean and leaves the std at its initial value for fine-tuning."""
        return -gaussian_log_prob(chunk, self(obs), self.std().detach().expand(*chunk.shape)).mean()


# ---------------------------------------------------------------------------------------------------- agents
class ChunkPPO(Agent):
    """PPO on a chunk policy with per-(env step, transition) ratios: the update DPPO and its Gaussian baseline
    share (paper eq. 4.2 with DPPO's clipping, discounting and reductions, brief section 8.4).

    A fine-tuning loop drives both identically: ``sample`` for rollouts (chunks + chains ``(N, S + 1, Ta, Da)``),
    ``values`` and ``chain_log_probs`` after the rollout, then ``update`` on
    :func:`~diffrl.agents.ppo_utils.ppo_minibatches`, stopping an epoch when ``should_stop(metrics)``.
    """

    policy: DiffusionPolicy | GaussianPolicy

    def __init__(self, policy: DiffusionPolicy | GaussianPolicy, obs_dim: int, params: PPOParams,
                 device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        self.obs_dim = int(obs_dim)
        self.policy = policy.to(self.device)
        self.critic = ValueCritic(obs_dim, params.cond_steps, params.critic_hidden, params.critic_residual,
                                  params.critic_activation).to(self.device)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.actor_opt = torch.optim.AdamW(self.actor_params, lr=params.actor_lr,
                                           weight_decay=params.actor_weight_decay, **fused)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=params.critic_lr,
                                            weight_decay=params.critic_weight_decay, **fused)
        self.nets = {"policy": self.policy, "critic": self.critic}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.num_updates = 0  # update() calls
        self.num_actor_updates = 0  # of which stepped the actor (not critic_only)

    # ------------------------------------------------------------------------------------------- acting
    @property
    def num_transitions(self) -> int:
        """S, the transitions scored per env step (DPPO: K'; Gaussian: 1)."""
        return self.policy.num_transitions

    def _obs(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if o.dim() == 2 and self.p.cond_steps == 1:
            o = o.unsqueeze(1)  # (B, Do) -> (B, 1, Do)
        if o.dim() != 3 or o.shape[1:] != (self.p.cond_steps, self.obs_dim):
            raise ValueError(f"expected observation histories of shape (B, {self.p.cond_steps}, {self.obs_dim}), "
                             f"got {tuple(o.shape)}")
        return o

    def sample(self, obs: np.ndarray | torch.Tensor, deterministic: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rollout step: chunks ``(B, Ta, Da)`` and (when not deterministic) chains ``(B, S + 1, Ta, Da)``."""
        return self.policy.act(self._obs(obs), deterministic, generator)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Action chunks ``(B, Ta, Da)`` (normalised units) for histories ``(B, To, Do)``; the evaluation path."""
        return self.sample(obs, deterministic)[0].cpu().numpy()

    @torch.no_grad()
    def values(self, obs: np.ndarray | torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
        """``V(s)`` ``(B,)`` of histories ``(B, To, Do)``, in chunks of ``batch_size``."""
        o = self._obs(obs)
        return torch.cat([self.critic(part) for part in o.split(batch_size)]) if len(o) else o.new_zeros(0)

    # -------------------------------------------------------------------------------------------- scoring
    def log_probs(self, obs: torch.Tensor, chain_x: torch.Tensor, chain_next: torch.Tensor,
                  denoise_idx: torch.Tensor) -> torch.Tensor:
        """Reduced log-probabilities ``(B,)`` of transitions ``chain_x -> chain_next`` (mixed indices ``(B,)``).

        Element-wise log-probs (std floored) are clamped to ``logprob_clamp``, truncated to the first
        ``act_steps`` actions of the chunk and averaged over ``(act_steps, Da)`` (DPPO: a per-dimension geometric
        mean ratio, not the joint density).
        """
        lp = self.policy.transition_log_prob(self._obs(obs), chain_x, chain_next, denoise_idx.long())
        lo, hi = self.p.logprob_clamp
        return lp.clamp(lo, hi)[:, :self.p.act_steps].mean(dim=(1, 2))

    @torch.no_grad()
    def chain_log_probs(self, obs: torch.Tensor, chains: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
        """Reduced log-probs ``(M, S)`` of every recorded transition (the rollout's old log-probs).

        Args:
            obs: ``(M, To, Do)``; chains: ``(M, S + 1, Ta, Da)``; ``batch_size`` pairs per network call.
        """
        o = self._obs(obs)
        m, s = chains.shape[0], chains.shape[1] - 1
        if s != self.num_transitions or m != len(o):
            raise ValueError(f"chains must be (M={len(o)}, {self.num_transitions + 1}, Ta, Da), got "
                             f"{tuple(chains.shape)}")
        pair = torch.arange(m * s, device=self.device)
        out = [self.log_probs(o[p // s], chains[p // s, p % s], chains[p // s, p % s + 1], p % s)
               for p in pair.split(batch_size)]
        return torch.cat(out).view(m, s)

    def clip_coef(self, i: torch.Tensor) -> torch.Tensor:
        """PPO clip coefficient of transition ``i`` (constant here; DPPO schedules it)."""
        return torch.full(i.shape, self.p.clip_ploss_coef, device=i.device)

    def denoising_discount(self, i: torch.Tensor) -> torch.Tensor:
        """Advantage scale of transition ``i`` (1 here; DPPO discounts earlier denoising steps)."""
        return torch.ones(i.shape, device=i.device)

    # -------------------------------------------------------------------------------------------- update
    def update(self, batch: PPOBatch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """One PPO step on a minibatch: ``pg_loss + vf_coef * v_loss`` (``- ent_coef * entropy``), one backward,
        the actor and critic AdamW steps. ``critic_only`` (critic warm-up iterations): the actor is not stepped.

        Returns detached metrics: ``pg_loss, v_loss, entropy, approx_kl, clipfrac, ratio_mean, ratio_min,
        ratio_max, value_mean, adv_mean, clip_coef_mean, actor_grad_norm, critic_grad_norm``.
        """
        p = self.p
        idx = batch.denoise_idx.long()
        with torch.set_grad_enabled(not critic_only):
            new_lp = self.log_probs(batch.obs, batch.chain_x, batch.chain_next, idx)
            entropy = self.policy.entropy()
        log_ratio = new_lp - batch.old_log_prob
        ratio = log_ratio.exp()
        adv = batch.advantages
        if p.norm_adv and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # per minibatch (DPPO, CleanRL)
        adv = adv * self.denoising_discount(idx)  # after normalisation, as DPPO
        clip = self.clip_coef(idx)
        pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()

        values = self.critic(self._obs(batch.obs))
        if p.clip_vloss_coef is not None:
            clipped = batch.old_values + (values - batch.old_values).clamp(-p.clip_vloss_coef, p.clip_vloss_coef)
            v_loss = 0.5 * torch.max((values - batch.returns) ** 2, (clipped - batch.returns) ** 2).mean()
        else:
            v_loss = 0.5 * ((values - batch.returns) ** 2).mean()

        loss = p.vf_coef * v_loss
        if not critic_only:
            loss = loss + pg_loss
            if entropy is not None and p.ent_coef > 0:
                loss = loss - p.ent_coef * entropy
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        actor_norm = torch.zeros((), device=self.device)
        if not critic_only:
            actor_norm = nn.utils.clip_grad_norm_(self.actor_params, p.max_grad_norm or math.inf, foreach=True)
            self.actor_opt.step()
            self.num_actor_updates += 1
        critic_norm = nn.utils.clip_grad_norm_(self.critic.parameters(), math.inf, foreach=True)  # norm only
        self.critic_opt.step()
        self.num_updates += 1
        with torch.no_grad():
            return {"pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(),
                    "entropy": entropy.detach() if entropy is not None else torch.zeros((), device=self.device),
                    # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence")
                    "approx_kl": ((ratio - 1) - log_ratio).mean().detach(),
                    "clipfrac": ((ratio - 1).abs() > clip).float().mean(),
                    "ratio_mean": ratio.mean().detach(), "ratio_min": ratio.min().detach(),
                    "ratio_max": ratio.max().detach(), "value_mean": values.mean().detach(),
                    "adv_mean": batch.advantages.mean(), "clip_coef_mean": clip.mean(),
                    "actor_grad_norm": actor_norm.detach(), "critic_grad_norm": critic_norm.detach()}

    def should_stop(self, metrics: dict[str, torch.Tensor]) -> bool:
        """True when ``approx_kl`` exceeds ``target_kl``: end the epoch (checked after the step, as DPPO)."""
        return self.p.target_kl is not None and float(metrics["approx_kl"]) > self.p.target_kl

    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_actor_updates": self.num_actor_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_actor_updates = int(state["num_actor_updates"])


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
        if not isinstance(model, DDPM):
            raise ConfigError(f"DPPO fine-tunes a DDPM, got a {type(model).__name__}.")
        if model.num_steps != params.denoising_steps:
            raise ConfigError(f"the pre-trained model has {model.num_steps} denoising steps but denoising_steps="
                              f"{params.denoising_steps}; set it to the model's (DPPO keeps K from pre-training).")
        if len(model.event_shape) != 2 or model.event_shape[0] != params.horizon_steps:
            raise ConfigError(f"the model samples chunks of shape {model.event_shape} but horizon_steps="
                              f"{params.horizon_steps}; use the pre-training horizon.")
        if model.cond_dim != params.cond_steps * obs_dim:
            raise ConfigError(f"the model is conditioned on {model.cond_dim} values but cond_steps * obs_dim = "
                              f"{params.cond_steps} * {obs_dim}; use the pre-training cond_steps and env.")
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


class GaussianPPO(ChunkPPO):
    """PPO with the paper's Gaussian chunk policy (the baseline DPPO is compared with).

    Args:
        obs_dim, act_dim: ``Do``, ``Da``.
        params: :class:`GaussianPPOParams`.
        device: torch device.
        policy: a pre-trained :class:`GaussianPolicy` (e.g. by ``bc_loss``) to fine-tune (copied); None builds a
            fresh one from ``params``.
    """

    policy: GaussianPolicy

    def __init__(self, obs_dim: int, act_dim: int, params: GaussianPPOParams, device: torch.device | str = "cpu",
                 policy: GaussianPolicy | None = None) -> None:
        if policy is None:
            policy = GaussianPolicy(obs_dim, act_dim, params.horizon_steps, params.cond_steps, hidden=params.hidden,
                                    residual=params.residual, activation=params.activation,
                                    std_init=params.std_init, std_min=params.std_min, std_max=params.std_max,
                                    noise_clip=params.noise_clip)
        else:
            if policy.event_shape != (params.horizon_steps, act_dim):
                raise ConfigError(f"the given policy predicts chunks {policy.event_shape} but params give "
                                  f"({params.horizon_steps}, {act_dim}).")
            policy = copy.deepcopy(policy)
        super().__init__(policy, obs_dim, params, device)

    def log_probs(self, obs: torch.Tensor, chain_x: torch.Tensor, chain_next: torch.Tensor,
                  denoise_idx: torch.Tensor) -> torch.Tensor:
        """Reduced log-probabilities ``(B,)`` of executed chunks: averaged over ``(act_steps, Da)``, THEN clamped
        to ``logprob_clamp`` (DPPO's Gaussian PPO clamps the per-sample mean; clamping elements first, as the
        diffusion chain does, would zero the gradient of most elements once the std falls below ~0.05)."""
        lp = self.policy.transition_log_prob(self._obs(obs), chain_x, chain_next, denoise_idx.long())
        lo, hi = self.p.logprob_clamp
        return lp[:, :self.p.act_steps].mean(dim=(1, 2)).clamp(lo, hi)


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
