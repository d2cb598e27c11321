"""Offline RL on a fixed dataset: BC, TD3+BC, IQL, CQL, EDAC (``diffrl offline ALGO --dataset D``).

Reads top to bottom: load and validate the dataset, normalise (states with the dataset's mean/std, rewards by
``1000 / (max return - min return)`` where CORL's config does), then the loop — sample, update, log, evaluate
(return and D4RL-style normalised score), checkpoint — then the summary. Resume is exact on CPU: the
checkpoint holds the agent, every RNG and the buffer's sampling generator; the dataset itself is re-read and
its fingerprint must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.agents import BC, CQL, EDAC, IQL, TD3BC, Agent, BCParams, CQLParams, EDACParams, IQLParams, TD3BCParams
from diffrl.config import check, check_positive, from_dict, to_dict
from diffrl.data import MixedSampler, Normalizer, OfflineDataset, ReplayBuffer, load_dataset, validate
from diffrl.envs import env_signature, make_env
from diffrl.envs.vector import obs_dim
from diffrl.errors import CheckpointError, ConfigError, DiffrlError, DiffrlWarning
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, read_config, write_config, write_summary
from diffrl.runs.seeding import get_rng_state, seed_everything, set_rng_state


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


ALGOS: dict[str, tuple[type[OfflineConfig], type[Agent]]] = {
    "bc": (BCConfig, BC), "td3bc": (TD3BCConfig, TD3BC), "iql": (IQLConfig, IQL), "cql": (CQLConfig, CQL),
    "edac": (EDACConfig, EDAC)}
_QUICK = dict(steps=20_000, eval_every=5_000, eval_episodes=5, checkpoint_every=10_000)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"quick": dict(_QUICK), "paper": dict(steps=3_000_000 if name == "edac" else 1_000_000, eval_every=5_000,
                                                eval_episodes=10)}
    for name in ALGOS}


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
    return ALGOS[algo_name(cfg)][1](d_obs, d_act, params, device)  # type: ignore[arg-type]


def load_config(run_dir: Path) -> OfflineConfig:
    saved = read_config(run_dir)
    name = saved["pipeline"].removeprefix("offline_")
    if name not in ALGOS:
        raise CheckpointError(f"{run_dir} is a {saved['pipeline']} run, not an offline run.")
    return from_dict(ALGOS[name][0], saved["config"])


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


def fingerprint(ds: OfflineDataset, extra: dict[str, np.ndarray] | None = None) -> str:
    """Hash of the dataset's arrays (and any extra arrays): a resumed run must train on exactly the same data."""
    h = hashlib.sha256()
    for arrays in (ds.arrays(), extra or {}):
        for v in arrays.values():
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def _buffer(arrays: dict[str, np.ndarray], normalizer: Normalizer, scale: float, d_obs: int, d_act: int,
            device: torch.device, seed: int) -> ReplayBuffer:
    """A buffer holding transitions with states normalised and rewards scaled."""
    buffer = ReplayBuffer.for_transitions(len(arrays["observations"]), d_obs, d_act, device=device, seed=seed)
    buffer.add_batch(obs=normalizer(arrays["observations"]), act=arrays["actions"], rew=arrays["rewards"] * scale,
                     next_obs=normalizer(arrays["next_observations"]),
                     done=np.asarray(arrays["terminals"]).astype(np.float32))
    return buffer


def _eval_metrics(result: Any, ds: OfflineDataset) -> dict[str, float]:
    out = result.metrics()
    if ds.metadata.get("ref_min_score") is not None and ds.metadata.get("ref_max_score") is not None:
        out["eval/normalized_score"] = float(np.mean(ds.normalized_score(np.asarray(result.returns))))
    return out


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


