"""The three on-disk dataset layouts: legacy D4RL HDF5, DPPO (and SynthER) npz, and Minari.

Readers return ``(arrays, metadata)`` where ``arrays`` holds the six canonical keys of
:class:`diffrl.data.datasets.OfflineDataset` as float32 / bool numpy arrays, already checked with
:func:`check_arrays` under the file's own key names. Writers take the same and write atomically: into a
hidden temporary file or directory in the destination's parent, renamed into place only when complete.

Shapes: ``N`` transitions, ``Do`` observation dim, ``Da`` action dim, ``E`` episodes.

Deriving what a file lacks (the same rule for every layout):

- no ``timeouts``: all False, except that the final transition ends the collection.
- the final transition is always an episode end: if it is neither terminal nor timeout it becomes a timeout.
- no next observations: ``next_obs[i] = obs[i + 1]`` inside an episode. An episode that ends by timeout has
  no successor for its last transition, which is dropped (``d4rl.qlearning_dataset`` with
  ``terminate_on_end=False``) and the transition before it becomes the episode's timeout. A terminal's
  next observation is never bootstrapped; we store ``obs[i]`` itself. Unlike ``qlearning_dataset`` we keep
  a terminal final transition (it iterates ``range(N - 1)`` and always loses the last one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from diffrl.errors import DatasetError

Arrays = dict[str, np.ndarray]

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
FLOAT_KEYS, FLAG_KEYS = KEYS[:4], KEYS[4:]
META_KEY = "diffrl_metadata"  # our metadata, a JSON string, in every layout
_TMP_PREFIX = ".diffrl-tmp-"  # hidden, so Minari's listings skip it

# The shape kind of every per-transition key a reader may meet, canonical and foreign (DPPO) names.
KINDS = {"observations": "matrix", "next_observations": "matrix", "states": "matrix", "next_states": "matrix",
         "actions": "matrix", "rewards": "vector", "terminals": "flag", "timeouts": "flag"}
# DPPO npz name of each canonical key.
DPPO_NAMES = {"observations": "states", "actions": "actions", "rewards": "rewards",
              "next_observations": "next_states", "terminals": "terminals", "timeouts": "timeouts"}




# ----------------------------------------------------------------------------------------------- checks


def check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> int:
    """Check dtype, shape, common length, 0/1 flags and finiteness of the known keys; returns N.

    Keys are checked under the names they have in ``source`` (see ``KINDS``); unknown keys are ignored.
    """
    keys = [k for k in KINDS if k in arrays]
    for k in keys:
        _check_kind(arrays[k], k, source)
    n = len(arrays[keys[0]])
    if n == 0:
        raise DatasetError(f"{source} holds no transitions ('{keys[0]}' is empty); collect data first, e.g. "
                           "with `diffrl data collect`.")
    for k in keys:
        if len(arrays[k]) != n:
            raise DatasetError(f"{source}: '{k}' has {len(arrays[k])} rows but '{keys[0]}' has {n}; every "
                               "per-transition array must have the same length N.")
    for k in keys:
        _check_values(arrays[k], k, source)
    return n


def _check_kind(a: np.ndarray, key: str, source: str) -> None:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise DatasetError(f"{source}: '{key}' has non-numeric dtype {a.dtype}; store it as numbers (float32, "
                           "or bool for flags).")
    matrix = KINDS[key] == "matrix"
    if (a.ndim != 2 or a.shape[1] == 0) if matrix else a.ndim != 1:
        raise DatasetError(f"{source}: '{key}' has shape {a.shape}; expected "
                           f"{'(N, D) with D >= 1' if matrix else '(N,) or (N, 1)'}.")


def _check_values(a: np.ndarray, key: str, source: str) -> None:
    if KINDS[key] == "flag":
        bad = np.flatnonzero((a != 0) & (a != 1))
        if bad.size:
            raise DatasetError(f"{source}: '{key}' must hold only 0/1 but has {a[bad[0]].item()!r} at index "
                               f"{bad[0]}; store it as booleans.")
        return
    bad = np.argwhere(~np.isfinite(a))
    if bad.size:
        where = f"index {bad[0][0]}" + (f" (column {bad[0][1]})" if a.ndim == 2 else "")
        raise DatasetError(f"{source}: '{key}' has a non-finite value ({a[tuple(bad[0])].item()}) at {where}; "
                           "remove or repair that transition.")


def _require(raw: Mapping[str, Any], keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DatasetError(f"{source} lacks required key(s) {', '.join(map(repr, missing))} (it has "
                           f"{', '.join(map(repr, sorted(raw))) or 'none'}); see diffrl.data.datasets for the layouts.")


def _column(a: np.ndarray) -> np.ndarray:
    """(N, 1) -> (N,), as D4RL's ``get_dataset`` squeezes rewards and terminals."""
    return a[:, 0] if a.ndim == 2 and a.shape[1] == 1 else a


