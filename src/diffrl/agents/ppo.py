"""PPO over chunk policies with per-(env step, transition) ratios: the update DPPO, its Gaussian and GMM baselines,
plain PPO (a Gaussian policy with one-action chunks, ``diffrl train ppo``) and later chunk policies (DiffPPO's action
prior) share, the ``V(s)`` critic, the Gaussian and GMM chunk policies,
and the :class:`ChunkPolicy` protocol every chunk policy implements (Schulman et al. 2017, arXiv:1707.06347, with
DPPO's clipping and reductions, Ren et al. 2024, arXiv:2409.00588).

A chunk policy samples an action chunk from an observation history and records how it got there: a "chain" of
``S + 1`` states whose step ``i -> i + 1`` is scored transition ``i`` (DPPO: the ``K'`` fine-tuned denoising steps;
the Gaussian and GMM policies: one transition, mean -> sample). PPO re-scores every recorded transition, so the same
update serves a one-step Gaussian and a ``K'``-step denoising chain.

Shapes: ``B`` batch, ``M`` env steps of a rollout, ``S`` scored transitions per env step, ``C`` modes of the GMM,
``To`` / ``Do`` observation history length / dim, ``Ta`` / ``Da`` action chunk length / action dim (``act_steps <= Ta``
of a chunk are executed, and only those enter the log-probabilities).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden
from diffrl.agents.nets import mlp
from diffrl.agents.ppo_utils import PPOBatch
from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.diffusion.gaussian import gaussian_log_prob
from diffrl.diffusion.nets import ACTIVATIONS, PreActBlock
from diffrl.errors import ConfigError

__all__ = ["PPOParams", "GaussianPPOParams", "GMMPPOParams", "ValueCritic", "ChunkSample", "ChunkPolicy",
           "policy_module", "GaussianPolicy", "GMMPolicy", "ChunkPPO", "GaussianPPO", "GMMPPO", "residual_mlp",
           "check_optional_positive", "orthogonal_init"]

# the trunks' activations: the residual blocks take the diffusion core's; a plain MLP may also use tanh (PPO's 64x64)
MLP_ACTIVATIONS: dict[str, type[nn.Module]] = {**ACTIVATIONS, "tanh": nn.Tanh}


# ----------------------------------------------------------------------------------------------- parameters
def check_optional_positive(name: str, value: float | None) -> None:
    """A setting that is either None (off) or > 0 (one sentence otherwise)."""
    check(value is None or value > 0, name, value, "> 0 or None")


@dataclasses.dataclass(frozen=True)
class PPOParams(Params):
    """What every :class:`ChunkPPO` agent (DPPO, the Gaussian baseline) shares: chunking, the PPO objective, the
    critic and optimisers."""

    horizon_steps: int = 4
    """predicted action chunk length Ta"""
    act_steps: int = 4
    """actions of a chunk executed in the env (and kept in the log-prob), <= horizon_steps"""
    cond_steps: int = 1
    """observation history length To"""
    noise_clip: float | None = 3.0
    """clamp of the standard-normal sampling noise of the diffusion and Gaussian policies (DPPO's randn_clip_value in
    fine-tuning); the GMM samples unclipped, as DPPO's"""
    logprob_clamp: tuple[float, float] = (-5.0, 2.0)
    """clamp of log-probabilities before the ratio (DPPO): element-wise for the diffusion chain, of the per-element
    mean (or sum) for the Gaussian, of the joint log-density of the executed chunk for the GMM; (-inf, inf): none"""
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
    adam_eps: float = 1e-8
    """epsilon of both optimisers (PyTorch's default; CleanRL's and SB3's PPO use 1e-5)"""
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
    joint_grad_clip: bool = False
    """clip the norm of the actor's and the critic's gradients together, as one vector (CleanRL, SB3: one optimiser
    over both networks), instead of the actor's alone (DPPO)"""
    orthogonal_init: bool = False
    """orthogonal weights and zero biases (OpenAI baselines' PPO, CleanRL, SB3): gain sqrt(2) in hidden layers, 1 for
    the critic's output, 0.01 for a fresh Gaussian policy's mean; False: PyTorch's default init (DPPO)"""
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
        check_optional_positive("noise_clip", self.noise_clip)
        check_optional_positive("clip_vloss_coef", self.clip_vloss_coef)
        check_optional_positive("target_kl", self.target_kl)
        check_optional_positive("max_grad_norm", self.max_grad_norm)
        check_positive("adam_eps", self.adam_eps)
        check(len(self.logprob_clamp) == 2 and self.logprob_clamp[0] < self.logprob_clamp[1], "logprob_clamp",
              self.logprob_clamp, "a pair (low, high) with low < high")
        for name in ("actor_weight_decay", "critic_weight_decay", "vf_coef", "ent_coef"):
            check_non_negative(name, getattr(self, name))
        check_hidden(self.critic_hidden)
        if self.critic_residual:
            _check_residual("critic_hidden", self.critic_hidden)
        _check_activation("critic_activation", self.critic_activation, self.critic_residual)


