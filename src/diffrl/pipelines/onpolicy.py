"""The on-policy loop of the PPO family over chunk policies: roll out, score, estimate advantages, update.

One iteration of a system built on it (DPPO's ``finetune``; DiffPPO next) reads::

    ro = collect(agent, envs, obs, n_steps, generator)                  # T chunks from each of N envs
    values, adv, ret, stats = advantages(agent, ro, gamma, lam, scaler)  # rewards scaled, GAE
    metrics = ppo_update(agent, ro, values, adv, ret, ...)              # epochs of (env step x transition) pairs
    row = {**metrics, **stats, **episode_stats(ro.episodes)}            # what it logs (runs.logger)

The agent is a :class:`~diffrl.agents.ppo.ChunkPPO` over any :class:`~diffrl.agents.ppo.ChunkPolicy`, the envs a
:class:`~diffrl.envs.VecEnv` of chunk envs (:func:`diffrl.envs.chunking.chunk_envs`). Plain PPO
(:mod:`diffrl.pipelines.ppo`) is the same loop over one-action chunks with a running observation normaliser
(``collect(..., obs_norm=...)``) and per-step reward scaling. Bookkeeping (resume, checkpoints, logging, evaluation)
is the caller's. :func:`collect` and :func:`next_observations` also serve the
weighted-regression baselines (:mod:`diffrl.pipelines.chunk_rwr`), whose agents only need to sample
(:class:`ChunkSampler`).

Shapes: ``T`` rollout steps (chunks) per env, ``N`` envs, ``M = T N``, ``S`` scored transitions per env step
(``K'`` for DPPO, 1 for the Gaussian policy), ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk
length / action dim.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import torch

from diffrl.agents.ppo import ChunkPPO, ChunkSample
from diffrl.agents.ppo_utils import RunningObsNormalizer, RunningRewardScaler, gae, ppo_minibatches
from diffrl.envs import VecEnv


class ChunkSampler(Protocol):
    """What :func:`collect` needs from an agent: a :class:`~diffrl.agents.ppo.ChunkPPO`, or the weighted-regression
    agents of :mod:`diffrl.agents.rwr` (which record only the chunk, ``S = 0``)."""

    device: torch.device

    def sample(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               mean_path: bool = False) -> ChunkSample:
        """Chunks ``(N, Ta, Da)`` and, when not deterministic, the recorded chains ``(N, S + 1, Ta, Da)``."""
        ...


@dataclasses.dataclass
class Rollout:
    """One iteration's experience (``T`` chunks from each of ``N`` envs)."""

    obs: torch.Tensor            # (T, N, To, Do) normalised histories acted from
    chains: torch.Tensor         # (T, N, S + 1, Ta, Da) recorded chains (K' + 1 states for DPPO)
    rewards: np.ndarray          # (T, N) summed over each chunk's executed actions
    terminated: np.ndarray       # (T, N) bool
    truncated: np.ndarray        # (T, N) bool
    final_obs: dict[tuple[int, int], np.ndarray]  # (t, i) -> true final history of an episode truncated there
    last_obs: np.ndarray         # (N, To, Do) where the next rollout starts (normalised as obs)
    env_steps: int
    episodes: list[tuple[float, int]]


def collect(agent: ChunkSampler, envs: VecEnv, obs: np.ndarray, n_steps: int, generator: torch.Generator,
            obs_norm: RunningObsNormalizer | None = None) -> Rollout:
    """Roll out ``n_steps`` chunks per env with exploration noise, recording the chains PPO re-scores.

    Args:
        agent: samples the chunks; envs: steps them; obs: ``(N, To, Do)`` histories to act from first (already
            normalised when ``obs_norm`` is given: the previous rollout's ``last_obs``).
        n_steps: ``T``; generator: the exploration noise.
        obs_norm: a running observation normaliser (plain PPO; the chunk envs of DPPO normalise by themselves):
            each observation the envs return to act from enters its statistics and is normalised with them as it
            arrives; a truncated episode's final observation is normalised with the statistics of its step without
            entering them (SB3's ``VecNormalize``). The rollout then holds only normalised observations.
    """
    T, N = n_steps, envs.num_envs
    obs_buf = torch.zeros((T, N, *obs.shape[1:]), device=agent.device)
    chains: torch.Tensor | None = None
    rewards, term, trunc = np.zeros((T, N)), np.zeros((T, N), dtype=bool), np.zeros((T, N), dtype=bool)
    final: dict[tuple[int, int], np.ndarray] = {}
    env_steps, episodes = 0, []
    for t in range(T):
        o = torch.as_tensor(obs, dtype=torch.float32, device=agent.device)
        action, chain = agent.sample(o, deterministic=False, generator=generator)  # (N, Ta, Da), (N, S + 1, Ta, Da)
        if chains is None:
            chains = torch.zeros((T, *chain.shape), device=agent.device)  # type: ignore[union-attr]
        obs_buf[t], chains[t] = o, chain
        step = envs.step(action.cpu().numpy())
        rewards[t], term[t], trunc[t] = step.reward, step.terminated, step.truncated
        obs = step.obs if obs_norm is None else obs_norm(step.obs)  # type: ignore[arg-type]
        for i in np.flatnonzero(step.truncated):
            o = step.next_obs[i]  # type: ignore[index]
            final[(t, i)] = o if obs_norm is None else obs_norm(o, update=False)
        env_steps += step.env_steps
        episodes += [(ret, length) for _, ret, length, _ in step.finished]
    return Rollout(obs_buf, chains, rewards, term, trunc, final, obs, env_steps, episodes)  # type: ignore[arg-type]


