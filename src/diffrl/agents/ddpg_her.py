"""DDPG for goal-conditioned tasks, with OpenAI baselines' HER settings (Andrychowicz et al. 2017; Plappert et al.
2018, arXiv:1802.09464) — the RL side of ITER and ITER-Diffusion.

Shapes: ``B`` batch, ``Do`` obs, ``Dg`` goal, ``Da`` action dims. Inputs are ``[norm(o), norm(g)]`` with running
normalisers (clip ``clip_obs`` before, ``norm_clip`` after); the critic also takes the action. The target is
clipped to ``[-1 / (1 - gamma), 0]`` (Fetch rewards are in ``{-1, 0}``), the actor pays ``action_l2`` times the
mean squared action, and the target networks move by Polyak averaging once per cycle (``update_target``), not
after every gradient step.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden, set_requires_grad, soft_update
from diffrl.agents.nets import mlp
from diffrl.config import check, check_non_negative, check_positive, check_unit_interval
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class DDPGHERParams(Params):
    """DDPG+HER hyper-parameters (defaults: OpenAI baselines' ``her/experiment/config.py``, as ITER uses them)."""

    hidden: tuple[int, ...] = (256, 256, 256)
    """hidden layer widths of actor and critic"""
    actor_lr: float = 1e-3
    """actor learning rate (Adam)"""
    critic_lr: float = 1e-3
    """critic learning rate (Adam)"""
    gamma: float = 0.98
    """discount factor (baselines: 1 - 1/T with T = 50)"""
    polyak: float = 0.95
    """target <- polyak * target + (1 - polyak) * main, once per cycle"""
    action_l2: float = 1.0
    """weight of the actor's squared-action penalty"""
    clip_return: bool = True
    """clip the TD target to [-1/(1-gamma), 0] (rewards are <= 0)"""
    clip_obs: float = 200.0
    """clip raw observations and goals to [-clip_obs, clip_obs] before normalising"""
    norm_clip: float = 5.0
    """clip normalised inputs to [-norm_clip, norm_clip]"""
    norm_eps: float = 0.01
    """lower bound of the normalisers' std"""
    random_eps: float = 0.3
    """probability of a uniformly random exploration action"""
    noise_eps: float = 0.2
    """std of the Gaussian exploration noise (actions in [-1, 1])"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        check_positive("actor_lr", self.actor_lr)
        check_positive("critic_lr", self.critic_lr)
        if self.gamma is not None:  # None: a pipeline derives it from the horizon (`diffrl iter`: 1 - 1/T)
            check_unit_interval("gamma", self.gamma)
        check(0.0 <= self.polyak < 1.0, "polyak", self.polyak, "in [0, 1)")
        for name in ("action_l2", "random_eps", "noise_eps"):
            check_non_negative(name, getattr(self, name))
        check(self.random_eps <= 1.0, "random_eps", self.random_eps, "<= 1")
        for name in ("clip_obs", "norm_clip", "norm_eps"):
            check_positive(name, getattr(self, name))


class RunningNormalizer(nn.Module):
    """Running mean and std of every dimension (float64 sums), baselines' ``Normalizer``.

    ``forward`` returns ``clip((x - mean) / std, -clip, clip)`` with ``std = max(eps, sqrt(E[x^2] - mean^2))``.
    The statistics are buffers, so they travel with the agent's ``state_dict``.
    """

    def __init__(self, dim: int, eps: float = 0.01, clip: float = 5.0) -> None:
        super().__init__()
        self.eps, self.clip = eps, clip
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``(N, dim)``) to the statistics."""
        x = x.reshape(-1, self.sum.shape[0]).to(self.sum)
        self.sum += x.sum(0)
        self.sumsq += x.square().sum(0)
        self.count += x.shape[0]
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.square()).clamp(min=self.eps ** 2)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).clamp(-self.clip, self.clip)