def run(cfg: OfflineConfig, data: OfflineData | None = None) -> Path:
    """Train ``cfg``'s offline agent on ``cfg.dataset`` (or on ``data``); returns the run directory."""
    algo = algo_name(cfg)
    pipeline = (data.pipeline if data is not None else None) or f"offline_{algo}"
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    ds = data.real if data is not None else load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = cfg.env or ds.metadata.get("env_id")
    if not env_id:
        raise ConfigError(f"dataset {cfg.dataset} records no environment; pass --env ID for evaluation.")
    if cfg.env is None:
        validate(ds, env_id, source=str(cfg.dataset))  # against the recorded env too
    seed_everything(cfg.seed)
    eval_env = make_env(env_id)
    signature = env_signature(env_id, eval_env)
    d_obs, d_act = obs_dim(eval_env.observation_space), obs_dim(eval_env.action_space)
    normalizer = Normalizer.fit(ds.observations) if cfg.normalize_states else Normalizer.identity(d_obs)
    scale = reward_scale(ds) if cfg.normalize_reward else 1.0
    buffer = _buffer(ds.arrays(), normalizer, scale, d_obs, d_act, device, cfg.seed)
    sampler: Any = buffer
    buffers = [buffer]
    if data is not None and data.synthetic is not None and data.real_ratio < 1.0:
        # synthetic data goes through the REAL data's normalisation (SynthER: state and reward normalisers are
        # fitted on the real dataset and applied to generated transitions too)
        synthetic = _buffer(data.synthetic, normalizer, scale, d_obs, d_act, device, cfg.seed + 1)
        buffers.append(synthetic)
        sampler = synthetic if data.real_ratio == 0.0 else MixedSampler(buffer, synthetic, 1.0 - data.real_ratio)
    agent = build(cfg, d_obs, d_act, device)
    policy = NormalizedPolicy(agent, normalizer)
    data_id = fingerprint(ds, data.synthetic if data is not None else None)

    step, best, last_eval, wall_offset = 0, -np.inf, None, 0.0
    resumed = cfg.resume is not None
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        check_resumable(run_dir, pipeline, cfg)
        manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state",))
        if manifest["meta"].get("dataset_fingerprint") != data_id:
            raise CheckpointError(f"the dataset {cfg.dataset} differs from the one {run_dir} was trained on; "
                                  "resume with the same data (nothing was changed).")
        state = parts["state"]
        agent.load_state_dict(state["agent"])
        gen_states = state.get("buffer_generators") or [state["buffer_generator"]]  # older runs: one buffer
        for b, gen_state in zip(buffers, gen_states, strict=True):
            b.generator.set_state(gen_state)
        step, best = int(state["loop"]["step"]), float(state["loop"]["best"])
        last_eval, wall_offset = state["loop"]["last_eval"], float(state["loop"]["wall_s"])
        set_rng_state(state["rng"])
    elif data is not None and data.run_dir is not None:
        run_dir = data.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        name = Path(cfg.dataset).stem if Path(cfg.dataset).suffix else cfg.dataset  # file stem or Minari id
        run_dir = new_run_dir(pipeline, name, cfg.seed, cfg.runs_root, cfg.run_dir)
    write_config(run_dir, pipeline, to_dict(cfg))
    logger = Logger(run_dir, resume_step=step if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))

    def save() -> None:
        state = {"agent": agent.state_dict(), "rng": get_rng_state(),
                 "buffer_generators": [b.generator.get_state() for b in buffers],
                 "normalizer": normalizer.state_dict(), "reward_scale": scale,
                 "loop": {"step": step, "best": float(best), "last_eval": last_eval, "wall_s": logger.wall_s()}}
        meta = {"env": signature, "pipeline": pipeline, "gradient_steps": step, "seed": cfg.seed,
                "dataset": str(cfg.dataset), "dataset_fingerprint": data_id}
        ckpt.save_checkpoint(run_dir / "checkpoints", step, {"state": state}, meta, keep_last=cfg.keep_checkpoints)

    # ------------------------------------------------------------------ loop
    bar = Progress(cfg.steps, initial=step, desc=f"{algo} {Path(str(cfg.dataset)).name}", unit="update",
                   enabled=cfg.progress)
    metrics: dict[str, torch.Tensor] = {}
    t_rate, steps_rate = time.perf_counter(), step
    while step < cfg.steps:
        metrics = agent.update(sampler.sample(cfg.batch_size))
        step += 1
        row: dict[str, float] = {}
        on_grid = cfg.eval_every > 0 and step % cfg.eval_every == 0
        if on_grid or step == cfg.steps:  # off-grid final evaluation: summary only (see pipelines.online)
            result = evaluate(policy, eval_env, cfg.eval_episodes, seed=cfg.seed)
            last_eval = _eval_metrics(result, ds)
            if on_grid:
                best = max(best, last_eval.get("eval/normalized_score", last_eval["eval/return_mean"]))
                row.update(last_eval)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            row.update({k: float(v) for k, v in metrics.items()})
            check_finite(row, step, run_dir)
            row["perf/updates_per_s"] = (step - steps_rate) / max(now - t_rate, 1e-9)
            t_rate, steps_rate = now, step
        if row:
            logger.log(step, row)
        bar.update(1, **({"score": last_eval.get("eval/normalized_score", last_eval["eval/return_mean"])}
                         if last_eval else {}))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    bar.close()
    logger.close()

    # ------------------------------------------------------------------ summary
    final = last_eval or {}
    final_score = final.get("eval/normalized_score")
    final_key = final_score if final_score is not None else final.get("eval/return_mean", -np.inf)
    summary = {"pipeline": pipeline, "dataset": str(cfg.dataset), "env_id": env_id, "seed": cfg.seed,
               "gradient_steps": step, "env_steps": 0, "wall_s": logger.wall_s(),
               "eval_return_mean": final.get("eval/return_mean"), "eval_return_std": final.get("eval/return_std"),
               "normalized_score": final_score, "success_rate": final.get("eval/success_rate"),
               "best_score": max(float(best), final_key) if final else None,
               "best_eval_return": None, "eval_episodes": cfg.eval_episodes,
               "updates_per_s": step / max(logger.wall_s(), 1e-9), "dataset_transitions": len(ds),
               "normalize_states": cfg.normalize_states, "reward_scale": scale,
               **(data.summary if data is not None else {})}
    write_summary(run_dir, summary)
    eval_env.close()
    return run_dir


def evaluate_run(run_dir: Path, episodes: int = 10, device: str = "auto", seed: int | None = None,
                 cfg: OfflineConfig | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an offline run (its saved normaliser included); ``cfg`` defaults to the
    run's saved config."""
    cfg = cfg if cfg is not None else load_config(run_dir)
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state",))
    env_id = manifest["meta"]["env"]["env_id"]
    env = make_env(env_id)
    if env_signature(env_id, env) != manifest["meta"]["env"]:
        raise CheckpointError(f"the checkpoint in {run_dir} does not match {env_id} as installed here.")
    state = parts["state"]
    agent = build(cfg, obs_dim(env.observation_space), obs_dim(env.action_space), resolve_device(device))
    agent.load_state_dict(state["agent"])
    policy = NormalizedPolicy(agent, Normalizer.from_state_dict(state["normalizer"]))
    result = evaluate(policy, env, episodes, seed=cfg.seed if seed is None else seed)
    env.close()
    out = {"run_dir": str(run_dir), "env_id": env_id, "checkpoint_step": manifest["step"], "episodes": episodes,
           **result.to_dict()}
    with contextlib.suppress(DiffrlError, OSError):  # no references, or the dataset moved: return still reported
        out["normalized_score"] = float(load_dataset(cfg.dataset).normalized_score(result.return_mean))
    return out