def next_observations(ro: Rollout) -> torch.Tensor:
    """The history each chunk of a rollout reached, ``(T, N, To, Do)``: the next chunk's where the episode runs on,
    ``last_obs`` after the rollout's last chunk, the true final history where an episode was truncated; after a
    termination the next episode's first history (a terminal state's value is masked, so any finite one will do)."""
    nxt = torch.empty_like(ro.obs)
    nxt[:-1] = ro.obs[1:]
    nxt[-1] = torch.as_tensor(ro.last_obs, dtype=nxt.dtype, device=nxt.device)
    for (t, i), final in ro.final_obs.items():
        nxt[t, i] = torch.as_tensor(final, dtype=nxt.dtype, device=nxt.device)
    return nxt


def advantages(agent: ChunkPPO, ro: Rollout, gamma: float, gae_lambda: float, scaler: RunningRewardScaler | None,
               batch_size: int = 10_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Values ``(M,)``, GAE advantages and returns ``(M,)`` of a rollout (rewards scaled first), and statistics.

    Bootstrapping is masked by termination only; after a time-limit truncation the value of the TRUE final
    observation is used (DPPO uses the auto-reset observation's), and the GAE recursion stops at either end.

    Args:
        agent: its critic gives the values, ``batch_size`` histories per call.
        ro: the rollout.
        gamma: discount per env step of the rollout (DPPO: per executed chunk).
        gae_lambda: GAE lambda.
        scaler: running reward scaling (updated with this rollout), or None for raw rewards.
    """
    T, N = ro.rewards.shape
    values = agent.values(ro.obs.flatten(0, 1), batch_size).view(T, N)
    next_values = torch.empty_like(values)
    next_values[:-1] = values[1:]
    next_values[-1] = agent.values(ro.last_obs)
    if ro.final_obs:
        (ts, idx), finals = zip(*ro.final_obs.keys()), np.stack(list(ro.final_obs.values()))
        next_values[list(ts), list(idx)] = agent.values(finals)
    rewards = scaler(ro.rewards, ro.terminated | ro.truncated) if scaler is not None else ro.rewards
    adv, ret = gae(torch.as_tensor(rewards, dtype=torch.float32), values.cpu(), next_values.cpu(),
                   torch.as_tensor(ro.terminated), gamma, gae_lambda, truncated=torch.as_tensor(ro.truncated))
    var = float(ret.var())
    stats = {"train/explained_variance": 1.0 - float((ret - values.cpu()).var()) / var if var > 0 else 0.0,
             "train/reward_scaled_mean": float(np.mean(rewards)), "train/value_mean": float(values.mean())}
    if scaler is not None:
        stats["train/reward_scale_std"] = scaler.std
    device = agent.device
    return values.flatten(), adv.flatten().to(device), ret.flatten().to(device), stats


def ppo_update(agent: ChunkPPO, ro: Rollout, values: torch.Tensor, adv: torch.Tensor, ret: torch.Tensor, *,
               update_epochs: int, minibatch_size: int, critic_only: bool, generator: torch.Generator,
               logprob_batch_size: int = 10_000) -> dict[str, float]:
    """``update_epochs`` epochs of minibatches over the ``M S`` (env step, transition) pairs; stops the whole
    update once a minibatch's approx_kl exceeds target_kl (DPPO). Returns metrics averaged over minibatches.

    Args:
        agent: the PPO agent; ``critic_only`` (critic warm-up): its actor is not stepped.
        ro: the rollout; ``values``, ``adv``, ``ret``: ``(M,)`` from :func:`advantages`.
        update_epochs: epochs over the rollout.
        minibatch_size: (env step, transition) pairs per minibatch.
        generator: draws the minibatch permutations.
        logprob_batch_size: pairs per network call when scoring the rollout's old log-probs.
    """
    obs = ro.obs.flatten(0, 1)                                              # (M, To, Do)
    chains = ro.chains.flatten(0, 1)                                        # (M, S + 1, Ta, Da)
    old = agent.chain_log_probs(obs, chains, logprob_batch_size)            # (M, S)
    history: list[dict[str, torch.Tensor]] = []
    stopped = False
    for _ in range(update_epochs):
        for batch in ppo_minibatches(obs, chains, old, adv, ret, values, minibatch_size, generator=generator):
            history.append(agent.update(batch, critic_only=critic_only))
            if agent.should_stop(history[-1]):
                stopped = True
                break
        if stopped:
            break
    out = {k: float(torch.stack([h[k] for h in history]).mean()) for k in history[0]}
    out.update({"train/minibatches": float(len(history)), "train/kl_stop": float(stopped),
                "train/critic_only": float(critic_only)})
    return out
