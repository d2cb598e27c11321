"""What every training pipeline's config shares: evaluation, logging, checkpoints, device, run directory."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import gymnasium as gym

from diffrl.agents.base import Params
from diffrl.augment.transitions import OUT_OF_RANGE, TERMINALS
from diffrl.config import check, check_choice, check_positive
from diffrl.envs import env_signature
from diffrl.eval import evaluate
from diffrl.runs import checkpoint as ckpt


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


@dataclasses.dataclass(frozen=True)
class DiffusionSettings(Params):
    """The transition diffusion model a SynthER pipeline trains (SynthER's EDM + residual MLP)."""

    diffusion_steps: int = 100_000
    """diffusion model gradient steps (per retrain, online)"""
    diffusion_width: int = 2048
    """residual MLP width (SynthER: 2048 offline, 1024 online)"""
    diffusion_depth: int = 6
    """residual blocks"""
    diffusion_dim_t: int = 128
    """time embedding width (SynthER: 128 offline, 256 online)"""
    diffusion_batch_size: int | None = None
    """diffusion batch size; None: SynthER's rule, 256 for data below 800k transitions, else 1024"""
    diffusion_lr: float = 3e-4
    """diffusion learning rate"""
    bf16: bool = False
    """train and sample the diffusion model in bfloat16 autocast"""
    sampler: str = "heun"
    """sampler: heun (SynthER: with churn, 128 steps), euler, dpmpp_2m, dpmpp_2m_sde"""
    sample_steps: int = 128
    """sampler steps"""
    sample_batch_size: int = 100_000
    """samples generated per batch"""
    out_of_range: str = "clip"
    """a generated action outside the action space: clip it to the bounds (diffrl's default: the env would
    execute the bound), keep it as generated (SynthER's code, whose normaliser does not clamp), or reject the
    sample and draw another"""
    terminals: str = "model"
    """synthetic terminal flags: the model's thresholded column (SynthER), or the env's known termination rule
    applied to the generated next observation (rule: Hopper, Walker2d, Ant, HalfCheetah, Swimmer v5)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("diffusion_steps", "diffusion_width", "diffusion_depth", "diffusion_dim_t",
                     "diffusion_lr", "sample_steps", "sample_batch_size"):
            check_positive(name, getattr(self, name))
        if self.diffusion_batch_size is not None:
            check_positive("diffusion_batch_size", self.diffusion_batch_size)
        check_choice("sampler", self.sampler, ("heun", "euler", "dpmpp_2m", "dpmpp_2m_sde"))
        check_choice("out_of_range", self.out_of_range, OUT_OF_RANGE)
        check_choice("terminals", self.terminals, TERMINALS)

    def diffusion_batch_for(self, transitions: int) -> int:
        """The diffusion batch size for a model of ``transitions`` real transitions (SynthER's 800k rule)."""
        if self.diffusion_batch_size is not None:
            return self.diffusion_batch_size
        return 1024 if transitions >= 800_000 else 256


def extend_configs(settings: type, bases: dict[str, type], module: str, doc: str) -> dict[str, type]:
    """One frozen config class per agent that adds ``settings``' fields to the agent's config (so every agent flag
    stays a flag); ``doc`` is formatted with ``name`` and ``what`` (the agent's description)."""
    out = {}
    for name, base in bases.items():
        cls = dataclasses.make_dataclass(f"SynthER{base.__name__}", [], bases=(settings, base), frozen=True)
        cls.__doc__ = doc.format(name=name, what=(base.__doc__ or "").split(": ", 1)[-1].rstrip("."))
        cls.__module__ = module
        out[name] = cls
    return out


def evaluate_checkpoint(run_dir: Path, env_id: str, env: gym.Env, policy: Callable[[dict[str, Any], dict[str, Any]],
                        Any], episodes: int, seed: int, parts: tuple[str, ...] = ("state",)) -> dict[str, Any]:
    """``diffrl eval``'s one path: load the latest checkpoint's ``parts``, refuse one written for another env (id or
    spaces, one sentence), build the policy with ``policy(manifest, parts)`` and run :func:`diffrl.eval.evaluate`.

    Returns the run directory, env id, checkpoint step and episodes with the :class:`~diffrl.eval.EvalResult`
    fields. ``env`` is closed afterwards.
    """
    manifest, loaded = ckpt.load_checkpoint(run_dir, parts=parts)
    ckpt.check_env(manifest, env_signature(env_id, env), run_dir)
    result = evaluate(policy(manifest, loaded), env, episodes, seed=seed)
    env.close()
    return {"run_dir": str(run_dir), "env_id": env_id, "checkpoint_step": manifest["step"], "episodes": episodes,
            **result.to_dict()}


def reused_stage(path: Path | str, stage: str) -> Path:
    """A stage a user points to (``--diffusion PATH``, ``--prior PATH``): ``path/stage`` when ``path`` is a whole run
    directory of the system that holds that stage, else ``path`` itself."""
    path = Path(path)
    return path / stage if (path / stage).is_dir() else path


def stage_status(stage_dir: Path) -> Literal["done", "resume", "start"]:
    """Where a stage of a multi-stage run stands: ``done`` (its ``summary.json`` exists), ``resume`` (a checkpoint to
    continue from) or ``start``. An attempt stopped before its first checkpoint is cleared first: there is nothing
    to resume, and a new run refuses a directory that already holds one."""
    if (stage_dir / "summary.json").is_file():
        return "done"
    if ckpt.list_checkpoints(stage_dir / "checkpoints"):
        return "resume"
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    return "start"
