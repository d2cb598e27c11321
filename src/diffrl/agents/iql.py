"""Implicit Q-Learning (Kostrikov, Nair & Levine, 2021, arXiv:2110.06169), as in CORL.

Per update (CORL's order): ``V`` regresses towards ``min_i Q_target_i(s, a)`` with the expectile loss (eq. (5));
the twin ``Q`` regress towards ``r + gamma (1 - d) V(s')`` (eq. (6), ``V(s')`` taken before the ``V`` step);
the policy maximises advantage-weighted log-likelihood ``exp(beta * A) log pi(a | s)`` with weights clipped at
100 (eq. (7)); the actor's learning rate follows a cosine schedule over the whole run.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from diffrl.agents.base import Agent, Params, check_hidden, soft_update
from diffrl.agents.nets import EnsembleQ, GaussianActor, mlp
from diffrl.config import check, check_positive, check_unit_interval
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class IQLParams(Params):
    """IQL hyper-parameters (CORL's MuJoCo locomotion settings)."""

    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of policy, value and Q networks"""
    actor_lr: float = 3e-4
    """policy learning rate (cosine-annealed over actor_lr_steps)"""
    critic_lr: float = 3e-4
    """Q learning rate"""
    value_lr: float = 3e-4
    """V learning rate"""
    gamma: float = 0.99
    """discount factor, in (0, 1]"""
    tau: float = 0.005
    """target-network Polyak rate, in (0, 1]"""
    expectile: float = 0.7
    """expectile of the value loss (IQL's tau), in (0, 1)"""
    beta: float = 3.0
    """inverse temperature of the advantage weights"""
    max_exp_adv: float = 100.0
    """clip of exp(beta * advantage)"""
    actor_lr_steps: int | None = None
    """length of the actor's cosine learning-rate schedule (the pipeline sets it to its steps); None: constant"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        for name in ("actor_lr", "critic_lr", "value_lr", "beta", "max_exp_adv"):
            check_positive(name, getattr(self, name))
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("tau", self.tau)
        check(0 < self.expectile < 1, "expectile", self.expectile, "in (0, 1)")
        check(self.actor_lr_steps is None or self.actor_lr_steps > 0, "actor_lr_steps", self.actor_lr_steps, "> 0")


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """``|tau - 1(u < 0)| u^2`` averaged (IQL eq. (5)), with ``u = Q - V``."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


class IQL(Agent):
    """IQL agent: ``act`` returns the policy mean (deterministic) or a clipped Gaussian sample."""

    def __init__(self, obs_dim: int, act_dim: int, params: IQLParams, device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        hidden = tuple(params.hidden)
        self.actor = GaussianActor(obs_dim, act_dim, hidden).to(self.device)
        self.critic = EnsembleQ(obs_dim, act_dim, hidden, 2).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = mlp(obs_dim, hidden, 1).to(self.device)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=params.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=params.critic_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=params.value_lr)
        self.actor_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, params.actor_lr_steps)
                            if params.actor_lr_steps else None)
        self.nets = {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target,
                     "value": self.value}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt, "value": self.value_opt}
        self.num_updates = 0

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        o = self._obs_tensor(obs)
        return (self.actor(o) if deterministic else self.actor.sample(o)).cpu().numpy()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.num_updates += 1
        with torch.no_grad():
            next_v = self.value(batch.next_obs).squeeze(-1)  # (B,), before the V step (as CORL)
            target_q = self.critic_target(batch.obs, batch.act).min(0).values  # (B,)
        # V: expectile regression towards the target Q
        adv = target_q - self.value(batch.obs).squeeze(-1)
        value_loss = expectile_loss(adv, self.p.expectile)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()
        # Q: one-step TD towards r + gamma V(s')
        td_target = batch.rew + self.p.gamma * (1.0 - batch.done) * next_v
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - td_target).pow(2).mean(1).mean()  # average of the twins' MSEs (CORL)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        soft_update(self.critic_target, self.critic, self.p.tau)
        # policy: advantage-weighted regression on dataset actions
        weight = torch.exp(self.p.beta * adv.detach()).clamp(max=self.p.max_exp_adv)
        actor_loss = -(weight * self.actor.log_prob(batch.obs, batch.act)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        if self.actor_sched is not None:
            self.actor_sched.step()
        return {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(),
                "actor_loss": actor_loss.detach(), "q_mean": q.detach().mean(), "adv_mean": adv.detach().mean()}

    def extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_updates": self.num_updates}
        if self.actor_sched is not None:
            out["actor_sched"] = self.actor_sched.state_dict()
        return out

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        if self.actor_sched is not None and "actor_sched" in state:
            self.actor_sched.load_state_dict(state["actor_sched"])


__all__ = ["IQL", "IQLParams", "expectile_loss"]