def _check_activation(name: str, activation: str, residual: bool) -> None:
    choices = ACTIVATIONS if residual else MLP_ACTIVATIONS
    check(activation in choices, name, activation, "one of " + ", ".join(choices)
          + (" (tanh only without residual blocks)" if residual else ""))


def _check_residual(name: str, hidden: tuple[int, ...]) -> None:
    check(len(set(hidden)) == 1 and len(hidden) % 2 == 1, name, hidden,
          "an odd number of equal widths for a residual MLP (e.g. (256, 256, 256): Linear, one two-layer block, "
          "Linear), or set the residual flag to False")



@dataclasses.dataclass(frozen=True)
class GaussianPPOParams(PPOParams):
    """The paper's Gaussian baseline: tanh mean over the chunk, learnable state-independent std (brief 3). With
    one-action chunks, a linear mean head, an unbounded std, no noise or log-prob clamp and summed log-probs it is
    plain PPO's Gaussian policy (``diffrl train ppo``)."""

    hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the mean network (DPPO's Gaussian_MLP mlp_dims)"""
    residual: bool = True
    """residual mean network (equal widths, odd count) or a plain MLP"""
    activation: str = "mish"
    """activation of the mean network"""
    squash_mean: bool = True
    """tanh on the mean network's output (DPPO); False: a linear head (CleanRL, SB3)"""
    std_init: float = 0.1
    """initial std of every action dimension"""
    std_min: float = 0.01
    """lower bound of the std (0: none)"""
    std_max: float = 0.2
    """upper bound of the std (inf: none)"""
    logprob_reduction: str = "mean"
    """how element log-probs of an executed chunk become its one log-prob: mean over (act_steps, Da) (DPPO, a geometric
    mean ratio) or sum (the joint density: PPO's ratio, CleanRL, SB3)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        if self.residual:
            _check_residual("hidden", self.hidden)
        _check_activation("activation", self.activation, self.residual)
        check(self.std_min >= 0 and self.std_init > 0 and self.std_min <= self.std_init <= self.std_max, "std_init",
              self.std_init, f"> 0 and within [std_min={self.std_min}, std_max={self.std_max}] with 0 <= std_min")
        check_choice("logprob_reduction", self.logprob_reduction, ("mean", "sum"))


@dataclasses.dataclass(frozen=True)
class GMMPPOParams(PPOParams):
    """The paper's GMM baseline (DPPO's ``GMM_MLP`` with ``learn_fixed_std``, ``PPO_GMM``): ``num_modes`` tanh means
    over the chunk, a learnable state-independent std per (mode, Da), state-dependent mode weights. Defaults: the
    Gaussian's network (= DPPO's robomimic can/lift GMM configs: [512] * 3 residual, Mish; square/transport use
    [1024] * 3), 5 modes, std 0.1 in [0.01, 0.2]."""

    noise_clip: float | None = None
    """must stay None: DPPO samples its mixture unclipped (``MixtureSameFamily.sample``)"""
    hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the mean network and of the mode-weight network (two networks, as DPPO's mlp_mean and
    mlp_weights)"""
    residual: bool = True
    """residual networks (equal widths, odd count) or plain MLPs"""
    activation: str = "mish"
    """activation of both networks"""
    num_modes: int = 5
    """mixture components C (DPPO: 5)"""
    std_init: float = 0.1
    """initial std of every (mode, action dimension)"""
    std_min: float = 0.01
    """lower bound of the std"""
    std_max: float = 0.2
    """upper bound of the std"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.noise_clip is None, "noise_clip", self.noise_clip, "None for the GMM policy (DPPO samples its "
              "mixture unclipped)")
        check_hidden(self.hidden)
        if self.residual:
            _check_residual("hidden", self.hidden)
        _check_activation("activation", self.activation, self.residual)
        check_positive("num_modes", self.num_modes)
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
                                                                              MLP_ACTIVATIONS[activation])


@torch.no_grad()
def orthogonal_init(net: nn.Module, head_gain: float, hidden_gain: float = math.sqrt(2)) -> None:
    """Orthogonal weights and zero biases for every ``nn.Linear`` of ``net``: ``hidden_gain`` for all but the last,
    ``head_gain`` for the last (OpenAI baselines' PPO ``ortho_init``, CleanRL's ``layer_init``, SB3's ``ortho_init``:
    sqrt(2) hidden, 0.01 policy head, 1 value head)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(layers):
        nn.init.orthogonal_(layer.weight, head_gain if i == len(layers) - 1 else hidden_gain)
        nn.init.zeros_(layer.bias)


