"""One logger for every pipeline: ``metrics.csv`` + TensorBoard, and W&B only when asked.

Update steps return detached scalars; pipelines hand them to :meth:`Logger.log`. On resume the logger
drops rows logged after the checkpoint (they will be logged again) so the curve has no duplicates.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffrl.errors import ConfigError, TrainingDiverged
from diffrl.runs.rundir import METRICS_FILE

FIXED = ("step", "env_steps", "wall_s")


class Logger:
    """Write metrics rows to ``metrics.csv``, TensorBoard and (optionally) Weights & Biases.

    Args:
        run_dir: the run directory.
        resume_step: when resuming, the checkpoint's step; rows with a larger step are dropped.
        wall_offset: wall seconds already spent before this process (from the checkpoint).
        tensorboard: write TensorBoard events.
        wandb_project: if set, also log to W&B (needs ``pip install 'diffrl[wandb]'``).
        config: resolved config, recorded by W&B.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, wall_offset: float = 0.0,
                 tensorboard: bool = True, wandb_project: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.wall_offset = wall_offset
        self._t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = list(FIXED)
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or FIXED)
                self.rows = [r for r in reader if float(r["step"]) <= resume_step]
            self._rewrite()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb needs the wandb package: pip install 'diffrl[wandb]'.") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=dict(config or {}),
                                     name=Path(run_dir).name, resume="allow", id=_wandb_id(run_dir))

    def wall_s(self) -> float:
        """Wall seconds of the whole run so far, including time before a resume."""
        return self.wall_offset + time.perf_counter() - self._t0

    def log(self, step: int, metrics: Mapping[str, Any], env_steps: int | None = None) -> None:
        """Append one row. Tensor values are converted with ``float``; NaN is kept (and visible)."""
        row: dict[str, Any] = {"step": step, "env_steps": env_steps if env_steps is not None else "",
                               "wall_s": round(self.wall_s(), 3)}
        for k, v in metrics.items():
            row[k] = float(v)
        new_cols = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new_cols:
            self.columns.extend(new_cols)
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in FIXED and not math.isnan(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def check_finite(row: Mapping[str, float], step: int, run_dir: Path) -> None:
    """Stop a run whose metrics became NaN/inf, before it overwrites good checkpoints."""
    bad = sorted(k for k, v in row.items() if not math.isfinite(v))
    if bad:
        raise TrainingDiverged(f"training diverged at step {step}: {bad[0]}={row[bad[0]]}; the checkpoints before it "
                               f"are in {Path(run_dir) / 'checkpoints'} (try a lower learning rate).")


def episode_stats(episodes: list[tuple[float, int]], count: bool = True) -> dict[str, float]:
    """``train/episode_return`` / ``train/episode_length``: the means over the episodes finished since the last row
    (``(return, length)`` pairs), and with ``count`` their number (``train/episodes``); nothing when none finished."""
    if not episodes:
        return {}
    out = {"train/episode_return": float(np.mean([r for r, _ in episodes])),
           "train/episode_length": float(np.mean([n for _, n in episodes]))}
    return {**out, "train/episodes": float(len(episodes))} if count else out


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def x_column(rows: list[dict[str, float]], preferred: str = "env_steps") -> str:
    """The x axis of metrics rows: ``preferred`` where every row has a number there, else ``step`` (an offline run's
    gradient steps: its metrics.csv may carry an empty env_steps column, whose cells read as NaN)."""
    return preferred if all(not math.isnan(r.get(preferred, math.nan)) for r in rows) else "step"


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` with numeric values (empty cells become NaN)."""
    with open(Path(run_dir) / METRICS_FILE, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
