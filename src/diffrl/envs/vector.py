"""A synchronous vector env with explicit, seeded resets and exact resume.

Gymnasium 1.x vector envs auto-reset by default on the step *after* an episode ends (``NEXT_STEP``), so a
naive loop stores one transition that crosses the boundary. Here auto-reset is off: :meth:`VecEnv.step`
returns the true final observation of each finished episode (``next_obs``) and, separately, the observation
to act from next (``obs``, a fresh reset where an episode ended). No transition crosses a boundary.

Every episode starts from ``reset(seed=derive_seed(seed, env_index, episode_index))``. Because MuJoCo is
deterministic on CPU, the state of a running episode is fully defined by its seed and the actions taken so
far; :meth:`state_dict` stores exactly that and :meth:`load_state_dict` replays it, so a resumed run
continues mid-episode bit-exactly without touching simulator internals.

Shapes: ``N`` = number of envs; observations ``(N, *obs_shape)`` (dict of such arrays for goal envs),
actions ``(N, act_dim)``, rewards / flags ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from diffrl.envs.make import make_env
from diffrl.errors import CheckpointError
from diffrl.runs.seeding import derive_seed

Obs = np.ndarray | dict[str, np.ndarray]


def _stack(obs: list[Any]) -> Obs:
    if isinstance(obs[0], dict):
        return {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    return np.stack(obs)


@dataclass
class StepResult:
    """What one vector step returns (arrays over envs)."""

    next_obs: Obs
    """observation reached by this step (the true final observation where an episode ended)"""
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    obs: Obs
    """observation to act from next: ``next_obs`` or, where an episode ended, the first obs of the next one"""
    infos: list[dict[str, Any]]
    """per-env info dicts of this step (before any reset)"""
    finished: list[tuple[int, float, int, dict[str, Any]]]
    """episodes that ended here: (env index, return, length in env steps, final info)"""
    env_steps: int = 0
    """env steps executed over all envs (more than N when a wrapped env runs several per step, e.g. action chunks)"""


class VecEnv:
    """``N`` copies of ``make_env(env_id)`` stepped in sequence, each episode seeded from the run seed.

    Args:
        env_id: environment id (see :func:`diffrl.envs.make_env`).
        num_envs: number of copies.
        seed: run seed; episode ``k`` of env ``i`` is reset with ``derive_seed(seed, i, k)``.
        wrap: applied to each env (e.g. DPPO's action-chunk wrapper); a step that runs several env steps reports
            them in ``info["env_steps"]``, and episode lengths count env steps.
        env_kwargs: passed to :func:`make_env` (e.g. ``max_episode_steps``).
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, wrap: Callable[[gym.Env], gym.Env] | None = None,
                 **env_kwargs: Any) -> None:
        self.env_id = env_id
        self.num_envs = num_envs
        self.seed = seed
        self.envs = [make_env(env_id, **env_kwargs) for _ in range(num_envs)]
        if wrap is not None:
            self.envs = [wrap(env) for env in self.envs]
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.episode = np.zeros(num_envs, dtype=np.int64)
        self.ep_return = np.zeros(num_envs, dtype=np.float64)
        self.ep_length = np.zeros(num_envs, dtype=np.int64)
        self._actions: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self._obs: list[Any] = [None] * num_envs

    def _reset_one(self, i: int) -> Any:
        obs, _ = self.envs[i].reset(seed=derive_seed(self.seed, i, int(self.episode[i])))
        self.ep_return[i] = 0.0
        self.ep_length[i] = 0
        self._actions[i] = []
        self._obs[i] = obs
        return obs

    def reset(self) -> Obs:
        """Start the first episode of every env (episode counters restart at 0)."""
        self.episode[:] = 0
        return _stack([self._reset_one(i) for i in range(self.num_envs)])

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env once; reset (with the next episode's seed) those whose episode ended."""
        next_obs, obs, infos, finished = [], [], [], []
        rew = np.zeros(self.num_envs, dtype=np.float64)
        term = np.zeros(self.num_envs, dtype=bool)
        trunc = np.zeros(self.num_envs, dtype=bool)
        env_steps = 0
        for i, env in enumerate(self.envs):
            a = np.asarray(actions[i])
            o, r, te, tr, info = env.step(a)
            self._actions[i].append(a.copy())
            self.ep_return[i] += r
            n = int(info.get("env_steps", 1))
            self.ep_length[i] += n
            env_steps += n
            rew[i], term[i], trunc[i] = r, te, tr
            next_obs.append(o)
            infos.append(info)
            if te or tr:
                finished.append((i, float(self.ep_return[i]), int(self.ep_length[i]), info))
                self.episode[i] += 1
                o = self._reset_one(i)
            self._obs[i] = o
            obs.append(o)
        return StepResult(_stack(next_obs), rew, term, trunc, _stack(obs), infos, finished, env_steps)

    def current_obs(self) -> Obs:
        return _stack(self._obs)

    def state_dict(self) -> dict[str, Any]:
        """Episode indices, returns and the actions of each running episode (enough to rebuild it)."""
        shape = self.single_action_space.shape
        # Actions are kept in the dtype they were given in: the env's rescaling must see the same bits.
        return {"episode": self.episode.copy(), "ep_return": self.ep_return.copy(),
                "ep_length": self.ep_length.copy(),
                "actions": [np.stack(a) if a else np.zeros((0, *shape), dtype=self.single_action_space.dtype)
                            for a in self._actions]}

    def load_state_dict(self, state: dict[str, Any]) -> Obs:
        """Rebuild each running episode by replaying its actions from its seed; returns the current obs.

        Raises :class:`CheckpointError` if the replay does not reproduce the saved return (a non-deterministic
        env cannot be resumed exactly).
        """
        if len(state["actions"]) != self.num_envs:
            raise CheckpointError(f"the checkpoint has {len(state['actions'])} envs but this run has "
                                  f"{self.num_envs}; resume with the same --n-envs.")
        self.episode = np.asarray(state["episode"], dtype=np.int64).copy()
        for i in range(self.num_envs):
            self._reset_one(i)
            for a in state["actions"][i]:
                o, r, te, tr, info = self.envs[i].step(a)
                self._actions[i].append(a)
                self.ep_return[i] += r
                self.ep_length[i] += int(info.get("env_steps", 1))
                self._obs[i] = o
                if te or tr:
                    raise CheckpointError(f"replaying env {i} of {self.env_id} ended its episode early; the "
                                          "env is not deterministic, so this run cannot be resumed exactly.")
            if self.ep_return[i] != state["ep_return"][i]:
                raise CheckpointError(f"replaying env {i} of {self.env_id} gave return {float(self.ep_return[i])!r} "
                                      f"instead of {float(state['ep_return'][i])!r}; the env is not "
                                      "deterministic, so this run cannot be resumed exactly.")
        return self.current_obs()

    def close(self) -> None:
        for env in self.envs:
            env.close()


def obs_dim(space: gym.Space) -> int:
    """Flat size of a Box observation space."""
    return int(np.prod(space.shape))
