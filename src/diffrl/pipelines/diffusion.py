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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.augment import TransitionLayout
from diffrl.augment.transitions import generate_transitions
from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.data import OfflineDataset, dataset_env, dataset_run_name, fingerprint, load_dataset
from diffrl.data.formats import atomic_file, load_npz_arrays
from diffrl.diffusion.samplers import DEFAULT_STEPS, generate, network_evaluations
from diffrl.diffusion.spec import build_model, load_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs.termination import termination_rule
from diffrl.errors import CheckpointError, ConfigError, DatasetError
from diffrl.eval.fidelity import LAYOUTS, fidelity_report, format_fidelity
from diffrl.pipelines.common import RunConfig
from diffrl.registry import Command, System, Tool
from diffrl.runs.device import resolve_device
from diffrl.runs.rundir import write_json_atomic
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RateMeter, RunSession, due

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
    # 32 evaluations, 8x fewer than SynthER's sampler: how close its samples come to that sampler's depends on the
    # dataset (benchmarks/RESULTS.md, sampler fidelity)
    "quick": {"width": 256, "depth": 6, "steps": 10_000, "batch_size": 256, "checkpoint_every": 5_000,
              "sampler": "dpmpp_2m_sde", "sample_steps": 32},
    # SynthER's offline settings (config/resmlp_denoiser.gin): width 2048, 100k steps; batch 256 below 800k
    # transitions (pass --batch-size 1024 for larger datasets, as SynthER does)
    "paper": {"width": 2048, "depth": 6, "steps": 100_000, "batch_size": 256, "checkpoint_every": 10_000},
}


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


@dataclasses.dataclass
class Counters:
    """The diffusion loop's counters (saved in every checkpoint; the gradient step is the trainer's)."""

    last_loss: float = float("nan")


def stage_config(cfg: Any, run_dir: Path, resume: bool, transitions: int) -> DiffusionConfig:
    """The transition model's training run as the ``diffusion/`` stage of a system's run (SynthER offline, DiffPPO's
    augment mode): ``cfg`` carries :class:`~diffrl.pipelines.common.DiffusionSettings` and the run's dataset, env,
    seed and device; ``resume`` continues the stage in ``run_dir``."""
    return DiffusionConfig(
        dataset=cfg.dataset, env=cfg.env, seed=cfg.seed, width=cfg.diffusion_width, depth=cfg.diffusion_depth,
        dim_t=cfg.diffusion_dim_t, steps=cfg.diffusion_steps, batch_size=cfg.diffusion_batch_for(transitions),
        lr=cfg.diffusion_lr, bf16=cfg.bf16, sampler=cfg.sampler, sample_steps=cfg.sample_steps, fidelity_samples=0,
        checkpoint_every=min(10_000, cfg.diffusion_steps), device=cfg.device, progress=cfg.progress,
        run_dir=None if resume else run_dir, resume=run_dir if resume else None, runs_root=cfg.runs_root)


def train_steps(session: RunSession, trainer: DiffusionTrainer, c: Counters, steps: int, log_every: int,
                checkpoint_every: int, extra_row: Callable[[int], dict[str, float]] | None = None) -> None:
    """The diffusion training loop (this pipeline's, and Dydiff's window model's): train ``trainer`` up to ``steps``
    gradient steps, log loss / lr / speed every ``log_every`` (plus ``extra_row(step)``), checkpoint the trainer as
    part ``diffusion`` every ``checkpoint_every`` and at the end. Resumes from ``trainer.step``."""
    losses: list[torch.Tensor] = []
    rate = RateMeter(trainer.step)
    while trainer.step < steps:
        with session.timers.time("train_s"):
            losses.append(trainer.train_step())
        step = trainer.step
        row: dict[str, float] = {}
        if due(log_every, step - 1, step) or step == steps:
            c.last_loss = float(torch.stack(losses).mean())
            row.update({"train/loss": c.last_loss, "train/lr": trainer.opt.param_groups[0]["lr"],
                        "perf/steps_per_s": rate.rate(step)})
            session.check_finite(row, step)
            losses = []
        if extra_row is not None:
            row.update(extra_row(step))
        session.log(step, row)
        session.progress(1, loss=c.last_loss)
        if due(checkpoint_every, step - 1, step) or step == steps:
            session.save(step, parts={"diffusion": trainer.state_dict()}, meta={"gradient_steps": step})


