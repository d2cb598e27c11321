"""Offline RL on a fixed dataset: BC, TD3+BC, IQL, CQL, EDAC, Diffusion-QL (``diffrl offline ALGO --dataset D``).

Reads top to bottom: load and validate the dataset, normalise (states with the dataset's mean/std, rewards by
``1000 / (max return - min return)`` where CORL's config does), then the loop — sample, update, log, evaluate
(return and D4RL-style normalised score), checkpoint — then the summary. Resume is exact on CPU: the
checkpoint holds the agent, every RNG and the buffers' sampling generators; the dataset itself is re-read and
its fingerprint must match.

Systems plug into the loop in two ways: :class:`OfflineData` hands it other data than ``cfg.dataset`` (SynthER's
real and synthetic transitions, a fixed ratio), and an :class:`OfflineAugment` hook fills a second, model buffer
while training and sets the real/model split of each batch (Dydiff's rollouts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from diffrl.agents import (
    BC,
    CQL,
    DQL,
    EDAC,
    IQL,
    TD3BC,
    Agent,
    BCParams,
    CQLParams,
    DQLParams,
    EDACParams,
    IQLParams,
    TD3BCParams,
)
from diffrl.agents.dql import dql_offline_model
from diffrl.config import check, check_choice, check_positive
from diffrl.data import (
    MixedSampler,
    Normalizer,
    OfflineDataset,
    ReplayBuffer,
    dataset_env,
    dataset_run_name,
    fingerprint,
    load_dataset,
)
from diffrl.diffusion.schedules import BETA_SCHEDULES
from diffrl.envs import env_signature, make_env
from diffrl.envs.vector import obs_dim
from diffrl.errors import ConfigError, DiffrlError, DiffrlWarning
from diffrl.eval import EvalResult, evaluate, normalized_score, reference_scores
from diffrl.pipelines.common import RunConfig, evaluate_checkpoint
from diffrl.registry import Command, System
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RateMeter, RunSession, due


@dataclasses.dataclass(frozen=True)
class OfflineConfig(RunConfig):
    """Settings of the offline loop, shared by every offline agent."""

    dataset: str = ""
    """Minari dataset id (under MINARI_DATASETS_PATH) or a path to a D4RL .hdf5 or DPPO .npz file"""
    env: str | None = None
    """evaluation env id (default: the env recorded in the dataset)"""
    steps: int = 1_000_000
    """gradient steps"""
    seed: int = 0
    """run seed"""
    batch_size: int = 256
    """minibatch size"""
    normalize_states: bool = True
    """z-score states with the dataset's mean and std (+1e-3), as CORL"""
    normalize_reward: bool = False
    """scale rewards by 1000 / (max episode return - min episode return), as CORL's IQL on locomotion"""
    checkpoint_every: int = 50_000
    """write a checkpoint every this many gradient steps (and at the end)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.dataset), "dataset", self.dataset, "a Minari id or a dataset path (--dataset)")
        for name in ("steps", "batch_size"):
            check_positive(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class BCConfig(BCParams, OfflineConfig):
    """``diffrl offline bc``: behaviour cloning."""


@dataclasses.dataclass(frozen=True)
class TD3BCConfig(TD3BCParams, OfflineConfig):
    """``diffrl offline td3bc``: TD3+BC."""


@dataclasses.dataclass(frozen=True)
class IQLConfig(IQLParams, OfflineConfig):
    """``diffrl offline iql``: Implicit Q-Learning."""

    normalize_reward: bool = True
    """scale rewards by 1000 / (max episode return - min episode return) (CORL's IQL on locomotion)"""


@dataclasses.dataclass(frozen=True)
class CQLConfig(CQLParams, OfflineConfig):
    """``diffrl offline cql``: Conservative Q-Learning."""


@dataclasses.dataclass(frozen=True)
class EDACConfig(EDACParams, OfflineConfig):
    """``diffrl offline edac``: EDAC (CORL's EDAC does not normalise states)."""

    normalize_states: bool = False
    """z-score states with the dataset's statistics (CORL's EDAC does not)"""


@dataclasses.dataclass(frozen=True)
class DQLConfig(DQLParams, OfflineConfig):
    """``diffrl offline dql``: Diffusion-QL (Wang et al. 2023, arXiv:2208.06193) with the settings of their code
    (Zhendong-Wang/Diffusion-Policies-for-Offline-RL, ``main.py`` for D4RL locomotion): a fresh 5-step VP DDPM over
    single actions trained by BC + normalised Q through the chain, a' from its EMA copy, both gradients clipped,
    cosine learning-rate decay, actions chosen among 50 samples by the target critic (:mod:`diffrl.agents.dql`). One
    default differs from their code: evaluation takes the best of the 50, where their code draws one by softmax over
    min-Q' (``--eval-draw``)."""

    normalize_states: bool = False
    """z-score states with the dataset's statistics (their Data_Sampler does not)"""
    horizon_steps: int = 1
    """Ta: one action per transition (the offline buffer holds single transitions: must be 1)"""
    act_steps: int = 1
    """executed actions per transition (must be 1)"""
    cond_steps: int = 1
    """To, observations the policy sees (must be 1)"""
    actor_lr: float = 3e-4
    """actor learning rate (Adam: AdamW without weight decay; their lr)"""
    critic_lr: float = 3e-4
    """critic learning rate (their critic's 3e-4)"""
    max_grad_norm: float | None = 5.0
    """clip the actor's gradient norm (their per-dataset gn: 1-9 on locomotion; 5 as Dydiff)"""
    critic_max_grad_norm: float | None = 5.0
    """clip the critic's gradient norm (their same gn)"""
    min_sampling_std: float = 0.0
    """std floor of the chain's transitions (0: their plain posterior std, no noise at t = 0)"""
    noise_clip: float | None = None
    """clamp of the chain's standard-normal noise (None: not clamped, as theirs)"""
    target_actor: str = "ema"
    """who draws the TD target's a': 'ema' (theirs) or 'current' (DPPO's baseline)"""
    eval_candidates: int | None = 50
    """actions sampled per state when acting (their sample_action's 50); diffrl takes the one of highest min-Q', the
    mode of the softmax draw over min-Q' their sample_action makes (--eval-draw for theirs)"""
    lr_decay: bool = True
    """cosine-anneal both learning rates to 0 (their --lr_decay; diffrl.agents.dql.DQL.anneal_lr says how theirs
    differs)"""
    lr_decay_steps: int | None = None
    """length of the learning-rate decay in updates (None: the run's steps)"""
    denoising_steps: int = 5
    """K, denoising steps of the fresh DDPM (their --T)"""
    beta_schedule: str = "vp"
    """noise schedule of the DDPM (their --beta_schedule vp; linear or cosine)"""
    denoiser_hidden: int = 256
    """width of the denoiser's layers (their 256)"""
    time_dim: int = 16
    """sinusoidal time features of the denoiser (their t_dim)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("horizon_steps", "act_steps", "cond_steps"):
            check(getattr(self, name) == 1, name, getattr(self, name), "1 for offline Diffusion-QL (the dataset's "
                  "transitions hold one observation and one action)")
        for name in ("denoising_steps", "denoiser_hidden"):
            check_positive(name, getattr(self, name))
        check(self.time_dim >= 4 and self.time_dim % 2 == 0, "time_dim", self.time_dim, "even and >= 4")
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check(self.lr_decay or self.lr_decay_steps is None, "lr_decay_steps", self.lr_decay_steps,
              "unset with --no-lr-decay (no decay)")


ALGOS: dict[str, tuple[type[OfflineConfig], type[Agent]]] = {
    "bc": (BCConfig, BC), "td3bc": (TD3BCConfig, TD3BC), "iql": (IQLConfig, IQL), "cql": (CQLConfig, CQL),
    "edac": (EDACConfig, EDAC), "dql": (DQLConfig, DQL)}
_QUICK = dict(steps=20_000, eval_every=5_000, eval_episodes=5, checkpoint_every=10_000)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"quick": dict(_QUICK), "paper": dict(steps=3_000_000 if name == "edac" else 1_000_000, eval_every=5_000,
                                                eval_episodes=10)}
    for name in ALGOS}
# Diffusion-QL updates cost several TD3+BC updates (two 5-step chains, one differentiated): fewer quick steps, so
# the quick run still takes minutes on one core; paper: Wang et al.'s 2000 epochs of 1000 updates (main.py's
# num_epochs, num_steps_per_epoch), evaluated every 50 epochs on 10 episodes
PRESETS["dql"] = {"quick": dict(steps=10_000, eval_every=5_000, eval_episodes=5, checkpoint_every=5_000),
                  "paper": dict(steps=2_000_000, eval_every=50_000, eval_episodes=10)}


class NormalizedPolicy:
    """An agent acting on normalised observations, seen from the env: ``act(raw_obs)``."""

    def __init__(self, agent: Agent, normalizer: Normalizer) -> None:
        self.agent, self.normalizer = agent, normalizer

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        return self.agent.act(self.normalizer(obs), deterministic)


def algo_name(cfg: OfflineConfig) -> str:
    """The agent of a config (also of configs that extend an agent's config, e.g. SynthER's)."""
    return next(name for name, (cls, _) in ALGOS.items() if isinstance(cfg, cls))


def build(cfg: OfflineConfig, d_obs: int, d_act: int, device: torch.device) -> Agent:
    params = cfg
    if isinstance(cfg, IQLConfig) and cfg.actor_lr_steps is None:  # cosine schedule over the whole run (CORL)
        params = dataclasses.replace(cfg, actor_lr_steps=cfg.steps)
    if isinstance(cfg, DQLConfig):  # a fresh diffusion policy; its learning rates decay over the whole run
        params = dataclasses.replace(cfg, lr_decay_steps=(cfg.lr_decay_steps or cfg.steps) if cfg.lr_decay else None)
        model = dql_offline_model(d_obs, d_act, denoising_steps=cfg.denoising_steps, schedule=cfg.beta_schedule,
                                  hidden=cfg.denoiser_hidden, time_dim=cfg.time_dim, clip_x0=cfg.clip_x0)
        return DQL(model, d_obs, params, device, seed=cfg.seed)
    return ALGOS[algo_name(cfg)][1](d_obs, d_act, params, device)  # type: ignore[arg-type]


MAX_SCALED_REWARD = 10.0
"""mean |reward| per step after CORL's normalisation above which ``reward_scale`` warns (D4RL locomotion: ~1)"""


def reward_scale(ds: OfflineDataset) -> float:
    """CORL's locomotion reward normalisation: ``1000 / (max - min)`` over the dataset's episode returns."""
    returns = ds.episode_returns()
    spread = float(returns.max() - returns.min())
    if spread <= 0:
        raise ConfigError("normalize_reward needs episodes with different returns; this dataset's are all equal "
                          "(use --no-normalize-reward).")
    scale = 1000.0 / spread
    per_step = scale * float(np.abs(ds.rewards).mean())
    if per_step > MAX_SCALED_REWARD:
        # CORL's rule assumes D4RL's return spreads (thousands); one policy's episodes can span a few dozen, and
        # the scaled rewards then inflate Q-values (diffrl's hopper-medium-quick at 15%: scale 28.5, Q ~2600 still
        # rising after 20k IQL steps, evaluations swinging by 30+ points)
        warnings.warn(f"normalize_reward scales rewards by {scale:.1f} because this dataset's episode returns span "
                      f"only {spread:.1f}; scaled rewards average {per_step:.0f} per step, which inflates Q-values "
                      "and can make training swing (consider --no-normalize-reward).", DiffrlWarning, stacklevel=2)
    return scale


def _buffer(arrays: dict[str, np.ndarray], normalizer: Normalizer, scale: float, d_obs: int, d_act: int,
            device: torch.device, seed: int) -> ReplayBuffer:
    """A buffer holding transitions with states normalised and rewards scaled."""
    buffer = ReplayBuffer.for_transitions(len(arrays["observations"]), d_obs, d_act, device=device, seed=seed)
    buffer.add_batch(obs=normalizer(arrays["observations"]), act=arrays["actions"], rew=arrays["rewards"] * scale,
                     next_obs=normalizer(arrays["next_observations"]),
                     done=np.asarray(arrays["terminals"]).astype(np.float32))
    return buffer


def _eval_metrics(result: EvalResult, refs: dict[str, float] | None) -> dict[str, float]:
    out = result.metrics()
    if refs is not None:
        out["eval/normalized_score"] = float(np.mean(normalized_score(np.asarray(result.returns), refs["min"],
                                                                      refs["max"])))
    return out


def _score(metrics: dict[str, float]) -> float:
    """What "best" means: the normalised score where the dataset has references, else the return."""
    return metrics.get("eval/normalized_score", metrics["eval/return_mean"])


@dataclasses.dataclass
class OfflineData:
    """What another pipeline (SynthER) hands the offline loop instead of ``cfg.dataset`` alone.

    ``real`` sets the state / reward normalisation and the normalised scores (always the REAL data, as SynthER
    does); batches take ``real_ratio`` of their rows from ``real`` and the rest from ``synthetic`` (SynthER's npz
    layout). ``run_dir`` is the run directory to write (already created by the caller).
    """

    real: OfflineDataset
    synthetic: dict[str, np.ndarray] | None = None
    real_ratio: float = 1.0
    pipeline: str | None = None
    run_dir: Path | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AugmentContext:
    """What the loop hands an :class:`OfflineAugment` hook: its buffers (normalised space), the agent as a policy on
    raw states (``policy.act(raw_obs, deterministic)``), and the maps from raw data into the buffers' space."""

    real: ReplayBuffer
    model: ReplayBuffer
    policy: NormalizedPolicy
    normalizer: Normalizer
    reward_scale: float


class OfflineAugment(Protocol):
    """Model-generated experience for the offline loop (Dydiff: rollouts of a dynamics model under the learning
    policy). The loop owns a second, *model* buffer of ``capacity`` transitions, in the loop's normalised space
    (states normalised and rewards scaled as the real buffer's).

    Before the first gradient step and after every ``every`` gradient steps (the due rule on the gradient-step
    counter) the loop calls ``hook(step, ctx)`` with an :class:`AugmentContext`; the hook may fill ``ctx.model`` and
    returns metrics (logged with the next metrics row). Each batch then takes ``real_ratio(step)`` of its rows from
    the real buffer and the rest from the model buffer (real only while it is empty). The model buffer and
    ``state_dict`` are checkpointed, so resume stays exact (a hook must draw only from its own generators; the
    policy's deterministic actions draw nothing).
    """

    every: int
    capacity: int

    def __call__(self, step: int, ctx: AugmentContext) -> dict[str, float]: ...

    def real_ratio(self, step: int) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Counters:
    """The offline loop's counters (saved in every checkpoint)."""

    step: int = 0
    best: float = -np.inf
    last_eval: dict[str, float] | None = None
    augment_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # waiting for the next row


def run(cfg: OfflineConfig, data: OfflineData | None = None, augment: OfflineAugment | None = None) -> Path:
    """Train ``cfg``'s offline agent on ``cfg.dataset`` (or on ``data``); returns the run directory.

    Args:
        data: the real (and synthetic) data and the run directory a caller prepared (SynthER).
        augment: fills a model buffer while training and sets the real/model split of each batch (Dydiff).
    """
    algo = algo_name(cfg)
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    ds = data.real if data is not None else load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(ds, cfg.env, str(cfg.dataset))
    seed_everything(cfg.seed)
    eval_env = make_env(env_id)
    d_obs, d_act = obs_dim(eval_env.observation_space), obs_dim(eval_env.action_space)
    normalizer = Normalizer.fit(ds.observations) if cfg.normalize_states else Normalizer.identity(d_obs)
    scale = reward_scale(ds) if cfg.normalize_reward else 1.0
    refs = reference_scores(ds.metadata)
    real = _buffer(ds.arrays(), normalizer, scale, d_obs, d_act, device, cfg.seed)
    synthetic = data.synthetic if data is not None and data.real_ratio < 1.0 else None
    if synthetic is not None and augment is not None:
        raise ConfigError("the offline loop takes synthetic data or an augment hook, not both.")
    model = None
    if synthetic is not None:  # through the REAL data's normalisation (SynthER fits its normalisers on real data)
        model = _buffer(synthetic, normalizer, scale, d_obs, d_act, device, cfg.seed + 1)
    elif augment is not None:
        model = ReplayBuffer.for_transitions(augment.capacity, d_obs, d_act, device=device, seed=cfg.seed + 1)
    ratio = data.real_ratio if data is not None and synthetic is not None else 1.0
    sampler = real if model is None else MixedSampler(real, model, 1.0 - ratio)
    fixed = [real, model] if synthetic is not None else [real]  # buffers whose contents the data recreates
    agent = build(cfg, d_obs, d_act, device)
    policy = NormalizedPolicy(agent, normalizer)
    session = RunSession(cfg, (data.pipeline if data is not None else None) or f"offline_{algo}",
                         dataset_run_name(cfg.dataset), signature=env_signature(env_id, eval_env),
                         fingerprint=fingerprint(ds, data.synthetic if data is not None else None),
                         run_dir=data.run_dir if data is not None else None)
    if session.resumed:
        state = session.parts["state"]
        agent.load_state_dict(state["agent"])
        for b, gen_state in zip(fixed, state.get("buffer_generators") or [state["buffer_generator"]], strict=True):
            b.generator.set_state(gen_state)  # older runs saved one buffer's generator
        if augment is not None:
            model.load_state_dict(session.parts["model_buffer"])
            augment.load_state_dict(session.parts["augment"])
    c = session.start(Counters())
    session.progress_bar(cfg.steps, c.step, desc=f"{algo} {Path(str(cfg.dataset)).name}", unit="update")

    # ------------------------------------------------------------------ loop
    metrics: dict[str, torch.Tensor] = {}
    rate = RateMeter(c.step)
    while c.step < cfg.steps:
        if augment is not None:
            if due(augment.every, c.step - 1, c.step):  # fires at step 0, every, 2 every, ...
                c.augment_metrics.update(augment(c.step, AugmentContext(real, model, policy, normalizer, scale)))
            sampler.ratio = 1.0 - augment.real_ratio(c.step)
        metrics = agent.update(sampler.sample(cfg.batch_size))
        c.step += 1
        row: dict[str, float] = {}
        on_grid = due(cfg.eval_every, c.step - 1, c.step)
        if on_grid or c.step == cfg.steps:  # off-grid final evaluation: summary only (see pipelines.online)
            c.last_eval = _eval_metrics(evaluate(policy, eval_env, cfg.eval_episodes, seed=cfg.seed), refs)
            if on_grid:
                c.best = max(c.best, _score(c.last_eval))
                row.update(c.last_eval)
        if due(cfg.log_every, c.step - 1, c.step) or c.step == cfg.steps:
            row.update({k: float(v) for k, v in metrics.items()})
            row.update(c.augment_metrics)
            c.augment_metrics = {}
            session.check_finite(row, c.step)
            row["perf/updates_per_s"] = rate.rate(c.step)
        session.log(c.step, row)
        session.progress(1, **({"score": _score(c.last_eval)} if c.last_eval else {}))
        if due(cfg.checkpoint_every, c.step - 1, c.step) or c.step == cfg.steps:
            hook = {} if augment is None else {"model_buffer": model.state_dict(), "augment": augment.state_dict()}
            session.save(c.step, state={"agent": agent.state_dict(), "normalizer": normalizer.state_dict(),
                                        "buffer_generators": [b.generator.get_state() for b in fixed],
                                        "reward_scale": scale}, parts=hook, meta={"gradient_steps": c.step})
    eval_env.close()

    # ------------------------------------------------------------------ summary
    final, wall = c.last_eval or {}, session.wall_s()
    return session.finish({
        "dataset": str(cfg.dataset), "env_id": env_id, "gradient_steps": c.step, "env_steps": 0, "wall_s": wall,
        "eval_return_mean": final.get("eval/return_mean"), "eval_return_std": final.get("eval/return_std"),
        "normalized_score": final.get("eval/normalized_score"), "success_rate": final.get("eval/success_rate"),
        "best_score": max(float(c.best), _score(final)) if final else None, "best_eval_return": None,
        "eval_episodes": cfg.eval_episodes, "updates_per_s": c.step / max(wall, 1e-9),
        "dataset_transitions": len(ds), "dataset_fingerprint": fingerprint(ds),  # which data, in a result row
        "normalize_states": cfg.normalize_states, "reward_scale": scale,
        **(data.summary if data is not None else {})})


def evaluate_run(run_dir: Path, cfg: OfflineConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an offline run (``cfg``: its saved config; its saved normaliser included)
    on the run's eval episodes (another set with ``seed``), with the dataset's normalised score when it is found."""
    env_id = ckpt.read_manifest(ckpt.resolve_checkpoint(run_dir))["meta"]["env"]["env_id"]
    env = make_env(env_id)

    def policy(manifest: dict[str, Any], parts: dict[str, Any]) -> NormalizedPolicy:
        agent = build(cfg, obs_dim(env.observation_space), obs_dim(env.action_space), resolve_device(device))
        agent.load_state_dict(parts["state"]["agent"])
        return NormalizedPolicy(agent, Normalizer.from_state_dict(parts["state"]["normalizer"]))

    out = evaluate_checkpoint(run_dir, env_id, env, policy, episodes, cfg.seed if seed is None else seed)
    with contextlib.suppress(DiffrlError, OSError):  # the dataset moved: the return is still reported
        refs = reference_scores(load_dataset(cfg.dataset).metadata)
        if refs is not None:
            out["normalized_score"] = float(normalized_score(out["return_mean"], refs["min"], refs["max"]))
    return out


SYSTEM = System("offline", "train an offline agent on a dataset (BC, TD3+BC, IQL, CQL, EDAC, Diffusion-QL)", commands=(
    Command("", {name: cls for name, (cls, _) in ALGOS.items()}, run, PRESETS,
            pipelines={f"offline_{name}": cls for name, (cls, _) in ALGOS.items()}, evaluate=evaluate_run,
            help="offline bc|td3bc|iql|cql|edac|dql --dataset D"),))
