"""What DPPO's off-policy diffusion baselines share (Diffusion-QL, IDQL, DIPO, QSM): a DDPM chunk policy whose whole
chain is trained, a double Q-critic over ``[history, executed chunk]`` with a Polyak target, AdamW optimisers, the
agent's own generator and a complete ``state_dict``. Each baseline adds its losses and its update.

Three roles of the diffusion chain, one object or several:

- ``actor``: the trainable :class:`~diffrl.agents.dppo.DiffusionPolicy` (all ``K`` transitions fine-tuned);
- ``sampler``: the chain that draws actions for rollouts and for the TD target's ``a'`` (the actor, or DIPO's EMA
  copy of it);
- ``policy``: the :class:`~diffrl.agents.ppo.ChunkPolicy` that explores and is evaluated (the sampler, or IDQL's
  candidate selection around it).

Batches are flat (the Batch contract): ``obs`` / ``next_obs`` ``(B, To Do)``, ``act`` ``(B, act_steps Da)`` (the
EXECUTED part of each chunk), ``rew`` ``(B,)`` (already scaled), ``done`` ``(B,)`` (termination only).

Shapes: ``B`` batch, ``K`` denoising steps, ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length /
action dim, ``act_steps <= Ta`` executed actions of a chunk.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.base import Agent, Params, check_hidden
from diffrl.agents.dppo import DiffusionPolicy, check_chunk_model
from diffrl.agents.nets import EnsembleQ
from diffrl.agents.ppo import ChunkPolicy, check_optional_positive
from diffrl.config import check, check_choice, check_non_negative, check_positive, check_unit_interval
from diffrl.data.batch import Batch
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ACTIVATIONS

__all__ = ["DiffusionQParams", "DiffusionQAgent", "CandidatePolicy", "EVAL_SEED"]

EVAL_SEED = 1_299_709  # seed of the fixed noise of act(deterministic=True) (a prime; any constant would do)


@dataclasses.dataclass(frozen=True)
class DiffusionQParams(Params):
    """Settings every off-policy diffusion baseline shares (defaults: DPPO's Gym configs,
    ``cfg/gym/finetune/hopper-v2/ft_{dql,idql,dipo,qsm}_diffusion_mlp.yaml``, the same in all four)."""

    horizon_steps: int = 4
    """Ta, the predicted chunk length (must match the model; horizon_steps)"""
    act_steps: int = 4
    """executed actions per chunk: the critic scores these act_steps * Da values (act_steps)"""
    cond_steps: int = 1
    """To, the observation history length (cond_steps)"""
    gamma: float = 0.99
    """discount per executed chunk (train.gamma)"""
    tau: float = 0.005
    """Polyak rate of the target critic, after every gradient step"""
    actor_lr: float = 1e-4
    """actor learning rate (AdamW; the reference's cosine-warmup schedule has min_lr = max_lr: constant)"""
    critic_lr: float = 1e-3
    """critic learning rate (AdamW, constant as actor_lr)"""
    actor_weight_decay: float = 0.0
    """AdamW weight decay of the actor"""
    critic_weight_decay: float = 0.0
    """AdamW weight decay of the critic"""
    max_grad_norm: float | None = None
    """clip the actor's gradient norm (None: no clipping, as the Gym configs)"""
    critic_max_grad_norm: float | None = None
    """clip the critic's gradient norm (None: no clipping, as the Gym configs; Wang et al. clip both)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of each Q-network (CriticObsAct mlp_dims)"""
    critic_activation: str = "mish"
    """activation of the Q-networks (Mish)"""
    critic_residual: bool = False
    """DPPO's residual Q trunk. The configs ask for residual_style: True, but CriticObsAct's argument is spelt
    residual_tyle, so the reference runs a plain MLP: off by default, as the baselines' numbers were produced"""
    min_sampling_std: float = 0.1
    """std floor of every transition of the training chains (min_sampling_denoising_std); 0: the plain posterior
    std, so no noise at t = 0 (Wang et al.'s chain)"""
    noise_clip: float | None = 3.0
    """clamp of the standard-normal noise of the chains (randn_clip_value)"""
    clip_x0: float | None = 1.0
    """clamp of the predicted clean chunk (denoised_clip_value)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon_steps", "act_steps", "cond_steps", "actor_lr", "critic_lr"):
            check_positive(name, getattr(self, name))
        check_non_negative("min_sampling_std", self.min_sampling_std)
        check(self.act_steps <= self.horizon_steps, "act_steps", self.act_steps,
              f"<= horizon_steps={self.horizon_steps}")
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("tau", self.tau)
        for name in ("actor_weight_decay", "critic_weight_decay"):
            check_non_negative(name, getattr(self, name))
        check_optional_positive("max_grad_norm", self.max_grad_norm)
        check_optional_positive("critic_max_grad_norm", self.critic_max_grad_norm)
        check_optional_positive("noise_clip", self.noise_clip)
        check_optional_positive("clip_x0", self.clip_x0)
        check_hidden(self.critic_hidden)
        check_residual("critic", self.critic_hidden, self.critic_residual)
        check_choice("critic_activation", self.critic_activation, ACTIVATIONS)

    def check_whole_chunks(self, algorithm: str, why: str) -> None:
        """The buffer keeps only the executed actions: an algorithm that feeds buffer actions to the denoiser
        (behaviour cloning, score matching) needs ``act_steps = horizon_steps``."""
        check(self.act_steps == self.horizon_steps, "act_steps", self.act_steps,
              f"= horizon_steps={self.horizon_steps} for {algorithm} ({why}, and the buffer keeps only the executed "
              "actions of each chunk)")


def check_residual(what: str, hidden: Sequence[int], residual: bool) -> None:
    """A residual trunk (DPPO's ResidualMLP) needs an odd number of equal widths."""
    if residual:
        check(len(set(hidden)) == 1 and len(hidden) % 2 == 1, f"{what}_hidden", tuple(hidden),
              f"an odd number of equal widths for a residual {what} (e.g. 256 256 256)")


class CandidatePolicy(nn.Module):
    """A chain that acts by drawing ``S`` candidate chunks per state and letting the target critic choose, as a
    :class:`~diffrl.agents.ppo.ChunkPolicy` (IDQL's selection, Wang et al.'s Diffusion-QL action choice); subclasses
    write ``sample`` around :meth:`scored`. It holds the agent's networks; its own state is nothing.

    Candidate ``s`` of state ``b`` is row ``s B + b`` of the repeated batch (IDQL's reference layout), so a draw of
    ``S B`` chains equals the reference's with the same noise.
    """

    def __init__(self, chain: DiffusionPolicy, critic_target: EnsembleQ, num_candidates: int, act_steps: int) -> None:
        super().__init__()
        self.chain, self.critic_target = chain, critic_target
        self.num_candidates, self.act_steps = num_candidates, act_steps

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.chain.event_shape

    @property
    def num_transitions(self) -> int:
        return self.chain.num_transitions

    def scored(self, obs: torch.Tensor, chain_deterministic: bool, generator: torch.Generator | None,
               mean_path: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates ``(S, B, Ta, Da)`` for histories ``(B, To, Do)`` (the chain's evaluation sampling when
        ``chain_deterministic``, else its training sampling, from ``generator``) and their ``min_i Q'_i`` ``(S, B)``
        over the executed part (IDQL's reference scores whole chunks, which fits its critic only when
        ``act_steps = Ta``)."""
        n, s = len(obs), self.num_candidates
        rep = obs.repeat(s, *([1] * (obs.dim() - 1)))  # (S B, To, Do)
        cand = self.chain.sample(rep, chain_deterministic, generator, mean_path).action  # (S B, Ta, Da)
        q = self.critic_target(rep.flatten(1), cand[:, :self.act_steps].flatten(1)).min(0).values.view(s, n)
        return cand.view(s, n, *cand.shape[1:]), q

    def transition_log_prob(self, obs: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                            idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a candidate selection has no tractable density; PPO cannot re-score it")

    def entropy(self) -> torch.Tensor | None:
        return None


class DiffusionQAgent(Agent):
    """A DDPM chunk policy trained in full with a double Q-critic; subclasses write ``update``.

    All randomness (exploration, ``a'``, the denoising losses' ``t`` and noise, IDQL's candidate draw) comes from
    the agent's generator, saved in :meth:`state_dict`; ``act(obs, deterministic=True)`` uses a fixed noise of its
    own and draws nothing from it.

    Args:
        model: the DDPM over chunks ``(Ta, Da)`` conditioned on ``To * Do`` values (copied).
        obs_dim: ``Do``.
        params: the algorithm's :class:`DiffusionQParams`.
        device: torch device.
        seed: seed of the agent's generator.
    """

    name = "the diffusion agent"
    rewrites_actions = False  # the chunk off-policy loop's contract: its batches are left as sampled
    sampler: DiffusionPolicy
    policy: ChunkPolicy

    def __init__(self, model: DDPM, obs_dim: int, params: DiffusionQParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        p = self.p = params
        check_chunk_model(model, p.horizon_steps, p.cond_steps, obs_dim, self.name)
        self.device = torch.device(device)
        self.obs_dim, self.act_dim = int(obs_dim), int(model.event_shape[1])
        self.actor = DiffusionPolicy(model, model.num_steps, min_sampling_std=p.min_sampling_std,
                                     noise_clip=p.noise_clip, clip_x0=p.clip_x0).to(self.device)
        self.sampler = self.policy = self.actor  # DIPO and IDQL replace these
        # CriticObsAct: two Q-networks over [flattened history, executed chunk]
        self.critic = EnsembleQ(p.cond_steps * obs_dim, p.act_steps * self.act_dim, p.critic_hidden, 2,
                                activation=p.critic_activation, residual=p.critic_residual).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_params = [q for q in self.actor.parameters() if q.requires_grad]  # the trainable copy
        self.actor_opt = self.adamw(self.actor_params, p.actor_lr, p.actor_weight_decay)
        self.critic_opt = self.adamw(self.critic.parameters(), p.critic_lr, p.critic_weight_decay)
        self.nets: dict[str, nn.Module] = {"policy": self.actor, "critic": self.critic,
                                           "critic_target": self.critic_target}
        self.optims: dict[str, torch.optim.Optimizer] = {"actor": self.actor_opt, "critic": self.critic_opt}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.num_updates = 0  # update() calls
        self.num_actor_updates = 0  # of which stepped the actor (not critic_only)

    def adamw(self, params: Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """The reference's optimiser (AdamW), fused where torch has it."""
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else {}
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)

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
        """Exploration chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)``: the policy's training sampling (std
        floor ``min_sampling_std``, noise clamped), from the agent's generator."""
        return self.policy.sample(self._history(obs), False, self.generator).action

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The agent contract: chunks ``(B, Ta, Da)``, or actions ``(B, Da)`` for flat observations ``(B, Do)`` when
        ``To = Ta = 1`` (an offline transition agent). ``deterministic``: the policy's evaluation sampling (DPPO's
        evaluation chain: std floor 1e-3, no noise at the last step; or a candidate argmax) with a fixed noise, so the
        action is a function of the observation."""
        flat = np.ndim(obs) == 2 and self.p.cond_steps == 1 and self.p.horizon_steps == 1
        gen = torch.Generator(device=self.device).manual_seed(EVAL_SEED) if deterministic else self.generator
        out = self.policy.sample(self._history(obs), deterministic, gen).action
        return (out[:, 0] if flat else out).cpu().numpy()

    # ------------------------------------------------------------------------------------------------ losses
    def _executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The executed part of chunks ``(B, Ta, Da)``, flattened as the buffer stores it: ``(B, act_steps Da)``."""
        return chunk[:, :self.p.act_steps].flatten(1)

    def _chunks(self, act: torch.Tensor) -> torch.Tensor:
        """Buffer actions ``(B, act_steps Da)`` as chunks ``(B, Ta, Da)`` (``act_steps = Ta`` where this is used)."""
        return act.view(len(act), self.p.horizon_steps, self.act_dim)

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """``y = r + gamma (1 - done) min_i Q'_i(s', a')`` ``(B,)``, ``a'`` one training-chain draw of the sampler
        (DPPO's QSM and DIPO: "with noise, same as QSM"), ``Q'`` the target critic."""
        next_chunk = self.sampler.sample(self._history(batch.next_obs), False, self.generator).action
        q_next = self.critic_target(batch.next_obs, self._executed(next_chunk)).min(0).values
        return batch.rew + self.p.gamma * (1.0 - batch.done) * q_next

    def bc_loss(self, chunks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The DDPM epsilon (or x0) loss of chunks ``(B, Ta, Da)`` (data units) under the TRAINABLE copy, t uniform
        in ``[0, K)`` (drawn first, then the noise): ``DDPM.loss`` through the actor's network."""
        return self.actor.base.loss(chunks, cond, self.generator, net=self.actor.ft_net)

    # ------------------------------------------------------------------------------------------------ steps
    def critic_step(self, batch: Batch, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on ``sum_i mean (Q_i(s, a) - y)^2`` (the reference's double-Q loss), the gradient norm clipped at
        ``critic_max_grad_norm`` if set (then reported, unclipped, as ``critic_grad_norm``); detached metrics."""
        q = self.critic(batch.obs, batch.act)  # (2, B)
        loss = (q - target).pow(2).mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        out = {"critic_loss": loss.detach(), "q_mean": q.detach().mean(), "target_mean": target.mean()}
        if self.p.critic_max_grad_norm is not None:
            out["critic_grad_norm"] = nn.utils.clip_grad_norm_(self.critic.parameters(), self.p.critic_max_grad_norm,
                                                               foreach=True).detach()
        self.critic_opt.step()
        return out

    def actor_step(self, loss: torch.Tensor) -> torch.Tensor:
        """One actor step (gradient norm clipped at ``max_grad_norm`` if set); returns the unclipped norm."""
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.actor_params, self.p.max_grad_norm or math.inf, foreach=True)
        self.actor_opt.step()
        self.num_actor_updates += 1
        return norm.detach()

    # ------------------------------------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_actor_updates": self.num_actor_updates,
                "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_actor_updates = int(state["num_actor_updates"])
        self.generator.set_state(state["generator"])