class DDPGHER(Agent):
    """DDPG over ``(obs, goal)`` inputs.

    ``act`` takes a dict batch with ``observation`` and ``desired_goal`` (a Fetch env's observation, batched);
    ``update(batch)`` takes a :class:`Batch` with the goal keys (``goal``); ``update_target`` moves the targets.
    """

    def __init__(self, obs_dim: int, goal_dim: int, act_dim: int, params: DDPGHERParams,
                 device: torch.device | str = "cpu") -> None:
        if params.gamma is None:
            raise ValueError("DDPGHER needs a numeric gamma (None is resolved by the pipeline from the horizon).")
        self.p = params
        self.device = torch.device(device)
        self.act_dim = act_dim
        hidden = tuple(params.hidden)
        self.o_norm = RunningNormalizer(obs_dim, params.norm_eps, params.norm_clip).to(self.device)
        self.g_norm = RunningNormalizer(goal_dim, params.norm_eps, params.norm_clip).to(self.device)
        self.actor = nn.Sequential(mlp(obs_dim + goal_dim, hidden, act_dim), nn.Tanh()).to(self.device)
        self.critic = mlp(obs_dim + goal_dim + act_dim, hidden, 1).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=params.actor_lr, **fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=params.critic_lr, **fused)
        self.nets = {"actor": self.actor, "actor_target": self.actor_target, "critic": self.critic,
                     "critic_target": self.critic_target, "o_norm": self.o_norm, "g_norm": self.g_norm}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.num_updates = 0

    def inputs(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[norm(o), norm(g)]`` ``(B, Do + Dg)``."""
        c = self.p.clip_obs
        return torch.cat([self.o_norm(obs.clamp(-c, c)), self.g_norm(goal.clamp(-c, c))], dim=-1)

    def update_normalizers(self, obs: torch.Tensor, goal: torch.Tensor) -> None:
        """Add observations and goals (clipped like the inputs) to the running statistics."""
        c = self.p.clip_obs
        self.o_norm.update(obs.clamp(-c, c))
        self.g_norm.update(goal.clamp(-c, c))

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], deterministic: bool = False) -> np.ndarray:
        o = self._obs_tensor(obs["observation"])
        g = self._obs_tensor(obs["desired_goal"])
        a = self.actor(self.inputs(o, g))  # (B, Da)
        if deterministic:
            return a.cpu().numpy()
        # baselines' exploration: Gaussian noise, then with probability random_eps a uniform random action
        a = (a + self.p.noise_eps * torch.randn_like(a)).clamp(-1.0, 1.0)
        random = torch.rand(a.shape[0], 1, device=self.device) < self.p.random_eps
        a = torch.where(random, torch.rand_like(a) * 2.0 - 1.0, a)
        return a.cpu().numpy()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.num_updates += 1
        x = self.inputs(batch.obs, batch.goal)
        with torch.no_grad():
            x_next = self.inputs(batch.next_obs, batch.goal)
            q_next = self.critic_target(torch.cat([x_next, self.actor_target(x_next)], -1)).squeeze(-1)
            target = batch.rew + self.p.gamma * (1.0 - batch.done) * q_next
            if self.p.clip_return:  # returns of {-1, 0} rewards lie in [-1/(1-gamma), 0]
                target = target.clamp(-1.0 / (1.0 - self.p.gamma), 0.0)
        q = self.critic(torch.cat([x, batch.act], -1)).squeeze(-1)
        critic_loss = (q - target).pow(2).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        # The actor is updated against the critic just updated (baselines applies both gradients computed before
        # either step; the difference is one step of critic lag).
        set_requires_grad(self.critic.parameters(), False)
        pi = self.actor(x)
        q_pi = self.critic(torch.cat([x, pi], -1))
        actor_loss = -q_pi.mean() + self.p.action_l2 * pi.square().mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        set_requires_grad(self.critic.parameters(), True)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "q_mean": q.detach().mean()}

    def update_target(self) -> None:
        """Polyak-average the target networks (once per cycle, as baselines)."""
        soft_update(self.actor_target, self.actor, 1.0 - self.p.polyak)
        soft_update(self.critic_target, self.critic, 1.0 - self.p.polyak)

    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
