"""Known termination rules: whether a Gymnasium MuJoCo v5 task (default options) ends at a next observation.

A generated transition's terminal flag can be read off its own next observation instead of the diffusion
model's terminal column (the "static termination functions" of model-based offline RL, e.g. MBPO/MOPO), where
the rule is a function of the observation. The rules restate each env's ``is_healthy`` on the observation
layout ``qpos[k:] ++ qvel`` (root x, and y for Ant, excluded):

- Hopper-v5: ``0.7 < z``, ``|angle| < 0.2`` and every ``qpos[2:], qvel`` entry in ``(-100, 100)`` (the
  observation clips velocities to 10, so a velocity beyond 100 cannot be seen: the rule reads the clipped one).
- Walker2d-v5: ``0.8 < z < 2`` and ``|angle| < 1``.
- Ant-v5: a finite observation and ``0.2 <= z <= 1``.
- HalfCheetah-v5, Swimmer-v5: never terminate.

``z`` and ``angle`` are ``qpos[1]``/``qpos[2]`` (Hopper, Walker2d: observation dims 0 and 1) or ``qpos[2]`` (Ant:
dim 0). Non-default ``healthy_*`` options are not seen here; pass the model's terminals for such envs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffrl.errors import ConfigError

TerminationRule = Callable[[np.ndarray], np.ndarray]


def _hopper(next_obs: np.ndarray) -> np.ndarray:
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (z > 0.7) & (np.abs(angle) < 0.2) & np.all(np.abs(next_obs[:, 1:]) < 100.0, axis=1)
    return ~healthy


def _walker2d(next_obs: np.ndarray) -> np.ndarray:
    z, angle = next_obs[:, 0], next_obs[:, 1]
    return ~((z > 0.8) & (z < 2.0) & (np.abs(angle) < 1.0))


def _ant(next_obs: np.ndarray) -> np.ndarray:
    z = next_obs[:, 0]
    return ~(np.all(np.isfinite(next_obs), axis=1) & (z >= 0.2) & (z <= 1.0))


def _never(next_obs: np.ndarray) -> np.ndarray:
    return np.zeros(len(next_obs), dtype=bool)


TERMINATION_RULES: dict[str, TerminationRule] = {
    "Hopper-v5": _hopper, "Walker2d-v5": _walker2d, "Ant-v5": _ant, "HalfCheetah-v5": _never, "Swimmer-v5": _never}


def termination_rule(env_id: str | None, required: bool = True) -> TerminationRule | None:
    """``rule(next_obs (N, Do)) -> (N,) bool`` for ``env_id``. Where none is known: a :class:`ConfigError` if
    ``required`` (the rule is to label data), else None (it would only have been a diagnostic)."""
    if env_id not in TERMINATION_RULES:
        if not required:
            return None
        raise ConfigError(f"no termination rule is known for {env_id!r} (known: {', '.join(TERMINATION_RULES)}); "
                          "use the model's terminals (--terminals model).")
    return TERMINATION_RULES[env_id]


__all__ = ["TERMINATION_RULES", "TerminationRule", "termination_rule"]