class ValueCritic(nn.Module):
    """``V(s)`` of the flattened observation history: ``(B, To, Do) -> (B,)`` (DPPO's ``CriticObs``)."""

    def __init__(self, obs_dim: int, cond_steps: int, hidden: Sequence[int], residual: bool = True,
                 activation: str = "mish") -> None:
        super().__init__()
        self.net = _trunk(obs_dim * cond_steps, hidden, 1, residual, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.flatten(1)).squeeze(-1)


# ------------------------------------------------------------------------------------------- chunk policies
class ChunkSample(NamedTuple):
    """What a chunk policy's :meth:`ChunkPolicy.sample` returns."""

    action: torch.Tensor             # (B, Ta, Da) action chunks, in the units of the policy's data
    chain: torch.Tensor | None       # (B, S + 1, Ta, Da) recorded chain (None when deterministic)


class ChunkPolicy(Protocol):
    """What :class:`ChunkPPO`, the on-policy loop and evaluation need from a chunk policy (a ``torch.nn.Module``).

    Implemented by :class:`GaussianPolicy`, :class:`GMMPolicy` (``S = 1``) and
    :class:`~diffrl.agents.dppo.DiffusionPolicy` (``S = K'``); DiffPPO's diffusion action prior (a one-action chunk)
    implements the same five members and gets the PPO update, the rollout and the evaluation for free.
    """

    @property
    def event_shape(self) -> tuple[int, ...]:
        """``(Ta, Da)``, the shape of one action chunk."""
        ...

    @property
    def num_transitions(self) -> int:
        """``S``, the transitions of a recorded chain that PPO scores per env step."""
        ...

    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Action chunks for histories ``obs (B, To, Do)``; the chain only when not ``deterministic`` (a training
        rollout). ``deterministic`` is the policy's evaluation sampling; ``mean_path`` (with ``deterministic``)
        a policy's noise-free alternative where it has one."""
        ...

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        """Log-probability of recorded transitions ``x -> x_next`` with indices ``idx (B,)`` in ``[0, S)``, under the
        current weights (differentiable): element-wise ``(B, Ta, Da)`` where the policy factors over elements
        (diffusion, Gaussian), one joint value ``(B,)`` per transition where it does not (GMM); the agent's
        ``log_probs`` reduces it."""
        ...

    def entropy(self) -> torch.Tensor | None:
        """A differentiable entropy for the bonus ``ent_coef``, or None where it has no gradient (a state-dependent
        one, the GMM's, takes the histories and is called through the agent's :meth:`ChunkPPO.entropy`)."""
        ...


def policy_module(policy: ChunkPolicy) -> nn.Module:
    """The ``torch.nn.Module`` a chunk policy is (its parameters, device and train/eval mode)."""
    if not isinstance(policy, nn.Module):
        raise TypeError(f"a chunk policy must be a torch.nn.Module, got a {type(policy).__name__}.")
    return policy


def grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of ``params`` that exist (what ``clip_grad_norm_`` measures)."""
    return [p.grad for p in params if p.grad is not None]


class GaussianPolicy(nn.Module):
    """The paper's Gaussian chunk policy: ``N(tanh(MLP(s)), std^2)`` over ``(Ta, Da)``, learnable std per ``Da``.

    The std is initialised at ``std_init`` and kept in ``[std_min, std_max]`` (DPPO's ``Gaussian_MLP`` with
    ``learn_fixed_std``: 0.1 in [0.01, 0.2]). It is a one-transition "chain": ``sample`` records ``(B, 2, Ta, Da)``
    with the mean at index 0 (informative only; log-probs use the current mean) and the sample at index 1.
    ``squash_mean=False``, ``std_min=0``, ``std_max=inf`` and ``noise_clip=None`` give plain PPO's policy (a linear mean
    head, an unbounded state-independent log-std, unclipped samples; the env clips actions to its bounds).
    """

    def __init__(self, obs_dim: int, act_dim: int, horizon_steps: int, cond_steps: int = 1, *,
                 hidden: Sequence[int] = (512, 512, 512), residual: bool = True, activation: str = "mish",
                 std_init: float = 0.1, std_min: float = 0.01, std_max: float = 0.2,
                 noise_clip: float | None = 3.0, squash_mean: bool = True) -> None:
        super().__init__()
        self.event_shape = (horizon_steps, act_dim)
        self.mean_net = _trunk(obs_dim * cond_steps, hidden, horizon_steps * act_dim, residual, activation)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(std_init)))
        self.log_std_min = math.log(std_min) if std_min > 0 else -math.inf
        self.log_std_max = math.log(std_max)  # inf for std_max = inf
        self.noise_clip = noise_clip
        self.squash_mean = squash_mean

    @property
    def num_transitions(self) -> int:
        """One scored transition per env step: mean -> sample."""
        return 1

    def std(self) -> torch.Tensor:
        """``(Da,)``, clamped to ``[std_min, std_max]``."""
        return self.log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Mean chunk ``(B, Ta, Da)`` (in [-1, 1] with ``squash_mean``)."""
        mean = self.mean_net(obs.flatten(1))
        return (torch.tanh(mean) if self.squash_mean else mean).view(-1, *self.event_shape)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Chunks ``(B, Ta, Da)`` (the mean when deterministic, whatever ``mean_path``) and, when sampling, the
        chain ``(B, 2, Ta, Da)``."""
        mean = self(obs)
        if deterministic:
            return ChunkSample(mean, None)
        z = torch.randn(mean.shape, generator=generator, device=mean.device)
        if self.noise_clip is not None:  # DPPO's randn_clip_value (3 in its fine-tuning configs)
            z = z.clamp(-self.noise_clip, self.noise_clip)
        action = mean + self.std() * z
        return ChunkSample(action, torch.stack([mean, action], dim=1))

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        """Element-wise ``log N(x_next; mean(s), std^2)``, ``(B, Ta, Da)`` (``x`` and ``idx`` unused)."""
        return gaussian_log_prob(x_next, self(obs), self.std().expand(*x_next.shape))

    def entropy(self) -> torch.Tensor:
        """Mean per-dimension entropy of the Gaussian."""
        return (0.5 + 0.5 * math.log(2 * math.pi) + self.std().log()).mean()

    def log_prob(self, obs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Joint log-density ``(B,)`` of given chunks ``(B, Ta, Da)`` under the policy at histories ``(B, To, Do)``
        (summed over elements; differentiable in the mean network and the std). DiffPPO's auxiliary NLL."""
        return gaussian_log_prob(chunk, self(obs), self.std().expand(*chunk.shape)).sum(dim=(1, 2))

    def bc_loss(self, obs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Behaviour-cloning NLL of dataset chunks ``(B, Ta, Da)`` given histories ``(B, To, Do)``, mean over
        elements. The std is held fixed (DPPO pre-trains its Gaussian with a fixed std of 0.1), so this trains
        the mean and leaves the std at its initial value for fine-tuning."""
        return -gaussian_log_prob(chunk, self(obs), self.std().detach().expand(*chunk.shape)).mean()


class GMMPolicy(nn.Module):
    """The paper's GMM chunk policy: a mixture of ``C`` diagonal Gaussians over the flattened chunk ``Ta * Da``,
    ``MixtureSameFamily(Categorical(logits(s)), Independent(Normal(tanh(mean_c(s)), std_c)))`` (DPPO's ``GMM_MLP`` +
    ``GMMModel``, the baseline of its Figure 5).

    Two networks of the same architecture give the ``C`` means ``(B, C, Ta, Da)`` (tanh-squashed) and the mode
    logits ``(B, C)``. The std is learnable per (mode, Da), shared over the ``Ta`` steps of the chunk, initialised at
    ``std_init`` and kept in ``[std_min, std_max]`` (DPPO's ``learn_fixed_std``: 0.1 in [0.01, 0.2]). A one-transition
    "chain" as :class:`GaussianPolicy`: ``sample`` records ``(B, 2, Ta, Da)``, the drawn mode's mean at index 0
    (informative only) and the sample at index 1. The log-density does not factor over elements:
    :meth:`transition_log_prob` is the joint ``(B,)`` (DPPO: ``dist.log_prob`` of the chunk, not averaged).
    """

    def __init__(self, obs_dim: int, act_dim: int, horizon_steps: int, cond_steps: int = 1, *, num_modes: int = 5,
                 hidden: Sequence[int] = (512, 512, 512), residual: bool = True, activation: str = "mish",
                 std_init: float = 0.1, std_min: float = 0.01, std_max: float = 0.2) -> None:
        super().__init__()
        self.event_shape = (horizon_steps, act_dim)
        self.num_modes = num_modes
        d_in = obs_dim * cond_steps
        self.mean_net = _trunk(d_in, hidden, num_modes * horizon_steps * act_dim, residual, activation)
        self.logit_net = _trunk(d_in, hidden, num_modes, residual, activation)  # DPPO's mlp_weights
        self.log_std = nn.Parameter(torch.full((num_modes, act_dim), math.log(std_init)))
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)

    @property
    def num_transitions(self) -> int:
        """One scored transition per env step: mode mean -> sample."""
        return 1

    def std(self) -> torch.Tensor:
        """``(C, Da)``, clamped to ``[std_min, std_max]``."""
        return self.log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Unnormalised mode log-weights ``(B, C)`` of histories ``(B, To, Do)``."""
        return self.logit_net(obs.flatten(1))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mode means ``(B, C, Ta, Da)`` in [-1, 1] and mode logits ``(B, C)``."""
        flat = obs.flatten(1)
        means = torch.tanh(self.mean_net(flat)).view(-1, self.num_modes, *self.event_shape)
        return means, self.logit_net(flat)

    def _log_prob(self, obs: torch.Tensor, chunk: torch.Tensor, std: torch.Tensor,
                  steps: int | None) -> torch.Tensor:
        """``log sum_c w_c(s) prod_{t < steps, d} N(chunk_td; mean_ctd(s), std_cd^2)``, ``(B,)``."""
        means, logits = self(obs)                                       # (B, C, Ta, Da), (B, C)
        steps = self.event_shape[0] if steps is None else steps
        x = chunk[:, None, :steps]                                      # (B, 1, steps, Da)
        comp = gaussian_log_prob(x, means[:, :, :steps], std[None, :, None, :]).sum(dim=(2, 3))  # (B, C)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1) + comp, dim=-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Chunks ``(B, Ta, Da)`` and, when sampling, the chain ``(B, 2, Ta, Da)``: a mode ``c ~ Categorical(w(s))``,
        then ``mean_c + std_c * z``, unclipped (DPPO's ``MixtureSameFamily.sample``).

        ``deterministic`` (evaluation): the mean of a mode drawn by weight, as DPPO's deterministic GMM (its std
        1e-4 noise left out); with ``mean_path``, the mean of the most likely mode instead (no randomness at all).
        """
        means, logits = self(obs)                                       # (B, C, Ta, Da), (B, C)
        rows = torch.arange(len(means), device=means.device)
        if deterministic and mean_path:
            return ChunkSample(means[rows, logits.argmax(dim=-1)], None)
        mode = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)  # (B,)
        mean = means[rows, mode]                                        # (B, Ta, Da)
        if deterministic:
            return ChunkSample(mean, None)
        z = torch.randn(mean.shape, generator=generator, device=mean.device)
        action = mean + self.std()[mode].unsqueeze(1) * z               # std (B, 1, Da) over the Ta steps
        return ChunkSample(action, torch.stack([mean, action], dim=1))

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Joint log-density ``(B,)`` of the chunks ``x_next`` under the mixture, marginal over the first ``steps``
        actions (all ``Ta`` when None; a mixture's marginal keeps its weights). ``x`` and ``idx`` unused."""
        return self._log_prob(obs, x_next, self.std(), steps)

    def entropy(self, obs: torch.Tensor | None = None) -> torch.Tensor:
        """DPPO's approximate entropy ``mean_B sum_c w_c(s) H_c`` of histories ``obs (B, To, Do)``, with ``H_c`` the
        joint entropy of mode ``c`` over the chunk's ``Ta * Da`` elements. A lower bound of the mixture's entropy
        (concavity); with well-separated modes that entropy is this plus the weights' own entropy ``H(w)``."""
        if obs is None:
            raise ValueError("the GMM policy's entropy weights its modes per state: pass the histories obs.")
        h = self.event_shape[0] * (0.5 + 0.5 * math.log(2 * math.pi) + self.std().log()).sum(-1)  # (C,)
        return (torch.softmax(self.logits(obs), dim=-1) * h).sum(-1).mean()

    def bc_loss(self, obs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Behaviour-cloning NLL of dataset chunks ``(B, Ta, Da)`` given histories ``(B, To, Do)``: minus the joint
        log-density of the whole chunk, mean over the batch (DPPO's ``GMMModel.loss``). The std is held fixed (DPPO
        pre-trains with a fixed std of 0.1), so this trains the means and the mode weights."""
        return -self._log_prob(obs, chunk, self.std().detach(), None).mean()


# ---------------------------------------------------------------------------------------------------- agents
class ChunkPPO(Agent):
    """PPO on a :class:`ChunkPolicy` with per-(env step, transition) ratios: the update DPPO and its Gaussian
    baseline share (paper eq. 4.2 with DPPO's clipping, discounting and reductions, brief section 8.4).

    The on-policy loop (:mod:`diffrl.pipelines.onpolicy`) drives every chunk policy identically: ``sample`` for
    rollouts (chunks + chains ``(N, S + 1, Ta, Da)``), ``values`` and ``chain_log_probs`` after the rollout, then
    ``update`` on :func:`~diffrl.agents.ppo_utils.ppo_minibatches`, stopping an epoch when ``should_stop(metrics)``.
    Subclasses set the reductions: ``log_probs``, ``clip_coef`` and ``denoising_discount``.

    Args:
        policy: the chunk policy to fine-tune (moved to ``device``; its trainable parameters form the actor).
        obs_dim: ``Do``.
        params: :class:`PPOParams`.
        device: torch device.
    """

    policy: ChunkPolicy

    def __init__(self, policy: ChunkPolicy, obs_dim: int, params: PPOParams,
                 device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        self.obs_dim = int(obs_dim)
        module = policy_module(policy).to(self.device)
        self.policy = policy
        self.critic = ValueCritic(obs_dim, params.cond_steps, params.critic_hidden, params.critic_residual,
                                  params.critic_activation).to(self.device)
        if params.orthogonal_init:
            orthogonal_init(self.critic, head_gain=1.0)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_params = [p for p in module.parameters() if p.requires_grad]
        self.critic_params = list(self.critic.parameters())
        # AdamW with weight decay 0 is Adam; two optimisers at one lr and eps step exactly as one over both (PPO's)
        self.actor_opt = torch.optim.AdamW(self.actor_params, lr=params.actor_lr, eps=params.adam_eps,
                                           weight_decay=params.actor_weight_decay, **fused)
        self.critic_opt = torch.optim.AdamW(self.critic_params, lr=params.critic_lr, eps=params.adam_eps,
                                            weight_decay=params.critic_weight_decay, **fused)
        self.nets = {"policy": module, "critic": self.critic}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.num_updates = 0  # update() calls
        self.num_actor_updates = 0  # of which stepped the actor (not critic_only)
        # a system's extra actor loss per minibatch, ``batch -> (loss, detached metrics)``, added to the PPO loss
        # before the one backward (DiffPPO's auxiliary proposal NLL and KL to its prior); None: plain PPO
        self.extra_loss: Callable[[PPOBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None

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
               generator: torch.Generator | None = None, mean_path: bool = False) -> ChunkSample:
        """:meth:`ChunkPolicy.sample` of histories ``(B, To, Do)`` (or ``(B, Do)`` with ``To = 1``): chunks
        ``(B, Ta, Da)`` and (when not deterministic) chains ``(B, S + 1, Ta, Da)``; a rollout step."""
        return self.policy.sample(self._obs(obs), deterministic, generator, mean_path)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The agent contract: action chunks ``(B, Ta, Da)`` (normalised units) for histories ``(B, To, Do)``."""
        return self.sample(obs, deterministic).action.cpu().numpy()

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

    def entropy(self, obs: torch.Tensor) -> torch.Tensor | None:
        """The policy's differentiable entropy for the bonus on a minibatch of histories ``obs`` (state-independent
        here, the policy's own :meth:`ChunkPolicy.entropy`; the GMM weights its modes per state)."""
        return self.policy.entropy()

    def clip_coef(self, i: torch.Tensor) -> torch.Tensor:
        """PPO clip coefficient of transition ``i`` (constant here; DPPO schedules it)."""
        return torch.full(i.shape, self.p.clip_ploss_coef, device=i.device)

    def denoising_discount(self, i: torch.Tensor) -> torch.Tensor:
        """Advantage scale of transition ``i`` (1 here; DPPO discounts earlier denoising steps)."""
        return torch.ones(i.shape, device=i.device)

    def scaled_advantages(self, advantages: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Raw advantages ``(B,)`` normalised per minibatch (``norm_adv``), then scaled by the denoising discount of
        transitions ``idx`` (after normalisation, as DPPO)."""
        adv = advantages
        if self.p.norm_adv and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # per minibatch (DPPO, CleanRL)
        return adv * self.denoising_discount(idx)

    def policy_loss(self, new_lp: torch.Tensor, old_lp: torch.Tensor, advantages: torch.Tensor,
                    idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO's clipped surrogate ``mean(max(-A r, -A clip(r, 1 - c, 1 + c)))`` and the ratio ``r`` and clip
        coefficient ``c``, both ``(B,)``. ``new_lp`` / ``old_lp``: log-probs ``(B,)`` of :meth:`log_probs`;
        ``advantages``: raw (:meth:`scaled_advantages` here). Subclasses swap the loss here (DPOER)."""
        ratio = (new_lp - old_lp).exp()
        adv = self.scaled_advantages(advantages, idx)
        clip = self.clip_coef(idx)
        return torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean(), ratio, clip

    # -------------------------------------------------------------------------------------------- update
    def update(self, batch: PPOBatch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """One PPO step on a minibatch: ``pg_loss + vf_coef * v_loss`` (``- ent_coef * entropy``), one backward,
        the actor and critic AdamW steps; ``pg_loss`` is :meth:`policy_loss`'s. ``critic_only`` (critic warm-up
        iterations): the actor is not stepped.

        Returns detached metrics: ``pg_loss, v_loss, entropy, approx_kl, clipfrac, ratio_mean, ratio_min,
        ratio_max, value_mean, adv_mean, clip_coef_mean, actor_grad_norm, critic_grad_norm``.
        """
        p = self.p
        idx = batch.denoise_idx.long()
        with torch.set_grad_enabled(not critic_only):
            new_lp = self.log_probs(batch.obs, batch.chain_x, batch.chain_next, idx)
            entropy = self.entropy(batch.obs)
        pg_loss, ratio, clip = self.policy_loss(new_lp, batch.old_log_prob, batch.advantages, idx)
        log_ratio = (new_lp - batch.old_log_prob).detach()

        values = self.critic(self._obs(batch.obs))
        if p.clip_vloss_coef is not None:
            clipped = batch.old_values + (values - batch.old_values).clamp(-p.clip_vloss_coef, p.clip_vloss_coef)
            v_loss = 0.5 * torch.max((values - batch.returns) ** 2, (clipped - batch.returns) ** 2).mean()
        else:
            v_loss = 0.5 * ((values - batch.returns) ** 2).mean()

        loss = p.vf_coef * v_loss
        extra_metrics: dict[str, torch.Tensor] = {}
        if not critic_only:
            loss = loss + pg_loss
            if entropy is not None and p.ent_coef > 0:
                loss = loss - p.ent_coef * entropy
            if self.extra_loss is not None:
                extra, extra_metrics = self.extra_loss(batch)
                loss = loss + extra
        for param in (*self.actor_params, *self.critic_params):  # zero_grad(set_to_none=True), without its overhead
            param.grad = None
        loss.backward()
        actor_grads = grads(self.actor_params) if not critic_only else []
        critic_grads = grads(self.critic_params)
        # every gradient tensor's norm in one foreach call; a network's norm is the norm of its tensors' norms (as
        # nn.utils.get_total_norm computes it)
        norms = torch._foreach_norm([*actor_grads, *critic_grads]) if actor_grads or critic_grads else []
        actor_part, critic_part = norms[:len(actor_grads)], norms[len(actor_grads):]
        zero = torch.zeros((), device=self.device)
        actor_norm = torch.linalg.vector_norm(torch.stack(actor_part)) if actor_part else zero
        critic_norm = torch.linalg.vector_norm(torch.stack(critic_part)) if critic_part else zero
        if p.max_grad_norm is not None:  # scaled as nn.utils.clip_grads_with_norm_ does
            if p.joint_grad_clip:  # one norm over both networks (CleanRL, SB3); the metrics keep the two before it
                both = torch.stack([actor_norm, critic_norm])
                clipped, total = actor_grads + critic_grads, torch.linalg.vector_norm(both)
            else:  # DPPO: the actor's alone
                clipped, total = actor_grads, actor_norm
            if clipped:
                torch._foreach_mul_(clipped, torch.clamp(p.max_grad_norm / (total + 1e-6), max=1.0))
        if not critic_only:
            self.actor_opt.step()
            self.num_actor_updates += 1
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
                    "actor_grad_norm": actor_norm.detach(), "critic_grad_norm": critic_norm.detach(),
                    **extra_metrics}

    def should_stop(self, metrics: dict[str, torch.Tensor]) -> bool:
        """True when ``approx_kl`` exceeds ``target_kl``: end the epoch (checked after the step, as DPPO)."""
        return self.p.target_kl is not None and float(metrics["approx_kl"]) > self.p.target_kl

    def set_lr_fraction(self, fraction: float) -> None:
        """Set both learning rates to ``fraction`` of ``actor_lr`` / ``critic_lr`` (PPO's linear annealing to 0)."""
        for opt, lr in ((self.actor_opt, self.p.actor_lr), (self.critic_opt, self.p.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = fraction * lr

    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_actor_updates": self.num_actor_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_actor_updates = int(state["num_actor_updates"])


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
                                    noise_clip=params.noise_clip, squash_mean=params.squash_mean)
            if params.orthogonal_init:
                orthogonal_init(policy.mean_net, head_gain=0.01)  # a near-zero initial mean (baselines, CleanRL)
        else:
            if policy.event_shape != (params.horizon_steps, act_dim):
                raise ConfigError(f"the given policy predicts chunks {policy.event_shape} but params give "
                                  f"({params.horizon_steps}, {act_dim}).")
            policy = copy.deepcopy(policy)
        super().__init__(policy, obs_dim, params, device)

    def log_probs(self, obs: torch.Tensor, chain_x: torch.Tensor, chain_next: torch.Tensor,
                  denoise_idx: torch.Tensor) -> torch.Tensor:
        """Reduced log-probabilities ``(B,)`` of executed chunks: averaged (or, ``logprob_reduction="sum"``, summed:
        plain PPO's joint log-density) over ``(act_steps, Da)``, THEN clamped to ``logprob_clamp`` (DPPO's Gaussian PPO
        clamps the per-sample mean; clamping elements first, as the diffusion chain does, would zero the gradient of
        most elements once the std falls below ~0.05)."""
        lp = self.policy.transition_log_prob(self._obs(obs), chain_x, chain_next, denoise_idx.long())
        lo, hi = self.p.logprob_clamp
        executed = lp[:, :self.p.act_steps]
        reduced = executed.sum(dim=(1, 2)) if self.p.logprob_reduction == "sum" else executed.mean(dim=(1, 2))
        return reduced.clamp(lo, hi)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        """The bonus's entropy, reduced as the log-probs: per element (mean), or of the whole executed chunk (sum:
        ``act_steps * Da`` elements, CleanRL's ``entropy().sum(1)``)."""
        h = self.policy.entropy()
        return h * (self.p.act_steps * self.policy.event_shape[1]) if self.p.logprob_reduction == "sum" else h


class GMMPPO(ChunkPPO):
    """PPO with the paper's GMM chunk policy (DPPO's ``PPO_GMM``, the GMM baseline of its Figure 5).

    What differs from :class:`GaussianPPO` is the reduction: the ratio is of JOINT densities, one log-probability
    per env step (the mixture's log-density of the executed chunk, not a per-element mean), clamped to
    ``logprob_clamp`` as DPPO clamps both the new and the old joint log-probs before the ratio; and the entropy bonus
    weights each mode's entropy by the mode's weight in that state.

    With DPPO's clamp (-5, 2) the joint saturates: at std 0.1 each element adds up to ``-log 0.1 - 0.92 = 1.38``
    nats, so a sample from its own mode of a ``Ta * Da = 12`` chunk (Hopper) has a log-density near 10 and sits on
    the upper bound, where new and old are both 2: ratio 1 and no gradient. Only samples in the density's tails
    move the policy (log-density in [-5, 2]: 0.4% of a dominant mode's samples, 1.1% with 5 equal, separated
    modes). This is the reference's behaviour, kept as the default (the metric ``logprob_clamped_frac`` shows it);
    widen ``logprob_clamp`` to let every sample count.

    Args:
        obs_dim, act_dim: ``Do``, ``Da``.
        params: :class:`GMMPPOParams`.
        device: torch device.
        policy: a pre-trained :class:`GMMPolicy` (e.g. by ``bc_loss``) to fine-tune (copied); None builds a fresh one
            from ``params``.
    """

    policy: GMMPolicy

    def __init__(self, obs_dim: int, act_dim: int, params: GMMPPOParams, device: torch.device | str = "cpu",
                 policy: GMMPolicy | None = None) -> None:
        if policy is None:
            policy = GMMPolicy(obs_dim, act_dim, params.horizon_steps, params.cond_steps, num_modes=params.num_modes,
                               hidden=params.hidden, residual=params.residual, activation=params.activation,
                               std_init=params.std_init, std_min=params.std_min, std_max=params.std_max)
        else:
            if policy.event_shape != (params.horizon_steps, act_dim) or policy.num_modes != params.num_modes:
                raise ConfigError(f"the given policy predicts chunks {policy.event_shape} with {policy.num_modes} "
                                  f"modes but params give ({params.horizon_steps}, {act_dim}) with "
                                  f"{params.num_modes}.")
            policy = copy.deepcopy(policy)
        super().__init__(policy, obs_dim, params, device)

    def log_probs(self, obs: torch.Tensor, chain_x: torch.Tensor, chain_next: torch.Tensor,
                  denoise_idx: torch.Tensor) -> torch.Tensor:
        """Joint log-densities ``(B,)`` of the executed chunks (the mixture's marginal over the first ``act_steps``
        actions; DPPO scores the whole chunk, the same thing when ``act_steps = Ta`` as in all its GMM configs),
        clamped to ``logprob_clamp`` (DPPO's ``PPO_GMM.loss``)."""
        lp = self.policy.transition_log_prob(self._obs(obs), chain_x, chain_next, denoise_idx.long(),
                                             steps=self.p.act_steps)
        lo, hi = self.p.logprob_clamp
        return lp.clamp(lo, hi)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        """DPPO's approximate mixture entropy ``sum_c w_c(s) H_c``, averaged over the minibatch's histories."""
        return self.policy.entropy(self._obs(obs))

    def update(self, batch: PPOBatch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`ChunkPPO.update`, plus ``logprob_clamped_frac``: the share of the minibatch whose old joint
        log-prob sits on a bound of ``logprob_clamp`` (those samples give no gradient while the new one does too)."""
        metrics = super().update(batch, critic_only)
        lo, hi = self.p.logprob_clamp
        old = batch.old_log_prob
        metrics["logprob_clamped_frac"] = ((old <= lo) | (old >= hi)).float().mean()
        return metrics
