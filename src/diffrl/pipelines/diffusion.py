"""Train a transition diffusion model on a dataset, sample from it, and measure the samples' fidelity.

    diffrl diffusion train --dataset D [--preset quick|paper]       -> run dir with the model (EMA) checkpoint
    diffrl diffusion sample --model RUN_DIR --num N --out samples.npz [--sampler NAME --steps K]
    diffrl diffusion fidelity --samples samples.npz --dataset D [--env ID]

Reads top to bottom: load the dataset, lay transitions out as SynthER's vectors ``[s, a, r, s', done]``,
build the model (z-score normalisation inside, the terminal column left out), train (AdamW, cosine LR, EMA),
then sample with the EMA weights and report fidelity (simulator validity, diversity, marginals) next to a
real-plus-noise baseline. Resume is exact on CPU (model, EMA, optimiser, batch generator, RNGs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.augment import TransitionLayout
from diffrl.augment.transitions import generate_transitions
from diffrl.config import check, check_choice, check_non_negative, check_positive, from_dict, to_dict
from diffrl.data import OfflineDataset, load_dataset
from diffrl.data.formats import atomic_file, load_npz_arrays
from diffrl.diffusion.samplers import DEFAULT_STEPS, generate, network_evaluations
from diffrl.diffusion.spec import build_model, load_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs.termination import termination_rule
from diffrl.errors import CheckpointError, ConfigError, DatasetError
from diffrl.eval.fidelity import LAYOUTS, fidelity_report, format_fidelity
from diffrl.pipelines.common import RunConfig
from diffrl.pipelines.offline import fingerprint
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, read_config, write_config, write_json_atomic, write_summary
from diffrl.runs.seeding import get_rng_state, seed_everything, set_rng_state

PIPELINE = "diffusion"


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(TrainerSettings, RunConfig):
    """Train a diffusion model of a dataset's transitions (SynthER's model: EDM + residual MLP denoiser)."""

    dataset: str = ""
    """Minari dataset id or a path to a D4RL .hdf5 / DPPO .npz file (with rewards)"""
    env: str | None = None
    """env id for the fidelity check (default: the env recorded in the dataset)"""
    seed: int = 0
    """run seed"""
    model: str = "edm"
    """edm (SynthER) or ddpm"""
    width: int = 1024
    """residual MLP width (SynthER: 2048 offline, 1024 online)"""
    depth: int = 6
    """residual blocks"""
    dim_t: int = 128
    """input projection / time embedding width"""
    layer_norm: bool = False
    """LayerNorm in the residual blocks"""
    model_terminals: bool = True
    """model the terminal flag as a last, unnormalised column, thresholded at 0.5 (SynthER offline)"""
    normalize_reward: bool = True
    """z-score the reward column (SynthER's DMC online config leaves it raw)"""
    ddpm_steps: int = 100
    """denoising steps of a ddpm model"""
    sampler: str = "heun"
    """default sampler: heun (EDM, churned; SynthER), euler, dpmpp_2m, dpmpp_2m_sde, or ddpm / ddim (ddpm model)"""
    sample_steps: int = 128
    """default sampler steps (SynthER: 128 churned Heun steps = 255 network evaluations)"""
    s_churn: float = 80.0
    """EDM churn (SynthER: 80, i.e. the maximal gamma = sqrt(2) - 1 with 128 steps)"""
    s_tmin: float = 0.05
    """churn applies for sigma in [s_tmin, s_tmax]"""
    s_tmax: float = 50.0
    """churn applies for sigma in [s_tmin, s_tmax]"""
    s_noise: float = 1.003
    """EDM S_noise"""
    fidelity_samples: int = 2000
    """transitions generated at the end to measure fidelity (0: skip)"""
    eval_every: int = 0
    """also measure fidelity every this many gradient steps (0: only at the end)"""
    log_every: int = 500
    """write a metrics row every this many gradient steps"""
    checkpoint_every: int = 10_000
    """write a checkpoint every this many gradient steps (and at the end)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise ConfigError("--dataset is required: a Minari id or a path to a .hdf5 / .npz dataset.")
        check_choice("model", self.model, ("edm", "ddpm"))
        for name in ("width", "depth", "dim_t", "ddpm_steps", "sample_steps"):
            check_positive(name, getattr(self, name))
        check_non_negative("fidelity_samples", self.fidelity_samples)
        allowed = ("heun", "euler", "dpmpp_2m", "dpmpp_2m_sde") if self.model == "edm" else ("ddpm", "ddim")
        check(self.sampler in allowed, "sampler", self.sampler, f"one of {', '.join(allowed)} for a {self.model} model")

    def sampler_defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sampler": self.sampler, "steps": self.sample_steps}
        if self.sampler in ("heun", "euler"):
            out.update(S_churn=self.s_churn, S_tmin=self.s_tmin, S_tmax=self.s_tmax, S_noise=self.s_noise)
        if self.sampler == "ddpm":
            out["steps"] = None
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # minutes on 2 CPU cores: SynthER's architecture at width 256, 10k steps; stochastic DPM-Solver++(2M) with
    # 32 evaluations: validity within 10% of SynthER's 255-evaluation sampler, same marginals, 7x faster
    # (benchmarks/sampler_fidelity.py)
    "quick": {"width": 256, "depth": 6, "steps": 10_000, "batch_size": 256, "checkpoint_every": 5_000,
              "sampler": "dpmpp_2m_sde", "sample_steps": 32},
    # SynthER's offline settings (config/resmlp_denoiser.gin): width 2048, 100k steps; batch 256 below 800k
    # transitions (pass --batch-size 1024 for larger datasets, as SynthER does)
    "paper": {"width": 2048, "depth": 6, "steps": 100_000, "batch_size": 256, "checkpoint_every": 10_000},
}


def load_config(run_dir: Path) -> DiffusionConfig:
    saved = read_config(run_dir)
    if saved.get("pipeline") != PIPELINE:
        raise ConfigError(f"{run_dir} is a {saved.get('pipeline')} run, not a diffusion model run.")
    return from_dict(DiffusionConfig, saved["config"])


def model_spec(cfg: DiffusionConfig, layout: TransitionLayout) -> dict[str, Any]:
    skip = [d for d in (layout.terminal_index,) if d is not None]
    if not cfg.normalize_reward:
        skip.append(layout.reward_index)
    return {"type": cfg.model, "event_shape": [layout.dim],
            # DDPM conditions on the integer step 0..K-1: SynthER's random Fourier features of it are noise from
            # one step to the next (cosine similarity of t = 50 and 51: -0.24), so DDPM gets sinusoidal features
            "denoiser": {"type": "resmlp", "width": cfg.width, "depth": cfg.depth, "dim_t": cfg.dim_t,
                         "layer_norm": cfg.layer_norm,
                         "time_embedding": "sinusoidal" if cfg.model == "ddpm" else "fourier"},
            "normalizer": {"kind": "zscore", "skip_dims": skip},
            "diffusion": {"num_steps": cfg.ddpm_steps} if cfg.model == "ddpm" else {},
            "sampler": cfg.sampler_defaults()}


def _fidelity(model: Any, layout: TransitionLayout, real: dict[str, np.ndarray], env_id: str | None, num: int,
              seed: int) -> dict[str, Any]:
    x, rate = generate(model, num, seed=seed)
    out: dict[str, Any] = {"samples_per_s": rate}
    if env_id in LAYOUTS:
        out["report"] = fidelity_report(real, layout.split(x), env_id, num=num, seed=seed)
    else:
        out["skipped"] = f"simulator validity supports {', '.join(LAYOUTS)}, not {env_id}"
    return out


def _flat(report: dict[str, Any]) -> dict[str, float]:
    """Headline fidelity numbers as metric columns."""
    syn = report.get("report", {}).get("synthetic", {})
    out = {"perf/samples_per_s": report["samples_per_s"]}
    for key, path in (("fidelity/state_nmse", ("validity", "next_obs_nmse")),
                      ("fidelity/reward_nmse", ("validity", "reward_nmse")),
                      ("fidelity/nn_ratio", ("diversity", "nn_ratio_mean")),
                      ("fidelity/marginal_w1", ("marginals", "w1_mean"))):
        node: Any = syn
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            out[key] = float(node)
    return out


def run(cfg: DiffusionConfig, dataset: OfflineDataset | None = None) -> Path:
    """Train the diffusion model on ``cfg.dataset`` (or on ``dataset``, e.g. a subset); returns the run directory."""
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = cfg.env or ds.metadata.get("env_id")
    layout = TransitionLayout(ds.obs_dim, ds.act_dim, terminals=cfg.model_terminals)
    real = ds.arrays()
    seed_everything(cfg.seed)
    spec = model_spec(cfg, layout)
    model = build_model(spec).to(device)
    data = torch.as_tensor(layout.join(ds), device=device)
    model.normalizer.fit(data)
    trainer = DiffusionTrainer(model, data, cfg, seed=cfg.seed)
    data_id = fingerprint(ds)

    resumed = cfg.resume is not None
    wall_offset = 0.0
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        check_resumable(run_dir, PIPELINE, cfg)
        manifest, parts = ckpt.load_checkpoint(run_dir, parts=("diffusion", "state"))
        if manifest["meta"].get("dataset_fingerprint") != data_id:
            raise CheckpointError(f"the dataset {cfg.dataset} differs from the one {run_dir} was trained on; "
                                  "resume with the same data (nothing was changed).")
        trainer.load_state_dict(parts["diffusion"])
        set_rng_state(parts["state"]["rng"])
        wall_offset = float(parts["state"]["wall_s"])
    else:
        name = Path(cfg.dataset).stem if Path(cfg.dataset).suffix else cfg.dataset
        run_dir = new_run_dir(PIPELINE, name, cfg.seed, cfg.runs_root, cfg.run_dir)
    write_config(run_dir, PIPELINE, to_dict(cfg))
    logger = Logger(run_dir, resume_step=trainer.step if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))
    meta = {"model_spec": spec, "layout": layout.to_dict(), "env_id": env_id, "dataset": str(cfg.dataset),
            "dataset_fingerprint": data_id, "pipeline": PIPELINE, "seed": cfg.seed}

    def save() -> None:
        ckpt.save_checkpoint(run_dir / "checkpoints", trainer.step,
                             {"diffusion": trainer.state_dict(),
                              "state": {"rng": get_rng_state(), "wall_s": logger.wall_s()}},
                             {**meta, "gradient_steps": trainer.step}, keep_last=cfg.keep_checkpoints)

    bar = Progress(cfg.steps, initial=trainer.step, desc=f"diffusion {Path(str(cfg.dataset)).name}", unit="step",
                   enabled=cfg.progress)
    losses: list[torch.Tensor] = []
    start_step = trainer.step
    t_rate, steps_rate, t_train, last_loss = time.perf_counter(), trainer.step, 0.0, float("nan")
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        losses.append(trainer.train_step())
        t_train += time.perf_counter() - t0
        step = trainer.step
        row: dict[str, float] = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            last_loss = float(torch.stack(losses).mean())
            row.update({"train/loss": last_loss, "train/lr": trainer.opt.param_groups[0]["lr"],
                        "perf/steps_per_s": (step - steps_rate) / max(now - t_rate, 1e-9)})
            check_finite(row, step, run_dir)
            losses, t_rate, steps_rate = [], now, step
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and cfg.fidelity_samples and step < cfg.steps:
            row.update(_flat(_fidelity(trainer.ema.shadow, layout, real, env_id, cfg.fidelity_samples, cfg.seed)))
        if row:
            logger.log(step, row)
        bar.update(1, loss=last_loss)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    bar.close()
    logger.close()

    summary: dict[str, Any] = {"pipeline": PIPELINE, "dataset": str(cfg.dataset), "env_id": env_id,
                               "seed": cfg.seed, "gradient_steps": trainer.step, "env_steps": 0,
                               "wall_s": logger.wall_s(), "final_loss": last_loss,
                               "updates_per_s": (trainer.step - start_step) / max(t_train, 1e-9),
                               "transitions": len(ds), "model_spec": spec, "layout": layout.to_dict()}
    if cfg.fidelity_samples:
        fid = _fidelity(trainer.ema.shadow, layout, real, env_id, cfg.fidelity_samples, cfg.seed)
        summary["samples_per_s"] = fid["samples_per_s"]
        summary["fidelity"] = fid.get("report") or {"skipped": fid["skipped"]}
        write_json_atomic(run_dir / "fidelity.json", summary["fidelity"])
    write_summary(run_dir, summary)
    return run_dir


# ------------------------------------------------------------------------------------------- sample / fidelity
def sample_to_file(model_dir: Path, num: int, out: Path, *, sampler: str | None = None, steps: int | None = None,
                   batch_size: int = 100_000, seed: int = 0, device: str = "auto", overwrite: bool = False,
                   bf16: bool = False, progress: bool = True, out_of_range: str = "clip",
                   terminals: str = "model") -> dict[str, Any]:
    """Generate ``num`` transitions with a trained model's EMA weights into SynthER's npz layout (out-of-range
    actions clipped or rejected, terminals the model's or the env's rule: ``generate_transitions``)."""
    if num <= 0:
        raise ConfigError(f"invalid num={num}: it must be > 0.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists; choose another --out or pass --overwrite.")
    model, meta = load_model(model_dir, device=resolve_device(device))
    layout = TransitionLayout.from_dict(meta["layout"]) if "layout" in meta else None
    if layout is None:
        raise CheckpointError(f"{model_dir} is not a transition model (its checkpoint has no layout).")
    if sampler is not None and sampler not in model.samplers:
        raise ConfigError(f"sampler {sampler!r} does not apply to this {meta['model_spec']['type']} model: choose "
                          f"one of {', '.join(model.samplers)}.")
    model.amp_dtype = torch.bfloat16 if bf16 else None
    used, used_steps, _ = model.resolve_sampler(sampler, steps)
    env_id = meta.get("env_id")
    rule = termination_rule(env_id, required=terminals == "rule")
    arrays, figures = generate_transitions(model, layout, num, out_of_range=out_of_range, terminals=terminals,
                                           rule=rule, seed=seed, batch_size=batch_size, progress=progress,
                                           sampler=used, steps=used_steps)
    with atomic_file(out, overwrite) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return {"out": str(out), "num": num, **figures, "sampler": used,
            "steps": used_steps if used_steps is not None else DEFAULT_STEPS.get(used),
            "network_evaluations": network_evaluations(used, used_steps),
            "env_id": env_id}


def fidelity_of_file(samples: Path, dataset: str, env_id: str | None = None, num: int = 2000,
                     seed: int = 0) -> tuple[dict[str, Any], str]:
    """Fidelity of an npz of generated transitions against a dataset; returns ``(report, markdown table)``."""
    ds = load_dataset(dataset, env_id=env_id)
    env_id = env_id or ds.metadata.get("env_id")
    if not env_id:
        raise ConfigError(f"dataset {dataset} records no environment; pass --env ID.")
    synthetic = load_npz_arrays(samples)
    report = fidelity_report(ds.arrays(), synthetic, env_id, num=num, seed=seed)
    return report, format_fidelity(report)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
