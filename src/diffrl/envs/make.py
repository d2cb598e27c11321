"""``make_env(id, seed)``: one entry point for every environment family diffrl supports.

- Gymnasium MuJoCo v5 (``HalfCheetah-v5``, ``Hopper-v5``, ...): Box observations.
- DeepMind Control through shimmy (``dm_control/cheetah-run-v0``): dict observations flattened to a Box.
- Fetch v4 goal tasks from gymnasium-robotics (``FetchPush-v4``): dict observations kept
  (``observation``, ``achieved_goal``, ``desired_goal``) for goal-conditioned agents.
- Users' own Gymnasium envs with Box actions: any registered id, or ``my_module:MyEnv-v0`` (Gymnasium's
  ``module:EnvId`` syntax), which imports ``my_module`` first so that it registers ``MyEnv-v0``. The full string is
  what runs save, so evaluating the run later in a fresh process imports the module again.

Every env gets actions rescaled to [-1, 1] (and clipped there). Truncation is never turned into
termination: wrappers keep Gymnasium's ``terminated`` / ``truncated`` apart.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import os
import re
import sys
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import ClipAction, FlattenObservation, RescaleAction

from diffrl.errors import EnvError

# Locomotion tasks whose v2/v3 ids were mujoco-py based and are gone from Gymnasium 1.x.
_MUJOCO_TASKS = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "Swimmer",
                 "Reacher", "Pusher", "InvertedPendulum", "InvertedDoublePendulum")
_FETCH = re.compile(r"^(Fetch(Reach|Push|Slide|PickAndPlace)(Dense)?)-v(\d+)$")


def _register_families(env_id: str) -> None:
    """Import the packages that register the env families (Gymnasium 1.x has no plugin auto-loading)."""
    if env_id.startswith("dm_control/"):
        # dm_control probes for a GLFW display at import; rendering is not needed for training.
        warnings.filterwarnings("ignore", message=".*DISPLAY environment variable is missing.*")
        try:
            import shimmy  # noqa: F401  (registers dm_control/* ids)
        except ImportError:
            raise EnvError(f"{env_id} needs shimmy with DeepMind Control: pip install 'shimmy[dm-control]' "
                           "dm-control==1.0.44.") from None
        gym.register_envs(shimmy)
    elif env_id.startswith("Fetch") or env_id.startswith("HandManipulate"):
        gym.register_envs(import_robotics(env_id))


def import_robotics(what: str = "Fetch tasks") -> Any:
    """``gymnasium_robotics`` (with ``utils.rotations`` loaded), imported quietly: its import prints a notice about
    Adroit reward versions to stderr, irrelevant to Fetch."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
            import gymnasium_robotics.utils.rotations  # noqa: F401
    except ImportError:
        raise EnvError(f"{what} need(s) gymnasium-robotics: pip install gymnasium-robotics mujoco==3.11.0.") from None
    return gymnasium_robotics


def _is_removed(env_id: str) -> bool:
    name, _, version = env_id.rpartition("-v")
    m = _FETCH.match(env_id)
    return (name in _MUJOCO_TASKS and version in ("0", "1", "2", "3")) or bool(m and int(m.group(4)) < 4)


def _split_module(env_id: str) -> tuple[str | None, str]:
    """``"my_pkg.envs:MyEnv-v0"`` -> ``("my_pkg.envs", "MyEnv-v0")``; ids without a colon -> ``(None, env_id)``."""
    if ":" not in env_id:
        return None, env_id
    module, _, name = env_id.partition(":")
    if not module or not name or ":" in name:
        raise EnvError(f"malformed environment id {env_id!r}; write module:EnvId with one colon "
                       "(e.g. my_envs:MyReach-v0).")
    return module, name


