"""The loop of DPPO's weighted-regression baselines, DRWR and DAWR (:mod:`diffrl.agents.rwr`): roll out the diffusion
chunk policy, then regress it onto its own chunks with weights.

One iteration, as DPPO's ``agent/finetune/train_{rwr,awr}_diffusion_agent.py``::

    ro = onpolicy.collect(agent, envs, obs, n_steps, agent.generator)  # n_steps chunks from each of N envs
    # DRWR: returns-to-go of the finished chunks -> weights over the iteration -> update_epochs epochs
    metrics = rwr_update(agent, ro)
    # DAWR: the rollout joins the FIFO buffer; TD(lambda) targets over it with the current V -> n // ratio critic
    # steps -> the targets again with the new V -> n actor steps on random batches weighted by z-scored y - V
    store(fifo, ro, scale_reward_factor)
    metrics = awr_update(agent, fifo, N, n, critic_only=itr < n_critic_warmup_itr)

Episodes run on across iterations (the reference's ``reset_at_iteration: False``), so each env's transitions stand
in the FIFO buffer in time order and the TD(lambda) recursion runs along them. The reference spends every
``val_freq``-th iteration on a deterministic rollout without an update and resets all envs around it (which also
joins two unrelated stretches in DAWR's buffer); here evaluation runs on its own env with
:func:`~diffrl.pipelines.chunk_policy.evaluate_chunk_policy` and every iteration trains.

:func:`train` runs the iterations through the :class:`~diffrl.runs.session.RunSession` the system opened: evaluation
on the ``eval_every`` grid (and of the pre-trained policy), metrics rows, checkpoints (agent with its optimisers and
generator, DAWR's buffer, running episodes, RNGs, counters) and exact resume on CPU. The agents take the
pre-trained DDPM of a diffusion policy as DQL does (``DRWR(model, obs_dim, params, device, seed)``).

Shapes: ``T`` chunk steps per env per iteration, ``N`` envs, ``M`` transitions in the buffer, ``To`` / ``Do``
observation history / dim, ``Ta`` / ``Da`` chunk length / action dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents.rwr import DAWR, DRWR, AWRParams, returns_to_go, rwr_weights, td_lambda_targets
from diffrl.config import check
from diffrl.data import Batch, ReplayBuffer
from diffrl.envs import VecEnv
from diffrl.errors import ConfigError
from diffrl.pipelines import onpolicy
from diffrl.pipelines.chunk_offpolicy import ChunkLoopConfig, iterate, updates_per_iteration
from diffrl.runs.session import RunSession

__all__ = ["ChunkRWRConfig", "rwr_update", "awr_buffer", "awr_updates_per_iteration", "store", "buffer_targets",
           "awr_update", "train"]


@dataclasses.dataclass(frozen=True)
class ChunkRWRConfig(ChunkLoopConfig):
    """Run settings of the loop (defaults: DPPO's Gym Hopper RWR / AWR configs); a system's config extends it with
    :class:`~diffrl.agents.rwr.RWRParams` or :class:`~diffrl.agents.rwr.AWRParams`. Steps of eval_every /
    log_every / checkpoint_every are iterations."""


def _mean_metrics(history: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each metric averaged over the steps that reported it (DAWR's critic and actor steps report different ones)."""
    keys = dict.fromkeys(k for h in history for k in h)
    return {k: float(torch.stack([h[k] for h in history if k in h]).mean()) for k in keys}


def _draw(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` uniform indices in ``[0, n)`` with replacement (the reference's ``np.random.choice``)."""
    return torch.randint(n, (batch_size,), generator=generator, device=generator.device)


# ------------------------------------------------------------------------------------------------------ DRWR
def rwr_update(agent: DRWR, ro: onpolicy.Rollout) -> dict[str, float]:
    """DRWR's update on one rollout: every chunk whose episode finished in it (:func:`returns_to_go`), weighted by
    :func:`rwr_weights` over the rollout, ``update_epochs`` epochs of minibatches from one permutation each (full
    ones; the rest is skipped, as the reference). A rollout in which no episode finished makes no update (the
    reference would reuse the previous iteration's data). Returns the metrics averaged over the steps, with
    ``train/finished_chunks``, ``train/return_to_go_mean`` and ``train/updates``."""
    p = agent.p
    g, finished = returns_to_go(ro.rewards, ro.terminated, ro.truncated, p.gamma)  # (T, N)
    mask = finished.reshape(-1)
    stats = {"train/finished_chunks": float(mask.sum()), "train/updates": 0.0}
    if not mask.any():
        return stats
    keep = torch.as_tensor(np.flatnonzero(mask), device=agent.device)
    obs = ro.obs.flatten(0, 1)[keep]                            # (M, To, Do)
    chunks = ro.chains[:, :, -1].flatten(0, 1)[keep]            # (M, Ta, Da): the sampled chunks (S = 0)
    weights = rwr_weights(torch.as_tensor(g.reshape(-1)[mask]), p.beta, p.max_weight).to(agent.device)
    history: list[dict[str, torch.Tensor]] = []
    for _ in range(p.update_epochs):
        perm = torch.randperm(len(keep), generator=agent.generator, device=agent.generator.device)
        for b in range(max(1, len(keep) // p.batch_size)):
            i = perm[b * p.batch_size:(b + 1) * p.batch_size].to(agent.device)
            history.append(agent.update(obs[i], chunks[i], weights[i]))
    return {**_mean_metrics(history), **stats, "train/return_to_go_mean": float(g[finished].mean()),
            "train/updates": float(len(history))}


# ------------------------------------------------------------------------------------------------------ DAWR
def awr_buffer(params: AWRParams, n_envs: int, obs_dim: int, act_dim: int, device: torch.device | str = "cpu",
               seed: int = 0) -> ReplayBuffer:
    """DAWR's FIFO buffer: a :class:`~diffrl.data.ReplayBuffer` of the last ``buffer_steps`` vector steps (``N``
    transitions each, in ``(t, env)`` order, so :meth:`ReplayBuffer.all` lays them out as ``(T, N)``). Keys:
    ``obs`` / ``next_obs`` ``(To Do,)``, ``act`` the WHOLE sampled chunk ``(Ta Da,)`` (the reference keeps only the
    executed ``act_steps`` actions, which its loss cannot take when ``act_steps < Ta``), ``rew`` (scaled), ``done``
    (terminated), ``truncated``."""
    p = params
    history, chunk = p.cond_steps * obs_dim, p.horizon_steps * act_dim
    return ReplayBuffer(p.buffer_steps * n_envs, {"obs": (history,), "act": (chunk,), "rew": (),
                                                  "next_obs": (history,), "done": (), "truncated": ()},
                        device=device, seed=seed)


def awr_updates_per_iteration(cfg: ChunkRWRConfig, params: AWRParams) -> int:
    """DAWR's actor steps per iteration, ``int(n_steps * n_envs / batch_size * replay_ratio)`` (the reference's
    ``num_batch``; Hopper: 500 * 40 / 1000 * 64 = 1280, and 320 critic steps); one sentence if that leaves no critic
    step (a system config checks it in ``__post_init__``)."""
    n = updates_per_iteration(cfg.n_steps, cfg.n_envs, params.batch_size, params.replay_ratio)
    check(n // params.critic_update_ratio >= 1, "replay_ratio", params.replay_ratio,
          f"large enough for a critic step per iteration: int(n_steps * n_envs / batch_size * replay_ratio) // "
          f"critic_update_ratio = int({cfg.n_steps} * {cfg.n_envs} / {params.batch_size} * {params.replay_ratio}) // "
          f"{params.critic_update_ratio} = 0")
    return n


def store(fifo: ReplayBuffer, ro: onpolicy.Rollout, scale_reward_factor: float) -> None:
    """Append a rollout's ``T N`` chunk transitions in ``(t, env)`` order; the oldest vector steps leave first."""
    def flat(x: torch.Tensor | np.ndarray) -> torch.Tensor:  # (T, N, ...) -> (T N, ...)
        return torch.as_tensor(x).flatten(0, 1)

    fifo.add_batch(obs=flat(ro.obs).flatten(1), act=flat(ro.chains[:, :, -1]).flatten(1),
                   rew=flat(ro.rewards) * scale_reward_factor,
                   next_obs=flat(onpolicy.next_observations(ro)).flatten(1), done=flat(ro.terminated),
                   truncated=flat(ro.truncated))


def buffer_targets(agent: DAWR, data: Batch, n_envs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``V(s)`` and :func:`td_lambda_targets` ``(M,)`` of the buffer's transitions (``data``: its
    :meth:`ReplayBuffer.all`, ``M = T N``), with the agent's current critic."""
    p, t = agent.p, len(data) // n_envs
    values = agent.values(data.obs)
    grid = [x.view(t, n_envs) for x in (data.rew, values, agent.values(data.next_obs), data.done, data.truncated)]
    return values, td_lambda_targets(*grid, p.gamma, p.td_lambda, p.td_alpha).flatten().to(values)


def awr_update(agent: DAWR, fifo: ReplayBuffer, n_envs: int, n_updates: int, critic_only: bool) -> dict[str, float]:
    """DAWR's update: ``n_updates // critic_update_ratio`` critic steps on the buffer's TD(lambda) targets, then
    (unless ``critic_only``) the targets again with the updated critic and ``n_updates`` actor steps on
    ``A = y - V``, each batch drawn uniformly with replacement from the whole buffer (the reference's actor batches;
    its critic batches come from the oldest ``1 / N`` of the buffer only, an indexing slip). Returns the
    metrics averaged over the steps, with ``train/critic_updates``, ``train/updates`` and ``train/critic_only``."""
    p = agent.p
    data = fifo.all()  # (M, ...) in (t, env) order, oldest first
    _, targets = buffer_targets(agent, data, n_envs)
    history = []
    for _ in range(n_updates // p.critic_update_ratio):
        i = _draw(len(data), p.batch_size, agent.generator)
        history.append(agent.update_critic(data.obs[i], targets[i]))
    actor_steps = 0
    if not critic_only:  # the reference computes the actor loss in warm-up too and skips only the step
        values, targets = buffer_targets(agent, data, n_envs)
        adv, chunks = targets - values, data.act.view(len(data), p.horizon_steps, -1)
        for _ in range(n_updates):
            i = _draw(len(data), p.batch_size, agent.generator)
            history.append(agent.update_actor(data.obs[i], chunks[i], adv[i]))
        actor_steps = n_updates
    return {**_mean_metrics(history), "train/critic_updates": float(n_updates // p.critic_update_ratio),
            "train/updates": float(actor_steps), "train/critic_only": float(critic_only)}


# ------------------------------------------------------------------------------------------------------ the loop
def train(cfg: ChunkRWRConfig, session: RunSession, agent: DRWR | DAWR, envs: VecEnv, eval_env: gym.Env, *,
          ref_scores: dict[str, float] | None = None, eval_mean_path: bool = False,
          parts: Mapping[str, Any] | None = None, summary: Mapping[str, Any] | None = None) -> Path:
    """Run ``cfg.n_train_itr`` iterations of DRWR or DAWR (from where a resumed ``session`` stopped); returns the run
    directory.

    The system builds everything first (seeding, ``envs`` from :func:`~diffrl.envs.chunking.chunk_envs`, the eval
    env, the agent on the pre-trained DDPM, the session with its meta); this function restores the loop's own state
    on resume (agent, DAWR's buffer, running episodes), then counters and RNGs through ``session.start``.

    Args:
        cfg: the run settings (a system config extending :class:`ChunkRWRConfig`).
        session: the run session, not yet started.
        agent: :class:`~diffrl.agents.rwr.DRWR` or :class:`~diffrl.agents.rwr.DAWR`; ``envs``: ``cfg.n_envs`` chunk
            envs; ``eval_env``: one chunk env for evaluation.
        ref_scores: reference returns ``{"min", "max"}`` for normalised scores.
        eval_mean_path: evaluate along the noise-free mean path (:class:`~diffrl.pipelines.chunk_policy.ChunkActor`).
        parts: further checkpoint parts the system saves with every checkpoint (e.g. the normalisation).
        summary: further ``summary.json`` entries of the system.
    """
    if envs.num_envs != cfg.n_envs:
        raise ConfigError(f"the loop got {envs.num_envs} envs but n_envs={cfg.n_envs}; build cfg.n_envs envs.")
    fifo, n_updates = None, 0
    if isinstance(agent, DAWR):
        n_updates = awr_updates_per_iteration(cfg, agent.p)
        fifo = awr_buffer(agent.p, cfg.n_envs, agent.obs_dim, agent.policy.event_shape[1], agent.device, cfg.seed)
    if session.resumed:
        agent.load_state_dict(session.parts["state"]["agent"])
        if fifo is not None:
            fifo.load_state_dict(session.parts["buffer"])
        obs = envs.load_state_dict(session.parts["state"]["envs"])  # replays the running episodes
    else:
        obs = envs.reset()

    def critic_counts() -> dict[str, float]:  # DAWR: its critic's steps and the buffer's fill
        if not isinstance(agent, DAWR) or fifo is None:
            return {}
        return {"critic_gradient_steps": float(agent.num_critic_updates), "buffer_size": float(len(fifo))}

    def update(ro: onpolicy.Rollout, itr: int) -> dict[str, float]:
        if isinstance(agent, DAWR):
            store(fifo, ro, agent.p.scale_reward_factor)  # type: ignore[arg-type]
            return awr_update(agent, fifo, cfg.n_envs, n_updates,  # type: ignore[arg-type]
                              critic_only=itr < agent.p.n_critic_warmup_itr)
        return rwr_update(agent, ro)

    return iterate(
        cfg, session, agent, envs, eval_env, obs,
        rollout=lambda o: onpolicy.collect(agent, envs, o, cfg.n_steps, agent.generator), update=update,
        counts=critic_counts, loop_parts=lambda: {"buffer": fifo.state_dict()} if fifo is not None else {},
        ref_scores=ref_scores, eval_mean_path=eval_mean_path, parts=parts,
        summary=lambda: {"algo": "dawr" if fifo is not None else "drwr", **critic_counts(), **dict(summary or {})})
