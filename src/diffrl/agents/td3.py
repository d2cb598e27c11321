"""TD3 (Fujimoto et al., 2018, arXiv:1802.09477): clipped double Q, target policy smoothing, delayed actor."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from diffrl.agents.base import Agent, Params, check_hidden, set_requires_grad, soft_update
from diffrl.agents.nets import DeterministicActor, EnsembleQ
from diffrl.config import check, check_non_negative, check_positive, check_unit_interval
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class TD3Params(Params):
    """TD3 hyper-parameters (defaults: the author's reference implementation)."""

    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of actor and critics"""
    actor_lr: float = 3e-4
    """actor learning rate (Adam)"""
    critic_lr: float = 3e-4
    """critic learning rate (Adam)"""
    gamma: float = 0.99
    """discount factor, in (0, 1]"""
    tau: float = 0.005
    """target-network Polyak rate, in (0, 1]"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (actions in [-1, 1])"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise added by act()"""
    policy_delay: int = 2
    """critic updates per actor update"""
    num_critics: int = 2
    """critics in the ensemble; the target takes their min"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        check_positive("actor_lr", self.actor_lr)
        check_positive("critic_lr", self.critic_lr)
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("tau", self.tau)
        for name in ("policy_noise", "noise_clip", "exploration_noise"):
            check_non_negative(name, getattr(self, name))
        check(self.policy_delay >= 1, "policy_delay", self.policy_delay, ">= 1")
        check(self.num_critics >= 1, "num_critics", self.num_critics, ">= 1")


class TD3(Agent):
    """TD3 agent; ``update(batch)`` performs one critic update and every ``policy_delay`` an actor update."""

    def __init__(self, obs_dim: int, act_dim: int, params: TD3Params, device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        hidden = tuple(params.hidden)
        self.actor = DeterministicActor(obs_dim, act_dim, hidden).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = EnsembleQ(obs_dim, act_dim, hidden, params.num_critics).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=params.actor_lr, **fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=params.critic_lr, **fused)
        self.nets = {"actor": self.actor, "actor_target": self.actor_target, "critic": self.critic,
                     "critic_target": self.critic_target}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.num_updates = 0
        self._last_actor: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        a = self.actor(self._obs_tensor(obs))
        if not deterministic and self.p.exploration_noise > 0:
            a = (a + self.p.exploration_noise * torch.randn_like(a)).clamp(-1.0, 1.0)
        return a.cpu().numpy()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.num_updates += 1
        with torch.no_grad():
            noise = (torch.randn_like(batch.act) * self.p.policy_noise).clamp(-self.p.noise_clip, self.p.noise_clip)
            next_a = (self.actor_target(batch.next_obs) + noise).clamp(-1.0, 1.0)
            q_next = self.critic_target(batch.next_obs, next_a).min(0).values
            target = batch.rew + self.p.gamma * (1.0 - batch.done) * q_next
        q = self.critic(batch.obs, batch.act)  # (N, B)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        metrics = {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean()}
        if self.num_updates % self.p.policy_delay == 0:
            set_requires_grad(self.critic.parameters(), False)
            actor_loss, actor_metrics = self._actor_loss(batch)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            set_requires_grad(self.critic.parameters(), True)
            soft_update(self.critic_target, self.critic, self.p.tau)
            soft_update(self.actor_target, self.actor, self.p.tau)
            self._last_actor = {"actor_loss": actor_loss.detach(), **actor_metrics}
        metrics.update(self._last_actor)
        return metrics

    def _actor_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Deterministic policy gradient on Q_1 (as TD3); TD3+BC adds its behaviour-cloning term here."""
        return -self.critic(batch.obs, self.actor(batch.obs))[0].mean(), {}

    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_actor": dict(self._last_actor)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self._last_actor = {k: v.to(self.device) for k, v in state["last_actor"].items()}
