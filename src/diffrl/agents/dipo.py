"""DIPO, diffusion policy for model-free online RL (Yang et al. 2023, arXiv:2305.13122): improve the buffer's actions
by gradient ascent on the critic, write them back, and behaviour-clone the diffusion policy on them.

As DPPO's DIPO baseline (irom-princeton/dppo ``model/diffusion/diffusion_dipo.py``, ``agent/finetune/
train_dipo_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_dipo_diffusion_mlp.yaml``), one update is:

1. critic: ``L = sum_i mean (Q_i(s, a) - y)^2``, ``y = r + gamma (1 - done) min_i Q'_i(s', a')``, ``a'`` a
   training-chain draw of the EMA actor, ``Q'`` the target critic;
2. unless ``critic_only`` (the loop's critic warm-up): action ascent. A fresh Adam (lr ``action_lr`` 1e-4, eps 1e-5)
   over the batch's executed chunks ``a`` runs ``action_gradient_steps`` (10) steps on ``-sum_b min_i Q_i(s_b, a_b)``,
   each gradient clipped to global norm ``action_grad_norm_coef * act_steps * Da`` (over the whole batch, as
   ``clip_grad_norm_`` on the one tensor) and each step followed by a clamp to ``[-1, 1]``;
3. the improved chunks replace ``batch["act"]``: the chunk off-policy loop writes them into the sampled buffer rows
   (``rewrites_actions``), so the buffer's actions keep improving (DIPO's "action gradient" buffer);
4. the actor: the plain epsilon loss of the improved chunks;
5. the target critic and the EMA actor move by ``tau`` (0.005, ``target_ema_rate``), every update.

The EMA actor is the policy: it explores, it is evaluated and it samples ``a'`` (the reference's ``forward`` "Use
target actor"); the online actor is only behaviour-cloned.

Deviation: the reference draws a second, independent batch for steps 2-4; here the update's one batch serves both
(the loop samples one batch per update, which is also the batch it writes back). The reference reshapes the buffer's
executed actions to ``(horizon_steps, Da)`` for the BC step, which breaks unless ``act_steps = horizon_steps``; here
that is a :class:`~diffrl.errors.ConfigError` up front. Its earlier version bootstrapped from the online critic; the
latest (followed here) has the target critic.

Batches are flat: ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)``, ``rew``, ``done`` ``(B,)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from diffrl.agents.base import set_requires_grad, soft_update
from diffrl.agents.diffusion_q import DiffusionQAgent, DiffusionQParams
from diffrl.agents.ppo import check_optional_positive
from diffrl.config import check_positive
from diffrl.data.batch import Batch
from diffrl.diffusion.models import DDPM

__all__ = ["DIPOParams", "DIPO"]


@dataclasses.dataclass(frozen=True)
class DIPOParams(DiffusionQParams):
    """DIPO hyper-parameters (defaults: DPPO's Gym DIPO config ``ft_dipo_diffusion_mlp.yaml`` and its trainer)."""

    tau: float = 0.005
    """Polyak rate of the target critic AND of the EMA actor, after every update (train.target_ema_rate)"""
    action_lr: float = 1e-4
    """Adam learning rate of the action ascent (train.action_lr)"""
    action_gradient_steps: int = 10
    """Adam steps of the action ascent per update (train.action_gradient_steps)"""
    action_adam_eps: float = 1e-5
    """Adam eps of the action ascent (hard-coded in train_dipo_diffusion_agent.py)"""
    action_grad_norm_coef: float | None = 0.1
    """clip of the ascent's gradient: global norm coef * act_steps * Da over the batch (the trainer's
    action_grad_norm = action_dim * act_steps * 0.1); None: no clipping"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("action_lr", "action_gradient_steps", "action_adam_eps"):
            check_positive(name, getattr(self, name))
        check_optional_positive("action_grad_norm_coef", self.action_grad_norm_coef)
        self.check_whole_chunks("DIPO", "its actor behaviour-clones the improved buffer chunks")


class DIPO(DiffusionQAgent):
    """DIPO on a (pre-trained or fresh) DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values.

    ``update`` replaces ``batch["act"]`` (the dict entry; the tensor itself is not modified) by the improved chunks
    unless ``critic_only``; ``rewrites_actions`` tells the chunk off-policy loop to write them back.

    Args:
        model: the DDPM (copied; its chain is behaviour-cloned in full, and an EMA copy of it acts).
        obs_dim: ``Do``.
        params: :class:`DIPOParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "DIPO"
    p: DIPOParams
    rewrites_actions = True

    def __init__(self, model: DDPM, obs_dim: int, params: DIPOParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__(model, obs_dim, params, device, seed)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)  # the EMA actor (actor_target)
        self.sampler = self.policy = self.actor_target
        self.nets["policy_target"] = self.actor_target

    @property
    def action_grad_norm(self) -> float:
        """The ascent's gradient clip: ``action_grad_norm_coef * act_steps * Da`` (inf when off)."""
        coef = self.p.action_grad_norm_coef
        return math.inf if coef is None else coef * self.p.act_steps * self.act_dim

    def improve_actions(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Executed chunks ``(B, act_steps Da)`` after ``action_gradient_steps`` clipped Adam steps of ascent on
        ``min_i Q_i(s, a)``, clamped to ``[-1, 1]`` after each (the online critic; DIPO's action gradient)."""
        a = act.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([a], lr=self.p.action_lr, eps=self.p.action_adam_eps)
        set_requires_grad(self.critic.parameters(), False)
        try:
            for _ in range(self.p.action_gradient_steps):
                loss = -self.critic(obs, a).min(0).values.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_([a], self.action_grad_norm)
                opt.step()
                with torch.no_grad():
                    a.clamp_(-1.0, 1.0)
        finally:
            set_requires_grad(self.critic.parameters(), True)
        return a.detach()

    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """The critic step, then (unless ``critic_only``) the action ascent, the write-back into ``batch["act"]``
        and one BC step of the actor on the improved chunks, then the Polyak steps of the target critic and the
        EMA actor. Returns detached metrics: ``critic_loss, q_mean, target_mean`` and, with the actor,
        ``actor_loss, actor_grad_norm, action_shift`` (mean ``|a_new - a|``), ``q_gain`` (mean ``min_i Q_i``
        gained by the ascent)."""
        metrics = self.critic_step(batch, self.td_target(batch))
        if not critic_only:
            improved = self.improve_actions(batch.obs, batch.act)  # (B, act_steps Da)
            with torch.no_grad():
                q_gain = (self.critic(batch.obs, improved).min(0).values
                          - self.critic(batch.obs, batch.act).min(0).values).mean()
            shift = (improved - batch.act).abs().mean()
            batch["act"] = improved  # the loop writes batch["act"] back into the sampled rows
            bc = self.bc_loss(self._chunks(improved), batch.obs)
            metrics.update(actor_loss=bc.detach(), actor_grad_norm=self.actor_step(bc), action_shift=shift,
                           q_gain=q_gain)
        soft_update(self.critic_target, self.critic, self.p.tau)
        soft_update(self.actor_target.ft_net, self.actor.ft_net, self.p.tau)  # both every update, as the reference
        self.num_updates += 1
        return metrics
