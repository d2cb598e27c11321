"""Offline datasets: one in-memory form (:class:`OfflineDataset`), three on-disk layouts, strict validation.

Shapes: ``N`` transitions, ``E`` episodes, ``Do`` observation dim, ``Da`` action dim::

    observations (N, Do) f32   actions (N, Da) f32   rewards (N,) f32   next_observations (N, Do) f32
    terminals (N,) bool: true terminations only     timeouts (N,) bool: time limit or end of collection

An episode ends where ``terminals | timeouts``; the final transition always ends one.

Layouts (``detect_format`` picks one from the spec):

=========  ===========================  ===============================================================
format     spec                         keys
=========  ===========================  ===============================================================
``d4rl``   ``*.hdf5`` / ``*.h5``        ``observations, actions, rewards, terminals`` + optional
                                        ``timeouts, next_observations``; ours adds the file attribute
                                        ``diffrl_metadata`` (JSON)
``npz``    ``*.npz``                    DPPO: ``states, actions, traj_lengths`` + optional ``rewards,
                                        terminals``; ours adds ``next_states, timeouts,
                                        diffrl_metadata``. Or SynthER samples: ``observations, actions,
                                        rewards, next_observations, terminals`` (episode structure
                                        unknown: one run that ends at the last row)
``minari`` anything else: a local id    per episode ``observations`` (T + 1), ``actions, rewards,
           (``MINARI_DATASETS_PATH``)   terminations, truncations``; ours adds ``diffrl_metadata``
           or a dataset directory       (JSON) and ``ref_min_score/ref_max_score`` to metadata.json
=========  ===========================  ===============================================================

Missing next observations are rebuilt as ``d4rl.qlearning_dataset`` does (see :mod:`diffrl.data.formats`).
Round trips between the formats are bit-exact, metadata included (JSON: tuples come back as lists).
Nothing is ever downloaded: datasets are built locally with ``diffrl data collect``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffrl.data import formats
from diffrl.data.batch import Batch
from diffrl.data.formats import FLOAT_KEYS, KEYS, DatasetError, check_arrays, episode_bounds
from diffrl.errors import ConfigError

__all__ = ["DatasetError", "OfflineDataset", "validate", "load_dataset", "save_dataset", "detect_format",
           "fingerprint", "dataset_env", "dataset_run_name"]

Format = Literal["minari", "d4rl", "npz"]
ACTION_SLACK = 1e-6  # float32 rounding of actions that were clipped to the bounds
SUFFIXES = {".hdf5": "d4rl", ".h5": "d4rl", ".npz": "npz"}


@dataclass
class OfflineDataset:
    """Transitions of a fixed dataset, numpy arrays on the CPU (shapes in the module docstring)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-able: env_id, kind, ref_min_score, ref_max_score, preset, seed, ... (free-form)."""

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The six per-transition arrays by name (no copies)."""
        return {k: getattr(self, k) for k in KEYS}

    def episode_slices(self) -> list[slice]:
        """One slice per episode; episodes end where ``terminals | timeouts``."""
        return [slice(int(a), int(b)) for a, b in zip(*episode_bounds(self.terminals, self.timeouts))]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, (E,) float64."""
        starts, _ = episode_bounds(self.terminals, self.timeouts)
        return np.add.reduceat(self.rewards.astype(np.float64), starts)

    def to_batch(self, device: str | torch.device = "cpu") -> Batch:
        """All transitions as a :class:`Batch` (``done`` = terminals as float32); shares memory on the CPU."""
        b = Batch(obs=torch.from_numpy(self.observations), act=torch.from_numpy(self.actions),
                  rew=torch.from_numpy(self.rewards), next_obs=torch.from_numpy(self.next_observations),
                  done=torch.from_numpy(self.terminals.astype(np.float32)))
        return b.to(device)

    def subset_episodes(self, fraction: float, seed: int) -> OfflineDataset:
        """A random ``fraction`` of whole episodes (at least one), in their original order."""
        if not 0 < fraction <= 1:
            raise DatasetError(f"subset fraction must be in (0, 1], got {fraction}.")
        slices = self.episode_slices()
        k = max(1, round(fraction * len(slices)))
        chosen = np.sort(np.random.default_rng(seed).choice(len(slices), size=k, replace=False))
        index = np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in chosen])
        meta = {**self.metadata, "subset": {"fraction": fraction, "seed": seed, "episodes": k}}
        return OfflineDataset(**{k: v[index] for k, v in self.arrays().items()}, metadata=meta)

    def describe(self) -> dict[str, Any]:
        """Sizes, dims, return statistics and action range (``diffrl data info`` adds normalized scores:
        :func:`diffrl.eval.describe_dataset`)."""
        returns = self.episode_returns()
        return {"env_id": self.metadata.get("env_id"), "episodes": len(returns), "transitions": len(self),
                "obs_dim": self.obs_dim, "act_dim": self.act_dim, **summary_stats("return", returns),
                "terminals": int(self.terminals.sum()), "timeouts": int(self.timeouts.sum()),
                "action_min": float(self.actions.min()), "action_max": float(self.actions.max())}


def summary_stats(prefix: str, x: np.ndarray) -> dict[str, float]:
    """``{prefix}_mean / _std / _min / _max`` of ``x`` as floats."""
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_std": float(x.std()),
            f"{prefix}_min": float(x.min()), f"{prefix}_max": float(x.max())}


def fingerprint(ds: OfflineDataset, extra: dict[str, np.ndarray] | None = None) -> str:
    """Hash of the dataset's arrays (and any extra arrays): a resumed run must train on exactly the same data."""
    h = hashlib.sha256()
    for arrays in (ds.arrays(), extra or {}):
        for v in arrays.values():
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def dataset_env(ds: OfflineDataset, env: str | None, source: str, *, required: bool = True) -> str | None:
    """The env id a run on ``ds`` uses: ``env`` (``--env``) if given, else the env recorded in the dataset.

    Args:
        env: the user's env id; ``load_dataset(..., env_id=env)`` has already checked the data against it.
        source: the dataset as the user named it (for the sentence).
        required: one sentence (:class:`ConfigError`) when neither names an env, and a recorded env is checked
            against the data (dims, action bounds); ``False``: ``None`` then, and nothing is checked (the env only
            labels the run, e.g. a diffusion model's fidelity check).
    """
    env_id = env or ds.metadata.get("env_id")
    if not required:
        return env_id
    if not env_id:
        raise ConfigError(f"dataset {source} records no environment; pass --env ID for evaluation.")
    if env is None:
        validate(ds, env_id, source=source)  # against the recorded env too
    return env_id