def run(cfg: DiffusionConfig, dataset: OfflineDataset | None = None) -> Path:
    """Train the diffusion model on ``cfg.dataset`` (or on ``dataset``, e.g. a subset); returns the run directory."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(ds, cfg.env, str(cfg.dataset), required=False)  # only for the fidelity check
    layout = TransitionLayout(ds.obs_dim, ds.act_dim, terminals=cfg.model_terminals)
    real = ds.arrays()
    seed_everything(cfg.seed)
    spec = model_spec(cfg, layout)
    model = build_model(spec).to(device)
    data = torch.as_tensor(layout.join(ds), device=device)
    model.normalizer.fit(data)
    trainer = DiffusionTrainer(model, data, cfg, seed=cfg.seed)
    session = RunSession(cfg, PIPELINE, dataset_run_name(cfg.dataset), fingerprint=fingerprint(ds),
                         meta={"model_spec": spec, "layout": layout.to_dict(), "env_id": env_id})
    if session.resumed:
        trainer.load_state_dict(session.parts["diffusion"])
    c = session.start(Counters(), timers={"train_s": 0.0})
    session.progress_bar(cfg.steps, trainer.step, desc=f"diffusion {Path(str(cfg.dataset)).name}", unit="step")

    # ------------------------------------------------------------------ loop
    def fidelity_row(step: int) -> dict[str, float]:
        if due(cfg.eval_every, step - 1, step) and cfg.fidelity_samples and step < cfg.steps:
            return _flat(_fidelity(trainer.ema.shadow, layout, real, env_id, cfg.fidelity_samples, cfg.seed))
        return {}

    train_steps(session, trainer, c, cfg.steps, cfg.log_every, cfg.checkpoint_every, fidelity_row)

    # ------------------------------------------------------------------ summary
    summary: dict[str, Any] = {"dataset": str(cfg.dataset), "env_id": env_id, "gradient_steps": trainer.step,
                               "env_steps": 0, "wall_s": session.wall_s(), "final_loss": c.last_loss,
                               "updates_per_s": trainer.step / max(session.timers["train_s"], 1e-9),
                               "transitions": len(ds), "model_spec": spec, "layout": layout.to_dict()}
    if cfg.fidelity_samples:
        fid = _fidelity(trainer.ema.shadow, layout, real, env_id, cfg.fidelity_samples, cfg.seed)
        summary["samples_per_s"] = fid["samples_per_s"]
        summary["fidelity"] = fid.get("report") or {"skipped": fid["skipped"]}
        write_json_atomic(session.run_dir / "fidelity.json", summary["fidelity"])
    return session.finish(summary)


# ------------------------------------------------------------------------------------------- sample / fidelity
def sample_to_file(model_dir: Path, num: int, out: Path, *, sampler: str | None = None, steps: int | None = None,
                   batch_size: int = 100_000, seed: int = 0, device: str = "auto", overwrite: bool = False,
                   bf16: bool = False, progress: bool = True, out_of_range: str = "clip",
                   terminals: str = "model") -> dict[str, Any]:
    """Generate ``num`` transitions with a trained model's EMA weights into SynthER's npz layout (out-of-range
    actions clipped, kept or rejected, terminals the model's or the env's rule: ``generate_transitions``)."""
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
    env_id = dataset_env(ds, env_id, dataset)
    synthetic = load_npz_arrays(samples)
    report = fidelity_report(ds.arrays(), synthetic, env_id, num=num, seed=seed)
    return report, format_fidelity(report)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


# ------------------------------------------------------------------------------------------------ commands
@dataclasses.dataclass(frozen=True)
class DiffusionSampleArgs:
    """Generate transitions with a trained diffusion model (EMA weights) into SynthER's npz layout
    (observations, actions, rewards, next_observations, terminals; terminals thresholded, out-of-range actions
    clipped, kept or rejected)."""

    model: Path
    """run directory of `diffrl diffusion train` (or one of its checkpoints)"""
    num: int
    """number of transitions"""
    out: Path
    """output .npz file (never overwritten unless --overwrite)"""
    sampler: str | None = None
    """heun, euler, dpmpp_2m (EDM) or ddpm, ddim (DDPM); default: the model's"""
    steps: int | None = None
    """sampler steps (default: the model's)"""
    batch_size: int = 100_000
    """samples generated per batch"""
    seed: int = 0
    """sampling seed"""
    out_of_range: str = "clip"
    """a generated action outside the action space: clip it to the bounds (diffrl's default: the env would
    execute the bound), keep it as generated (SynthER's code, whose normaliser does not clamp), or reject the
    sample and draw another"""
    terminals: str = "model"
    """terminal flags: the model's (SynthER) or the env's known termination rule on the generated next state"""
    bf16: bool = False
    """run the network in bfloat16 autocast"""
    device: str = "auto"
    """auto, cpu or cuda"""
    overwrite: bool = False
    """replace an existing --out"""


