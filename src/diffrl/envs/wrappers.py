"""Action chunking and the min-max normalisation DPPO shares between its dataset and its environments.

Shapes: ``Do`` observation dim, ``Da`` action dim, ``To`` observation history length (``cond_steps``),
``Ta`` predicted chunk length (``horizon_steps``), of which the first ``act_steps`` are executed.

- :class:`MinMaxNormalization` maps each observation and action dimension's data range ``[min, max]`` to
  ``[-1, 1]`` (DPPO, ``script/dataset/get_d4rl_dataset.py``). The same object normalises the pre-training
  dataset (:class:`diffrl.data.sequence.ChunkDataset`) and the env (:class:`ActionChunkEnv`), and travels with
  the checkpoint (``state_dict``), so the policy always sees the units it was trained in.
- :class:`ActionChunkEnv` (DPPO's ``MultiStep``) executes the first ``act_steps`` actions of a chunk, sums their
  rewards and returns the normalised history of the last ``To`` observations.
"""

from __future__ import annotations

from collections import deque
from typing import Any, SupportsFloat, TypeVar

import gymnasium as gym
import numpy as np
import torch

from diffrl import affine
from diffrl.errors import EnvError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

CONSTANT_RANGE = 1e-6  # a data range below this is a constant dimension (see MinMaxNormalization)


