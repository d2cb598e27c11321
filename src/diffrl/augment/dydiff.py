"""Dydiff (Zhao, Han et al. 2024, arXiv:2405.19189; FineArtz/DyDiff): a trajectory diffusion model used as a
dynamics model, rolled out with the learning policy and refined by it ("iterative policy injection"), its rollouts
filtered by a reward model and mixed into the offline agent's batches.

- :class:`WindowLayout` / :func:`trajectory_windows`: windows of ``H`` rows ``[s_t, a_t]`` of the dataset's
  episodes; an episode that terminates is padded after its end (the reference pads every short episode; here a
  time-limit end is not a fall, so truncated episodes contribute only whole windows).
- :func:`model_spec` / :func:`condition_mask`: an EDM (sigma_data 0.5, P_mean -1.2, P_std 1.2) with a temporal
  UNet over ``(H, Ds + Da)``, min-max normalised; ``s_0`` and every action are held clean in training
  (``DiffusionModel.loss(fixed=...)``) and in sampling (``Inpaint(clean=True)``): the model is
  ``p(s_1:H | s_0, a_0:H)``, a dynamics model, not a policy (the reference's ``cond_on_action``).
- :func:`policy_injection`: roll out ``H`` steps with the policy and the single-step model, then ``K`` times
  sample the diffusion model on ``s_0`` and the current actions, average its states with the current states and
  relabel every action with the policy (the reference's ``dynamics_recursive_sampler``).
- :func:`cut_at_termination`, :func:`select_rollouts`: cut each rollout at its first terminal (the env's known
  rule); keep a fraction by reward-model return (``hardmax``: the top fraction; ``softmax``: sampled without
  replacement with ``p ~ exp(z / temperature)``).
- :class:`DydiffAugment`: the offline loop's augment hook doing all of it every ``every`` gradient steps.

Shapes: ``N`` rollouts, ``H`` window rows, ``Ds`` / ``Da`` state / action dims, ``K`` injection rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffrl.augment.dynamics import EnsembleDynamics, RewardModel
from diffrl.config import check, check_choice, check_positive, check_unit_interval
from diffrl.diffusion.inpaint import Inpaint
from diffrl.diffusion.models import DiffusionModel
from diffrl.errors import DatasetError

FILTERS = ("hardmax", "softmax", "none")
PAD_EPS = 1e-3
"""padding rows sit at ``-1 - PAD_EPS`` in the min-max normalised space, just outside the data (the reference's
``-1 - eps``)"""

Policy = Callable[[torch.Tensor], torch.Tensor]
"""a deterministic batched policy on raw states: ``(N, Ds) -> (N, Da)``"""


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """Rows ``[s (Ds), a (Da)]`` of a window of ``horizon`` steps."""

    obs_dim: int
    act_dim: int
    horizon: int

    @property
    def channels(self) -> int:
        return self.obs_dim + self.act_dim

    @property
    def obs(self) -> slice:
        return slice(0, self.obs_dim)

    @property
    def act(self) -> slice:
        return slice(self.obs_dim, self.channels)


def trajectory_windows(observations: np.ndarray, actions: np.ndarray, episodes: list[slice], terminated: list[bool],
                       horizon: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(M, H, Ds + Da)`` starting every ``stride`` steps of each episode, and a ``(M, H)`` bool mask of
    their real (not padded) rows.

    A terminated episode gives windows starting at each of its steps, padded after its last row; a truncated one
    (time limit, end of collection) only windows that fit. Padding rows are NaN here; the caller sets them to the
    pad value once the normaliser is fitted on the real rows.
    """
    longest = max((sl.stop - sl.start for sl in episodes), default=0)
    if horizon > longest:
        raise DatasetError(f"a window of {horizon} steps is longer than every episode of the dataset (the longest has "
                           f"{longest}); use --horizon {longest} or less.")
    rows = np.concatenate([observations, actions], axis=1).astype(np.float32)
    out, real = [], []
    for sl, term in zip(episodes, terminated, strict=True):
        length = sl.stop - sl.start
        last_start = length - 1 if term else length - horizon
        for t in range(0, last_start + 1, stride):
            n = min(horizon, length - t)
            w = np.full((horizon, rows.shape[1]), np.nan, dtype=np.float32)
            w[:n] = rows[sl.start + t: sl.start + t + n]
            out.append(w)
            real.append(np.arange(horizon) < n)
    return np.stack(out), np.stack(real)


