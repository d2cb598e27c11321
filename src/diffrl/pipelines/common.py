"""What every training pipeline's config shares: evaluation, logging, checkpoints, device, run directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from diffrl.agents.base import Params
from diffrl.config import check, check_positive


@dataclasses.dataclass(frozen=True)
class RunConfig(Params):
    """Run settings shared by all pipelines (their step unit is the pipeline's: env or gradient steps)."""

    eval_every: int = 5_000
    """evaluate every this many steps (0: only at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes"""
    log_every: int = 1_000
    """write a metrics row every this many steps"""
    checkpoint_every: int = 10_000
    """write a checkpoint every this many steps (and always at the end)"""
    keep_checkpoints: int = 2
    """how many checkpoints to keep (0 keeps all)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    runs_root: Path = Path("runs")
    """parent directory of generated run directories"""
    run_dir: Path | None = None
    """write to this run directory instead of runs/<pipeline>/<name>/<time>-s<seed>"""
    resume: Path | None = None
    """continue the run in this directory from its latest checkpoint"""
    wandb: bool = False
    """also log to Weights & Biases (pip install 'diffrl[wandb]')"""
    wandb_project: str = "diffrl"
    """W&B project name"""
    progress: bool = True
    """show a progress bar"""

    # Fields a resume may change; everything else must match the saved run.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"steps", "device", "resume", "run_dir", "runs_root", "wandb", "wandb_project", "progress",
         "eval_episodes", "keep_checkpoints"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("eval_episodes", "log_every", "checkpoint_every"):
            check_positive(name, getattr(self, name))
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        check(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, ">= 0")
