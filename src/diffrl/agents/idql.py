"""IDQL, implicit diffusion Q-learning (Hansen-Estruch et al. 2023, arXiv:2304.10573): IQL's expectile critics and a
behaviour-cloned diffusion policy that acts by scoring several candidate chunks with the critic.

As DPPO's IDQL baseline (irom-princeton/dppo ``model/diffusion/diffusion_idql.py``, ``agent/finetune/
train_idql_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_idql_diffusion_mlp.yaml``), one update is:

1. ``V``: ``L_V = mean |tau - 1(u < 0)| u^2`` with ``u = min_i Q'_i(s, a) - V(s)`` (IQL eq. 5; ``tau`` = 0.8, the
   default of the reference's ``expectile_loss``, which its loss calls without an argument), ``Q'`` the target critic;
2. ``Q``: ``L_Q = sum_i mean (Q_i(s, a) - y)^2``, ``y = r + gamma (1 - done) V(s')`` with the ``V`` just updated (the
   reference's order; CORL's IQL reads ``V(s')`` before the ``V`` step);
3. the target critic moves by ``tau`` (0.001);
4. the actor (unless ``critic_only``): the plain epsilon loss of the buffer chunks (no weighting).

Acting (:class:`CandidateSelection`): ``S`` = ``num_candidates`` chains per state (20, the config's
``eval_sample_num``, used by the reference in training and evaluation alike), scored by ``min_i Q'_i``. Evaluation
(the DDPM evaluation chain) takes the argmax; exploration (the training chain) draws candidate ``k`` with
probability ``w_k / sum w``, ``w_k = 0.7`` if ``Q'_k - V > 0`` else ``0.3`` (the reference's ``critic_hyperparam``).

Batches are flat: ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)``, ``rew``, ``done`` ``(B,)``.
Shapes: ``B`` batch, ``S`` candidates per state, ``Ta`` / ``Da`` chunk length / action dim, ``To`` / ``Do`` history
length / observation dim.
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.agents.base import check_hidden, soft_update
from diffrl.agents.diffusion_q import CandidatePolicy, DiffusionQAgent, DiffusionQParams, check_residual
from diffrl.agents.dppo import DiffusionPolicy
from diffrl.agents.iql import expectile_loss
from diffrl.agents.nets import EnsembleQ
from diffrl.agents.ppo import ChunkSample, ValueCritic
from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.data.batch import Batch
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ACTIVATIONS

__all__ = ["IDQLParams", "IDQL", "CandidateSelection", "expectile_weights", "select_candidates"]


@dataclasses.dataclass(frozen=True)
class IDQLParams(DiffusionQParams):
    """IDQL hyper-parameters (defaults: DPPO's Gym IDQL config ``ft_idql_diffusion_mlp.yaml`` and its code)."""

    tau: float = 0.001
    """Polyak rate of the target critic, after every gradient step (train.critic_tau)"""
    expectile: float = 0.8
    """expectile of the V loss (the default of diffusion_idql.py's expectile_loss, which loss_critic_v uses)"""
    num_candidates: int = 20
    """candidate chunks drawn per state when acting, in training and evaluation (train.eval_sample_num)"""
    exploration_expectile: float = 0.7
    """exploration weight of a candidate with Q' - V > 0 (1 minus it otherwise; forward's critic_hyperparam)"""
    expectile_exploration: bool = True
    """explore by expectile-weighted draws (train.use_expectile_exploration); False: the argmax, as evaluation"""
    value_lr: float = 1e-3
    """V learning rate (AdamW; the reference uses critic_lr for both critics)"""
    value_weight_decay: float = 0.0
    """AdamW weight decay of V (critic_weight_decay)"""
    value_hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of V (critic_v mlp_dims)"""
    value_activation: str = "mish"
    """activation of V (Mish)"""
    value_residual: bool = True
    """DPPO's residual trunk for V: CriticObs spells residual_style correctly, so unlike Q's it takes effect"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.expectile < 1, "expectile", self.expectile, "in (0, 1)")
        check(0 < self.exploration_expectile < 1, "exploration_expectile", self.exploration_expectile, "in (0, 1)")
        check_positive("num_candidates", self.num_candidates)
        check_positive("value_lr", self.value_lr)
        check_non_negative("value_weight_decay", self.value_weight_decay)
        check_hidden(self.value_hidden)
        check_residual("value", self.value_hidden, self.value_residual)
        check_choice("value_activation", self.value_activation, ACTIVATIONS)
        self.check_whole_chunks("IDQL", "its actor behaviour-clones buffer chunks")


def expectile_weights(adv: torch.Tensor, expectile: float) -> torch.Tensor:
    """Sampling weights over candidates ``(S, B)`` from advantages ``Q' - V`` ``(S, B)``: ``expectile`` where the
    advantage is positive, ``1 - expectile`` elsewhere (the reference's ``adv > 0``), normalised over ``S``."""
    w = torch.where(adv > 0, expectile, 1.0 - expectile)
    return w / w.sum(0)


def select_candidates(candidates: torch.Tensor, q: torch.Tensor, adv: torch.Tensor | None, expectile: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One chunk per state from ``candidates`` ``(S, B, Ta, Da)``: the argmax of ``q`` ``(S, B)`` when ``adv`` is
    None, else a draw with :func:`expectile_weights` of ``adv`` ``(S, B)``. Returns ``(B, Ta, Da)``."""
    if adv is None:
        idx = q.argmax(0)  # (B,)
    else:
        idx = torch.multinomial(expectile_weights(adv, expectile).T, 1, generator=generator).squeeze(1)  # (B,)
    return candidates[idx, torch.arange(candidates.shape[1], device=candidates.device)]


class CandidateSelection(CandidatePolicy):
    """IDQL's policy: ``S`` chains per state, one chunk selected by the target critic (and ``V`` when exploring)."""

    def __init__(self, chain: DiffusionPolicy, critic_target: EnsembleQ, value: ValueCritic, num_candidates: int,
                 act_steps: int, expectile_exploration: bool = True, exploration_expectile: float = 0.7) -> None:
        super().__init__(chain, critic_target, num_candidates, act_steps)
        self.value = value
        self.expectile_exploration, self.exploration_expectile = expectile_exploration, exploration_expectile

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)``; ``deterministic`` (evaluation): candidates from the
        evaluation chain and the argmax; otherwise the training chain and (``expectile_exploration``) a weighted
        draw from ``generator``. No chain is recorded (nothing re-scores it)."""
        cand, q = self.scored(obs, deterministic, generator, mean_path)
        explore = not deterministic and self.expectile_exploration
        adv = q - self.value(obs).unsqueeze(0) if explore else None  # V(s) is the same for every candidate
        return ChunkSample(select_candidates(cand, q, adv, self.exploration_expectile, generator), None)


class IDQL(DiffusionQAgent):
    """IDQL on a (pre-trained or fresh) DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values.

    ``policy`` (exploration and evaluation) is the :class:`CandidateSelection` around the behaviour-cloned chain.

    Args:
        model: the DDPM (copied; its chain is behaviour-cloned in full).
        obs_dim: ``Do``.
        params: :class:`IDQLParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "IDQL"
    p: IDQLParams
    policy: CandidateSelection

    def __init__(self, model: DDPM, obs_dim: int, params: IDQLParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__(model, obs_dim, params, device, seed)
        p = params
        self.value = ValueCritic(obs_dim, p.cond_steps, p.value_hidden, residual=p.value_residual,
                                 activation=p.value_activation).to(self.device)  # CriticObs
        self.value_opt = self.adamw(self.value.parameters(), p.value_lr, p.value_weight_decay)
        self.policy = CandidateSelection(self.actor, self.critic_target, self.value, p.num_candidates, p.act_steps,
                                         p.expectile_exploration, p.exploration_expectile)
        self.nets["value"] = self.value
        self.optims["value"] = self.value_opt

    def value_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The expectile loss of ``u = min_i Q'_i(s, a) - V(s)`` and ``u`` ``(B,)`` (detached)."""
        with torch.no_grad():
            q = self.critic_target(batch.obs, batch.act).min(0).values  # (B,)
        adv = q - self.value(batch.obs)
        return expectile_loss(adv, self.p.expectile), adv.detach()

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """``y = r + gamma (1 - done) V(s')`` ``(B,)`` with the current ``V``."""
        return batch.rew + self.p.gamma * (1.0 - batch.done) * self.value(batch.next_obs)

    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """The ``V`` step, the ``Q`` step on the updated ``V``, the target critic's Polyak step, then (unless
        ``critic_only``, the loop's critic warm-up) one BC step of the actor. Returns detached metrics:
        ``value_loss, adv_mean, critic_loss, q_mean, target_mean`` and, with the actor, ``actor_loss,
        actor_grad_norm``."""
        value_loss, adv = self.value_loss(batch)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()
        metrics = {"value_loss": value_loss.detach(), "adv_mean": adv.mean(),
                   **self.critic_step(batch, self.td_target(batch))}
        soft_update(self.critic_target, self.critic, self.p.tau)
        if not critic_only:  # the reference computes the BC loss in warm-up too and skips only the step
            bc = self.bc_loss(self._chunks(batch.act), batch.obs)
            metrics.update(actor_loss=bc.detach(), actor_grad_norm=self.actor_step(bc))
        self.num_updates += 1
        return metrics
