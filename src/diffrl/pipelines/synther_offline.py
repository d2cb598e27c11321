"""SynthER offline (Lu, Ball et al. 2023): upsample a dataset with a diffusion model, train an offline agent on it.

    diffrl synther offline --dataset D --algo td3bc|iql|cql|edac [--data-mode synthetic|mixed|real]
        [--real-ratio R] [--num-samples N] [--data-fraction F] [--diffusion RUN_DIR] [--preset quick|paper]

Reads top to bottom, in stages that a resume skips when they are done:
1. real data: the dataset, or a random ``data_fraction`` of its episodes (SynthER's small-data experiment);
2. the transition diffusion model, trained on that real data (``run_dir/diffusion``, the diffusion pipeline's own
   run directory) or loaded from ``--diffusion``;
3. ``num_samples`` generated transitions, saved as ``run_dir/samples.npz`` (SynthER's layout: terminals
   thresholded at 0.5, out-of-range actions clipped by default: ``out_of_range``), and their fidelity on a subsample;
4. the offline agent on synthetic-only, mixed (``real_ratio`` of each batch real) or real data, with state and
   reward normalisation fitted on the REAL data and applied to synthetic transitions too (as SynthER's CORL code);
5. evaluation: normalised scores in ``summary.json``, with the fidelity and the diffusion run's figures.
SynthER's own code trains on synthetic data only offline; ``mixed`` is diffrl's addition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from diffrl.augment import TransitionLayout
from diffrl.augment.transitions import SAMPLE_KEYS, generate_transitions
from diffrl.config import check, check_choice, check_positive, check_unit_interval, to_dict
from diffrl.data import dataset_env, dataset_run_name, fingerprint, load_dataset
from diffrl.data.formats import atomic_file
from diffrl.diffusion.spec import load_model
from diffrl.envs.termination import termination_rule
from diffrl.errors import CheckpointError, ConfigError, DiffrlWarning
from diffrl.eval.fidelity import LAYOUTS, fidelity_report, format_fidelity
from diffrl.pipelines import diffusion, offline, online
from diffrl.pipelines.common import DiffusionSettings, extend_configs, stage_status
from diffrl.registry import Command, System
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.lock import lock_run_dir
from diffrl.runs.rundir import check_resumable, new_run_dir, read_summary, write_config

PREFIX = "synther_offline_"


@dataclasses.dataclass(frozen=True)
class SynthERSettings(DiffusionSettings):
    """SynthER's data and diffusion settings, shared by every offline agent."""

    data_mode: str = "synthetic"
    """synthetic (SynthER), mixed (real_ratio of each batch real) or real (the baseline; no diffusion model)"""
    real_ratio: float = 0.5
    """mixed mode: fraction of each batch drawn from the real data"""
    num_samples: int = 5_000_000
    """generated transitions (SynthER: 5M)"""
    data_fraction: float = 1.0
    """keep this random fraction of the real episodes first (SynthER's small-data experiment: 0.15)"""
    diffusion: Path | None = None
    """reuse a trained `diffrl diffusion train` run instead of training one"""
    fidelity_samples: int = 2000
    """generated transitions whose fidelity is measured (0: skip)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("data_mode", self.data_mode, ("synthetic", "mixed", "real"))
        check(0.0 <= self.real_ratio <= 1.0, "real_ratio", self.real_ratio, "in [0, 1]")
        check_unit_interval("data_fraction", self.data_fraction)
        check_positive("num_samples", self.num_samples)
        check(self.fidelity_samples >= 0, "fidelity_samples", self.fidelity_samples, ">= 0")

    @property
    def batch_real_ratio(self) -> float:
        return {"synthetic": 0.0, "mixed": self.real_ratio, "real": 1.0}[self.data_mode]


ALGOS: dict[str, type] = extend_configs(
    SynthERSettings, {name: cls for name, (cls, _) in offline.ALGOS.items() if name != "bc"}, __name__,
    "``diffrl synther offline --algo {name}``: {what} on SynthER data.")
for _cls in ALGOS.values():
    globals()[_cls.__name__] = _cls  # importable by name (from_dict, pickling-free configs)

_DIFFUSION_QUICK = dict(diffusion_steps=10_000, diffusion_width=256, sampler="dpmpp_2m_sde", sample_steps=32,
                        num_samples=200_000)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"quick": {**offline.PRESETS[name]["quick"], **_DIFFUSION_QUICK},
           "paper": {**offline.PRESETS[name]["paper"], "diffusion_steps": 100_000, "diffusion_width": 2048,
                     "sampler": "heun", "sample_steps": 128, "num_samples": 5_000_000}}
    for name in ALGOS}


def algo_name(cfg: Any) -> str:
    return offline.algo_name(cfg)


def _train_diffusion(cfg: Any, real: Any, run_dir: Path) -> Path:
    """Stage 2: the diffusion model's run directory (trained here, resumed, or the user's)."""
    if cfg.diffusion is not None:
        return Path(cfg.diffusion)
    model_dir = run_dir / "diffusion"
    status = stage_status(model_dir)
    if status == "done":
        return model_dir
    return diffusion.run(diffusion.stage_config(cfg, model_dir, status == "resume", len(real)), dataset=real)


def _check_model_data(model_dir: Path, real: Any) -> bool:
    """Whether the diffusion model in ``model_dir`` was trained on exactly ``real`` (after --data-fraction); a
    model from other data (e.g. the full dataset in a small-data experiment) is allowed but announced."""
    trained_on = ckpt.read_manifest(ckpt.resolve_checkpoint(model_dir)).get("meta", {}).get("dataset_fingerprint")
    same = trained_on == fingerprint(real)
    if not same:
        warnings.warn(f"the diffusion model in {model_dir} was trained on other data than this run's real data "
                      "(another dataset or --data-fraction); summary.json records diffusion_same_data: false.",
                      DiffrlWarning, stacklevel=2)
    return same


GENERATED = "generated"  # a diffusion run's cache of generated transitions (one npz + json per setting)


def _generation_key(cfg: Any, model_dir: Path, sampler: str, steps: int | None) -> str:
    """What fixes the generated transitions: the model checkpoint (its manifest) and every generation setting."""
    checkpoint = ckpt.resolve_checkpoint(model_dir)
    spec = {"checkpoint": checkpoint.name, "manifest": ckpt.read_manifest(checkpoint), "sampler": sampler,
            "steps": steps, "num": cfg.num_samples, "seed": cfg.seed, "out_of_range": cfg.out_of_range,
            "terminals": cfg.terminals, "batch_size": cfg.sample_batch_size, "bf16": cfg.bf16,
            "device": resolve_device(cfg.device).type}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(model_dir: Path, key: str) -> tuple[dict, dict] | None:
    """The transitions another run generated from this model with the same settings, with its figures."""
    npz, meta = model_dir / GENERATED / f"{key}.npz", model_dir / GENERATED / f"{key}.json"
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        with np.load(npz) as f:
            samples = {k: f[k] for k in SAMPLE_KEYS}
        return samples, json.loads(meta.read_text())
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is regenerated, never trusted


def _keep(model_dir: Path, key: str, samples_path: Path, figures: dict) -> None:
    """Leave this run's transitions in the model's cache for the next run with the same model and settings (the
    arms of a study that share one model: synthetic, mixed, other agents). Best effort: a model directory that
    cannot be written to only costs the next run a regeneration."""
    folder = model_dir / GENERATED
    try:
        folder.mkdir(exist_ok=True)
        with atomic_file(folder / f"{key}.json", overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(figures, default=float))
        with atomic_file(folder / f"{key}.npz", overwrite=True) as tmp:
            try:
                tmp.unlink()
                os.link(samples_path, tmp)  # same file system: no second copy on disk
            except OSError:
                shutil.copyfile(samples_path, tmp)
    except OSError:
        pass


def _samples(cfg: Any, model_dir: Path, run_dir: Path, obs_dim: int, act_dim: int,
             env_id: str) -> tuple[dict, dict]:
    """Stage 3: generated transitions (read back if a previous attempt saved them, or taken from the model's cache
    when another run generated them with the same settings: generation is deterministic given the model, the
    seed and the settings) and generation figures."""
    path = run_dir / "samples.npz"
    meta = ckpt.read_manifest(ckpt.resolve_checkpoint(model_dir)).get("meta", {})
    if "layout" not in meta:
        raise CheckpointError(f"{model_dir} is not a transition diffusion model (its checkpoint has no layout).")
    layout = TransitionLayout.from_dict(meta["layout"])
    if (layout.obs_dim, layout.act_dim) != (obs_dim, act_dim):
        raise ConfigError(f"the diffusion model in {model_dir} generates {layout.obs_dim}/{layout.act_dim}-dim "
                          f"observations/actions, the dataset has {obs_dim}/{act_dim}.")
    if path.is_file():
        with np.load(path) as f:
            samples = {k: f[k] for k in SAMPLE_KEYS}
        if len(samples["observations"]) == cfg.num_samples:
            return samples, {"samples_per_s": None, "out_of_range_fraction": None, "generation_s": None,
                             "terminal_rate": float(samples["terminals"].mean()), "terminal_rule_disagreement": None}
    import torch

    model, _ = load_model(model_dir, device=resolve_device(cfg.device))
    model.amp_dtype = torch.bfloat16 if cfg.bf16 else None
    sampler, steps, _ = model.resolve_sampler(cfg.sampler, cfg.sample_steps)
    key = _generation_key(cfg, model_dir, sampler, steps)
    found = _cached(model_dir, key)
    if found is not None:
        samples, figures = found
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, **samples)
        return samples, {**figures, "generation_s": 0.0, "samples_from": str(model_dir / GENERATED / key)}
    t0 = time.perf_counter()
    rule = termination_rule(env_id, required=cfg.terminals == "rule")
    samples, figures = generate_transitions(model, layout, cfg.num_samples, out_of_range=cfg.out_of_range,
                                            terminals=cfg.terminals, rule=rule, seed=cfg.seed,
                                            batch_size=cfg.sample_batch_size, progress=cfg.progress,
                                            sampler=sampler, steps=steps)
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, **samples)
    figures = {**figures, "generation_s": time.perf_counter() - t0}
    _keep(model_dir, key, path, figures)
    return samples, figures


def run(cfg: Any) -> Path:
    """Train the diffusion model, generate, measure fidelity, train and evaluate the agent; returns the run dir."""
    algo = algo_name(cfg)
    pipeline = PREFIX + algo
    full = load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(full, cfg.env, str(cfg.dataset))
    real = full.subset_episodes(cfg.data_fraction, cfg.seed) if cfg.data_fraction < 1.0 else full
    if cfg.terminals == "rule" and cfg.data_mode != "real":
        termination_rule(env_id)  # an unknown env is refused before anything is written

    if cfg.resume is not None:
        run_dir = Path(cfg.resume)
    else:
        run_dir = new_run_dir(pipeline, dataset_run_name(cfg.dataset), cfg.seed, cfg.runs_root, cfg.run_dir)
    # one writer per run directory (runs/lock.py), held across every stage; the agent's session re-enters it
    with lock_run_dir(run_dir, resume=cfg.resume is not None):
        if cfg.resume is not None:
            check_resumable(run_dir, pipeline, cfg)
        return _stages(cfg, pipeline, run_dir, real, env_id)


def _stages(cfg: Any, pipeline: str, run_dir: Path, real: Any, env_id: str) -> Path:
    """Stages 2-5 in the locked ``run_dir``."""
    write_config(run_dir, pipeline, to_dict(cfg))

    extra: dict[str, Any] = {"data_mode": cfg.data_mode, "batch_real_ratio": cfg.batch_real_ratio,
                             "data_fraction": cfg.data_fraction, "real_transitions": len(real),
                             "real_episodes": len(real.episode_slices())}
    samples = None
    if cfg.data_mode != "real":
        t0 = time.perf_counter()
        model_dir = _train_diffusion(cfg, real, run_dir)
        extra["diffusion_run"] = str(model_dir)
        # a model trained here is trained on `real` by construction; only a --diffusion model needs the hash check
        extra["diffusion_same_data"] = _check_model_data(model_dir, real) if cfg.diffusion is not None else True
        with_summary = read_summary(model_dir) if (model_dir / "summary.json").is_file() else {}
        extra["diffusion_train_s"] = with_summary.get("wall_s", time.perf_counter() - t0)
        extra["diffusion_final_loss"] = with_summary.get("final_loss")
        samples, gen = _samples(cfg, model_dir, run_dir, real.obs_dim, real.act_dim, env_id)
        extra.update(num_samples=len(samples["observations"]), **gen)
        if cfg.fidelity_samples and env_id in LAYOUTS:
            extra["fidelity"] = fidelity_report(real.arrays(), samples, env_id, num=cfg.fidelity_samples,
                                                seed=cfg.seed)

    agent_resume = cfg.resume is not None and bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
    agent_cfg = dataclasses.replace(cfg, resume=run_dir if agent_resume else None)
    data = offline.OfflineData(real=real, synthetic=samples, real_ratio=cfg.batch_real_ratio, pipeline=pipeline,
                               run_dir=run_dir, summary=extra)
    try:
        return offline.run(agent_cfg, data)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (SynthER run {run_dir})") from None


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Printed after a run's summary: the wall-clock breakdown and the fidelity table, where the summary has them."""
    lines = online.summary_lines(summary) if "time_breakdown_s" in summary else []
    return lines + ([format_fidelity(summary["fidelity"])] if "fidelity" in summary else [])


SYSTEM = System("synther", "SynthER: upsampled offline data, or online SAC/REDQ with synthetic data", commands=(
    Command("offline", ALGOS, run, PRESETS, pipelines={PREFIX + name: cls for name, cls in ALGOS.items()},
            algo_flag="--algo", default_algo="td3bc", evaluate=offline.evaluate_run, summary_lines=summary_lines,
            help="upsample a dataset with a diffusion model, train an offline agent on it"),))