def _import_module(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        # The diffrl console script puts its bin/ directory first on sys.path, not the working directory (as
        # `python -m` would): a module next to the user is found only after adding it (as uvicorn, flask do).
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
            raise
        sys.path.append(cwd)  # last: never shadows an installed package
        try:
            importlib.import_module(module)
        except BaseException:
            sys.path.remove(cwd)
            raise


def _import_env_module(module: str, env_id: str) -> None:
    """Import the module of a ``module:EnvId`` id so that it registers its envs; one sentence if it cannot."""
    try:
        _import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise EnvError(f"{env_id}: there is no module {module!r} to import (looked in the working directory "
                           f"and on the Python path); run from the directory that holds {module.split('.')[0]}, "
                           "add it to PYTHONPATH or install the package.") from None
        if e.name is not None:
            raise EnvError(f"{env_id}: importing module {module!r} failed because it needs {e.name!r}, which is "
                           "not installed.") from None
        raise EnvError(f"{env_id}: importing module {module!r} raised ModuleNotFoundError: {e}.") from None
    except Exception as e:
        raise EnvError(f"{env_id}: importing module {module!r} raised {type(e).__name__}: {e} (run python -c "
                       f"'import {module}' to see the traceback).") from None


def _registered_by(module: str) -> list[str]:
    """Ids whose entry point lives in ``module`` (or a submodule of it)."""
    def home(entry_point: Any) -> str:
        return entry_point.partition(":")[0] if isinstance(entry_point, str) else getattr(entry_point, "__module__", "")

    return [k for k, spec in gym.registry.items()
            if home(spec.entry_point) == module or home(spec.entry_point).startswith(module + ".")]


def _check_id(env_id: str, module: str | None = None) -> None:
    """Raise one clear sentence for removed or unknown ids (``module``: the one named in ``module:EnvId``)."""
    name, _, version = env_id.rpartition("-v")
    if name in _MUJOCO_TASKS and _is_removed(env_id):
        raise EnvError(f"{env_id} is a mujoco-py environment that Gymnasium 1.x no longer provides; use "
                       f"{name}-v5 (MuJoCo 3 bindings).")
    m = _FETCH.match(env_id)
    if m and int(m.group(4)) < 4:
        raise EnvError(f"{env_id} is the mujoco-py version of this Fetch task; use {m.group(1)}-v4 "
                       "(gymnasium-robotics, MuJoCo 3 bindings).")
    if env_id in gym.registry:
        return
    if module is not None:
        own = _registered_by(module)
        listed = f"it registers {', '.join(own)}" if own else "it registers no Gymnasium env at all"
        raise EnvError(f"module {module!r} was imported but registers no environment {env_id!r} ({listed}); "
                       f"call gymnasium.register(id={env_id!r}, entry_point=...) when {module} is imported.")
    known = [k for k in gym.registry if not _is_removed(k)]
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise EnvError(f"unknown environment id {env_id!r}.{hint} diffrl supports Gymnasium MuJoCo v5 ids "
                   "(e.g. HalfCheetah-v5), DeepMind Control via shimmy (e.g. dm_control/cheetah-run-v0), "
                   "Fetch v4 via gymnasium-robotics (e.g. FetchPush-v4) and your own Gymnasium envs with Box "
                   "actions as module:EnvId (e.g. my_envs:MyReach-v0, which imports my_envs to register it).")


def is_goal_env(env: gym.Env) -> bool:
    """True for goal-conditioned envs (dict observation with achieved and desired goals)."""
    space = env.observation_space
    return isinstance(space, gym.spaces.Dict) and {"achieved_goal", "desired_goal"} <= set(space.spaces)


def make_env(env_id: str, seed: int | None = None, *, max_episode_steps: int | None = None,
             render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """Create an environment with actions in [-1, 1].

    Args:
        env_id: a Gymnasium id, or ``module:EnvId`` to import ``module`` first (see module docstring).
        seed: if given, the env is reset once with this seed and its action space is seeded.
        max_episode_steps: override the registered time limit (truncation, never termination).
        render_mode: passed to ``gym.make`` if given (an env whose constructor takes no ``render_mode`` still works).
        kwargs: extra keyword arguments for the env constructor.
    Returns:
        The wrapped env. Goal envs keep dict observations; DMC dict observations are flattened.
    """
    module, name = _split_module(env_id)
    if module is not None:
        _import_env_module(module, env_id)
    _register_families(name)
    _check_id(name, module)
    if render_mode is not None:  # gym.make hands render_mode=None on to the constructor, and users' envs may lack it
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(name, max_episode_steps=max_episode_steps, **kwargs)
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        raise EnvError(f"{env_id} could not be created because a dependency is missing ({e}).") from None
    if isinstance(env.observation_space, gym.spaces.Dict) and not is_goal_env(env):
        env = FlattenObservation(env)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise EnvError(f"{env_id} has a {type(env.action_space).__name__} action space; diffrl's agents need "
                       "continuous (Box) actions.")
    space = env.action_space
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise EnvError(f"{env_id} has unbounded actions; diffrl rescales actions to [-1, 1] and needs finite "
                       "bounds.")
    if not (np.all(space.low == -1) and np.all(space.high == 1)):
        ones = np.ones(space.shape, dtype=space.dtype)  # bounds in the space's dtype: no precision warning
        env = RescaleAction(env, -ones, ones)
    bounded = env.action_space  # [-1, 1] after RescaleAction
    env = ClipAction(env)
    env.action_space = bounded  # Gymnasium 1.x ClipAction advertises (-inf, inf); actions are still clipped
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def _space_signature(space: gym.Space) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: _space_signature(s) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype)}
    return {"type": type(space).__name__}


def env_signature(env_id: str, env: gym.Env) -> dict[str, Any]:
    """What a checkpoint records about its env: id and observation/action spaces (shapes and dtypes)."""
    return {"env_id": env_id, "observation_space": _space_signature(env.observation_space),
            "action_space": _space_signature(env.action_space)}
