"""Diffusion-QL (Wang et al. 2023, arXiv:2208.06193): a diffusion policy trained by behaviour cloning plus the
Q-value of its own samples, back-propagated through the whole denoising chain; double Q with a Polyak target.

As DPPO's DQL baseline (irom-princeton/dppo ``model/diffusion/diffusion_dql.py``, ``agent/finetune/
train_dql_diffusion_agent.py``, ``cfg/gym/finetune/hopper-v2/ft_dql_diffusion_mlp.yaml``), the defaults:

- critic: ``L = sum_{i=1,2} mean (Q_i(s, a) - y)^2`` with ``y = r + gamma (1 - done) min_i Q'_i(s', a')``, ``a'``
  drawn from the CURRENT diffusion policy (stochastic chain, std floor ``min_sampling_std``, noise clamped to
  ``noise_clip``), ``Q'`` the Polyak target (``tau``) updated after every gradient step;
- actor: ``L = bc_loss + eta q_loss`` with ``q_loss = -Q_i(s, a_new).mean() / |Q_j(s, a_new)|.mean().detach()``,
  ``(i, j)`` = (1, 2) or (2, 1) with probability 1/2 each (paper eq. 3 with the reference's normalisation), and
  ``a_new`` sampled with gradients through all ``K`` transitions (:func:`~diffrl.diffusion.samplers.
  sample_chain_grad`).

Wang et al.'s offline algorithm (Zhendong-Wang/Diffusion-Policies-for-Offline-RL ``agents/ql_diffusion.py``,
``agents/diffusion.py``, ``main.py``) is the same update on a fresh model (:func:`dql_offline_model`: ``K = 5`` steps
of the VP schedule, one action per state) with options of :class:`DQLParams` switched on: ``a'`` from an EMA copy
of the actor (``target_actor='ema'``), the plain posterior chain (``min_sampling_std = 0``: no noise at ``t = 0``;
``noise_clip = None``), the critic's gradient clipped too (``critic_max_grad_norm``), cosine learning-rate decay
(``lr_decay_steps``) and actions chosen among ``eval_candidates`` samples by the target critic (:class:`QSelection`).
``diffrl offline dql`` (:mod:`diffrl.pipelines.offline`) sets them. Dydiff's code (FineArtz/DyDiff
``rlkit/algo/diff_ql.py``) runs that update with ``use_pred_start``: its ``a_new`` is the clean-action estimate of the
BC term's own network call, not a chain sample (``q_action='pred_start'``).

The critic, the chain's roles, ``a'``, the BC loss and the steps are :class:`~diffrl.agents.diffusion_q.
DiffusionQAgent`'s (shared with IDQL, DIPO and QSM); this module adds the actor loss and the update. The agent knows
no loop: the chunk off-policy loop (:mod:`diffrl.pipelines.chunk_offpolicy`) drives it online, the offline loop on
dataset transitions (``Ta = To = 1``).

Batches are flat (the Batch contract): ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)`` (the
EXECUTED part of each chunk, as the reference stores it), ``rew`` ``(B,)`` (already scaled), ``done`` ``(B,)``
(termination only).

Shapes: ``B`` batch, ``K`` denoising steps, ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length /
action dim, ``act_steps <= Ta`` executed actions of a chunk, ``N`` candidates per state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from diffrl.agents.base import set_requires_grad, soft_update
from diffrl.agents.diffusion_q import EVAL_SEED, CandidatePolicy, DiffusionQAgent, DiffusionQParams
from diffrl.agents.dppo import DiffusionPolicy
from diffrl.agents.nets import EnsembleQ
from diffrl.agents.ppo import ChunkSample, check_optional_positive
from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.data.batch import Batch
from diffrl.diffusion.ema import EMA
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.samplers import sample_chain_grad
from diffrl.diffusion.spec import build_model

__all__ = ["DQLParams", "DQL", "QSelection", "dql_offline_model", "BC_TARGETS", "TARGET_ACTORS", "Q_ACTIONS",
           "EVAL_SEED"]

BC_TARGETS = ("buffer", "sampled")
TARGET_ACTORS = ("current", "ema")
Q_ACTIONS = ("chain", "pred_start")


@dataclasses.dataclass(frozen=True)
class DQLParams(DiffusionQParams):
    """Diffusion-QL hyper-parameters (defaults: DPPO's Gym DQL config, ``ft_dql_diffusion_mlp.yaml``; the shared ones
    are :class:`~diffrl.agents.diffusion_q.DiffusionQParams`)."""

    eta: float = 1.0
    """weight of the normalised Q term in the actor loss"""
    bc_target: str = "buffer"
    """what the BC term clones: 'buffer' (the paper: the epsilon loss of the batch's actions) or 'sampled' (DPPO's
    reference: the epsilon loss of a_new itself, with gradients through a_new)"""
    q_action: str = "chain"
    """the action a_new whose value the Q term raises: 'chain' (the paper: a sample of the whole chain, differentiated
    through every step) or 'pred_start' (DyDiff's code, FineArtz/DyDiff rlkit/algo/diff_ql.py use_pred_start: the
    clean-action estimate of the BC term's own network call on the noised data action, one step at a random t)"""
    target_actor: str = "current"
    """who draws the TD target's a': 'current' (DPPO's reference: the trained chain itself) or 'ema' (Wang et al.: an
    EMA copy of it, moved by ema_decay every ema_every updates from update ema_start on)"""
    ema_decay: float = 0.995
    """decay of the EMA actor (Wang et al.'s ema_decay)"""
    ema_every: int = 5
    """updates between two EMA steps (update_ema_every)"""
    ema_start: int = 1000
    """updates before the EMA starts averaging (step_start_ema); until then it copies the actor"""
    eval_candidates: int | None = None
    """None: act with the chain itself (deterministic: DPPO's evaluation chain); N: Wang et al.'s selection, N actions
    sampled per state and the one of highest min_i Q'_i taken (deterministic) or drawn by softmax(min_i Q'_i)"""
    eval_draw: bool = False
    """with eval_candidates: evaluate with the softmax draw too (Wang et al.'s and Dydiff's code evaluate that way),
    from a fixed seed at each call so an action stays a function of the observation; off: the argmax (its mode)"""
    lr_decay_steps: int | None = None
    """cosine-anneal both learning rates to 0 over this many updates (Wang et al.'s lr_decay); None: constant"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative("eta", self.eta)
        check_choice("bc_target", self.bc_target, BC_TARGETS)
        check_choice("target_actor", self.target_actor, TARGET_ACTORS)
        check_choice("q_action", self.q_action, Q_ACTIONS)
        check(self.q_action == "chain" or self.bc_target == "buffer", "bc_target", self.bc_target,
              "'buffer' with q_action='pred_start' (its a_new is the estimate of the buffer action's BC term)")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        check_positive("ema_every", self.ema_every)
        check_non_negative("ema_start", self.ema_start)
        check_optional_positive("eval_candidates", self.eval_candidates)
        check(not self.eval_draw or self.eval_candidates is not None, "eval_draw", self.eval_draw,
              "False unless eval_candidates is set (it draws among the candidates)")
        check_optional_positive("lr_decay_steps", self.lr_decay_steps)
        # the buffer holds only the executed actions: the model's (Ta, Da) event needs all of them
        check(self.bc_target == "sampled" or self.act_steps == self.horizon_steps, "act_steps", self.act_steps,
              f"= horizon_steps={self.horizon_steps} with bc_target='buffer' (the buffer keeps only executed "
              "actions, and behaviour cloning needs whole chunks); or use bc_target='sampled'")


def dql_offline_model(obs_dim: int, act_dim: int, *, denoising_steps: int = 5, schedule: str = "vp",
                      hidden: int = 256, time_dim: int = 16, clip_x0: float | None = 1.0) -> DDPM:
    """Wang et al.'s fresh (untrained) diffusion policy over single actions: an epsilon-predicting DDPM over
    ``(1, Da)`` conditioned on the state, ``denoising_steps`` steps of ``schedule`` (their ``--T 5``, ``vp``), the
    clean action clipped to ``[-clip_x0, clip_x0]`` (their ``max_action``: 1 on MuJoCo), no normaliser (actions are
    used as they are). The denoiser takes ``[x, time_mlp(t), s]`` with their time MLP (sinusoidal ``time_dim`` ->
    ``2 time_dim`` -> ``time_dim``, Mish) into ``hidden``-wide Mish layers.

    Deviation: the denoiser is ``chunk_mlp`` (DPPO's trunk ``Linear -> x + L(mish(L(mish(x)))) -> Linear``: four
    linear layers of Wang et al.'s widths, but a skip connection and no Mish before the output layer, where
    ``agents/model.py`` stacks ``Linear -> Mish`` three times), the MLP denoiser :mod:`diffrl.diffusion.nets` has.
    Built from a spec (:func:`~diffrl.diffusion.spec.build_model`) with the global torch RNG."""
    return build_model({  # type: ignore[return-value]
        "type": "ddpm", "event_shape": [1, act_dim], "cond_dim": obs_dim,
        "denoiser": {"type": "chunk_mlp", "hidden": hidden, "blocks": 1, "time_dim": time_dim, "activation": "mish"},
        "normalizer": {"kind": "none"},
        "diffusion": {"num_steps": denoising_steps, "schedule": schedule, "prediction": "epsilon", "clip_x0": clip_x0},
        "sampler": {"sampler": "ddpm"}})


class QSelection(CandidatePolicy):
    """Wang et al.'s action selection (``Diffusion_QL.sample_action``): ``N`` chains per state from the actor's
    TRAINING sampling (theirs, also to evaluate), scored by ``min_i Q'_i`` of the target critic; the argmax when
    ``deterministic`` (the mode of their softmax draw) unless ``draw_when_deterministic``, else a draw from
    ``softmax`` over the ``N`` scores."""

    def __init__(self, chain: DiffusionPolicy, critic_target: EnsembleQ, num_candidates: int, act_steps: int, *,
                 draw_when_deterministic: bool = False) -> None:
        super().__init__(chain, critic_target, num_candidates, act_steps)
        self.draw_when_deterministic = draw_when_deterministic

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)``; candidates and the softmax draw from ``generator``."""
        if mean_path:
            raise ValueError("Wang et al.'s candidate selection has no mean path; evaluate without it")
        cand, q = self.scored(obs, False, generator)  # (N, B, Ta, Da), (N, B)
        if deterministic and not self.draw_when_deterministic:
            idx = q.argmax(0)  # (B,)
        else:
            idx = torch.multinomial(torch.softmax(q, 0).T, 1, generator=generator).squeeze(1)  # (B,)
        return ChunkSample(cand[idx, torch.arange(cand.shape[1], device=obs.device)], None)


class DQL(DiffusionQAgent):
    """Diffusion-QL on a (pre-trained or fresh) DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values.

    The actor is a :class:`~diffrl.agents.dppo.DiffusionPolicy` whose every transition runs the trainable copy
    (``K' = K``: DQL trains the whole chain), so sampling, evaluation and the differentiable chain use DPPO's
    routing, std floors and noise clip. By default it explores, is evaluated and draws ``a'`` (DPPO's choice); with
    ``target_actor='ema'`` its EMA copy (:class:`~diffrl.diffusion.ema.EMA`) draws ``a'``, with ``eval_candidates``
    a :class:`QSelection` around it acts (Wang et al.'s). All of the agent's randomness (exploration, ``a'``,
    ``a_new``, the Q choice, the BC noise, the softmax draw) comes from its own generator, saved in
    :meth:`state_dict`; ``act(obs, deterministic=True)`` uses a fixed noise of its own and draws nothing from it, so
    an evaluation action is a function of the observation (and the batch size).

    Args:
        model: the DDPM (copied; its chain is fine-tuned in full).
        obs_dim: ``Do``.
        params: :class:`DQLParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "Diffusion-QL"
    p: DQLParams
    policy: DiffusionPolicy | QSelection

    def __init__(self, model: DDPM, obs_dim: int, params: DQLParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__(model, obs_dim, params, device, seed)
        p = params
        self.ema: EMA | None = None
        if p.target_actor == "ema":
            # Deviation: until ema_start the EMA copies the actor (DPPO's and Diffuser's reset); Wang et al.'s
            # step_ema returns without one, so their first 1000 targets come from the untrained initial chain
            self.ema = EMA(self.actor, p.ema_decay, p.ema_every, p.ema_start)
            self.sampler = self.ema.shadow
            self.nets["policy_target"] = self.ema.shadow
        if p.eval_candidates is not None:
            self.policy = QSelection(self.actor, self.critic_target, p.eval_candidates, p.act_steps,
                                     draw_when_deterministic=p.eval_draw)

    def anneal_lr(self) -> None:
        """Both learning rates at update ``u = num_updates``: ``lr (1 + cos(pi min(u, T) / T)) / 2`` with ``T =
        lr_decay_steps`` (torch's CosineAnnealingLR, eta_min 0, stepped once per update), a function of the saved
        counter so a resume continues it exactly. Deviation: Wang et al. step their scheduler once per 50k-update
        ``train`` call against ``T_max = num_epochs`` (2000), so their rates only fall to 99.9% by the end."""
        steps = self.p.lr_decay_steps
        if steps is None:
            return
        scale = 0.5 * (1.0 + math.cos(math.pi * min(self.num_updates, steps) / steps))
        for opt, lr in ((self.actor_opt, self.p.actor_lr), (self.critic_opt, self.p.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * scale

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``bc_loss + eta q_loss`` and its parts. Draws, in order: the differentiable chain of ``a_new``, one
        uniform for the Q choice (``> 0.5``: ``Q_1`` over ``|Q_2|``, as the reference's coin), the BC noise; with
        ``q_action='pred_start'``: the BC step and noise (their ``a_new`` is its clean-action estimate), the coin."""
        p, base = self.p, self.actor.base
        cond = batch.obs  # (B, To Do)
        data = batch.act.view(len(cond), p.act_steps, self.act_dim)
        bc = None
        if p.q_action == "pred_start":
            bc, x = base.loss_and_x0(data, cond, self.generator, net=self.actor.ft_net)
        else:
            x = sample_chain_grad(base, (len(cond), *base.event_shape), cond, min_std=p.min_sampling_std,
                                  noise_clip=p.noise_clip, generator=self.generator, device=self.device,
                                  net_for_step=self.actor.net_for_step)  # (B, Ta, Da), normalised space
        a_new = base.normalizer.unnormalize(x)
        q = self.critic(cond, self._executed(a_new))  # (2, B)
        i = 0 if float(torch.rand((), device=self.device, generator=self.generator)) > 0.5 else 1
        q_loss = -q[i].mean() / q[1 - i].abs().mean().detach()
        if bc is None:
            # 'buffer': Wang et al. 2023 (eq. 3 and their code) clone the data's actions. 'sampled': DPPO's reference
            # (diffusion_dql.py loss_actor at its latest commit; the earlier one cloned buffer actions):
            # self.loss(action_new, obs), the policy cloning its own fresh sample, which anchors it to itself rather
            # than to the data the paper's term keeps it near; an option to reproduce that baseline
            bc = self.bc_loss(data if p.bc_target == "buffer" else a_new, cond)
        loss = bc + p.eta * q_loss
        return loss, {"bc_loss": bc.detach(), "q_loss": q_loss.detach(), "q_new_mean": q.detach().mean()}

    # ------------------------------------------------------------------------------------------------ update
    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """The learning rates of this update (:meth:`anneal_lr`), one critic step, then (unless ``critic_only``, the
        loop's critic warm-up) one actor step on the updated critic, then the Polyak target update (every call, as
        the reference) and the EMA actor's update. Returns detached metrics: ``critic_loss, q_mean, target_mean``
        (``critic_grad_norm`` when clipped) and, with the actor, ``actor_loss, bc_loss, q_loss, q_new_mean,
        actor_grad_norm``."""
        self.anneal_lr()
        metrics = self.critic_step(batch, self.td_target(batch))
        if not critic_only:  # the reference computes the actor loss in warm-up too and skips only the step
            set_requires_grad(self.critic.parameters(), False)
            actor_loss, parts = self.actor_loss(batch)
            norm = self.actor_step(actor_loss)
            set_requires_grad(self.critic.parameters(), True)
            metrics.update(actor_loss=actor_loss.detach(), actor_grad_norm=norm, **parts)
        soft_update(self.critic_target, self.critic, self.p.tau)
        if self.ema is not None:
            self.ema.update()  # counts updates: copies until ema_start, then averages every ema_every-th
        self.num_updates += 1
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), **({"ema_step": self.ema.step} if self.ema is not None else {})}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self.ema is not None:
            self.ema.step = int(state["ema_step"])