def pad_windows(windows: torch.Tensor, real: torch.Tensor, model: DiffusionModel) -> torch.Tensor:
    """Fill the padding rows (``~real``) with the pad value in data units (``-1 - PAD_EPS`` once normalised)."""
    pad = model.normalizer.unnormalize(torch.full((1, windows.shape[-1]), -1.0 - PAD_EPS))[0]
    return torch.where(real[..., None], windows, pad.to(windows))


def condition_mask(layout: WindowLayout) -> torch.Tensor:
    """``(H, Ds + Da)`` bool: ``s_0`` and every action are given (``cond_on_action``); the model learns the rest."""
    mask = torch.zeros(layout.horizon, layout.channels, dtype=torch.bool)
    mask[0, layout.obs] = True
    mask[:, layout.act] = True
    return mask


def model_spec(layout: WindowLayout, *, dim: int, dim_mults: tuple[int, ...], sampler: str, steps: int,
               s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> dict[str, Any]:
    """The window model's spec (:func:`diffrl.diffusion.spec.build_model`): Dydiff's EDM settings."""
    sampler_defaults: dict[str, Any] = {"sampler": sampler, "steps": steps}
    if sampler in ("heun", "euler"):
        sampler_defaults.update(S_churn=s_churn, S_tmin=s_tmin, S_tmax=s_tmax, S_noise=s_noise)
    return {"type": "edm", "event_shape": [layout.horizon, layout.channels],
            "denoiser": {"type": "unet", "dim": dim, "dim_mults": list(dim_mults)},
            "normalizer": {"kind": "minmax"},
            "diffusion": {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2},  # Dydiff's EDMLoss / EDMPrecond
            "sampler": sampler_defaults}


@torch.no_grad()
def sample_states(model: DiffusionModel, layout: WindowLayout, s0: torch.Tensor, actions: torch.Tensor,
                  generator: torch.Generator | None = None, **sample_options: Any) -> torch.Tensor:
    """The model's states ``(N, H, Ds)`` given ``s0`` ``(N, Ds)`` and actions ``(N, H, Da)`` (raw units); row 0 is
    ``s0`` exactly."""
    n = len(s0)
    mask = condition_mask(layout).to(s0.device)
    values = torch.zeros(n, layout.horizon, layout.channels, device=s0.device)
    values[:, 0, layout.obs] = s0
    values[:, :, layout.act] = actions
    rows = model.sample(n, inpaint=Inpaint(mask, values, clean=True), generator=generator, **sample_options)
    return rows[:, :, layout.obs]


@torch.no_grad()
def autoregressive_rollout(policy: Policy, dynamics: EnsembleDynamics, s0: torch.Tensor, horizon: int,
                           generator: torch.Generator | None = None,
                           actions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``(N, H, Ds)`` and actions ``(N, H, Da)`` of ``H`` rows from ``s0`` with the single-step model
    (deterministic mean of a random elite per row), acting with ``policy`` or replaying the given ``actions``."""
    states, acts = [s0], []
    for t in range(horizon):
        a = policy(states[-1]) if actions is None else actions[:, t]
        acts.append(a)
        if t < horizon - 1:
            states.append(dynamics.predict(states[-1], a, generator))
    return torch.stack(states, 1), torch.stack(acts, 1)


@torch.no_grad()
def policy_injection(policy: Policy, dynamics: EnsembleDynamics, model: DiffusionModel, layout: WindowLayout,
                     s0: torch.Tensor, rounds: int, generator: torch.Generator | None = None,
                     **sample_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Dydiff's iterative policy injection (``dynamics_recursive_sampler``, ``iterative_times = K``).

    1. ``H`` rows from ``s0`` with ``policy`` and the single-step model;
    2. ``K`` times: sample the diffusion model on ``s0`` and the current actions (fresh noise each round), set the
       states to the average of its states and the current ones, relabel every action ``a_t = policy(s_t)``.

    Returns states ``(N, H, Ds)`` (row 0 is ``s0``) and actions ``(N, H, Da)``.
    """
    states, actions = autoregressive_rollout(policy, dynamics, s0, layout.horizon, generator)
    for _ in range(rounds):
        dm = sample_states(model, layout, s0, actions, generator, **sample_options)
        states = 0.5 * (dm + states)
        states[:, 0] = s0  # exact (the model's row 0 is s0 already; this guards rounding)
        actions = policy(states.flatten(0, 1)).view(*states.shape[:2], -1)
    return states, actions


def cut_at_termination(next_obs: np.ndarray, rule: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """For transitions ``(N, T)`` with next states ``(N, T, Ds)``: ``done`` ``(N, T)`` (the rule at each next state)
    and ``keep`` ``(N, T)``, true up to and including each rollout's first terminal."""
    n, t = next_obs.shape[:2]
    done = np.asarray(rule(next_obs.reshape(n * t, -1)), dtype=bool).reshape(n, t)
    ended_before = np.cumsum(done, axis=1) - done > 0  # a terminal at an earlier step
    return done, ~ended_before


def select_rollouts(scores: torch.Tensor, keep: float, kind: str, temperature: float = 0.05,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the rollouts to keep, ``round(keep N)`` of them, by score ``(N,)``.

    - ``hardmax``: the highest scores (the reference keeps scores >= the (1 - keep) percentile; ties aside the same);
    - ``softmax``: drawn without replacement with ``p ~ exp(z / temperature)``, ``z`` the z-scored scores, mixed
      with a uniform 1e-6 so every rollout keeps a chance (the reference's epsilon smoothing). At the reference's
      temperature 0.05 the rollouts above z ~ 2 are always drawn first, and after them the smoothing outweighs
      the softmax, so the rest of the kept set is close to a uniform draw (tests/unit/test_dydiff.py);
    - ``none``: all.
    """
    n = len(scores)
    k = int(round(keep * n))
    if kind == "none" or k >= n:
        return torch.arange(n, device=scores.device)
    if kind == "hardmax":
        return torch.topk(scores, k).indices
    z = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    probs = torch.softmax(z / temperature, 0) + 1e-6
    return torch.multinomial(probs / probs.sum(), k, replacement=False, generator=generator)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How the hook generates, filters and mixes rollouts (Dydiff's ``OfflineTrainer``)."""

    rollouts: int = 2048
    """start states (rollouts) per generation round (rollout_batch_size)"""
    rounds: int = 2
    """K, policy-injection rounds (iterative_times)"""
    filter: str = "softmax"
    """keep rollouts by reward-model return: hardmax (the top fraction), softmax (sampled), none"""
    keep: float = 0.6
    """fraction of rollouts kept (threshold)"""
    temperature: float = 0.05
    """softmax filter temperature on z-scored returns"""
    real_ratio: float = 0.6
    """share of each batch from the dataset; the rest from the model buffer"""
    min_model_rows: int = 256
    """batches are all real while the model buffer holds fewer rows (the reference's fallback)"""
    every: int = 1000
    """generate after every this many gradient steps (the reference: every epoch)"""
    capacity: int = 2_000_000
    """model buffer size (circular)"""

    def __post_init__(self) -> None:
        for name in ("rollouts", "every", "capacity", "temperature"):
            check_positive(name, getattr(self, name))
        check(self.rounds >= 0, "rounds", self.rounds, ">= 0")
        check_choice("filter", self.filter, FILTERS)
        check(0 < self.keep <= 1, "keep", self.keep, "in (0, 1]")
        check_unit_interval("real_ratio", self.real_ratio)
        check(self.min_model_rows >= 0, "min_model_rows", self.min_model_rows, ">= 0")


class DydiffAugment:
    """The offline loop's augment hook (:class:`diffrl.pipelines.offline.OfflineAugment`): every ``every`` gradient
    steps, ``rollouts`` start states from the dataset, policy injection, reward-model scores, termination cut,
    filter, and the kept transitions into the model buffer (the loop's normalised space).

    Args:
        start_states: the dataset's states ``(M, Ds)`` (raw units) to draw start states from.
        model, layout, dynamics, reward: the trained window model and single-step models (raw units).
        rule: the env's termination rule on next states.
        settings: :class:`RolloutSettings`.
        sample_options: the diffusion sampler's settings (sampler, steps, ...).
        seed: the hook's own generator (start states, model noise, softmax draws), saved in ``state_dict``.
    """

    def __init__(self, start_states: np.ndarray, model: DiffusionModel, layout: WindowLayout,
                 dynamics: EnsembleDynamics, reward: RewardModel, rule: Callable[[np.ndarray], np.ndarray],
                 settings: RolloutSettings, sample_options: dict[str, Any] | None = None, seed: int = 0) -> None:
        self.settings, self.every, self.capacity = settings, settings.every, settings.capacity
        self.start_states = torch.as_tensor(start_states, dtype=torch.float32)
        self.model, self.layout, self.dynamics, self.reward, self.rule = model, layout, dynamics, reward, rule
        self.sample_options = dict(sample_options or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.model_rows = 0  # rows in the model buffer (capped at capacity)
        self.rounds_done = 0

    def real_ratio(self, step: int) -> float:
        """The share of real rows in a batch: ``real_ratio``, or 1 while the model buffer is small."""
        return self.settings.real_ratio if self.model_rows >= self.settings.min_model_rows else 1.0

    @torch.no_grad()
    def generate(self, policy: Policy) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """One round: the kept transitions (raw units: ``obs, act, rew, next_obs, done``) and metrics."""
        s = self.settings
        idx = torch.randint(len(self.start_states), (s.rollouts,), generator=self.generator)
        states, actions = policy_injection(policy, self.dynamics, self.model, self.layout, self.start_states[idx],
                                           s.rounds, self.generator, **self.sample_options)
        finite = torch.isfinite(states).all(2).all(1) & torch.isfinite(actions).all(2).all(1)
        states, actions = states[finite], actions[finite]  # a diverged rollout (inf / nan) is dropped, and counted
        obs, act, next_obs = states[:, :-1], actions[:, :-1], states[:, 1:]  # (N, H-1, .): H-1 transitions
        n, t = obs.shape[:2]
        rew = self.reward.predict(obs.reshape(n * t, -1), act.reshape(n * t, -1)).view(n, t)
        done, alive = cut_at_termination(next_obs.numpy(), self.rule)
        alive_t = torch.as_tensor(alive)
        scores = torch.nan_to_num((rew * alive_t).sum(1), nan=-1e30, posinf=1e30, neginf=-1e30)  # the reward
        # model's return up to the first terminal (non-finite only where the reward model overflows)
        kept = select_rollouts(scores, s.keep, s.filter, s.temperature, self.generator)
        rows = alive_t[kept].flatten()
        out = {"obs": obs[kept].flatten(0, 1)[rows].numpy(), "act": act[kept].flatten(0, 1)[rows].numpy(),
               "rew": rew[kept].flatten()[rows].numpy(), "next_obs": next_obs[kept].flatten(0, 1)[rows].numpy(),
               "done": done[kept.numpy()].reshape(-1)[rows.numpy()].astype(np.float32)}
        metrics = {"dydiff/rollout_return": float(scores.mean()), "dydiff/kept_return": float(scores[kept].mean()),
                   "dydiff/rollout_length": float(alive_t.sum(1).float().mean()),
                   "dydiff/terminal_rate": float(done[alive].mean()) if alive.any() else 0.0,
                   "dydiff/transitions_added": float(len(out["obs"])),
                   "dydiff/diverged_rollouts": float((~finite).sum())}
        return out, metrics

    def __call__(self, step: int, ctx: Any) -> dict[str, float]:
        """Generate with the loop's current policy (``ctx.policy``, on raw states) and add the kept transitions to
        ``ctx.model`` in the loop's space (states normalised, rewards scaled). With ``real_ratio = 1`` no batch
        would use them: nothing is generated (the plain agent, a control at the same budget)."""
        if self.settings.real_ratio >= 1.0:
            return {}

        def policy(states: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(ctx.policy.act(states.numpy(), deterministic=True), dtype=torch.float32)

        data, metrics = self.generate(policy)
        ctx.model.add_batch(obs=ctx.normalizer(data["obs"]), act=data["act"], rew=data["rew"] * ctx.reward_scale,
                            next_obs=ctx.normalizer(data["next_obs"]), done=data["done"])
        self.model_rows = min(self.model_rows + len(data["obs"]), self.capacity)
        self.rounds_done += 1
        metrics["dydiff/model_buffer"] = float(self.model_rows)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "model_rows": self.model_rows,
                "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.model_rows = int(state["model_rows"])
        self.rounds_done = int(state["rounds_done"])


__all__ = ["WindowLayout", "trajectory_windows", "pad_windows", "condition_mask", "model_spec", "sample_states",
           "autoregressive_rollout", "policy_injection", "cut_at_termination", "select_rollouts", "RolloutSettings",
           "DydiffAugment", "FILTERS", "PAD_EPS"]
