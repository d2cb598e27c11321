"""Reward- and advantage-weighted regression of a diffusion chunk policy: DPPO's DRWR and DAWR fine-tuning baselines
(Ren et al. 2024, arXiv:2409.00588; RWR: Peters & Schaal 2007; AWR: Peng et al. 2019,
arXiv:1910.00177).

Both fine-tune EVERY denoising step of a pre-trained DDPM with its own denoising loss on the chunks it sampled in the
env, each chunk weighted by how well it turned out. The loss is the diffusion core's weighted loss
(:meth:`~diffrl.diffusion.models.DiffusionModel.loss` with ``weights``): ``mean_i w_i l_i``, ``l_i`` chunk ``i``'s
epsilon MSE averaged over ``(Ta, Da)`` at one ``t ~ U[0, K)`` (DPPO's ``RWRDiffusion.p_losses``). The weights:

- DRWR (:func:`returns_to_go`, :func:`rwr_weights`): the discounted return-to-go ``G`` of each chunk whose episode
  finished within the iteration, ``z = (G - mean) / (std + 1e-3)`` over the iteration, ``w = min(exp(beta z), w_max)``;
- DAWR (:func:`td_lambda_targets`, :func:`awr_weights`): a critic ``V(s)`` fitted to TD(lambda) targets
  ``y = V + alpha GAE(lambda)`` over a FIFO buffer of recent chunk transitions, the advantage ``A = y - V`` z-scored
  per batch, ``w = min(exp(beta z), w_max)``.

As the reference (irom-princeton/dppo ``model/diffusion/diffusion_{rwr,awr}.py``,
``agent/finetune/train_{rwr,awr}_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_{rwr,awr}_diffusion_mlp.yaml``),
except where it is wrong; each correction is commented where it is made:

- DRWR keeps the chunks of an episode that began in the previous iteration and of one-chunk episodes (their returns
  are complete); the reference keeps only episodes that start AND end within the iteration and are longer than one
  chunk (a side effect of the code that splits episodes for its reward log);
- DAWR's critic loss is the per-sample ``mean (V(s_i) - y_i)^2``; the reference subtracts ``(B,)`` targets from
  ``(B, 1)`` values, which broadcasts to ``(B, B)`` and regresses every ``V(s_i)`` to the batch's mean target;
- DAWR's critic batches are drawn from the whole buffer; the reference draws indices below the number of VECTOR
  steps into the ``(step, env)``-flattened transitions, so its critic only ever sees the oldest ``1 / n_envs`` of
  the buffer (its actor batches are drawn right);
- DAWR bootstraps from ``V`` of the true next history: at a time limit the final history, with the recursion stopped
  there (the reference takes ``V`` of the next episode's first state and runs on into that episode), and at the
  newest transition the history reached (the reference takes ``V`` of that transition's own state); ``gamma`` is the
  configured one (the reference's ``td_values`` call keeps its default 0.99, the value of every config).

Shapes: ``B`` batch, ``T`` chunk steps per env, ``N`` envs, ``K`` denoising steps, ``To`` / ``Do`` observation
history length / dim, ``Ta`` / ``Da`` chunk length / action dim (``act_steps <= Ta`` of a chunk are executed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden
from diffrl.agents.dppo import DiffusionPolicy, check_chunk_model
from diffrl.agents.ppo import ChunkSample, ValueCritic, check_optional_positive
from diffrl.agents.ppo_utils import gae
from diffrl.config import check, check_choice, check_non_negative, check_positive, check_unit_interval
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ACTIVATIONS

__all__ = ["RegressionParams", "RWRParams", "AWRParams", "WeightedRegression", "DRWR", "DAWR", "returns_to_go",
           "rwr_weights", "awr_weights", "td_lambda_targets", "RWR_STD_EPS", "AWR_STD_EPS"]

RWR_STD_EPS = 1e-3
"""added to the std of the iteration's returns-to-go before z-scoring (DRWR, the reference)"""
AWR_STD_EPS = 1e-6
"""added to the std of a batch's advantages before z-scoring (DAWR, the reference)"""