def dataset_run_name(spec: str | Path) -> str:
    """The run directory's dataset level for ``--dataset spec``: a file's stem or the Minari id."""
    return Path(spec).stem if Path(spec).suffix else str(spec)


# ---------------------------------------------------------------------------------------------- validation


def validate(ds: OfflineDataset, env_id: str | None = None, action_space: Any = None, *,
             source: str = "dataset") -> None:
    """Raise :class:`DatasetError` (one sentence naming ``source``, key and index) unless ``ds`` is sound.

    Checks shapes, dtypes (float32 / bool), equal lengths, 0/1 flags, NaN/inf, non-emptiness and that the
    final transition ends an episode; with ``env_id`` also the observation/action dims and that actions lie
    in the env's action space ([-1, 1] for diffrl envs), or in ``action_space`` if given.
    """
    arrays = ds.arrays()
    check_arrays(arrays, source)
    for k in KEYS:
        want = np.float32 if k in FLOAT_KEYS else np.bool_
        if arrays[k].dtype != want:
            raise DatasetError(f"{source}: '{k}' has dtype {arrays[k].dtype}; OfflineDataset holds "
                               f"{np.dtype(want)} (convert with .astype).")
    if ds.next_observations.shape[1] != ds.obs_dim:
        raise DatasetError(f"{source}: 'next_observations' has {ds.next_observations.shape[1]} columns but "
                           f"'observations' has {ds.obs_dim}; they must match.")
    if not (ds.terminals[-1] or ds.timeouts[-1]):
        raise DatasetError(f"{source}: the final transition (index {len(ds) - 1}) is neither terminal nor timeout; "
                           "mark the end of collection as a timeout.")
    if env_id is not None:
        action_space = _check_env(ds, env_id, action_space, source)
    if action_space is not None:
        _check_actions(ds.actions, action_space, source, env_id or "the given action space")


def _check_env(ds: OfflineDataset, env_id: str, action_space: Any, source: str) -> Any:
    """Observation dims against ``env_id``; returns the action space to check against."""
    from gymnasium.spaces import Box

    from diffrl.envs import make_env

    env = make_env(env_id)
    obs_space, env_action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(obs_space, Box):
        raise DatasetError(f"{env_id} has a {type(obs_space).__name__} observation space; offline datasets "
                           "support Box observations only.")
    if obs_space.shape != (ds.obs_dim,):
        raise DatasetError(f"{source}: observations have {ds.obs_dim} dims but {env_id} observes shape "
                           f"{obs_space.shape}; pass the env the dataset was collected on.")
    return env_action_space if action_space is None else action_space


