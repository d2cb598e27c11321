"""``evaluate(policy, env, episodes)``: deterministic actions, eval episodes seeded apart from training.

Training and ``diffrl eval`` both call this function, so an evaluation printed during training and one
run later on the same checkpoint agree (the disagreement users hit in DPPO issue #29 cannot happen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from diffrl.runs.seeding import derive_seed

EVAL_SEED_STREAM = 7_919  # eval episode k of a run with seed s starts from derive_seed(s, EVAL_SEED_STREAM, k)


class Policy(Protocol):
    def act(self, obs: Any, deterministic: bool = False) -> np.ndarray: ...


@dataclass
class EvalResult:
    """Returns and lengths of each evaluation episode and their summary."""

    returns: list[float]
    lengths: list[int]
    successes: list[float] | None
    """final ``info["is_success"]`` of each episode, when the env reports it"""

    @property
    def return_mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def return_std(self) -> float:
        return float(np.std(self.returns))

    @property
    def success_rate(self) -> float | None:
        return None if self.successes is None else float(np.mean(self.successes))

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metrics for the logger."""
        out = {f"{prefix}return_mean": self.return_mean, f"{prefix}return_std": self.return_std,
               f"{prefix}length_mean": float(np.mean(self.lengths))}
        if self.successes is not None:
            out[f"{prefix}success_rate"] = self.success_rate  # type: ignore[assignment]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "return_mean": self.return_mean, "return_std": self.return_std,
                "success_rate": self.success_rate}


def _batch(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: np.asarray(v)[None] for k, v in obs.items()}
    return np.asarray(obs)[None]


def evaluate(policy: Policy | Callable[[Any], np.ndarray], env: gym.Env, episodes: int, seed: int = 0) -> EvalResult:
    """Run ``episodes`` full episodes with deterministic actions.

    Args:
        policy: an agent with ``act(obs, deterministic=True)`` or a callable ``obs_batch -> action_batch``;
            it receives a batch of one observation and returns a batch of one action.
        env: an env from :func:`diffrl.envs.make_env` (not the training env).
        episodes: number of episodes (> 0).
        seed: run seed; episode ``k`` starts from ``derive_seed(seed, EVAL_SEED_STREAM, k)``, so every
            evaluation of a run sees the same initial states and none of the training episodes'.
    Returns:
        :class:`EvalResult` (success rate when the env reports ``is_success``).
    """
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
    act = policy.act if hasattr(policy, "act") else None
    returns, lengths, successes = [], [], []
    # A policy whose evaluation still samples (DPPO's DDPM chain keeps its posterior noise) draws from torch's
    # global RNG: seed it per episode inside a fork, so an evaluation is reproducible and leaves the caller's
    # training stream exactly where it was.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    for k in range(episodes):
        episode_seed = derive_seed(seed, EVAL_SEED_STREAM, k)
        obs, _ = env.reset(seed=episode_seed)
        ret, length = 0.0, 0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(episode_seed)
            while True:
                a = act(_batch(obs), deterministic=True) if act is not None else policy(_batch(obs))  # type: ignore[operator]
                obs, r, terminated, truncated, info = env.step(np.asarray(a)[0])
                ret += float(r)
                length += int(info.get("env_steps", 1))  # an action-chunk env step runs several env steps
                if terminated or truncated:
                    break
        returns.append(ret)
        lengths.append(length)
        if "is_success" in info:
            successes.append(float(info["is_success"]))
    return EvalResult(returns, lengths, successes if len(successes) == episodes else None)