def _squeeze(raw: Arrays) -> Arrays:
    return {k: _column(v) if KINDS.get(k) in ("vector", "flag") else v for k, v in raw.items()}


# ------------------------------------------------------------------------------------- episode structure


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)`` of the episodes; an episode ends where ``terminals | timeouts``."""
    n = len(terminals)
    stops = np.flatnonzero(terminals | timeouts) + 1
    if stops.size == 0 or stops[-1] != n:
        stops = np.append(stops, n)  # a trailing episode that was never closed
    starts = np.concatenate([[0], stops[:-1]])
    return starts, stops


def _finish(raw: Mapping[str, np.ndarray | None], require_rewards: bool, source: str) -> Arrays:
    """Cast to the canonical dtypes and derive what is missing (module docstring rules)."""
    obs = raw["observations"].astype(np.float32, copy=False)
    n = len(obs)
    terminals = raw["terminals"].astype(bool)
    timeouts = raw["timeouts"].astype(bool) if raw.get("timeouts") is not None else np.zeros(n, bool)
    timeouts[-1] |= not terminals[-1]  # the end of the collection is a truncation
    rewards = raw.get("rewards")
    if rewards is None and require_rewards:
        raise DatasetError(f"{source} has no 'rewards'; pass require_rewards=False to load it for behaviour "
                           "cloning only (rewards are then zeros).")
    out = {"observations": obs, "actions": raw["actions"].astype(np.float32, copy=False),
           "rewards": np.zeros(n, np.float32) if rewards is None else rewards.astype(np.float32, copy=False),
           "terminals": terminals, "timeouts": timeouts}
    if raw.get("next_observations") is not None:
        return {**out, "next_observations": raw["next_observations"].astype(np.float32, copy=False)}
    next_obs, keep, timeouts = _successors(obs, terminals, timeouts)
    out = {k: v[keep] for k, v in out.items()}
    return {**out, "next_observations": next_obs, "timeouts": timeouts}


def _successors(obs: np.ndarray, terminals: np.ndarray, timeouts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """next_obs = obs[i + 1] inside episodes; returns (next_obs (M, Do), keep mask (N,), timeouts (M,))."""
    next_obs = obs.copy()  # a terminal keeps obs[i] (never bootstrapped)
    inner = ~(terminals | timeouts)
    next_obs[:-1][inner[:-1]] = obs[1:][inner[:-1]]
    drop = timeouts & ~terminals  # no successor stored: dropped, as d4rl.qlearning_dataset does
    timeouts = timeouts.copy()
    timeouts[:-1] |= drop[1:] & inner[:-1]  # the transition before a dropped one now ends its episode
    keep = ~drop
    return next_obs[keep], keep, timeouts[keep]


# ---------------------------------------------------------------------------------------------- atomicity


def _refuse_existing(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise DatasetError(f"{dest} already exists; choose another destination or pass overwrite=True.")


@contextlib.contextmanager
def atomic_file(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` on success, delete it on failure."""
    _refuse_existing(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _move_dir(src: Path, dest: Path, scratch: Path, overwrite: bool) -> None:
    """Rename a finished directory into place; an old ``dest`` (overwrite) goes to ``scratch`` first."""
    _refuse_existing(dest, overwrite)  # again: someone may have written it meanwhile
    if dest.exists():
        os.replace(dest, scratch / "replaced")
    os.replace(src, dest)


def _dump_metadata(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata)
    except TypeError as e:
        raise DatasetError(f"the dataset's metadata is not JSON-serializable ({e}); keep it to str, numbers, "
                           "bools, None, lists and dicts.") from None


def _load_metadata(text: Any, source: str) -> dict[str, Any]:
    text = text.decode() if isinstance(text, bytes) else str(text)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise DatasetError(f"{source}: '{META_KEY}' is not valid JSON; remove it or re-export the file.") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{source}: '{META_KEY}' holds a {type(meta).__name__}, expected a JSON object.")
    return meta


# ---------------------------------------------------------------------------------------------- D4RL HDF5


def read_d4rl(path: Path, require_rewards: bool = True) -> tuple[Arrays, dict[str, Any]]:
    """Read the legacy D4RL layout (``observations, actions, rewards, terminals[, timeouts, next_observations]``)."""
    source = str(path)
    try:
        with h5py.File(path, "r") as f:
            raw = {k: _h5_array(f, k, source) for k in KEYS if k in f}
            meta = _load_metadata(f.attrs[META_KEY], source) if META_KEY in f.attrs else {}
    except OSError as e:
        raise DatasetError(f"{source} is not a readable HDF5 file ({e}); pass a D4RL-style .hdf5 file.") from None
    _require(raw, ["observations", "actions", "terminals"], source)  # rewards: see _finish
    raw = _squeeze(raw)
    check_arrays(raw, source)
    return _finish(raw, require_rewards, source), meta


def _h5_array(f: h5py.File, key: str, source: str) -> np.ndarray:
    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise DatasetError(f"{source}: '{key}' is an HDF5 group (dict observations?), expected an array; only "
                           "Box (flat array) data is supported.")
    return np.asarray(node[()])


def write_d4rl(arrays: Arrays, metadata: dict[str, Any], path: Path, overwrite: bool = False) -> None:
    """Write all six keys (next_observations included) and our metadata as the file attribute ``diffrl_metadata``."""
    text = _dump_metadata(metadata)
    with atomic_file(path, overwrite) as tmp:
        _write_hdf5(tmp, arrays, text)


def _write_hdf5(path: Path, arrays: Arrays, metadata_json: str) -> None:
    with h5py.File(path, "w") as f:
        for k in KEYS:
            f.create_dataset(k, data=arrays[k])
        f.attrs[META_KEY] = metadata_json


# -------------------------------------------------------------------------------------- DPPO / SynthER npz


def load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz archive, never unpickling; one-sentence :class:`DatasetError` for anything else."""
    if not zipfile.is_zipfile(path):  # np.load would read a .npy as an array and anything else as a pickle
        raise DatasetError(f"{path} is not an npz archive (np.savez / np.savez_compressed output).")
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path} is not a readable npz file without pickled objects ({e}).") from None


def read_npz(path: Path, require_rewards: bool = True) -> tuple[Arrays, dict[str, Any]]:
    """Read DPPO's ``states, actions, traj_lengths[, rewards, terminals]`` or SynthER's flat sample layout."""
    source = str(path)
    raw = load_npz_arrays(path)
    meta = _load_metadata(raw.pop(META_KEY), source) if META_KEY in raw else {}
    if "states" in raw:
        return _read_dppo(raw, source, require_rewards), meta
    if "observations" in raw:  # SynthER samples: episode structure unknown, one run ending at the last row
        _require(raw, ["observations", "actions", "next_observations", "terminals"], source)
        raw = _squeeze(raw)
        check_arrays(raw, source)
        return _finish(raw, require_rewards, source), meta
    raise DatasetError(f"{source} has neither 'states' (DPPO layout) nor 'observations' (SynthER layout); it has "
                       f"{', '.join(map(repr, sorted(raw))) or 'no arrays'}.")


def _read_dppo(raw: Arrays, source: str, require_rewards: bool) -> Arrays:
    _require(raw, ["states", "actions", "traj_lengths"], source)
    raw = _squeeze(raw)
    n = check_arrays(raw, source)
    traj_end = _trajectory_ends(raw["traj_lengths"], n, source)
    canon = {c: raw.get(d) for c, d in DPPO_NAMES.items()}
    if canon["terminals"] is None:
        canon["terminals"] = np.zeros(n, bool)
    if canon["timeouts"] is None:
        canon["timeouts"] = traj_end & ~canon["terminals"].astype(bool)
    return _finish(canon, require_rewards, source)


def _trajectory_ends(lengths: np.ndarray, n: int, source: str) -> np.ndarray:
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or (lengths <= 0).any():
        raise DatasetError(f"{source}: 'traj_lengths' must be a 1-D array of positive integers, got dtype "
                           f"{lengths.dtype} and shape {lengths.shape}.")
    if lengths.sum() != n:
        raise DatasetError(f"{source}: 'traj_lengths' sums to {lengths.sum()} but 'states' has {n} rows; they "
                           "must agree.")
    ends = np.zeros(n, bool)
    ends[np.cumsum(lengths) - 1] = True
    return ends


def write_npz(arrays: Arrays, metadata: dict[str, Any], path: Path, overwrite: bool = False) -> None:
    """Write DPPO's keys plus ``rewards, terminals, timeouts, next_states`` and ``diffrl_metadata``."""
    starts, stops = episode_bounds(arrays["terminals"], arrays["timeouts"])
    out = {DPPO_NAMES[k]: arrays[k] for k in KEYS}
    out.update(traj_lengths=(stops - starts).astype(np.int64), **{META_KEY: np.array(_dump_metadata(metadata))})
    with atomic_file(path, overwrite) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)


