"""Soft Actor-Critic (Haarnoja et al., 2018, arXiv:1812.05905) with automatic temperature, and REDQ
(Chen et al., 2021, arXiv:2101.05982) as its ensemble generalisation.

Both use one batched critic ensemble (:class:`~diffrl.agents.nets.EnsembleQ`): SAC is ``N = M = 2`` (clipped
double Q), REDQ is ``N = 10`` critics whose target takes the min over a random subset of ``M = 2``, with the
actor maximising the mean over all ``N`` and updated once every ``G`` critic updates (the pipeline performs
``G`` updates per env step, the update-to-data ratio).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import numpy as np
import torch

from diffrl.agents.base import Agent, Params, check_hidden, set_requires_grad, soft_update
from diffrl.agents.nets import EnsembleQ, TanhGaussianActor
from diffrl.config import check, check_choice, check_positive, check_unit_interval
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class SACParams(Params):
    """SAC hyper-parameters (defaults: the SAC paper / Stable-Baselines3)."""

    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of the actor (and of the critics unless critic_hidden is set)"""
    critic_hidden: tuple[int, ...] | None = None
    """hidden layer widths of the critics; None = hidden"""
    actor_lr: float = 3e-4
    """actor learning rate (Adam)"""
    critic_lr: float = 3e-4
    """critic learning rate (Adam)"""
    alpha_lr: float = 3e-4
    """temperature learning rate (Adam)"""
    gamma: float = 0.99
    """discount factor, in (0, 1]"""
    tau: float = 0.005
    """target-network Polyak rate, in (0, 1]"""
    init_alpha: float = 1.0
    """initial entropy temperature"""
    autotune_alpha: bool = True
    """learn the temperature towards ``target_entropy``"""
    target_entropy: float | None = None
    """entropy target; None means -action_dim"""
    num_critics: int = 2
    """critics in the ensemble (REDQ's N)"""
    target_subset: int = 2
    """critics in the random subset whose min forms the target (REDQ's M; = num_critics for SAC)"""
    actor_q: Literal["min", "mean"] = "min"
    """how the actor aggregates the ensemble: min (SAC) or mean (REDQ)"""
    actor_update_every: int = 1
    """critic updates per actor/temperature update (REDQ: the update-to-data ratio)"""
    backup_entropy: bool = True
    """subtract alpha * log pi(a'|s') in the TD target (SAC); CQL's reference code does not"""
    actor_first: bool = False
    """update actor and temperature before the critic, from the pre-update critic (EDAC's and CQL's reference
    order); SAC updates the critic first"""
    target_first: bool = False
    """with actor_first: compute the critic's TD target before the actor step, from the pre-update actor and
    temperature, so that both losses see the same pre-update networks (the order of REDQ's code, through which
    SynthER runs SAC); without it the target uses the just-updated actor (CQL's and EDAC's reference order)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        if self.critic_hidden is not None:
            check_hidden(self.critic_hidden)
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            check_positive(name, getattr(self, name))
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("tau", self.tau)
        check(self.num_critics >= 1, "num_critics", self.num_critics, ">= 1")
        check(1 <= self.target_subset <= self.num_critics, "target_subset", self.target_subset,
              f"between 1 and num_critics={self.num_critics}")
        check_choice("actor_q", self.actor_q, ("min", "mean"))
        check(self.actor_first or not self.target_first, "target_first", self.target_first,
              "False unless actor_first is set (the target is computed before the actor step)")
        check(self.actor_update_every is None or self.actor_update_every >= 1, "actor_update_every",
              self.actor_update_every, ">= 1 (or None: once per env step)")


@dataclasses.dataclass(frozen=True)
class REDQParams(SACParams):
    """REDQ defaults: N = 10 critics, subset M = 2, actor on the ensemble mean, one actor update per 20, and the
    order of REDQ's code: target and actor loss from the same pre-update networks."""

    num_critics: int = 10
    """critics in the ensemble (REDQ's N)"""
    target_subset: int = 2
    """critics in the random subset whose min forms the target (REDQ's M)"""
    actor_q: Literal["min", "mean"] = "mean"
    """how the actor aggregates the ensemble: min (SAC) or mean (REDQ)"""
    actor_update_every: int = 20
    """critic updates per actor/temperature update (REDQ's policy update delay = its UTD ratio G)"""
    actor_first: bool = True
    """actor and temperature step before the critics, from the pre-update critics (REDQ's code)"""
    target_first: bool = True
    """the critics' target is computed before the actor step, from the pre-update actor (REDQ's code)"""


