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

The critic, the chain's roles, ``a'``, the BC loss and the steps are :class:`~diffrl.agents.diffusion_q.
DiffusionQAgent`'s (shared with IDQL, DIPO and QSM); this module adds the actor loss and the update. The agent knows
no loop: the chunk off-policy loop (:mod:`diffrl.pipelines.chunk_offpolicy`) drives it online, and
an offline loop may call :meth:`DQL.update` on dataset batches (Dydiff: ``Ta = To = 1`` transitions).

Batches are flat (the Batch contract): ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)`` (the
EXECUTED part of each chunk, as the reference stores it), ``rew`` ``(B,)`` (already scaled), ``done`` ``(B,)``
(termination only).

Shapes: ``B`` batch, ``K`` denoising steps, ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length /
action dim, ``act_steps <= Ta`` executed actions of a chunk.
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.agents.base import set_requires_grad, soft_update
from diffrl.agents.diffusion_q import EVAL_SEED, DiffusionQAgent, DiffusionQParams
from diffrl.agents.dppo import DiffusionPolicy
from diffrl.config import check, check_choice, check_non_negative
from diffrl.data.batch import Batch
from diffrl.diffusion.samplers import sample_chain_grad

__all__ = ["DQLParams", "DQL", "BC_TARGETS", "EVAL_SEED"]

BC_TARGETS = ("buffer", "sampled")


@dataclasses.dataclass(frozen=True)
class DQLParams(DiffusionQParams):
    """Diffusion-QL hyper-parameters (defaults: DPPO's Gym DQL config, ``ft_dql_diffusion_mlp.yaml``; the shared ones
    are :class:`~diffrl.agents.diffusion_q.DiffusionQParams`)."""

    eta: float = 1.0
    """weight of the normalised Q term in the actor loss"""
    bc_target: str = "buffer"
    """what the BC term clones: 'buffer' (the paper: the epsilon loss of the batch's actions) or 'sampled' (DPPO's
    reference: the epsilon loss of a_new itself, with gradients through a_new)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative("eta", self.eta)
        check_choice("bc_target", self.bc_target, BC_TARGETS)
        # the buffer holds only the executed actions: the model's (Ta, Da) event needs all of them
        check(self.bc_target == "sampled" or self.act_steps == self.horizon_steps, "act_steps", self.act_steps,
              f"= horizon_steps={self.horizon_steps} with bc_target='buffer' (the buffer keeps only executed "
              "actions, and behaviour cloning needs whole chunks); or use bc_target='sampled'")


class DQL(DiffusionQAgent):
    """Diffusion-QL on a (pre-trained or fresh) DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values.

    The policy is a :class:`~diffrl.agents.dppo.DiffusionPolicy` whose every transition runs the trainable copy
    (``K' = K``: DQL trains the whole chain), so sampling, evaluation and the differentiable chain use DPPO's
    routing, std floors and noise clip; it explores, is evaluated and draws ``a'`` (the reference's choice; the
    paper's code samples the EMA actor). All of the agent's randomness (exploration, ``a'``, ``a_new``, the Q
    choice, the BC noise) comes from its own generator, saved in :meth:`state_dict`; ``act(obs,
    deterministic=True)`` uses a fixed noise of its own and draws nothing from it.

    Args:
        model: the DDPM (copied; its chain is fine-tuned in full).
        obs_dim: ``Do``.
        params: :class:`DQLParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "Diffusion-QL"
    p: DQLParams
    policy: DiffusionPolicy

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
        metrics = self.critic_step(batch, self.td_target(batch))
        if not critic_only:  # the reference computes the actor loss in warm-up too and skips only the step
            set_requires_grad(self.critic.parameters(), False)
            actor_loss, parts = self.actor_loss(batch)
            norm = self.actor_step(actor_loss)
            set_requires_grad(self.critic.parameters(), True)
            metrics.update(actor_loss=actor_loss.detach(), actor_grad_norm=norm, **parts)
        soft_update(self.critic_target, self.critic, self.p.tau)
        self.num_updates += 1
        return metrics
