"""Diffusion-QL (Wang et al. 2023, arXiv:2208.06193): a diffusion policy trained by behaviour cloning plus the
Q-value of its own samples, back-propagated through the whole denoising chain; double Q with a Polyak target.

As DPPO's DQL baseline (irom-princeton/dppo ``model/diffusion/diffusion_dql.py``, ``agent/finetune/
train_dql_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_dql_diffusion_mlp.yaml``):

- critic: ``L = sum_{i=1,2} mean (Q_i(s, a) - y)^2`` with ``y = r + gamma (1 - done) min_i Q'_i(s', a')``, ``a'``
  drawn from the CURRENT diffusion policy (stochastic chain, std floor ``min_sampling_std``, noise clamped to
  ``noise_clip``), ``Q'`` the Polyak target (``tau``) updated after every gradient step;
- actor: ``L = bc_loss + eta q_loss`` with ``q_loss = -Q_i(s, a_new).mean() / |Q_j(s, a_new)|.mean().detach()``,
  ``(i, j)`` = (1, 2) or (2, 1) with probability 1/2 each (paper eq. 3 with the reference's normalisation), and
  ``a_new`` sampled with gradients through all ``K`` transitions (:func:`~diffrl.diffusion.samplers.
  sample_chain_grad`).

The agent knows no loop: the chunk off-policy loop (:mod:`diffrl.pipelines.chunk_offpolicy`) drives it online, and
an offline loop may call :meth:`DQL.update` on dataset batches (Dydiff: ``Ta = To = 1`` transitions).

Batches are flat (the Batch contract): ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)`` (the
EXECUTED part of each chunk, as the reference stores it), ``rew`` ``(B,)`` (already scaled), ``done`` ``(B,)``
(termination only).

Shapes: ``B`` batch, ``K`` denoising steps, ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length /
action dim, ``act_steps <= Ta`` executed actions of a chunk.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden, set_requires_grad, soft_update
from diffrl.agents.dppo import DiffusionPolicy
from diffrl.agents.nets import EnsembleQ
from diffrl.agents.ppo import check_optional_positive
from diffrl.config import check, check_choice, check_non_negative, check_positive, check_unit_interval
from diffrl.data.batch import Batch
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ACTIVATIONS
from diffrl.diffusion.samplers import sample_chain_grad
from diffrl.errors import ConfigError

__all__ = ["DQLParams", "DQL", "BC_TARGETS"]

BC_TARGETS = ("buffer", "sampled")
EVAL_SEED = 1_299_709  # seed of the fixed noise of act(deterministic=True) (a prime; any constant would do)


@dataclasses.dataclass(frozen=True)
class DQLParams(Params):
    """Diffusion-QL hyper-parameters (defaults: DPPO's Gym DQL config, ``ft_dql_diffusion_mlp.yaml``)."""

    horizon_steps: int = 4
    """Ta, the predicted chunk length (must match the model)"""
    act_steps: int = 4
    """executed actions per chunk: the critic scores these act_steps * Da values"""
    cond_steps: int = 1
    """To, the observation history length"""
    gamma: float = 0.99
    """discount per executed chunk"""
    tau: float = 0.005
    """Polyak rate of the target critic, after every gradient step (target_ema_rate)"""
    eta: float = 1.0
    """weight of the normalised Q term in the actor loss"""
    actor_lr: float = 1e-4
    """actor learning rate (AdamW; the reference's cosine-warmup schedule has min_lr = max_lr: constant after a
    10-iteration warm-up from that same value)"""
    critic_lr: float = 1e-3
    """critic learning rate (AdamW, constant as actor_lr)"""
    actor_weight_decay: float = 0.0
    """AdamW weight decay of the actor"""
    critic_weight_decay: float = 0.0
    """AdamW weight decay of the critic"""
    max_grad_norm: float | None = None
    """clip the actor's gradient norm (None: no clipping, as the Gym config)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of each Q-network (CriticObsAct mlp_dims)"""
    critic_activation: str = "mish"
    """activation of the Q-networks (Mish)"""
    critic_residual: bool = False
    """DPPO's residual Q trunk. The Gym config asks for residual_style: True, but CriticObsAct's argument is spelt
    residual_tyle, so the reference runs a plain MLP: off by default, as the baseline's numbers were produced"""
    min_sampling_std: float = 0.1
    """std floor of every transition of the training chains (exploration, a', a_new)"""
    noise_clip: float | None = 3.0
    """clamp of the standard-normal noise of the chains (randn_clip_value)"""
    clip_x0: float | None = 1.0
    """clamp of the predicted clean chunk (denoised_clip_value)"""
    bc_target: str = "buffer"
    """what the BC term clones: 'buffer' (the paper: the epsilon loss of the batch's actions) or 'sampled' (DPPO's
    reference: the epsilon loss of a_new itself, with gradients through a_new)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon_steps", "act_steps", "cond_steps", "actor_lr", "critic_lr", "min_sampling_std"):
            check_positive(name, getattr(self, name))
        check(self.act_steps <= self.horizon_steps, "act_steps", self.act_steps,
              f"<= horizon_steps={self.horizon_steps}")
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("tau", self.tau)
        for name in ("eta", "actor_weight_decay", "critic_weight_decay"):
            check_non_negative(name, getattr(self, name))
        check_optional_positive("max_grad_norm", self.max_grad_norm)
        check_optional_positive("noise_clip", self.noise_clip)
        check_optional_positive("clip_x0", self.clip_x0)
        check_hidden(self.critic_hidden)
        if self.critic_residual:
            check(len(set(self.critic_hidden)) == 1 and len(self.critic_hidden) % 2 == 1, "critic_hidden",
                  self.critic_hidden, "an odd number of equal widths for a residual critic (e.g. 256 256 256)")
        check_choice("critic_activation", self.critic_activation, ACTIVATIONS)
        check_choice("bc_target", self.bc_target, BC_TARGETS)
        # the buffer holds only the executed actions: the model's (Ta, Da) event needs all of them
        check(self.bc_target == "sampled" or self.act_steps == self.horizon_steps, "act_steps", self.act_steps,
              f"= horizon_steps={self.horizon_steps} with bc_target='buffer' (the buffer keeps only executed "
              "actions, and behaviour cloning needs whole chunks); or use bc_target='sampled'")


class DQL(Agent):
    """Diffusion-QL on a (pre-trained or fresh) DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values.

    The policy is a :class:`~diffrl.agents.dppo.DiffusionPolicy` whose every transition runs the trainable copy
    (``K' = K``: DQL trains the whole chain), so sampling, evaluation and the differentiable chain use DPPO's
    routing, std floors and noise clip. All of the agent's randomness (exploration, ``a'``, ``a_new``, the Q choice,
    the BC noise) comes from its own generator, saved in :meth:`state_dict`; ``act(obs, deterministic=True)`` uses a
    fixed noise of its own and draws nothing from it.

    Args:
        model: the DDPM (copied; its chain is fine-tuned in full).
        obs_dim: ``Do``.
        params: :class:`DQLParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    policy: DiffusionPolicy
    rewrites_actions = False  # the chunk off-policy loop's contract: its batches are left as sampled

    def __init__(self, model: DDPM, obs_dim: int, params: DQLParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        p = self.p = params
        if not isinstance(model, DDPM):
            raise ConfigError(f"Diffusion-QL trains a DDPM chain, got a {type(model).__name__}.")
        if len(model.event_shape) != 2 or model.event_shape[0] != p.horizon_steps:
            raise ConfigError(f"the model samples chunks of shape {model.event_shape} but horizon_steps="
                              f"{p.horizon_steps}; use the model's horizon.")
        if model.cond_dim != p.cond_steps * obs_dim:
            raise ConfigError(f"the model is conditioned on {model.cond_dim} values but cond_steps * obs_dim = "
                              f"{p.cond_steps} * {obs_dim}; use the model's cond_steps and env.")
        self.device = torch.device(device)
        self.obs_dim, self.act_dim = int(obs_dim), int(model.event_shape[1])
        self.policy = DiffusionPolicy(model, model.num_steps, min_sampling_std=p.min_sampling_std,
                                      noise_clip=p.noise_clip, clip_x0=p.clip_x0).to(self.device)
        # CriticObsAct: two Q-networks over [flattened history, executed chunk]
        self.critic = EnsembleQ(p.cond_steps * obs_dim, p.act_steps * self.act_dim, p.critic_hidden, 2,
                                activation=p.critic_activation, residual=p.critic_residual).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_params = [q for q in self.policy.parameters() if q.requires_grad]  # the trainable copy
        self.actor_opt = torch.optim.AdamW(self.actor_params, lr=p.actor_lr, weight_decay=p.actor_weight_decay,
                                           **fused)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=p.critic_lr,
                                            weight_decay=p.critic_weight_decay, **fused)
        self.nets = {"policy": self.policy, "critic": self.critic, "critic_target": self.critic_target}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.num_updates = 0  # update() calls
        self.num_actor_updates = 0  # of which stepped the actor (not critic_only)

    # ------------------------------------------------------------------------------------------------ acting
    def _history(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Histories ``(B, To, Do)`` from ``(B, To, Do)``, flat ``(B, To Do)`` or (``To = 1``) ``(B, Do)``."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if o.dim() == 2 and o.shape[1] == self.p.cond_steps * self.obs_dim:
            o = o.view(len(o), self.p.cond_steps, self.obs_dim)
        if o.dim() != 3 or tuple(o.shape[1:]) != (self.p.cond_steps, self.obs_dim):
            raise ValueError(f"expected observation histories of shape (B, {self.p.cond_steps}, {self.obs_dim}) or "
                             f"(B, {self.p.cond_steps * self.obs_dim}), got {tuple(o.shape)}")
        return o

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """Exploration chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)``: the training chain (std floor
        ``min_sampling_std``, noise clamped), from the agent's generator."""
        return self.policy.sample(self._history(obs), False, self.generator).action

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The agent contract: chunks ``(B, Ta, Da)``, or actions ``(B, Da)`` for flat observations ``(B, Do)`` when
        ``To = Ta = 1`` (an offline transition agent). ``deterministic``: DPPO's evaluation chain (std floor 1e-3,
        no noise at the last step) with a fixed noise, so the action is a function of the observation."""
        flat = np.ndim(obs) == 2 and self.p.cond_steps == 1 and self.p.horizon_steps == 1
        gen = torch.Generator(device=self.device).manual_seed(EVAL_SEED) if deterministic else self.generator
        out = self.policy.sample(self._history(obs), deterministic, gen).action
        return (out[:, 0] if flat else out).cpu().numpy()

    # ------------------------------------------------------------------------------------------------ losses
    def _executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The executed part of chunks ``(B, Ta, Da)``, flattened as the buffer stores it: ``(B, act_steps Da)``."""
        return chunk[:, :self.p.act_steps].flatten(1)

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """``y = r + gamma (1 - done) min_i Q'_i(s', a')`` ``(B,)``, ``a'`` a training-chain sample of the current
        policy (the reference's choice; the paper's code samples the EMA actor). One chain draw."""
        next_chunk = self.policy.sample(self._history(batch.next_obs), False, self.generator).action
        q_next = self.critic_target(batch.next_obs, self._executed(next_chunk)).min(0).values
        return batch.rew + self.p.gamma * (1.0 - batch.done) * q_next

    def bc_loss(self, chunks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The DDPM epsilon (or x0) loss of chunks ``(B, Ta, Da)`` (data units) under the TRAINABLE copy, t uniform
        in ``[0, K)``: ``DDPM._loss`` with the policy's network (``DDPM.loss`` would train the frozen base)."""
        base = self.policy.base
        x0 = base.normalizer(chunks)
        t = torch.randint(0, base.num_steps, (len(x0),), device=self.device, generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, generator=self.generator)
        out = base.network(base.q_sample(x0, t, noise), t.float(), cond, net=self.policy.ft_net)
        return ((out - (noise if base.prediction == "epsilon" else x0)) ** 2).mean()

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``bc_loss + eta q_loss`` and its parts. Draws, in order: the differentiable chain of ``a_new``, one
        uniform for the Q choice (``> 0.5``: ``Q_1`` over ``|Q_2|``, as the reference's coin), the BC noise."""
        p, base = self.p, self.policy.base
        cond = batch.obs  # (B, To Do)
        x = sample_chain_grad(base, (len(cond), *base.event_shape), cond, min_std=p.min_sampling_std,
                              noise_clip=p.noise_clip, generator=self.generator, device=self.device,
                              net_for_step=self.policy.net_for_step)  # (B, Ta, Da), normalised space
        a_new = base.normalizer.unnormalize(x)
        q = self.critic(cond, self._executed(a_new))  # (2, B)
        i = 0 if float(torch.rand((), device=self.device, generator=self.generator)) > 0.5 else 1
        q_loss = -q[i].mean() / q[1 - i].abs().mean().detach()
        if p.bc_target == "buffer":  # Wang et al. 2023 (eq. 3 and their code): clone the data's actions
            bc = self.bc_loss(batch.act.view(len(cond), p.act_steps, self.act_dim), cond)
        else:
            # DPPO's reference (diffusion_dql.py loss_actor at its latest commit; the earlier one cloned buffer
            # actions): self.loss(action_new, obs), the policy cloning its own fresh sample, which anchors it to
            # itself rather than to the data the paper's term keeps it near; an option to reproduce that baseline
            bc = self.bc_loss(a_new, cond)
        loss = bc + p.eta * q_loss
        return loss, {"bc_loss": bc.detach(), "q_loss": q_loss.detach(), "q_new_mean": q.detach().mean()}

    # ------------------------------------------------------------------------------------------------ update
    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """One critic step, then (unless ``critic_only``, the loop's critic warm-up) one actor step on the updated
        critic, then the Polyak target update (every call, as the reference). Returns detached metrics:
        ``critic_loss, q_mean, target_mean`` and, with the actor, ``actor_loss, bc_loss, q_loss, q_new_mean,
        actor_grad_norm``."""
        target = self.td_target(batch)
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - target).pow(2).mean(1).sum()  # mean (Q1 - y)^2 + mean (Q2 - y)^2
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        metrics = {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean(), "target_mean": target.mean()}
        if not critic_only:  # the reference computes the actor loss in warm-up too and skips only the step
            set_requires_grad(self.critic.parameters(), False)
            actor_loss, parts = self.actor_loss(batch)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            norm = nn.utils.clip_grad_norm_(self.actor_params, self.p.max_grad_norm or math.inf, foreach=True)
            self.actor_opt.step()
            set_requires_grad(self.critic.parameters(), True)
            self.num_actor_updates += 1
            metrics.update(actor_loss=actor_loss.detach(), actor_grad_norm=norm.detach(), **parts)
        soft_update(self.critic_target, self.critic, self.p.tau)
        self.num_updates += 1
        return metrics

    # ------------------------------------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_actor_updates": self.num_actor_updates,
                "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_actor_updates = int(state["num_actor_updates"])
        self.generator.set_state(state["generator"])