@dataclasses.dataclass(frozen=True)
class DiffusionFidelityArgs:
    """Fidelity of generated transitions against a dataset: simulator validity, diversity, marginals, next to real
    data and a real-plus-noise baseline."""

    samples: Path
    """.npz of generated transitions (diffrl diffusion sample)"""
    dataset: str
    """the real dataset (Minari id or .hdf5 / .npz path)"""
    env: str | None = None
    """env id (default: the dataset's)"""
    num: int = 2000
    """transitions compared"""
    seed: int = 0
    """subsampling seed"""
    json_out: Path | None = None
    """also write the full report as JSON here"""


def sample_main(a: DiffusionSampleArgs) -> None:
    """``diffrl diffusion sample``: write the samples and say what was generated."""
    r = sample_to_file(a.model, a.num, a.out, sampler=a.sampler, steps=a.steps, batch_size=a.batch_size,
                       seed=a.seed, device=a.device, overwrite=a.overwrite, bf16=a.bf16, out_of_range=a.out_of_range,
                       terminals=a.terminals)
    print(f"written: {r['out']} ({r['num']} transitions, sampler {r['sampler']} with {r['steps']} steps = "
          f"{r['network_evaluations']} network evaluations, {r['samples_per_s']:.0f} samples/s; "
          f"{r['out_of_range_fraction']:.1%} of the samples drawn had out-of-range actions, "
          f"{ {'reject': 'rejected', 'keep': 'kept'}.get(a.out_of_range, 'clipped')})")
    if r.get("terminal_rule_disagreement") is not None:
        print(f"the model's terminal flags disagree with {r['env_id']}'s termination rule on "
              f"{r['terminal_rule_disagreement']:.2%} of the transitions"
              + (" (the rule's labels were written)" if a.terminals == "rule" else ""))


def fidelity_main(a: DiffusionFidelityArgs) -> None:
    """``diffrl diffusion fidelity``: print the fidelity table (and write the report as JSON)."""
    report, table = fidelity_of_file(a.samples, a.dataset, a.env, a.num, a.seed)
    print(table)
    if a.json_out is not None:
        write_json_atomic(a.json_out, report)
        print(f"written: {a.json_out}")


def summary_lines(s: dict[str, Any]) -> list[str]:
    """What ``diffrl diffusion train`` prints after the run directory: steps, final loss, speed, fidelity table."""
    lines = [f"gradient steps: {s['gradient_steps']}, final loss {s['final_loss']:.4f}, wall {s['wall_s']:.0f} s "
             f"({s['updates_per_s']:.1f} steps/s)"]
    if "synthetic" in (s.get("fidelity") or {}):
        lines.append(format_fidelity(s["fidelity"]))
    return lines


SYSTEM = System("diffusion", "transition diffusion models", commands=(
    Command("train", {"": DiffusionConfig}, run, {"": PRESETS}, pipelines={PIPELINE: DiffusionConfig},
            summary_lines=summary_lines, print_summary=False, help="train a transition diffusion model on a dataset"),),
    tools=(Tool("sample", DiffusionSampleArgs, sample_main, help="--model RUN_DIR --num N --out samples.npz"),
           Tool("fidelity", DiffusionFidelityArgs, fidelity_main, help="--samples F --dataset D [--env ID]")))
