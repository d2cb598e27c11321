"""What a PPO loop needs around the agent: running observation normalisation and reward scaling, GAE and
(env step, transition) minibatches.

Shapes: ``T`` rollout steps (action chunks), ``N`` envs, ``S`` policy transitions per env step (DPPO: the
``K'`` fine-tuned denoising steps; a Gaussian policy: 1), ``B`` minibatch, ``To`` / ``Do`` observation history
length / dim, ``Ta`` / ``Da`` chunk length / action dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def merge_moments(mean: Any, var: Any, count: float, batch: np.ndarray) -> tuple[Any, Any, float]:
    """Running mean and (population) variance after adding the rows of ``batch`` ``(B, *shape)``: Chan et al.'s
    parallel update, as OpenAI baselines' / SB3's ``RunningMeanStd`` (float64). ``mean`` / ``var``: floats or arrays of
    ``shape``; ``count``: the (possibly fractional, see the prior) number of rows so far."""
    b_count = batch.shape[0]
    if b_count == 1:  # one env's step (plain PPO's loop, every step): its row is the mean, its variance 0, exactly
        delta = batch[0] - mean
        total = count + 1
        m2 = var * count + delta ** 2 * count * 1 / total
        return mean + delta * 1 / total, m2 / total, total
    b_mean, b_var = batch.mean(axis=0), batch.var(axis=0)
    delta, total = b_mean - mean, count + b_count
    m2 = var * count + b_var * b_count + delta ** 2 * count * b_count / total
    return mean + delta * b_count / total, m2 / total, total


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


class RunningObsNormalizer:
    """``clip((o - mean) / sqrt(var + eps), -clip, clip)`` per observation dimension, with running statistics of the
    observations seen so far (SB3's ``VecNormalize`` / gymnasium's ``NormalizeObservation`` + CleanRL's clip at 10).

    The moments start from a prior of mean 0, var 1 with weight 1e-4 (baselines' ``RunningMeanStd``) and are
    updated in float64 with every batch passed with ``update=True``; a call normalises with the statistics after
    its own update (SB3). The statistics belong to the run (checkpointed with it, frozen for evaluation).

    Args:
        dim: ``Do``; observations are ``(..., Do)`` (an observation history ``(N, To, Do)`` is normalised per element).
        clip: bound of the normalised observations.
        eps: added to the variance.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.clip, self.eps = clip, eps
        self.mean, self.var, self.count = np.zeros(dim), np.ones(dim), 1e-4

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """Normalised float32 observations ``(..., Do)``; with ``update`` the rows of ``obs`` enter the statistics
        first."""
        o = np.asarray(obs, dtype=np.float64)
        if o.shape[-1] != len(self.mean):
            raise ValueError(f"observations must be (..., {len(self.mean)}), got {o.shape}")
        if update:
            self.mean, self.var, self.count = merge_moments(self.mean, self.var, self.count, o.reshape(-1, o.shape[-1]))
        return np.clip((o - self.mean) / np.sqrt(self.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean, var = _array(state["mean"]), _array(state["var"])
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ValueError(f"the saved observation statistics are {mean.shape[0]}-dimensional, this normaliser "
                             f"{self.mean.shape[0]}-dimensional")
        self.mean, self.var, self.count = mean.copy(), var.copy(), float(state["count"])


class RunningRewardScaler:
    """Divides rewards by the running std of a discounted return (Engstrom et al. 2020, arXiv:2005.12729, 9.3).

    DPPO's ``reward_scale_running`` (``util/reward_scaling.py``, after OpenAI baselines): each env keeps a
    return ``R <- r + gamma R`` that restarts after an episode end; one running variance is pooled over every
    env's ``R`` (no per-env statistics) and rewards are scaled by ``1 / sqrt(var + eps)``, then clipped.

    Args:
        num_envs: ``N``.
        gamma: discount of the tracked return (its own, 0.99, not the RL discount).
        clip: rewards are clipped to ``[-clip, clip]`` after scaling.
        eps: added to the variance.
        per_step: update the variance with every env step's ``N`` returns and scale that step's rewards with the
            statistics after it (SB3's ``VecNormalize``, gymnasium's ``NormalizeReward``: plain PPO); False (DPPO):
            one update with the whole rollout's returns, then every reward of the rollout scaled with the result.
    """

    def __init__(self, num_envs: int, gamma: float = 0.99, clip: float = 10.0, eps: float = 1e-8,
                 per_step: bool = False) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.gamma, self.clip, self.eps, self.per_step = gamma, clip, eps, per_step
        self.ret = np.zeros(num_envs, dtype=np.float64)  # running discounted return of each env
        # running moments start from a prior of mean 0, var 1 with a tiny weight (baselines' RunningMeanStd)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def _update_moments(self, x: np.ndarray) -> None:
        # Chan et al.'s parallel update, pooled over envs; DPPO divides M2 by (count - 1), negligible once count is
        # large
        mean, var, count = merge_moments(self.mean, self.var, self.count, x.reshape(-1))
        self.mean, self.var, self.count = float(mean), float(var), count

    def __call__(self, rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
        """Update the statistics with a rollout and return its scaled rewards.

        Args:
            rewards: ``(T, N)`` rewards of one rollout, in order.
            episode_ends: ``(T, N)`` true where an episode ended at that step (terminated or truncated): the
                tracked return restarts at the next step. Carried over between calls.
        Returns:
            ``(T, N)`` float32 scaled rewards (all scaled with the statistics after this rollout, as DPPO; with
            ``per_step``, each step's with the statistics after that step).
        """
        r = np.asarray(rewards, dtype=np.float64)
        ends = np.asarray(episode_ends, dtype=bool)
        if r.ndim != 2 or r.shape != ends.shape or r.shape[1] != len(self.ret):
            raise ValueError(f"rewards and episode_ends must both be (T, {len(self.ret)}), got {r.shape} and "
                             f"{ends.shape}")
        rets = np.empty_like(r)
        scaled = np.empty(r.shape, dtype=np.float32)
        for t in range(len(r)):
            self.ret = r[t] + self.gamma * self.ret
            rets[t] = self.ret
            if self.per_step:
                self._update_moments(self.ret)
                scaled[t] = self.scale(r[t])
            self.ret = np.where(ends[t], 0.0, self.ret)  # SB3 restarts at either end (gymnasium: terminations only)
        if self.per_step:
            return scaled
        self._update_moments(rets)
        return self.scale(r)

    def scale(self, rewards: np.ndarray) -> np.ndarray:
        """Scale rewards with the current statistics (no update)."""
        scaled = np.asarray(rewards, dtype=np.float64) / np.sqrt(self.var + self.eps)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + self.eps))

    def state_dict(self) -> dict[str, Any]:
        return {"ret": self.ret.copy(), "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ret = _array(state["ret"])
        if ret.shape != self.ret.shape:
            raise ValueError(f"the saved reward scaler tracks {ret.shape[0]} envs, this one {self.ret.shape[0]}")
        self.ret = ret.copy()
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        gamma: float, lam: float, truncated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over ``(T, N)`` env (chunk) steps.

    ``delta_t = r_t + gamma (1 - terminated_t) V'_t - V_t`` and ``A_t = delta_t + gamma lam (1 - end_t) A_{t+1}``.
    Bootstrapping is masked by TERMINATION only: a truncated step still bootstraps from ``next_values``.

    Args:
        rewards, values: ``(T, N)``; ``values[t] = V(s_t)``.
        next_values: ``(T, N)`` value of the observation each step reached, ``V(s_{t+1})``. Pass the value of the
            true final observation where an episode ended (our vector env returns it); DPPO uses the value of the
            auto-reset observation there, a small bias after truncations.
        terminated: ``(T, N)`` true terminations.
        gamma: discount per env step (DPPO: per chunk).
        lam: GAE lambda.
        truncated: ``(T, N)`` time-limit ends. The recursion stops at ``terminated | truncated`` when given; with
            ``None`` it stops at terminations only (DPPO's loop, whose advantages then flow across a truncation
            into the next episode).
    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``, both ``(T, N)`` float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    v = torch.as_tensor(values, dtype=torch.float32, device=r.device)
    nv = torch.as_tensor(next_values, dtype=torch.float32, device=r.device)
    term = torch.as_tensor(terminated, device=r.device).float()
    end = term if truncated is None else torch.maximum(term, torch.as_tensor(truncated, device=r.device).float())
    if not (r.shape == v.shape == nv.shape == term.shape == end.shape) or r.dim() != 2:
        raise ValueError(f"gae takes (T, N) tensors of one shape, got rewards {tuple(r.shape)}, values "
                         f"{tuple(v.shape)}, next_values {tuple(nv.shape)}, terminated {tuple(term.shape)}")
    delta = r + gamma * (1.0 - term) * nv - v
    # the backward recursion in numpy: T small steps, each far cheaper than a torch op (same float32 operations)
    d, carry = delta.cpu().numpy(), (gamma * lam * (1.0 - end)).cpu().numpy()
    out = np.empty_like(d)
    last = np.zeros_like(d[0])
    for t in range(d.shape[0] - 1, -1, -1):
        last = d[t] + carry[t] * last
        out[t] = last
    adv = torch.from_numpy(out).to(r.device)
    return adv, adv + v


@dataclasses.dataclass
class PPOBatch:
    """One PPO minibatch of (env step, transition) pairs.

    For DPPO, ``chain_x -> chain_next`` is fine-tuned denoising transition ``denoise_idx`` of that env step's
    recorded chain (0 = the noisiest fine-tuned step, ``K' - 1`` = the one producing the action). For a Gaussian
    policy ``denoise_idx`` is 0 and ``chain_next`` is the sampled action chunk.
    """

    obs: torch.Tensor            # (B, To, Do) normalised observation history
    chain_x: torch.Tensor        # (B, Ta, Da) input of the transition
    chain_next: torch.Tensor     # (B, Ta, Da) its sampled output
    denoise_idx: torch.Tensor    # (B,) long, transition index in [0, S)
    old_log_prob: torch.Tensor   # (B,) reduced log-prob under the rollout policy
    advantages: torch.Tensor     # (B,) env-step GAE advantage
    returns: torch.Tensor        # (B,) env-step return target of the critic
    old_values: torch.Tensor     # (B,) critic value at rollout time
    env_step: torch.Tensor | None = None  # (B,) long, row of each pair's env step in the flattened (M,) rollout

    def to(self, device: torch.device | str) -> PPOBatch:
        return PPOBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                           for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def ppo_minibatches(obs: torch.Tensor, chains: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor, values: torch.Tensor, batch_size: int,
                    generator: torch.Generator | None = None) -> Iterator[PPOBatch]:
    """One epoch of minibatches over the flattened ``M * S`` (env step, transition) pairs (DPPO PR #13).

    Args:
        obs: ``(M, To, Do)`` with ``M = T * N`` env steps flattened.
        chains: ``(M, S + 1, Ta, Da)`` recorded chains.
        old_log_probs: ``(M, S)`` reduced log-probs at rollout time (``agent.chain_log_probs``).
        advantages, returns, values: ``(M,)`` per env step.
        batch_size: pairs per minibatch; ``max(1, M S // batch_size)`` full minibatches are drawn from one random
            permutation and the remainder is skipped (as DPPO).
        generator: for the permutation.
    """
    m, s = old_log_probs.shape
    if chains.shape[:2] != (m, s + 1) or obs.shape[0] != m:
        raise ValueError(f"chains must be (M, S + 1, Ta, Da) and obs (M, To, Do) with (M, S) = {(m, s)}, got "
                         f"{tuple(chains.shape)} and {tuple(obs.shape)}")
    perm = torch.randperm(m * s, generator=generator).to(obs.device)
    for b in range(max(1, (m * s) // batch_size)):
        pair = perm[b * batch_size:(b + 1) * batch_size]
        step, idx = pair // s, pair % s  # unravel (env step, transition)
        yield PPOBatch(obs[step], chains[step, idx], chains[step, idx + 1], idx, old_log_probs[step, idx],
                       advantages[step], returns[step], values[step], env_step=step)
