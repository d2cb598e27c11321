"""Conservative Q-Learning (Kumar et al., 2020, arXiv:2006.04779), CQL(H) with importance sampling, as CORL.

The SAC critic loss gains ``cql_alpha * (logsumexp_a Q(s, a) - Q(s, a_data))`` (eq. (4)), the logsumexp
estimated from ``cql_n_actions`` uniform actions and policy actions at ``s`` and at ``s'``, each divided by its
sampling density. As in the reference code (young-geng/CQL, CORL), actions sampled at ``s'`` are scored at ``s``.
As in CORL, actor and temperature are updated first, from the pre-update critic (``actor_first``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from diffrl.agents.nets import EnsembleQ
from diffrl.agents.sac import SAC, SACParams
from diffrl.config import check, check_positive
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class CQLParams(SACParams):
    """CQL hyper-parameters (CORL's defaults for MuJoCo locomotion)."""

    hidden: tuple[int, ...] = (256, 256, 256)
    """hidden layer widths of the policy"""
    critic_hidden: tuple[int, ...] | None = (256, 256, 256)
    """hidden layer widths of the critics"""
    actor_lr: float = 3e-5
    """policy learning rate"""
    alpha_lr: float = 3e-5
    """temperature learning rate (CORL uses the policy's)"""
    backup_entropy: bool = False
    """no entropy term in the TD target (CORL)"""
    actor_first: bool = True
    """actor and temperature before the critic (CORL's order)"""
    cql_alpha: float = 10.0
    """weight of the conservative term"""
    cql_n_actions: int = 10
    """sampled actions per state for the logsumexp"""
    cql_temp: float = 1.0
    """temperature of the logsumexp"""
    importance_sample: bool = True
    """divide sampled Q-values by their sampling densities (CQL(H) with importance sampling)"""
    orthogonal_init: bool = True
    """orthogonal critic initialisation (CORL)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("cql_alpha", self.cql_alpha)
        check_positive("cql_temp", self.cql_temp)
        check(self.cql_n_actions >= 1, "cql_n_actions", self.cql_n_actions, ">= 1")


class CQL(SAC):
    """SAC with the conservative critic regulariser."""

    p: CQLParams

    def __init__(self, obs_dim: int, act_dim: int, params: CQLParams, device: torch.device | str = "cpu") -> None:
        super().__init__(obs_dim, act_dim, params, device)
        if params.orthogonal_init:  # rebuild the critics with CQL's init, and the optimizer over them
            hidden = tuple(params.critic_hidden or params.hidden)
            self.critic.load_state_dict(EnsembleQ(obs_dim, act_dim, hidden, params.num_critics,
                                                  orthogonal_init=True).state_dict())
            self.critic_target.load_state_dict(self.critic.state_dict())

    def _critic_loss(self, batch: Batch, alpha: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self._target(batch, alpha)
        q = self.critic(batch.obs, batch.act)  # (N, B)
        td_loss = (q - target).pow(2).mean(1).sum()  # sum of the critics' MSEs (CORL)
        n, b, k = q.shape[0], q.shape[1], self.p.cql_n_actions
        act_dim = batch.act.shape[-1]
        obs_rep = batch.obs.repeat_interleave(k, 0)  # (B*K, Do)
        with torch.no_grad():
            rand_a = torch.empty(b * k, act_dim, device=self.device).uniform_(-1.0, 1.0)
            cur_a, cur_logp = self.actor.sample(obs_rep)
            next_a, next_logp = self.actor.sample(batch.next_obs.repeat_interleave(k, 0))
        q_ood = self.critic(obs_rep.repeat(3, 1), torch.cat([rand_a, next_a, cur_a]))  # (N, 3*B*K)
        q_rand, q_next, q_cur = q_ood.view(n, 3, b, k).unbind(1)  # each (N, B, K)
        if self.p.importance_sample:
            log_uniform = act_dim * math.log(0.5)  # density of U(-1, 1)^Da
            cat = torch.cat([q_rand - log_uniform, q_next - next_logp.view(b, k), q_cur - cur_logp.view(b, k)], -1)
        else:
            cat = torch.cat([q_rand, q.unsqueeze(-1), q_next, q_cur], -1)
        ood = torch.logsumexp(cat / self.p.cql_temp, dim=-1) * self.p.cql_temp  # (N, B)
        gap = (ood - q).mean(1)  # (N,)
        loss = td_loss + self.p.cql_alpha * gap.sum()
        return loss, {"q_mean": q.detach().mean(), "td_loss": td_loss.detach(), "cql_gap": gap.detach().mean()}