class SAC(Agent):
    """SAC / REDQ agent.

    Args:
        obs_dim: observation size ``Do``.
        act_dim: action size ``Da`` (actions in [-1, 1]).
        params: :class:`SACParams` (or any object with its fields).
        device: torch device of the networks.
    """

    def __init__(self, obs_dim: int, act_dim: int, params: SACParams, device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        hidden = tuple(params.hidden)
        self.actor = TanhGaussianActor(obs_dim, act_dim, hidden).to(self.device)
        critic_hidden = tuple(params.critic_hidden) if params.critic_hidden is not None else hidden
        self.critic = EnsembleQ(obs_dim, act_dim, critic_hidden, params.num_critics).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(np.log(params.init_alpha), dtype=torch.float32, device=self.device,
                                      requires_grad=True)
        self.target_entropy = float(params.target_entropy if params.target_entropy is not None else -act_dim)
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        # Actor and temperature share one Adam (two parameter groups, own learning rates): their losses touch
        # disjoint parameters, so one backward + one step gives exactly the two separate Adam updates.
        groups = [{"params": list(self.actor.parameters()), "lr": params.actor_lr}]
        if params.autotune_alpha:
            groups.append({"params": [self.log_alpha], "lr": params.alpha_lr})
        self.actor_opt = torch.optim.Adam(groups, **fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=params.critic_lr, **fused)
        self.nets = {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}
        self.optims = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.num_updates = 0
        self._last_actor: dict[str, torch.Tensor] = {}
        self._early_target: torch.Tensor | None = None  # target_first: the target computed before the actor step

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        o = self._obs_tensor(obs)
        a = self.actor(o) if deterministic else self.actor.sample(o)[0]
        return a.cpu().numpy()

    def _target(self, batch: Batch, alpha: torch.Tensor) -> torch.Tensor:
        if self._early_target is not None:  # target_first: computed from the pre-update actor and temperature
            target, self._early_target = self._early_target, None
            return target
        with torch.no_grad():
            next_a, next_logp = self.actor.sample(batch.next_obs)
            subset = None
            if self.p.target_subset < self.p.num_critics:  # REDQ: min over a random subset of M critics, the
                # only ones evaluated (M of N target forwards)
                subset = torch.randperm(self.p.num_critics, device=self.device)[: self.p.target_subset]
            q_next = self.critic_target(batch.next_obs, next_a, subset)  # (M, B)
            v_next = q_next.min(0).values  # (B,)
            if self.p.backup_entropy:
                v_next = v_next - alpha * next_logp
            return batch.rew + self.p.gamma * (1.0 - batch.done) * v_next

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One critic update (and, every ``actor_update_every`` calls, one actor + temperature update)."""
        self.num_updates += 1
        actor_due = self.num_updates % (self.p.actor_update_every or 1) == 0
        if actor_due and self.p.actor_first:
            if self.p.target_first:
                self._early_target = self._target(batch, self.alpha)
            self._last_actor = self._update_actor(batch.obs, self.alpha)
        alpha = self.alpha
        critic_loss, metrics = self._critic_loss(batch, alpha)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        soft_update(self.critic_target, self.critic, self.p.tau)
        metrics["critic_loss"] = critic_loss.detach()
        if actor_due and not self.p.actor_first:
            self._last_actor = self._update_actor(batch.obs, alpha)
        metrics.update(self._last_actor)
        return metrics

    def _critic_loss(self, batch: Batch, alpha: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critic's loss and metrics; offline variants (CQL, EDAC) add their regularisers here."""
        target = self._target(batch, alpha)
        q = self.critic(batch.obs, batch.act)  # (N, B)
        # 0.5 * sum over members of each member's MSE, as Stable-Baselines3.
        return 0.5 * (q - target).pow(2).mean(1).sum(), {"q_mean": q.detach().mean()}

    def _update_actor(self, obs: torch.Tensor, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        set_requires_grad(self.critic.parameters(), False)  # no wasted critic gradients
        a, logp = self.actor.sample(obs)
        q = self.critic(obs, a)  # (N, B)
        q = q.min(0).values if self.p.actor_q == "min" else q.mean(0)
        actor_loss = (alpha * logp - q).mean()
        out = {"actor_loss": actor_loss.detach(), "entropy": -logp.detach().mean(), "alpha": alpha}
        loss = actor_loss
        if self.p.autotune_alpha:  # J(alpha) with the same sample's log-probs (as the SAC paper's code)
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            out["alpha_loss"] = alpha_loss.detach()
            loss = actor_loss + alpha_loss  # disjoint parameters: gradients are those of each loss alone
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        set_requires_grad(self.critic.parameters(), True)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().clone(), "num_updates": self.num_updates,
                "last_actor": dict(self._last_actor)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.num_updates = int(state["num_updates"])
        self._last_actor = {k: v.to(self.device) for k, v in state["last_actor"].items()}


class REDQ(SAC):
    """REDQ: :class:`SAC` with :class:`REDQParams` (N critics, subset M, delayed actor)."""
