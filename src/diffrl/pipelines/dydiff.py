"""Dydiff (Zhao, Han et al. 2024, arXiv:2405.19189): offline RL with a trajectory diffusion model as a dynamics
model, rolled out with the learning policy (iterative policy injection), filtered by a reward model.

    diffrl dydiff --dataset D [--algo td3bc|dql|cql] [--filter hardmax|softmax] [--preset quick|paper]
    diffrl dydiff fidelity --run RUN_DIR [--rollouts N]

Reads top to bottom, one stage per directory of the run, each resumable and each reusable by path, or kept in a
stage cache shared by runs (``--stage-cache DIR``, keyed by :func:`window_stage_key` / :func:`models_stage_key`):

1. ``diffusion/``: the window model, an EDM over ``(H, Ds + Da)`` windows with ``s_0`` and the actions held clean
   (``--diffusion PATH`` reuses one);
2. ``models/``: the single-step Gaussian ensemble (Δs) and the reward model r(s, a), trained once
   (``--models PATH`` reuses them);
3. the agent: the offline loop (:mod:`diffrl.pipelines.offline`) with :class:`~diffrl.augment.dydiff.DydiffAugment`
   filling its model buffer every ``rollout_every`` gradient steps; batches take ``real_ratio`` real rows;
   ``--algo dql`` is diffrl's Diffusion-QL with Wang et al.'s settings (``diffrl offline dql``); Dydiff's code
   (``rlkit/algo/diff_ql.py``, ``exp_specs/dydiff_diffql``) trains a variant of it: ``--q-action pred_start
   --no-lr-decay --normalize-states --critic-hidden 256 256 --critic-activation relu --eval-draw`` (its Q term on
   the BC call's clean-action estimate, a constant learning rate, z-scored states, two ReLU layers per critic, and
   each evaluation action drawn by the softmax over its 50 candidates' values instead of the best taken);
4. rollout fidelity in the simulator (``fidelity_rollouts``): the window model, the single-step model and both under
   the trained policy, against MuJoCo from the same start states and actions; the table goes into ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.augment.dydiff import (
    DydiffAugment,
    RolloutSettings,
    WindowLayout,
    autoregressive_rollout,
    condition_mask,
    model_spec,
    pad_windows,
    policy_injection,
    sample_states,
    trajectory_windows,
)
from diffrl.augment.dynamics import EnsembleDynamics, ModelFitSettings, RewardModel
from diffrl.config import check, check_choice, check_non_negative, check_positive, to_dict
from diffrl.data import Normalizer, OfflineDataset, dataset_env, dataset_run_name, fingerprint, load_dataset
from diffrl.diffusion.models import DiffusionModel
from diffrl.diffusion.spec import build_model, load_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs.termination import termination_rule
from diffrl.errors import CheckpointError, ConfigError, DatasetError, RunLocked
from diffrl.eval.rollout_fidelity import drift, drift_table, plot_drift, simulate, supports_state_reset
from diffrl.pipelines import diffusion, offline
from diffrl.pipelines.common import RunConfig, extend_configs, reused_stage, stage_status
from diffrl.registry import Command, System, Tool
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.lock import lock_run_dir
from diffrl.runs.rundir import (
    check_resumable,
    new_run_dir,
    read_config,
    read_summary,
    write_config,
    write_json_atomic,
)
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RunSession

PREFIX = "dydiff_"


@dataclasses.dataclass(frozen=True)
class DydiffSettings(RolloutSettings):
    """Dydiff's settings on top of the agent's (defaults: the reference's ``exp_specs`` and README)."""

    horizon: int = 100
    """H, window rows [s, a] (max_length_of_trajectory; the README's 100)"""
    window_stride: int = 1
    """a window starts every this many steps of an episode"""
    diffusion: Path | None = None
    """reuse this window model (a Dydiff run directory or its diffusion/ stage) instead of training one"""
    models: Path | None = None
    """reuse these single-step models (a Dydiff run directory or its models/ stage) instead of training them"""
    stage_cache: Path | None = None
    """keep the window model and the single-step models in this folder, keyed by all that determines them (the
    dataset's contents, seed, their settings, device kind), and reuse them from there: runs that differ only in
    their agent (TD3+BC and Diffusion-QL on one dataset and seed) train them once (--diffusion / --models win)"""
    diffusion_steps: int = 500_000
    """window-model gradient steps (the README's 4 Mimg at batch 8)"""
    diffusion_batch_size: int = 8
    """windows per diffusion step (the README's --batch=8)"""
    diffusion_lr: float = 4e-4
    """AdamW learning rate, cosine-decayed (the reference's Adam warms up to 1e-3 over 10 Mimg, longer than its
    4 Mimg run, so it ends at 4e-4; a cosine schedule from there is ours)"""
    unet_dim: int = 128
    """temporal UNet base width (UNet_RL dim 128)"""
    unet_mults: tuple[int, ...] = (1, 4, 8)
    """UNet width multipliers per level (dim_mults)"""
    sampler: str = "heun"
    """window-model sampler: heun (the reference's, with churn), euler, dpmpp_2m, dpmpp_2m_sde"""
    sample_steps: int = 34
    """sampler steps (EDM Heun: 2 steps - 1 network evaluations)"""
    s_churn: float = 60.0
    """EDM S_churn (the reference's)"""
    s_tmin: float = 0.37
    """churn applies for sigma in [s_tmin, s_tmax] (the reference's S_min)"""
    s_tmax: float = 52.24
    """(the reference's S_max)"""
    s_noise: float = 1.002
    """EDM S_noise (the reference's)"""
    dynamics_members: int = 7
    """single-step ensemble size"""
    dynamics_elites: int = 5
    """elites the rollouts draw from"""
    dynamics_hidden: tuple[int, ...] = (200, 200, 200, 200)
    """ensemble member widths (SiLU)"""
    reward_hidden: tuple[int, ...] = (256, 256)
    """reward model widths"""
    model_lr: float = 1e-4
    """single-step models' learning rate"""
    model_max_epochs: int | None = None
    """cap on the single-step models' epochs (None: until early stopping, patience 7)"""
    fidelity_rollouts: int = 256
    """start states of the end-of-run rollout-fidelity check in the simulator (0: skip)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon", "window_stride", "diffusion_steps", "diffusion_batch_size", "diffusion_lr",
                     "unet_dim", "sample_steps", "dynamics_members", "dynamics_elites", "model_lr"):
            check_positive(name, getattr(self, name))
        check(self.horizon >= 2, "horizon", self.horizon, ">= 2 (a window of H rows gives H - 1 transitions)")
        check(self.dynamics_elites <= self.dynamics_members, "dynamics_elites", self.dynamics_elites,
              f"<= dynamics_members={self.dynamics_members}")
        check_choice("sampler", self.sampler, ("heun", "euler", "dpmpp_2m", "dpmpp_2m_sde"))
        check_non_negative("fidelity_rollouts", self.fidelity_rollouts)
        if self.model_max_epochs is not None:
            check_positive("model_max_epochs", self.model_max_epochs)

    def sample_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sampler": self.sampler, "steps": self.sample_steps}
        if self.sampler in ("heun", "euler"):
            out.update(S_churn=self.s_churn, S_tmin=self.s_tmin, S_tmax=self.s_tmax, S_noise=self.s_noise)
        return out

    def fit_settings(self) -> ModelFitSettings:
        return ModelFitSettings(lr=self.model_lr, max_epochs=self.model_max_epochs)


AGENTS = {name: offline.ALGOS[name][0] for name in ("td3bc", "dql", "cql") if name in offline.ALGOS}
ALGOS = extend_configs(DydiffSettings, AGENTS, __name__,
                       "``diffrl dydiff --algo {name}``: {what} on the dataset plus Dydiff's filtered model rollouts.")

# quick: minutes on one CPU core per stage; the windows, UNet, rollouts and sampler shrink, the method does not.
# Its sampler is DPM-Solver++(2M) SDE at 32 evaluations: with this window model its rollouts were at least as close
# to MuJoCo's as those of the reference's Heun at 34 steps (67 evaluations) on all six quick datasets
# (benchmarks/dydiff_samplers.py; RESULTS.md, Dydiff). The window model trains 16k steps at lr 1e-3: with the 4k
# steps at 4e-4 of the first quick preset its rollouts were further from MuJoCo's than the single-step model's at
# every horizon, so the preset no longer tested Dydiff's premise (benchmarks/dydiff_window_fit.py; RESULTS.md, Dydiff)
_QUICK = dict(horizon=32, diffusion_steps=16_000, diffusion_batch_size=16, diffusion_lr=1e-3, unet_dim=32,
              unet_mults=(1, 2, 4), sampler="dpmpp_2m_sde", sample_steps=32, rollouts=128, every=2_000,
              capacity=200_000, model_max_epochs=30,
              fidelity_rollouts=128, eval_every=5_000, eval_episodes=5, checkpoint_every=5_000)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"quick": {**offline.PRESETS[name]["quick"], **_QUICK},
           # the reference: 2000 epochs of 500 (TD3+BC) or 250 (DQL) gradient steps, rollouts every epoch
           "paper": {"steps": 1_000_000 if name != "dql" else 500_000, "every": 500 if name != "dql" else 250,
                     "eval_every": 5_000, "eval_episodes": 10}}
    for name in AGENTS}


# ------------------------------------------------------------------------------------------- stage 1: windows
@dataclasses.dataclass(frozen=True)
class WindowModelConfig(TrainerSettings, RunConfig):
    """The window model's training run (the ``diffusion/`` stage of a Dydiff run)."""

    dataset: str = ""
    """the dataset (its fingerprint is checked on resume)"""
    seed: int = 0
    """run seed"""
    horizon: int = 100
    """H"""
    window_stride: int = 1
    """window start stride"""
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the model spec (:func:`diffrl.augment.dydiff.model_spec`)"""
    log_every: int = 500
    """metrics row every this many steps"""


def _layout(ds: OfflineDataset, horizon: int) -> WindowLayout:
    return WindowLayout(ds.obs_dim, ds.act_dim, horizon)


def windows_of(ds: OfflineDataset, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's windows and their real-row mask (:func:`~diffrl.augment.dydiff.trajectory_windows`)."""
    episodes = ds.episode_slices()
    return trajectory_windows(ds.observations, ds.actions, episodes, [bool(ds.terminals[e.stop - 1]) for e in episodes],
                              horizon, stride)


def train_window_model(cfg: WindowModelConfig, ds: OfflineDataset) -> Path:
    """Train (or resume) the window model; returns its run directory."""
    device = resolve_device(cfg.device)
    layout = _layout(ds, cfg.horizon)
    windows, real = windows_of(ds, cfg.horizon, cfg.window_stride)
    seed_everything(cfg.seed)
    model = build_model(cfg.spec).to(device)
    data, real_rows = torch.as_tensor(windows, device=device), torch.as_tensor(real, device=device)
    model.normalizer.fit(data[real_rows])  # min-max over the real rows; padding sits just outside
    data = pad_windows(data, real_rows, model)
    trainer = DiffusionTrainer(model, data, cfg, seed=cfg.seed, fixed=condition_mask(layout).to(device))
    session = RunSession(cfg, PREFIX + "diffusion", dataset_run_name(cfg.dataset), fingerprint=fingerprint(ds),
                         meta={"model_spec": cfg.spec, "horizon": cfg.horizon})
    if session.resumed:
        trainer.load_state_dict(session.parts["diffusion"])
    c = session.start(diffusion.Counters(), timers={"train_s": 0.0})
    session.progress_bar(cfg.steps, trainer.step, desc="dydiff window model", unit="step")
    diffusion.train_steps(session, trainer, c, cfg.steps, cfg.log_every, cfg.checkpoint_every)
    return session.finish({"dataset": cfg.dataset, "gradient_steps": trainer.step, "final_loss": c.last_loss,
                           "windows": len(data), "padded_rows": float((~real_rows).float().mean()),
                           "wall_s": session.wall_s(), "env_steps": 0})


# ------------------------------------------------------------------------------------------- stage cache
STAGE_CACHE_VERSION = 1
"""part of every stage-cache key: raise it when the code that trains a stage changes what the stage computes"""


def stage_key(what: dict[str, Any]) -> str:
    """The stage-cache key of a stage: a hash of everything that determines what it computes."""
    text = json.dumps({"version": STAGE_CACHE_VERSION, **what}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def cached_stage(cache: Path, name: str, poll_s: float = 5.0) -> Iterator[Path]:
    """``cache/name``, held by this process while the caller trains or reads the stage there: another process that
    needs the same stage waits (polling every ``poll_s``) instead of training it twice or reading it half-written.
    The lock lives in ``cache/.locks/name``, so clearing an attempt from the stage's folder never touches it."""
    lock_dir = cache / ".locks" / name
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            lock = lock_run_dir(lock_dir)
            break
        except RunLocked:
            time.sleep(poll_s)
    try:
        yield cache / name
    finally:
        lock.release()


def window_config(cfg: Any, ds: OfflineDataset) -> WindowModelConfig:
    """The window model's training run as a Dydiff config ``cfg`` asks for it (no run directory set)."""
    spec = model_spec(_layout(ds, cfg.horizon), dim=cfg.unet_dim, dim_mults=tuple(cfg.unet_mults),
                      sampler=cfg.sampler, steps=cfg.sample_steps, s_churn=cfg.s_churn, s_tmin=cfg.s_tmin,
                      s_tmax=cfg.s_tmax, s_noise=cfg.s_noise)
    return WindowModelConfig(dataset=str(cfg.dataset), seed=cfg.seed, horizon=cfg.horizon,
                             window_stride=cfg.window_stride, spec=spec, steps=cfg.diffusion_steps,
                             batch_size=cfg.diffusion_batch_size, lr=cfg.diffusion_lr,
                             checkpoint_every=min(5_000, cfg.diffusion_steps), device=cfg.device,
                             progress=cfg.progress, runs_root=cfg.runs_root)


def window_stage_key(cfg: Any, ds: OfflineDataset, device: torch.device) -> str:
    """What determines a window model: the data's contents (not its path), seed, windows, model spec, optimisation
    settings and the device kind (a GPU's floats differ from a CPU's). Not the sampler: training never samples,
    and every run samples with its own settings (``sample_options``), so runs that differ only in how they sample
    share one model (the spec saved with the stage keeps the sampler of the run that trained it)."""
    wcfg = window_config(cfg, ds)
    settings = {f.name: getattr(wcfg, f.name) for f in dataclasses.fields(TrainerSettings)}
    spec = {k: v for k, v in wcfg.spec.items() if k != "sampler"}
    return stage_key({"stage": "window", "data": fingerprint(ds), "seed": wcfg.seed, "horizon": wcfg.horizon,
                      "window_stride": wcfg.window_stride, "spec": spec, "trainer": settings,
                      "device": device.type})


def models_stage_key(cfg: Any, ds: OfflineDataset) -> str:
    """What determines the single-step models (always trained on the CPU): data, seed, sizes, fit settings."""
    return stage_key({"stage": "models", "data": fingerprint(ds), "seed": cfg.seed,
                      "members": cfg.dynamics_members, "elites": cfg.dynamics_elites,
                      "hidden": list(cfg.dynamics_hidden), "reward_hidden": list(cfg.reward_hidden),
                      "fit": dataclasses.asdict(cfg.fit_settings())})


def _train_window_stage(cfg: Any, ds: OfflineDataset, model_dir: Path) -> None:
    """Train the window model into ``model_dir`` unless it is there; resume it if it stopped part-way."""
    status = stage_status(model_dir)
    if status != "done":
        resume = status == "resume"
        wcfg = dataclasses.replace(window_config(cfg, ds), run_dir=None if resume else model_dir,
                                   resume=model_dir if resume else None)
        train_window_model(wcfg, ds)


def window_model(cfg: Any, ds: OfflineDataset, run_dir: Path, device: torch.device) -> tuple[DiffusionModel, Path]:
    """Stage 1: the window model (EMA weights) from ``--diffusion``, the stage cache, a finished stage, a resumed one
    or a new one."""
    if cfg.diffusion is not None:
        model_dir = reused_stage(cfg.diffusion, "diffusion")
    elif cfg.stage_cache is not None:
        name = f"{dataset_run_name(cfg.dataset)}-window-{window_stage_key(cfg, ds, device)}"
        with cached_stage(Path(cfg.stage_cache), name) as model_dir:
            _train_window_stage(cfg, ds, model_dir)
    else:
        model_dir = run_dir / "diffusion"
        _train_window_stage(cfg, ds, model_dir)
    try:
        model, meta = load_model(model_dir, device=device)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"{model_dir} holds no Dydiff window model ({e}).") from None
    want = (cfg.horizon, ds.obs_dim + ds.act_dim)
    if tuple(model.event_shape) != want:
        raise CheckpointError(f"the window model in {model_dir} has windows of shape {tuple(model.event_shape)}, this "
                              f"run needs {want} (horizon {cfg.horizon}, {ds.obs_dim} + {ds.act_dim} dims).")
    return model, model_dir


# ------------------------------------------------------------------------------------- stage 2: single-step
def single_step_models(cfg: Any, ds: OfflineDataset, run_dir: Path) -> tuple[EnsembleDynamics, RewardModel, Path,
                                                                            dict[str, Any]]:
    """Stage 2: the single-step dynamics ensemble and reward model, trained once and saved (or reused)."""
    if cfg.models is None and cfg.stage_cache is not None:
        name = f"{dataset_run_name(cfg.dataset)}-models-{models_stage_key(cfg, ds)}"
        with cached_stage(Path(cfg.stage_cache), name) as models_dir:
            return fit_single_step_models(cfg, ds, models_dir)
    models_dir = reused_stage(cfg.models, "models") if cfg.models is not None else run_dir / "models"
    return fit_single_step_models(cfg, ds, models_dir)


def fit_single_step_models(cfg: Any, ds: OfflineDataset, models_dir: Path) -> tuple[EnsembleDynamics, RewardModel,
                                                                                     Path, dict[str, Any]]:
    """The single-step models saved in ``models_dir``, or fitted and saved there."""
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, whatever ran before in this process
        torch.manual_seed(cfg.seed)
        dynamics = EnsembleDynamics(ds.obs_dim, ds.act_dim, num_members=cfg.dynamics_members,
                                    num_elites=cfg.dynamics_elites, hidden=tuple(cfg.dynamics_hidden))
        reward = RewardModel(ds.obs_dim, ds.act_dim, hidden=tuple(cfg.reward_hidden))
    root = models_dir / "checkpoints"
    if ckpt.list_checkpoints(root):
        manifest, parts = ckpt.load_checkpoint(models_dir, ("dynamics", "reward"))
        ckpt.load_weights(dynamics, parts["dynamics"], models_dir)
        ckpt.load_weights(reward, parts["reward"], models_dir)
        return dynamics, reward, models_dir, manifest["meta"].get("fit", {})
    if cfg.models is not None:
        raise CheckpointError(f"{models_dir} holds no Dydiff single-step models (no checkpoint).")
    obs, act, next_obs = (torch.as_tensor(a) for a in (ds.observations, ds.actions, ds.next_observations))
    start = time.perf_counter()
    fit = {"dynamics": dynamics.fit(obs, act, next_obs, cfg.fit_settings(), seed=cfg.seed),
           # Dydiff's reward model trains without weight decay (the ensemble has MBPO's)
           "reward": reward.fit(obs, act, torch.as_tensor(ds.rewards),
                                dataclasses.replace(cfg.fit_settings(), weight_decay=0.0), seed=cfg.seed),
           "wall_s": time.perf_counter() - start}
    ckpt.save_checkpoint(root, 0, {"dynamics": dynamics.state_dict(), "reward": reward.state_dict()},
                         meta={"fit": fit, "dataset_fingerprint": fingerprint(ds)})
    return dynamics, reward, models_dir, fit


# ------------------------------------------------------------------------------------------------------ run
def uses_models(cfg: Any) -> bool:
    """Whether the run needs the window model and single-step models: for its batches (``real_ratio < 1``) or its
    fidelity check. With ``real_ratio = 1`` and no fidelity check the run is the plain agent on the same loop,
    seeds, data and evaluation (the control of a Dydiff comparison), and no model is trained or loaded, so a
    control never waits for, or depends on, another run's models."""
    return cfg.real_ratio < 1.0 or cfg.fidelity_rollouts > 0


def run(cfg: Any) -> Path:
    """The three stages, then the rollout-fidelity check; returns the run directory."""
    algo = offline.algo_name(cfg)
    pipeline = PREFIX + algo
    ds = load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(ds, cfg.env, str(cfg.dataset))
    rule = termination_rule(env_id)  # an env without a known rule is refused before anything is written
    windows_of(ds, cfg.horizon, max(cfg.horizon, 1))  # a window longer than every episode: one sentence, now
    if cfg.stage_cache is not None and Path(cfg.stage_cache).exists() and not Path(cfg.stage_cache).is_dir():
        raise ConfigError(f"the stage cache {cfg.stage_cache} is a file; give --stage-cache a folder (it is created "
                          "if missing).")
    run_dir = Path(cfg.resume) if cfg.resume is not None else new_run_dir(pipeline, dataset_run_name(cfg.dataset),
                                                                         cfg.seed, cfg.runs_root, cfg.run_dir)
    with lock_run_dir(run_dir, resume=cfg.resume is not None):
        if cfg.resume is not None:
            check_resumable(run_dir, pipeline, cfg)
        write_config(run_dir, pipeline, to_dict(cfg))
        device = resolve_device(cfg.device)
        extra: dict[str, Any] = {"filter": cfg.filter, "real_ratio": cfg.real_ratio}
        augment = None
        if uses_models(cfg):
            model, model_dir = window_model(cfg, ds, run_dir, device)
            dynamics, reward, models_dir, fit = single_step_models(cfg, ds, run_dir)
            augment = DydiffAugment(ds.observations, model, _layout(ds, cfg.horizon), dynamics, reward, rule,
                                    RolloutSettings(**{f.name: getattr(cfg, f.name)
                                                       for f in dataclasses.fields(RolloutSettings)}),
                                    cfg.sample_options(), seed=cfg.seed)
            extra.update({"diffusion_run": str(model_dir), "models_run": str(models_dir), "single_step_fit": fit})
        else:  # the control: no batch takes a model row and nothing is checked, so no model is trained or loaded
            extra.update({"diffusion_run": None, "models_run": None})
        agent_resume = cfg.resume is not None and bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
        agent_cfg = dataclasses.replace(cfg, resume=run_dir if agent_resume else None)
        data = offline.OfflineData(real=ds, pipeline=pipeline, run_dir=run_dir, summary=extra)
        offline.run(agent_cfg, data, augment)
        summary = read_summary(run_dir)
        if augment is not None:
            if cfg.fidelity_rollouts and supports_state_reset(env_id) and "rollout_fidelity" not in summary:
                summary["rollout_fidelity"] = rollout_fidelity(run_dir, cfg, ds, env_id, model, dynamics, reward,
                                                               cfg.fidelity_rollouts, cfg.seed)
            summary.update(stage_costs(model_dir, fit, summary))
            summary.update(flat_fidelity(summary.get("rollout_fidelity")))
        else:
            summary.update(stage_costs(None, {}, summary))
        write_json_atomic(run_dir / "summary.json", summary)
    return run_dir


FIDELITY_HORIZONS = (1, 5, 10)


def flat_fidelity(fid: dict[str, Any] | None) -> dict[str, float]:
    """The rollout-fidelity table as scalars (kept in result rows): per model, the state error at horizons 1, 5,
    10 and the last (``fidelity/<model>/h<k>``) and the return error (``fidelity/<model>/return_error``)."""
    out: dict[str, float] = {}
    for name, d in (fid or {}).get("models", {}).items():
        key = "fidelity/" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # "dydiff + injection (policy)"
        err = d["state_error"]
        for h in (*(h for h in FIDELITY_HORIZONS if h < len(err)), len(err)):
            out[f"{key}/h{h}"] = float(err[h - 1])
        out[f"{key}/return_error"] = float(d["return_error"])
    return out


def stage_costs(model_dir: Path | None, fit: dict[str, Any], summary: dict[str, Any]) -> dict[str, float | None]:
    """Wall-clock seconds of each stage: the window model's training (the stage's own, also when reused), the
    single-step models' fit, the agent with its rollouts (and the fidelity check, if any, is not counted); None
    for a stage the run did not have (``model_dir`` None, ``fit`` empty: the control)."""
    has_model = model_dir is not None and (model_dir / "summary.json").is_file()
    diffusion_s = read_summary(model_dir).get("wall_s") if has_model else None
    return {"stage_s/window_model": diffusion_s, "stage_s/single_step_models": fit.get("wall_s"),
            "stage_s/agent": summary.get("wall_s")}


# -------------------------------------------------------------------------------------- rollout fidelity
def trained_policy(run_dir: Path, cfg: Any, ds: OfflineDataset, device: torch.device) -> Any:
    """The trained agent of a Dydiff run (its latest checkpoint) as a batched policy on raw states."""
    agent = offline.build(cfg, ds.obs_dim, ds.act_dim, device)
    _, parts = ckpt.load_checkpoint(run_dir, ("state",))
    agent.load_state_dict(parts["state"]["agent"])
    policy = offline.NormalizedPolicy(agent, Normalizer.from_state_dict(parts["state"]["normalizer"]))
    return lambda s: torch.as_tensor(policy.act(s.numpy(), deterministic=True), dtype=torch.float32)


def fidelity_starts(ds: OfflineDataset, horizon: int, n: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` start states and the dataset's next ``horizon`` actions (windows that fit in their episode)."""
    windows, real = windows_of(ds, horizon, 1)
    whole = np.flatnonzero(real.all(1))
    if len(whole) == 0:
        raise DatasetError(f"no episode of the dataset has {horizon} steps for the rollout-fidelity check.")
    pick = whole[torch.randint(len(whole), (n,), generator=gen).numpy()]
    w = torch.as_tensor(windows[pick])
    return w[:, 0, :ds.obs_dim], w[:, :, ds.obs_dim:]


@torch.no_grad()
def rollout_fidelity(run_dir: Path, cfg: Any, ds: OfflineDataset, env_id: str, model: DiffusionModel,
                     dynamics: EnsembleDynamics, reward: RewardModel, rollouts: int, seed: int,
                     sample_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """State error against horizon and return error of each model's rollouts against MuJoCo's, from the same start
    states: with the dataset's actions (the window model; the single-step model autoregressively) and with the
    trained policy's (the single-step model alone; Dydiff after policy injection, the rollouts the agent trains
    on). ``sample_options``: the window model's sampler (default: the run's). Writes ``rollout_fidelity.png``;
    returns the drift per model, the sampler and the table."""
    layout = _layout(ds, cfg.horizon)
    gen = torch.Generator().manual_seed(seed)
    s0, actions = fidelity_starts(ds, cfg.horizon, rollouts, gen)
    scale = ds.observations.std(0)
    opts = sample_options or cfg.sample_options()

    def score(states: torch.Tensor, acts: torch.Tensor) -> dict[str, Any]:
        sim = simulate(env_id, states[:, 0].numpy(), acts[:, :-1].numpy())  # H rows: H - 1 transitions
        n, t = acts.shape[0], acts.shape[1] - 1
        rew = reward.predict(states[:, :-1].reshape(n * t, -1), acts[:, :-1].reshape(n * t, -1)).view(n, t)
        out = drift(sim, states.numpy(), rew.numpy(), scale=scale)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}

    results = {"dydiff (data actions)": score(sample_states(model, layout, s0, actions, gen, **opts), actions),
               "single-step (data actions)": score(autoregressive_rollout(None, dynamics, s0, cfg.horizon, gen,
                                                                          actions)[0], actions)}
    if ckpt.list_checkpoints(run_dir / "checkpoints"):
        policy = trained_policy(run_dir, cfg, ds, torch.device("cpu"))
        results["single-step (policy)"] = score(*autoregressive_rollout(policy, dynamics, s0, cfg.horizon, gen))
        results["dydiff + injection (policy)"] = score(*policy_injection(policy, dynamics, model, layout, s0,
                                                                         cfg.rounds, gen, **opts))
    arrays = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in results.items()}
    plot = "rollout_fidelity.png" if opts == cfg.sample_options() else \
        f"rollout_fidelity_{opts['sampler']}_{opts['steps']}.png"  # another sampler's plot beside the run's
    plot_drift(arrays, run_dir / plot)
    return {"rollouts": rollouts, "horizon": cfg.horizon - 1, "sampler": opts, "models": results,
            "table": drift_table(arrays), "plot": plot}


@dataclasses.dataclass(frozen=True)
class FidelityArgs:
    """``diffrl dydiff fidelity``: rollout drift of a Dydiff run's models against the simulator."""

    run: Path
    """a Dydiff run directory (its window model, single-step models and, if trained, its agent)"""
    rollouts: int = 256
    """start states drawn from the dataset"""
    seed: int = 0
    """seed of the start states and the models' noise"""
    sampler: str | None = None
    """the window model's sampler for this measurement (default: the run's), e.g. to measure a few-step sampler
    against the reference's Heun: heun, euler, dpmpp_2m, dpmpp_2m_sde"""
    sample_steps: int | None = None
    """its steps (default: the run's)"""

    def __post_init__(self) -> None:
        check_positive("rollouts", self.rollouts)
        if self.sampler is not None:
            check_choice("sampler", self.sampler, ("heun", "euler", "dpmpp_2m", "dpmpp_2m_sde"))
        if self.sample_steps is not None:
            check_positive("sample_steps", self.sample_steps)


def fidelity_main(a: FidelityArgs) -> None:
    """Measure, print the table, keep it in the run's ``summary.json`` and plot it."""
    from diffrl import registry  # the run's config class, through the registry (no import of a system here)

    saved = read_config(a.run)
    if not str(saved.get("pipeline", "")).startswith(PREFIX):
        raise ConfigError(f"{a.run} is a {saved.get('pipeline')!r} run, not a Dydiff run.")
    cfg = registry.find_run(a.run)[2]
    ds = load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(ds, cfg.env, str(cfg.dataset))
    if not supports_state_reset(env_id):
        raise ConfigError(f"rollout fidelity needs an env whose state can be set from an observation, not {env_id}.")
    model, _ = window_model(dataclasses.replace(cfg, diffusion=cfg.diffusion or a.run), ds, a.run,
                            torch.device("cpu"))
    dynamics, reward, _, _ = single_step_models(dataclasses.replace(cfg, models=cfg.models or a.run), ds, a.run)
    opts = None
    if a.sampler is not None or a.sample_steps is not None:
        sampler = a.sampler or cfg.sampler
        run_steps = cfg.sample_steps if sampler == cfg.sampler else None
        opts = dataclasses.replace(cfg, sampler=sampler, sample_steps=a.sample_steps or run_steps or 32
                                   ).sample_options()
    out = rollout_fidelity(a.run, cfg, ds, env_id, model, dynamics, reward, a.rollouts, a.seed, opts)
    print(f"window model sampler: {out['sampler']}")
    print(out["table"])
    if (a.run / "summary.json").is_file():  # the run's own sampler's table is "rollout_fidelity"; others are kept
        summary = read_summary(a.run)    # beside it, by sampler and steps
        key = "rollout_fidelity" if opts is None else f"rollout_fidelity_{out['sampler']['sampler']}_" \
                                                      f"{out['sampler']['steps']}"
        summary[key] = out
        write_json_atomic(a.run / "summary.json", summary)
    print(f"written: {a.run / out['plot']}")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    fid = summary.get("rollout_fidelity")
    return [f"rollout fidelity ({fid['rollouts']} start states, state error in dataset std units):",
            fid["table"]] if fid else []


SYSTEM = System("dydiff", "Dydiff: offline RL on filtered rollouts of a trajectory diffusion model", commands=(
    Command("", ALGOS, run, PRESETS, pipelines={PREFIX + name: cls for name, cls in ALGOS.items()},
            algo_flag="--algo", default_algo="td3bc", evaluate=offline.evaluate_run, summary_lines=summary_lines,
            help="--dataset D [--algo td3bc|dql|cql]: window model, single-step models, agent on filtered rollouts"),),
    tools=(Tool("fidelity", FidelityArgs, fidelity_main, help="--run RUN_DIR: rollout drift against the simulator"),))