def _affine(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and half-range of ``[lo, hi]``; a constant dimension gets half-range 1."""
    centre, half = affine.minmax_shift_scale(lo, hi)
    # DPPO divides by (max - min + 1e-6), which sends a constant dim to -1 and scales any deviation from it by 1e6;
    # with half-range 1 a constant dim maps to 0 and deviations pass through unscaled (still an exact inverse).
    return centre.astype(np.float32), np.where(hi - lo < CONSTANT_RANGE, 1.0, half).astype(np.float32)


def _apply(x: ArrayT, shift: np.ndarray, scale: np.ndarray, inverse: bool) -> ArrayT:
    if isinstance(x, torch.Tensor):
        s = torch.as_tensor(shift, device=x.device, dtype=x.dtype)
        c = torch.as_tensor(scale, device=x.device, dtype=x.dtype)
        return affine.unnormalize(x, s, c) if inverse else affine.normalize(x, s, c)
    x = np.asarray(x, dtype=np.float32)
    return (affine.unnormalize(x, shift, scale) if inverse else affine.normalize(x, shift, scale)).astype(np.float32)


class MinMaxNormalization:
    """Per-dimension map of the data range ``[min, max]`` to ``[-1, 1]`` for observations and actions.

    ``normalize(x) = (x - centre) / half`` with ``centre = (max + min) / 2``, ``half = (max - min) / 2``; a
    constant dimension (range < 1e-6) gets ``half = 1``, so it maps to 0 instead of dividing by zero. Works on
    NumPy arrays (float32 out) and tensors of shape ``(..., Do)`` / ``(..., Da)``.

    Args:
        obs_min, obs_max: per-dimension observation bounds ``(Do,)``.
        act_min, act_max: per-dimension action bounds ``(Da,)``.
    """

    def __init__(self, obs_min: np.ndarray, obs_max: np.ndarray, act_min: np.ndarray, act_max: np.ndarray) -> None:
        arrays = {"obs_min": obs_min, "obs_max": obs_max, "act_min": act_min, "act_max": act_max}
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        for kind in ("obs", "act"):
            lo, hi = arrays[f"{kind}_min"], arrays[f"{kind}_max"]
            if lo.ndim != 1 or lo.shape != hi.shape:
                raise ValueError(f"{kind}_min and {kind}_max must be 1-D arrays of one shape, got {lo.shape} and "
                                 f"{hi.shape}")
            if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise ValueError(f"{kind}_min / {kind}_max contain NaN or inf; fit the statistics on finite data")
            if np.any(lo > hi):
                j = int(np.argmax(lo > hi))
                raise ValueError(f"{kind}_min[{j}] = {lo[j]} exceeds {kind}_max[{j}] = {hi[j]}")
        self.obs_min, self.obs_max = arrays["obs_min"], arrays["obs_max"]
        self.act_min, self.act_max = arrays["act_min"], arrays["act_max"]
        self._obs = _affine(self.obs_min, self.obs_max)
        self._act = _affine(self.act_min, self.act_max)

    @classmethod
    def fit(cls, observations: np.ndarray, actions: np.ndarray) -> MinMaxNormalization:
        """Statistics of a dataset: ``observations (N, Do)``, ``actions (N, Da)``."""
        obs, act = np.asarray(observations), np.asarray(actions)
        if obs.ndim != 2 or act.ndim != 2 or len(obs) == 0 or len(act) == 0:
            raise ValueError(f"fit needs non-empty (N, Do) observations and (N, Da) actions, got {obs.shape} and "
                             f"{act.shape}")
        return cls(obs.min(0), obs.max(0), act.min(0), act.max(0))

    @property
    def obs_dim(self) -> int:
        return int(self.obs_min.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.act_min.shape[0])

    def normalize_obs(self, obs: ArrayT) -> ArrayT:
        return _apply(obs, *self._obs, inverse=False)

    def unnormalize_obs(self, obs: ArrayT) -> ArrayT:
        return _apply(obs, *self._obs, inverse=True)

    def normalize_act(self, act: ArrayT) -> ArrayT:
        return _apply(act, *self._act, inverse=False)

    def unnormalize_act(self, act: ArrayT) -> ArrayT:
        return _apply(act, *self._act, inverse=True)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"obs_min": self.obs_min.copy(), "obs_max": self.obs_max.copy(),
                "act_min": self.act_min.copy(), "act_max": self.act_max.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MinMaxNormalization:
        return cls(*(np.asarray(state[k].cpu() if isinstance(state[k], torch.Tensor) else state[k])
                     for k in ("obs_min", "obs_max", "act_min", "act_max")))


class ActionChunkEnv(gym.Wrapper):
    """Executes action chunks and observes a history of observations (DPPO's ``MultiStep``).

    ``step(chunk)`` takes ``(T, Da)`` with ``T >= act_steps`` (normalised units when ``normalization`` is given,
    else the env's own), un-normalises and executes the first ``act_steps`` actions one by one, and returns:

    - observation ``(To, Do)``: the last ``To`` env-step observations, normalised, most recent last (at an
      episode start the history is the first observation repeated);
    - reward: the SUM of the executed steps' rewards (DPPO sums; gamma then applies per chunk);
    - terminated / truncated: those of the last executed step; the chunk stops early when either is set;
    - info: the last step's info plus ``env_steps``, the number of env steps actually executed.

    The wrapper never resets by itself (vector envs reset explicitly), so the returned observation after an
    episode end is the true final one.

    Args:
        env: an env with a flat Box observation space (any :func:`diffrl.envs.make_env` env but Fetch).
        act_steps: actions executed per chunk.
        cond_steps: observation history length ``To``.
        horizon_steps: the chunk length ``Ta`` the action space advertises (default ``act_steps``).
        normalization: statistics for observations and actions; ``None`` passes both through.
    """

    def __init__(self, env: gym.Env, act_steps: int, cond_steps: int = 1, horizon_steps: int | None = None,
                 normalization: MinMaxNormalization | None = None) -> None:
        super().__init__(env)
        space, act_space = env.observation_space, env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise EnvError(f"ActionChunkEnv needs a flat Box observation space, got {space}; goal envs (dict "
                           "observations) are not supported.")
        if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
            raise EnvError(f"ActionChunkEnv needs a flat Box action space, got {act_space}.")
        horizon_steps = act_steps if horizon_steps is None else horizon_steps
        if not 1 <= act_steps <= horizon_steps:
            raise ValueError(f"need 1 <= act_steps <= horizon_steps, got act_steps={act_steps}, "
                             f"horizon_steps={horizon_steps}")
        if cond_steps < 1:
            raise ValueError(f"cond_steps must be >= 1, got {cond_steps}")
        obs_dim, act_dim = int(space.shape[0]), int(act_space.shape[0])
        if normalization is not None and (normalization.obs_dim, normalization.act_dim) != (obs_dim, act_dim):
            raise ValueError(f"the normalization statistics are for {normalization.obs_dim}-dim observations and "
                             f"{normalization.act_dim}-dim actions but the env has {obs_dim} and {act_dim}; fit them "
                             "on a dataset of this env.")
        self.act_steps, self.cond_steps, self.horizon_steps = act_steps, cond_steps, horizon_steps
        self.normalization = normalization
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (cond_steps, obs_dim), np.float32)
        # normalised units: [-1, 1] is the data's action range (the env's own range without normalisation)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (horizon_steps, act_dim), np.float32)
        self._history: deque[np.ndarray] = deque(maxlen=cond_steps)
        self._inner_dtype = act_space.dtype

    def _norm(self, obs: Any) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        return self.normalization.normalize_obs(obs) if self.normalization is not None else obs

    def _observation(self) -> np.ndarray:
        return np.stack(self._history)  # (To, Do), most recent last

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        first = self._norm(obs)
        self._history.clear()
        self._history.extend([first] * self.cond_steps)  # pad by repeating the first observation (DPPO)
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        chunk = np.asarray(action, dtype=np.float32)
        da = self.action_space.shape[1]
        if chunk.ndim != 2 or chunk.shape[1] != da or chunk.shape[0] < self.act_steps:
            raise ValueError(f"ActionChunkEnv.step takes an action chunk of shape (T >= {self.act_steps}, {da}), "
                             f"got {chunk.shape}")
        if self.normalization is not None:
            chunk = self.normalization.unnormalize_act(chunk)
        total, terminated, truncated, info, k = 0.0, False, False, {}, 0
        for k in range(self.act_steps):
            obs, reward, terminated, truncated, info = self.env.step(chunk[k].astype(self._inner_dtype))
            total += float(reward)  # rewards summed over the executed prefix (DPPO's MultiStep)
            self._history.append(self._norm(obs))
            if terminated or truncated:
                break
        info = {**info, "env_steps": k + 1}
        return self._observation(), total, bool(terminated), bool(truncated), info
