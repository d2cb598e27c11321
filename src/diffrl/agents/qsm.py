"""QSM, Q-score matching (Psenka et al. 2024, arXiv:2312.11752): train the diffusion policy's score to match the
action gradient of the critic, with no behaviour-cloning term.

As DPPO's QSM baseline (irom-princeton/dppo ``model/diffusion/diffusion_qsm.py``, ``agent/finetune/
train_qsm_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_qsm_diffusion_mlp.yaml``), one update is:

1. critic: ``L = sum_i mean (Q_i(s, a) - y)^2``, ``y = r + gamma (1 - done) min_i Q'_i(s', a')``, ``a'`` a
   training-chain draw of the CURRENT policy, ``Q'`` the target critic;
2. unless ``critic_only`` (the loop's critic warm-up), the actor: for the buffer chunk ``a``, ``t ~ U[0, K)`` and
   ``a_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps`` (``DDPM.q_sample``),
   ``L = mean (-eps_theta(a_t, t, s) - alpha g)^2`` with ``g = mean_i grad_{a_t} Q_i(s, a_t)`` (the online critic,
   detached) and ``alpha`` = ``q_grad_coeff`` (10); a noise prediction ``eps`` moves a sample along ``-eps``, so
   the policy's denoising drifts up the critic;
3. the target critic moves by ``tau`` (0.005).

The critic is evaluated at the NOISED chunk ``a_t`` (the reference: "the algorithm block in the paper is wrong").
With a normaliser inside the model, ``a_t`` lives in its space and the gradient is taken through the
un-normalisation (the identity for DPPO's pre-normalised data).

Batches are flat: ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)``, ``rew``, ``done`` ``(B,)``.
Shapes: ``B`` batch, ``K`` denoising steps, ``Ta`` / ``Da`` chunk length / action dim.
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.agents.base import soft_update
from diffrl.agents.diffusion_q import DiffusionQAgent, DiffusionQParams
from diffrl.config import check_positive
from diffrl.data.batch import Batch
from diffrl.diffusion.models import DDPM
from diffrl.errors import ConfigError

__all__ = ["QSMParams", "QSM"]


@dataclasses.dataclass(frozen=True)
class QSMParams(DiffusionQParams):
    """QSM hyper-parameters (defaults: DPPO's Gym QSM config ``ft_qsm_diffusion_mlp.yaml`` at its latest commit)."""

    tau: float = 0.005
    """Polyak rate of the target critic, after every gradient step (train.critic_tau)"""
    q_grad_coeff: float = 10.0
    """alpha, the scale of the critic's action gradient the negated noise prediction regresses on
    (train.q_grad_coeff; 50 in an earlier version of the config)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("q_grad_coeff", self.q_grad_coeff)
        self.check_whole_chunks("QSM", "its actor noises buffer chunks")


class QSM(DiffusionQAgent):
    """QSM on a (pre-trained or fresh) epsilon-predicting DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do``
    values. The trained chain is the policy (exploration, evaluation and ``a'``).

    Args:
        model: the DDPM (copied; its chain is trained in full).
        obs_dim: ``Do``.
        params: :class:`QSMParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "QSM"
    p: QSMParams

    def __init__(self, model: DDPM, obs_dim: int, params: QSMParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        if isinstance(model, DDPM) and model.prediction != "epsilon":
            raise ConfigError(f"QSM matches the noise prediction to the critic's gradient, so it needs an "
                              f"epsilon-predicting DDPM, got prediction={model.prediction!r}.")
        super().__init__(model, obs_dim, params, device, seed)

    def score_target(self, obs: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """``alpha mean_i grad_{x_t} Q_i(s, unnormalize(x_t))`` ``(B, Ta, Da)`` (detached) at noised chunks ``x_t``
        ``(B, Ta, Da)`` in the model's space, with the online critic."""
        x = x_t.detach().requires_grad_(True)
        q = self.critic(obs, self._executed(self.actor.base.normalizer.unnormalize(x)))  # (2, B)
        (grad,) = torch.autograd.grad(q.mean(0).sum(), x)  # the mean of the two critics' gradients
        return self.p.q_grad_coeff * grad

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean (-eps_theta(a_t, t, s) - alpha g)^2`` and the mean norm of ``alpha g`` per sample. Draws ``t``, then
        the noise, from the agent's generator."""
        base = self.actor.base
        x0 = base.normalizer(self._chunks(batch.act))  # (B, Ta, Da)
        t = torch.randint(0, base.num_steps, (len(x0),), device=self.device, generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, generator=self.generator)
        x_t = base.q_sample(x0, t, noise)
        target = self.score_target(batch.obs, x_t)
        eps = base.network(x_t, t.float(), batch.obs, net=self.actor.ft_net)
        return ((-eps - target) ** 2).mean(), target.flatten(1).norm(dim=1).mean()

    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """The critic step, then (unless ``critic_only``) one actor step on the updated critic, then the target
        critic's Polyak step. Returns detached metrics: ``critic_loss, q_mean, target_mean`` and, with the actor,
        ``actor_loss, actor_grad_norm, score_target_norm``."""
        metrics = self.critic_step(batch, self.td_target(batch))
        if not critic_only:  # the reference computes the actor loss in warm-up too and skips only the step
            loss, target_norm = self.actor_loss(batch)
            metrics.update(actor_loss=loss.detach(), actor_grad_norm=self.actor_step(loss),
                           score_target_norm=target_norm)
        soft_update(self.critic_target, self.critic, self.p.tau)
        self.num_updates += 1
        return metrics
