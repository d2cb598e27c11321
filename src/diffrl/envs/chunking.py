"""Envs that execute a chunk policy's action chunks: one (evaluation) or a seeded vector of them (rollouts).

Each env is ``make_env(env_id)`` inside :class:`~diffrl.envs.wrappers.ActionChunkEnv`: it takes a normalised chunk
``(Ta, Da)``, un-normalises and executes its first ``act_steps`` actions, sums their rewards, stops at an episode's
end and returns the normalised history of the last ``To`` observations ``(To, Do)``. The normalisation is the one
the policy's data were fitted with (:class:`~diffrl.envs.wrappers.MinMaxNormalization`).

Shapes: ``Ta`` / ``Da`` chunk length / action dim, ``To`` / ``Do`` observation history length / dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import gymnasium as gym

from diffrl.envs.make import make_env
from diffrl.envs.vector import VecEnv
from diffrl.envs.wrappers import ActionChunkEnv, MinMaxNormalization


class Chunking(Protocol):
    """How a policy chunks actions (a pre-trained policy's spec is one)."""

    @property
    def horizon_steps(self) -> int:
        """``Ta``, the predicted chunk length."""
        ...

    @property
    def act_steps(self) -> int:
        """Actions of a chunk executed in the env (``<= Ta``)."""
        ...

    @property
    def cond_steps(self) -> int:
        """``To``, the observation history length."""
        ...


def chunk_wrapper(chunking: Chunking, normalization: MinMaxNormalization,
                  act_steps: int | None = None) -> Callable[[gym.Env], ActionChunkEnv]:
    """Wraps an env to execute the policy's chunks in the normalised units of its data (``act_steps`` overrides
    the policy's executed actions per chunk)."""
    return lambda env: ActionChunkEnv(env, act_steps or chunking.act_steps, chunking.cond_steps,
                                      chunking.horizon_steps, normalization)


def chunk_env(env_id: str, chunking: Chunking, normalization: MinMaxNormalization, act_steps: int | None = None,
              max_episode_steps: int | None = None) -> ActionChunkEnv:
    """``make_env(env_id)`` executing the policy's chunks (:func:`chunk_wrapper`)."""
    return chunk_wrapper(chunking, normalization, act_steps)(make_env(env_id, max_episode_steps=max_episode_steps))


def chunk_envs(env_id: str, num_envs: int, seed: int, chunking: Chunking, normalization: MinMaxNormalization,
               act_steps: int | None = None, max_episode_steps: int | None = None) -> VecEnv:
    """``num_envs`` seeded :class:`ActionChunkEnv` copies (:class:`~diffrl.envs.VecEnv`'s explicit resets and exact
    replay; episode lengths count env steps)."""
    return VecEnv(env_id, num_envs, seed, max_episode_steps=max_episode_steps,
                  wrap=chunk_wrapper(chunking, normalization, act_steps))
