"""Two tiny user-defined Gymnasium envs, registered on import, for the ``module:EnvId`` tests.

Importable as ``envs_for_tests`` whenever pytest runs: ``tests/conftest.py`` has no ``__init__.py`` beside it, so
pytest puts ``tests/`` on ``sys.path`` before collecting. Ids: ``envs_for_tests:ToyReach-v0`` (Box actions) and
``envs_for_tests:ToyDiscrete-v0`` (Discrete actions, which diffrl refuses).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

DIM = 2
STEP = 0.2  # native action bounds [-0.2, 0.2]: make_env must rescale them to [-1, 1]


class ToyReachEnv(gym.Env):
    """A point in ``[-1, 1]^2`` moved by its action toward a random target.

    Observation ``[position (2), target (2)]``; reward ``-distance``; terminated within 0.05 of the target. Like many
    users' envs, its constructor takes no ``render_mode``.
    """

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (2 * DIM,), np.float32)
        self.action_space = gym.spaces.Box(-STEP, STEP, (DIM,), np.float32)

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.target]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-1, 1, DIM)
        self.target = self.np_random.uniform(-1, 1, DIM)
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.pos = np.clip(self.pos + np.clip(action, -STEP, STEP), -1.0, 1.0)
        distance = float(np.linalg.norm(self.pos - self.target))
        return self._obs(), -distance, distance < 0.05, False, {"distance": distance}


class ToyDiscreteEnv(ToyReachEnv):
    """ToyReach with four discrete moves (up, down, left, right)."""

    MOVES = STEP * np.array([[0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.float64)

    def __init__(self) -> None:
        super().__init__()
        self.action_space = gym.spaces.Discrete(len(self.MOVES))

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return super().step(self.MOVES[int(action)])


# Registered once even if this file is imported under two module names (a second register() would warn).
for _id, _cls in (("ToyReach-v0", ToyReachEnv), ("ToyDiscrete-v0", ToyDiscreteEnv)):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls, max_episode_steps=50)