# ----------------------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class RegressionParams(Params):
    """What DRWR and DAWR share (defaults: DPPO's Gym Hopper configs ``ft_{rwr,awr}_diffusion_mlp.yaml``)."""

    horizon_steps: int = 4
    """Ta, the predicted chunk length (must match the model)"""
    act_steps: int = 4
    """actions of a chunk executed in the env (the whole chunk is regressed)"""
    cond_steps: int = 1
    """To, the observation history length"""
    gamma: float = 0.99
    """discount per executed chunk (train.gamma)"""
    beta: float = 10.0
    """inverse temperature of the weights exp(beta z) (train.beta)"""
    max_weight: float = 100.0
    """upper clip of the weights (train.max_reward_weight / train.max_adv_weight)"""
    actor_lr: float = 1e-4
    """learning rate of the diffusion network (AdamW; train.lr / train.actor_lr; the reference's cosine-warmup
    schedule has min_lr = lr: constant)"""
    actor_weight_decay: float = 0.0
    """AdamW weight decay of the diffusion network (train.weight_decay / train.actor_weight_decay)"""
    max_grad_norm: float | None = None
    """clip of the diffusion network's gradient norm (None: off, the reference's default)"""
    batch_size: int = 1000
    """chunks per gradient step (train.batch_size)"""
    min_sampling_std: float = 0.1
    """std floor of every transition of the rollout chains (model.min_sampling_denoising_std)"""
    noise_clip: float | None = 3.0
    """clamp of the chains' standard-normal noise (model.randn_clip_value)"""
    clip_x0: float | None = 1.0
    """clamp of the predicted clean chunk (DiffusionModel's denoised_clip_value default)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon_steps", "act_steps", "cond_steps", "beta", "max_weight", "actor_lr",
                     "min_sampling_std"):
            check_positive(name, getattr(self, name))
        check(self.act_steps <= self.horizon_steps, "act_steps", self.act_steps,
              f"<= horizon_steps={self.horizon_steps}")
        check_unit_interval("gamma", self.gamma)
        check_non_negative("actor_weight_decay", self.actor_weight_decay)
        for name in ("max_grad_norm", "noise_clip", "clip_x0"):
            check_optional_positive(name, getattr(self, name))
        # per-batch z-scoring (DAWR) needs two samples; DRWR's minibatches are no smaller
        check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")


@dataclasses.dataclass(frozen=True)
class RWRParams(RegressionParams):
    """DRWR (defaults: DPPO's ``cfg/gym/finetune/hopper-v2/ft_rwr_diffusion_mlp.yaml``)."""

    update_epochs: int = 16
    """epochs of minibatches over each iteration's finished chunks (train.update_epochs)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("update_epochs", self.update_epochs)


@dataclasses.dataclass(frozen=True)
class AWRParams(RegressionParams):
    """DAWR (defaults: DPPO's ``cfg/gym/finetune/hopper-v2/ft_awr_diffusion_mlp.yaml`` and ``td_values``)."""

    critic_lr: float = 1e-3
    """critic learning rate (AdamW; train.critic_lr, constant as actor_lr)"""
    critic_weight_decay: float = 0.0
    """AdamW weight decay of the critic (train.critic_weight_decay)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of V(s) (CriticObs mlp_dims)"""
    critic_residual: bool = True
    """residual critic (CriticObs residual_style: True; spelt right there, unlike CriticObsAct's)"""
    critic_activation: str = "mish"
    """activation of the critic (Mish)"""
    buffer_steps: int = 5000
    """vector steps kept in the FIFO buffer, each n_envs chunk transitions (train.buffer_size, a deque of vector
    steps: 5000 x 40 envs = 200k transitions, the last 10 iterations of 500 steps)"""
    scale_reward_factor: float = 0.01
    """factor on the chunk rewards stored in the buffer (train.scale_reward_factor)"""
    replay_ratio: float = 64.0
    """actor steps per iteration = int(n_steps * n_envs / batch_size * replay_ratio) (train.replay_ratio)"""
    critic_update_ratio: int = 4
    """critic steps per iteration = actor steps // critic_update_ratio (train.critic_update_ratio)"""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) targets (td_values' lam)"""
    td_alpha: float = 0.95
    """step of the targets toward the lambda-return, y = V + alpha GAE (td_values' alpha)"""
    n_critic_warmup_itr: int = 0
    """first iterations that train only the critic (train.n_critic_warmup_itr)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("critic_lr", "buffer_steps", "scale_reward_factor", "replay_ratio", "critic_update_ratio"):
            check_positive(name, getattr(self, name))
        check_non_negative("critic_weight_decay", self.critic_weight_decay)
        check_non_negative("n_critic_warmup_itr", self.n_critic_warmup_itr)
        check(0.0 <= self.td_lambda <= 1.0, "td_lambda", self.td_lambda, "in [0, 1]")
        check_unit_interval("td_alpha", self.td_alpha)
        check_hidden(self.critic_hidden)
        if self.critic_residual:
            check(len(set(self.critic_hidden)) == 1 and len(self.critic_hidden) % 2 == 1, "critic_hidden",
                  self.critic_hidden, "an odd number of equal widths for a residual critic (e.g. 256 256 256)")
        check_choice("critic_activation", self.critic_activation, ACTIVATIONS)


# ------------------------------------------------------------------------------------------------ weights
def exp_weights(z: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """``min(exp(beta z), max_weight)`` (an overflow to inf is clipped too)."""
    return torch.exp(beta * z).clamp(max=max_weight)


def returns_to_go(rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                  gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Discounted returns-to-go ``(T, N)`` of a rollout, and which chunks' episodes finished within it ``(T, N)``.

    ``G_t = r_t + gamma G_{t+1}`` inside an episode, ``G_t = r_t`` where it ends (terminated or truncated: RWR has no
    critic to bootstrap a time limit with, as the reference). A chunk is ``finished`` when its episode ends at or
    after it within the rollout: its return is then complete. That includes the chunks of an episode that began in
    an earlier rollout and of one-chunk episodes, which the reference drops (see the module docstring); the chunks
    after an env's last episode end are not finished (their returns are unknown).

    Args:
        rewards: ``(T, N)`` chunk rewards (summed over the executed actions).
        terminated, truncated: ``(T, N)`` episode ends.
        gamma: discount per chunk.
    """
    r = np.asarray(rewards, dtype=np.float64)
    end = np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
    g, finished = np.zeros_like(r), np.zeros(r.shape, dtype=bool)
    for t in range(len(r) - 1, -1, -1):
        after, done_after = (g[t + 1], finished[t + 1]) if t + 1 < len(r) else (0.0, False)
        g[t] = r[t] + gamma * np.where(end[t], 0.0, after)
        finished[t] = end[t] | done_after
    return g, finished


def rwr_weights(returns: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """DRWR's weights of an iteration's finished chunks ``(M,)``: ``min(exp(beta z), max_weight)`` with
    ``z = (G - mean G) / (std G + 1e-3)``, the population std (the reference's NumPy ``std``)."""
    g = returns.double()
    z = (g - g.mean()) / (g.std(unbiased=False) + RWR_STD_EPS)
    return exp_weights(z, beta, max_weight).float()


def awr_weights(advantages: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """DAWR's weights of a batch ``(B,)``: ``min(exp(beta z), max_weight)`` with the advantages z-scored within the
    batch, ``z = (A - mean A) / (std A + 1e-6)``, the sample std (the reference's ``torch.std``)."""
    z = (advantages - advantages.mean()) / (advantages.std() + AWR_STD_EPS)
    return exp_weights(z, beta, max_weight)


def td_lambda_targets(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                      terminated: torch.Tensor, truncated: torch.Tensor, gamma: float, lam: float,
                      alpha: float) -> torch.Tensor:
    """DAWR's critic targets ``(T, N)``: ``y_t = V_t + alpha GAE_t(lambda)`` (the reference's ``td_values``: its
    recursion ``val = alpha delta_t + gamma lam val`` sums to ``alpha GAE``, a step ``alpha`` from ``V`` toward the
    lambda-return; ``alpha = 1`` gives the lambda-return itself).

    ``delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V_t`` with ``s'_t`` the history chunk ``t`` reached (the
    true final one at a time limit); the recursion stops at terminations and truncations (:func:`gae`'s contract).

    Args:
        rewards, values, next_values, terminated, truncated: ``(T, N)`` in time order per env (``values[t] = V(s_t)``,
            ``next_values[t] = V(s'_t)``).
        gamma, lam, alpha: discount per chunk, lambda and the step toward the lambda-return.
    """
    adv, _ = gae(rewards, values, next_values, terminated, gamma, lam, truncated=truncated)
    return values.to(adv) + alpha * adv


# ----------------------------------------------------------------------------------------------------- agents
class WeightedRegression(Agent):
    """What DRWR and DAWR share: the diffusion policy (every denoising step fine-tuned), its optimiser and
    generator, rollout sampling and the weighted denoising step.

    The policy is a :class:`~diffrl.agents.dppo.DiffusionPolicy` over all ``K`` steps (``K' = K``, as DQL), so
    rollouts and deterministic evaluation use DPPO's routing, std floors and noise clip. All of the agent's
    randomness (rollout chains, the loss's ``t`` and noise, the loop's minibatch draws) comes from its own
    generator, saved in :meth:`state_dict`.

    Args:
        model: the pre-trained DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values (copied).
        obs_dim: ``Do``.
        params: :class:`RWRParams` or :class:`AWRParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    policy: DiffusionPolicy
    params_type: type[RegressionParams] = RegressionParams

    def __init__(self, model: DDPM, obs_dim: int, params: RegressionParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        if not isinstance(params, self.params_type):
            raise TypeError(f"{type(self).__name__} takes {self.params_type.__name__}, got {type(params).__name__}")
        p = self.p = params
        check_chunk_model(model, p.horizon_steps, p.cond_steps, obs_dim, type(self).__name__)
        self.device = torch.device(device)
        self.obs_dim = int(obs_dim)
        self.policy = DiffusionPolicy(model, model.num_steps, min_sampling_std=p.min_sampling_std,
                                      noise_clip=p.noise_clip, clip_x0=p.clip_x0).to(self.device)
        self.actor_params = list(self.policy.ft_net.parameters())
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_opt = torch.optim.AdamW(self.actor_params, lr=p.actor_lr, weight_decay=p.actor_weight_decay,
                                           **fused)
        self.nets: dict[str, nn.Module] = {"policy": self.policy}
        self.optims: dict[str, torch.optim.Optimizer] = {"actor": self.actor_opt}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.num_updates = 0  # weighted (actor) steps

    # ------------------------------------------------------------------------------------------------ acting
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """A rollout step (:func:`diffrl.pipelines.onpolicy.collect`): chunks ``(B, Ta, Da)`` for histories
        ``(B, To, Do)`` and, when sampling, the chunks alone as the recorded "chain" ``(B, 1, Ta, Da)``: weighted
        regression re-scores no chain transition (``S = 0``), only the chunk itself."""
        action = self.policy.sample(obs, deterministic, generator, mean_path).action
        return ChunkSample(action, None if deterministic else action.unsqueeze(1))

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The agent contract: chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)`` (training noise from the agent's
        generator; evaluation goes through :func:`~diffrl.pipelines.chunk_policy.evaluate_chunk_policy`)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        # deterministic: a fixed noise of its own, so the action is a function of the observation
        gen = torch.Generator(device=self.device).manual_seed(0) if deterministic else self.generator
        return self.policy.sample(o, deterministic, gen).action.cpu().numpy()

    # ------------------------------------------------------------------------------------------------ update
    def weighted_loss(self, obs: torch.Tensor, chunks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``mean_i w_i l_i`` over a batch: chunks ``(B, Ta, Da)`` (data units) given histories ``(B, To, Do)`` (or
        flat ``(B, To Do)``), ``l_i`` the epsilon MSE averaged over ``(Ta, Da)`` at ``t ~ U[0, K)``; ``t`` and the
        noise from the agent's generator."""
        return self.policy.base.loss(chunks, obs.flatten(1), self.generator, weights=weights.detach(),
                                     net=self.policy.ft_net)  # K' = K: ft_net runs every transition

    def update(self, obs: torch.Tensor, chunks: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """One AdamW step on :meth:`weighted_loss`. Returns detached metrics: ``actor_loss, weight_mean, weight_max,
        weight_clip_frac`` (share at ``max_weight``), ``weight_ess`` (effective sample size ``(sum w)^2 / sum w^2``
        over ``B``), ``actor_grad_norm``."""
        loss = self.weighted_loss(obs, chunks, weights)
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.actor_params, self.p.max_grad_norm or math.inf, foreach=True)
        self.actor_opt.step()
        self.num_updates += 1
        w = weights.detach()
        return {"actor_loss": loss.detach(), "weight_mean": w.mean(), "weight_max": w.max(),
                "weight_clip_frac": (w >= self.p.max_weight).float().mean(),
                "weight_ess": w.sum() ** 2 / (w.square().sum() * len(w)).clamp(min=1e-12),
                "actor_grad_norm": norm.detach()}

    # ------------------------------------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.generator.set_state(state["generator"])


class DRWR(WeightedRegression):
    """Diffusion reward-weighted regression (DPPO's DRWR): on-policy, no critic. The loop
    (:func:`diffrl.pipelines.chunk_rwr.rwr_update`) weights each finished chunk by :func:`rwr_weights` of its
    :func:`returns_to_go` and runs ``update_epochs`` epochs of :meth:`update`.

    Args: as :class:`WeightedRegression`, with :class:`RWRParams`.
    """

    p: RWRParams
    params_type = RWRParams


class DAWR(WeightedRegression):
    """Diffusion advantage-weighted regression (DPPO's DAWR): a ``V(s)`` critic (DPPO's ``CriticObs``) fitted to
    :func:`td_lambda_targets`, and the policy regressed with :func:`awr_weights` of ``y - V`` per batch. The loop
    (:func:`diffrl.pipelines.chunk_rwr.awr_update`) keeps the FIFO buffer and computes the targets over it.

    Args: as :class:`WeightedRegression`, with :class:`AWRParams`.
    """

    p: AWRParams
    params_type = AWRParams

    def __init__(self, model: DDPM, obs_dim: int, params: AWRParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__(model, obs_dim, params, device, seed)
        p = params
        self.critic = ValueCritic(obs_dim, p.cond_steps, p.critic_hidden, p.critic_residual,
                                  p.critic_activation).to(self.device)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=p.critic_lr,
                                            weight_decay=p.critic_weight_decay, **fused)
        self.nets["critic"] = self.critic
        self.optims["critic"] = self.critic_opt
        self.num_critic_updates = 0

    @torch.no_grad()
    def values(self, obs: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
        """``V(s)`` ``(M,)`` of histories ``(M, To, Do)`` or flat ``(M, To Do)``, ``batch_size`` per call."""
        return torch.cat([self.critic(part) for part in obs.split(batch_size)]) if len(obs) else obs.new_zeros(0)

    def update_critic(self, obs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One AdamW step on ``mean_i (V(s_i) - y_i)^2`` (no 1/2, as the reference). The reference's values are
        ``(B, 1)`` against ``(B,)`` targets, a ``(B, B)`` broadcast that fits every ``V(s_i)`` to the batch's mean
        target; here each value meets its own target. Returns ``critic_loss, value_mean, target_mean``."""
        values = self.critic(obs)  # (B,)
        loss = (values - targets).square().mean()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        self.num_critic_updates += 1
        return {"critic_loss": loss.detach(), "value_mean": values.detach().mean(), "target_mean": targets.mean()}

    def update_actor(self, obs: torch.Tensor, chunks: torch.Tensor, advantages: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        """One weighted step (:meth:`update`) with :func:`awr_weights` of the batch's advantages ``(B,)``; adds
        ``adv_mean`` and ``adv_std`` (before z-scoring)."""
        metrics = self.update(obs, chunks, awr_weights(advantages, self.p.beta, self.p.max_weight))
        return {**metrics, "adv_mean": advantages.mean(), "adv_std": advantages.std()}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "num_critic_updates": self.num_critic_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.num_critic_updates = int(state["num_critic_updates"])