# ------------------------------------------------------------------------------------------------ Minari


def read_minari(spec: str | Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a local Minari dataset (id under ``MINARI_DATASETS_PATH``, or a dataset directory); never downloads."""
    from gymnasium.spaces import Box

    mds, source = _open_minari(spec)
    for name, space in (("observation", mds.observation_space), ("action", mds.action_space)):
        if not isinstance(space, Box):
            raise DatasetError(f"{source} has a {type(space).__name__} {name} space; diffrl's offline datasets "
                               "support Box (flat array) spaces only.")
    if mds.total_episodes == 0:
        raise DatasetError(f"{source} holds no episodes; collect data first, e.g. with `diffrl data collect`.")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
    for ep in mds.iterate_episodes():
        for k, v in _episode_arrays(ep, source).items():
            parts[k].append(v)
    raw = {k: np.concatenate(v) for k, v in parts.items()}
    check_arrays(raw, source)
    meta = mds.storage.metadata
    return _finish(raw, True, source), (_load_metadata(meta[META_KEY], source) if META_KEY in meta
                                        else _minari_metadata(meta))


def _open_minari(spec: str | Path) -> tuple[Any, str]:
    import minari

    path = Path(spec).expanduser()
    if path.is_dir():
        data = path / "data" if (path / "data").is_dir() else path
        if not (data / "metadata.json").is_file():
            raise DatasetError(f"{path} is a directory but not a Minari dataset (no data/metadata.json).")
        return _minari_call(lambda: minari.MinariDataset(data), str(path)), str(path)
    try:
        return _minari_call(lambda: minari.load_dataset(str(spec), download=False), str(spec)), str(spec)
    except FileNotFoundError:
        local = sorted(minari.list_local_datasets())
        raise DatasetError(f"no dataset {str(spec)!r}: it is not a file, not a Minari dataset directory and not a "
                           f"local Minari id under {minari_root()} (local ids: {', '.join(local) or 'none'}); "
                           "diffrl never downloads, build one with `diffrl data collect`.") from None


def _minari_call(fn: Any, source: str) -> Any:
    try:
        return fn()
    except (ValueError, KeyError, AssertionError) as e:
        raise DatasetError(f"{source} could not be opened by Minari ({e!r}); re-create it with this Minari "
                           "version.") from None


def minari_root() -> Path:
    """Where local Minari datasets live (``MINARI_DATASETS_PATH`` or Minari's default)."""
    from minari.storage import get_dataset_path

    return Path(get_dataset_path())


def _episode_arrays(ep: Any, source: str) -> Arrays:
    obs = np.asarray(ep.observations)  # (T + 1, Do)
    t = len(ep.actions)
    if len(obs) != t + 1:
        raise DatasetError(f"{source}: episode {ep.id} has {len(obs)} observations for {t} actions; Minari "
                           "episodes store T + 1 observations.")
    terminals, timeouts = np.asarray(ep.terminations), np.asarray(ep.truncations).copy()
    if t and not (terminals[-1] or timeouts[-1]):
        timeouts[-1] = True  # an episode cut off by the end of collection
    return {"observations": obs[:-1], "next_observations": obs[1:], "actions": np.asarray(ep.actions),
            "rewards": _column(np.asarray(ep.rewards)), "terminals": terminals, "timeouts": timeouts}


def _minari_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Our metadata for a Minari dataset diffrl did not write: its id, env and reference scores."""
    out: dict[str, Any] = {"minari_id": meta.get("dataset_id")}
    spec = meta.get("eval_env_spec") or meta.get("env_spec")
    if isinstance(spec, str):
        with contextlib.suppress(json.JSONDecodeError):
            out["env_id"] = json.loads(spec).get("id")
    for k in ("ref_min_score", "ref_max_score", "description", "algorithm_name"):
        if meta.get(k) is not None:
            out[k] = meta[k]
    return out


def _minari_target(out: str | Path) -> tuple[str, Path, bool]:
    """``(dataset_id, directory, is_id)``: a Path or a str starting with '/', '.' or '~' is a directory."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage import get_dataset_path

    is_id = not (isinstance(out, Path) or str(out).startswith(("/", ".", "~")))
    dest = Path(get_dataset_path(str(out))) if is_id else Path(out).expanduser().absolute()
    dataset_id = str(out) if is_id else dest.name
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(f"{dataset_id!r} is not a valid Minari dataset name; use (namespace/)name-vN, e.g. "
                           "diffrl/hopper/medium-v0.") from None
    return dataset_id, dest, is_id


def write_minari(arrays: Arrays, metadata: dict[str, Any], out: str | Path, overwrite: bool = False) -> str:
    """Write a Minari dataset with ``minari.create_dataset_from_buffers``; returns the id (or the directory).

    Minari places datasets under ``MINARI_DATASETS_PATH``, so for atomicity that variable points at a hidden
    temporary root beside the destination while Minari writes, and the finished directory is renamed into
    place (not thread-safe: the variable is process-wide). Reference scores go to Minari's own
    ``ref_min_score``/``ref_max_score`` keys (``minari.get_normalized_score`` reads them); everything else
    of ours is the JSON string ``diffrl_metadata`` in ``metadata.json``.
    """
    import minari

    dataset_id, dest, is_id = _minari_target(out)
    buffers = _episode_buffers(arrays, f"dataset {dataset_id}")
    text = _dump_metadata(metadata)
    _refuse_existing(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dest.parent))
    try:
        with _minari_env(scratch), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Minari warns for every optional field left None
            created = minari.create_dataset_from_buffers(
                dataset_id, buffers, observation_space=_obs_space(arrays), action_space=_act_space(arrays),
                algorithm_name=str(metadata.get("algorithm_name", "diffrl")),
                author=str(metadata.get("author", "diffrl")),
                description=str(metadata.get("description", _describe(metadata))),
                data_format="hdf5", jpeg_encoding=False)
            created.storage.update_metadata({META_KEY: text, **_refs(metadata)})
        _move_dir(scratch / dataset_id, dest, scratch, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if is_id:
        _ensure_namespace(dataset_id)
    return dataset_id if is_id else str(dest)


def _episode_buffers(arrays: Arrays, source: str) -> list[Any]:
    from minari.data_collector import EpisodeBuffer

    obs, nxt = arrays["observations"], arrays["next_observations"]
    buffers = []
    for e, (a, b) in enumerate(zip(*episode_bounds(arrays["terminals"], arrays["timeouts"]))):
        # bitwise, so that the round trip is bit-exact (0.0 == -0.0 would pass ==)
        same = (nxt[a:b - 1].view(np.uint32) == obs[a + 1:b].view(np.uint32)).all(axis=1)
        if not same.all():
            i = a + int(np.argmin(same))
            raise DatasetError(f"{source}: next_observations[{i}] differs from observations[{i + 1}] inside episode "
                               f"{e}, so it cannot be stored in Minari's episode layout (T + 1 observations); use "
                               "d4rl or npz.")
        buffers.append(EpisodeBuffer(
            observations=np.concatenate([obs[a:b], nxt[b - 1:b]]), actions=arrays["actions"][a:b],
            rewards=arrays["rewards"][a:b], terminations=arrays["terminals"][a:b],
            truncations=arrays["timeouts"][a:b]))
    return buffers


def _obs_space(arrays: Arrays) -> Any:
    from gymnasium.spaces import Box

    return Box(-np.inf, np.inf, arrays["observations"].shape[1:], np.float32)


def _act_space(arrays: Arrays) -> Any:
    """diffrl's [-1, 1], widened per dimension where the data goes beyond it (e.g. unscaled D4RL actions)."""
    from gymnasium.spaces import Box

    act = arrays["actions"]
    return Box(np.minimum(-1, act.min(0)), np.maximum(1, act.max(0)), act.shape[1:], np.float32)


def _refs(metadata: Mapping[str, Any]) -> dict[str, float]:
    keys = ("ref_min_score", "ref_max_score")
    return {k: float(metadata[k]) for k in keys} if all(metadata.get(k) is not None for k in keys) else {}


def _describe(metadata: Mapping[str, Any]) -> str:
    parts = [str(metadata[k]) for k in ("env_id", "kind", "preset") if metadata.get(k) is not None]
    return "diffrl offline dataset" + (f": {' '.join(parts)}" if parts else "")


@contextlib.contextmanager
def _minari_env(root: Path) -> Iterator[None]:
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _ensure_namespace(dataset_id: str) -> None:
    """Give the id's namespace its ``namespace_metadata.json`` in the real root, as Minari itself does."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces

    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)