def _check_actions(actions: np.ndarray, space: Any, source: str, name: str) -> None:
    from gymnasium.spaces import Box

    if not isinstance(space, Box):
        raise DatasetError(f"{name} is a {type(space).__name__} space; offline datasets need Box (continuous) actions.")
    low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
    if tuple(space.shape) != actions.shape[1:]:
        raise DatasetError(f"{source}: actions have {actions.shape[1]} dims but {name} takes shape "
                           f"{tuple(space.shape)}; pass the env the dataset was collected on.")
    bad = np.argwhere((actions < low - ACTION_SLACK) | (actions > high + ACTION_SLACK))
    if bad.size:
        i, j = bad[0]
        raise DatasetError(f"{source}: action {actions[i, j]:.6g} at index {i} (dim {j}) lies outside {name}'s "
                           f"bounds [{low[j]:g}, {high[j]:g}]; diffrl envs take actions in [-1, 1], so rescale "
                           "the dataset's actions (or pass the env it was collected on).")


# ----------------------------------------------------------------------------------------------- load/save


def detect_format(spec: str | Path) -> Format:
    """``d4rl`` for ``.hdf5``/``.h5``, ``npz`` for ``.npz``, else ``minari`` (an id or a dataset directory)."""
    fmt = SUFFIXES.get(Path(spec).suffix.lower())
    if fmt is not None:
        return fmt  # type: ignore[return-value]
    if Path(spec).expanduser().is_file():
        raise DatasetError(f"{spec} is a file of unknown type; expected a D4RL .hdf5/.h5 file, a DPPO .npz file or a "
                           "Minari dataset id or directory.")
    return "minari"


def load_dataset(spec: str | Path, env_id: str | None = None, *, require_rewards: bool = True) -> OfflineDataset:
    """Load and validate a dataset from a path or a local Minari id (format detected, never downloaded).

    Args:
        spec: ``*.hdf5``/``*.h5`` (D4RL), ``*.npz`` (DPPO or SynthER), or a Minari id / dataset directory.
        env_id: if given, observation/action dims and action bounds are checked against ``make_env(env_id)``.
        require_rewards: False lets reward-less npz/HDF5 files load (rewards zero) for behaviour cloning.
    Returns:
        The dataset; raises :class:`DatasetError` with one sentence on any problem.
    """
    fmt = detect_format(spec)
    if fmt == "minari":
        arrays, meta = formats.read_minari(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DatasetError(f"{spec} does not exist; pass an existing .hdf5/.h5 (D4RL) or .npz (DPPO) file, or "
                               "a Minari dataset id.")
        read = formats.read_d4rl if fmt == "d4rl" else formats.read_npz
        arrays, meta = read(path, require_rewards)
    ds = OfflineDataset(**arrays, metadata=meta)
    validate(ds, env_id, source=str(spec))
    return ds


def save_dataset(ds: OfflineDataset, out: str | Path, fmt: Format, *, overwrite: bool = False) -> str:
    """Validate ``ds`` and write it atomically; never replaces ``out`` unless ``overwrite``.

    Args:
        out: a ``.hdf5``/``.h5`` path (d4rl), a ``.npz`` path (npz), or for minari a dataset id such as
            ``diffrl/hopper/medium-v0`` (under ``MINARI_DATASETS_PATH``) or a directory (a ``Path``, or a str
            starting with '/', '.' or '~') whose name is a valid id like ``hopper-medium-v0``.
    Returns:
        The file path, the Minari id, or the Minari directory.
    """
    validate(ds, source="dataset to save")
    if fmt == "minari":
        return formats.write_minari(ds.arrays(), ds.metadata, out, overwrite)
    if fmt not in ("d4rl", "npz"):
        raise DatasetError(f"unknown dataset format {fmt!r}; choose minari, d4rl or npz.")
    path = Path(out).expanduser()
    if SUFFIXES.get(path.suffix.lower()) != fmt:
        raise DatasetError(f"{out} does not end in {'.hdf5 or .h5' if fmt == 'd4rl' else '.npz'}, so it would not "
                           f"be read back as {fmt}; change the suffix.")
    write = formats.write_d4rl if fmt == "d4rl" else formats.write_npz
    write(ds.arrays(), ds.metadata, path, overwrite)
    return str(path)
