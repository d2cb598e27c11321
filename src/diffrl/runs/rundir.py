"""The run directory every diffrl command writes (DESIGN.md, "Run directory").

::

    runs/<pipeline>/<env-or-dataset>/<timestamp>-s<seed>/
        config.yaml    resolved config + library versions + command line
        metrics.csv    one row per log step (runs.logger)
        events.*       TensorBoard
        summary.json   final numbers
        checkpoints/   runs.checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from diffrl.config import load_yaml, save_yaml, to_dict
from diffrl.errors import CheckpointError, ConfigError
from diffrl.runs.checkpoint import versions

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (env ids like dm_control/cheetah-run-v0 included)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def task_name(env_id: str) -> str:
    """``Hopper-v5`` -> ``hopper``; ``dm_control/cheetah-run-v0`` -> ``cheetah-run``; ``my_envs:Reach-v0`` ->
    ``reach`` (dataset and file names)."""
    return env_id.rpartition(":")[2].split("/")[-1].rsplit("-v", 1)[0].lower()


def new_run_dir(pipeline: str, name: str, seed: int, root: Path = Path("runs"), run_dir: Path | None = None) -> Path:
    """Create and return a fresh run directory; refuse to reuse one that already holds a run.

    Args:
        pipeline: pipeline name (first path level), e.g. ``train_sac``.
        name: env id or dataset name (second level).
        seed: run seed (suffix ``-s<seed>``).
        root: parent of all runs (default ``./runs``).
        run_dir: an explicit directory instead of the generated path.
    """
    if run_dir is not None:
        path = Path(run_dir)
        if (path / CONFIG_FILE).exists():
            raise ConfigError(f"run directory {path} already holds a run; continue it with --resume {path} or "
                              "choose another --run-dir (nothing was overwritten).")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / slug(pipeline) / slug(name)
    for i in range(1000):
        path = base / (f"{stamp}-s{seed}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a unique run directory under {base}.")


def write_config(run_dir: Path, pipeline: str, config: dict[str, Any]) -> None:
    """Write ``config.yaml``: the pipeline name, the resolved config, versions and the command line."""
    save_yaml({"pipeline": pipeline, "config": config, "versions": versions(),
               "command": " ".join(sys.argv)}, run_dir / CONFIG_FILE)


def read_config(run_dir: Path) -> dict[str, Any]:
    """Read a run's ``config.yaml``; a missing or broken one is a :class:`CheckpointError`."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a diffrl run directory (no {CONFIG_FILE}); pass the directory "
                              "a diffrl command printed as its run directory.")
    try:
        data = load_yaml(path)
    except Exception as e:  # yaml.YAMLError and decoding errors
        raise CheckpointError(f"{path} is unreadable ({e}).") from None
    if not isinstance(data, dict) or "pipeline" not in data or "config" not in data:
        raise CheckpointError(f"{path} is not a diffrl config file (it lacks 'pipeline' or 'config').")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write the run's final numbers to ``summary.json``."""
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json``; missing or broken is a :class:`CheckpointError`."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is missing or unreadable ({e}); the run may not have finished.") from None


def _same_value(a: Any, b: Any) -> bool:
    """Equal config values; two spellings of one path (relative and absolute, e.g. a run started by one sweep runner
    and resumed by the other) are the same value."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b) and \
        os.path.realpath(a) == os.path.realpath(b)


def check_resumable(run_dir: Path, pipeline: str, new: Any) -> None:
    """Refuse to resume ``run_dir`` with a config that differs from its saved one in anything but the fields
    ``new.RESUMABLE`` names (e.g. ``steps``, ``device``).

    Args:
        run_dir: the run being resumed (its ``config.yaml`` holds the saved config and pipeline).
        pipeline: the pipeline asked to resume it.
        new: the new resolved config dataclass. A field the saved config predates counts as its default, so a run
            started before diffrl added the field still resumes (at that default only).
    """
    saved = read_config(run_dir)
    if saved["pipeline"] != pipeline:
        raise CheckpointError(f"{run_dir} is a {saved['pipeline']} run and cannot be resumed by {pipeline} "
                              "(nothing was changed).")
    may_change = set(new.RESUMABLE)
    old = dict(saved["config"])
    for f in dataclasses.fields(new):
        if f.name not in old and f.default is not dataclasses.MISSING:
            old[f.name] = to_dict(f.default)
        elif f.name not in old and f.default_factory is not dataclasses.MISSING:
            old[f.name] = to_dict(f.default_factory())
    wanted = to_dict(new)
    changed = [k for k in sorted(set(old) | set(wanted))
               if k not in may_change and not _same_value(old.get(k), wanted.get(k))]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more field(s))" if len(changed) > 1 else ""
        raise CheckpointError(f"cannot resume {run_dir} with {k}={wanted.get(k)!r}: that run was started with "
                              f"{k}={old.get(k)!r}{more}; start a new run instead (nothing was changed).")
