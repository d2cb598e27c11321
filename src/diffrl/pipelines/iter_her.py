"""Goal-conditioned learning on Fetch tasks: DDPG+HER, ITER (KER + GER) and ITER-Diffusion.

    diffrl iter --env FetchPush-v4 [--n-ker 8] [--n-ger 4] [--before-ger-minibatch-size 256] [--ddpm]
        [--ddpm-time-steps 50 --ddpm-tol 0.05 --ddpm-train-start 100 --ddpm-aug-start 150 --ddpm-aug-freq 20]
        [--epochs E] [--n-cycles C] [--preset quick|paper] [--seed S]

``--n-ker 0 --n-ger 0`` is plain DDPG+HER (OpenAI baselines' settings). The loop, as baselines' ``her.train``:
epochs of ``n_cycles`` cycles; a cycle collects ``rollouts_per_cycle`` exploration episodes (each stored with its
KER reflections, ``2 n_ker`` episodes per real one), takes ``n_batches`` gradient steps on HER minibatches of
``before_ger_minibatch_size`` transitions that GER extends to ``(1 + n_ger)`` times that, then moves the target
networks. Every epoch ends with ``eval_episodes`` deterministic test episodes (``eval/success_rate``).

ITER-Diffusion (``--ddpm``): from epoch ``ddpm_train_start`` a temporal-UNet DDPM over whole episodes is trained
every epoch on ``ddpm_n_train_episodes`` real episodes (KER reflections count as real); from ``ddpm_aug_start``,
every ``ddpm_aug_freq`` epochs, it generates ``ddpm_n_synth`` episodes for initial states and goals of real
episodes that reached their goal at least once; episodes whose consistency error exceeds ``ddpm_tol`` (metres)
are rejected. Accepted ones go to their own buffer, which supplies ``synthetic_ratio`` of each minibatch (the
reference overwrote random real episodes instead, so the share was never controlled).

Resume is exact on CPU at epoch boundaries (checkpoints are written at the end of epochs).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffrl.agents.ddpg_her import DDPGHER, DDPGHERParams
from diffrl.augment.episodes import (
    FETCH_SUCCESS_THRESHOLD,
    EpisodeDiffusionSettings,
    EpisodeGenerator,
    component_stats,
    successful_contexts,
)
from diffrl.augment.ger import ger_minibatch
from diffrl.augment.ker import fetch_task, ker_augment
from diffrl.config import check, check_choice, check_non_negative, check_positive, from_dict, to_dict
from diffrl.data.batch import Batch
from diffrl.data.episodes import HER_STRATEGIES, OVERWRITE, EpisodeBuffer, RewardFn
from diffrl.envs import env_signature, make_env
from diffrl.envs.make import is_goal_env
from diffrl.errors import CheckpointError, ConfigError
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, read_config, write_config, write_summary
from diffrl.runs.seeding import (
    derive_seed,
    generator_state,
    get_rng_state,
    seed_everything,
    set_generator_state,
    set_rng_state,
)

PIPELINE = "iter"
TRAIN_SEED_STREAM, NORM_SEED_STREAM = 104_729, 130_363  # training episode k resets with derive_seed(seed, stream, k)


@dataclasses.dataclass(frozen=True)
class ITERConfig(DDPGHERParams, RunConfig):
    """``diffrl iter``: DDPG+HER with ITER's KER reflections and GER goals, and ITER-Diffusion's generated episodes.
    Steps of eval_every / log_every / checkpoint_every are epochs."""

    env: str = "FetchPush-v4"
    """Fetch task (gymnasium-robotics v4: FetchReach, FetchPush, FetchSlide, FetchPickAndPlace)"""
    seed: int = 0
    """run seed (networks, sampling, exploration, episode resets)"""
    epochs: int = 50
    """training epochs"""
    n_cycles: int = 50
    """cycles per epoch (the ITER README runs 100)"""
    rollouts_per_cycle: int = 1
    """exploration episodes per cycle (ITER: one worker, one rollout)"""
    n_batches: int = 40
    """gradient steps per cycle"""
    before_ger_minibatch_size: int = 256
    """HER minibatch size; GER makes the batch (1 + n_ger) times larger"""
    n_ker: int = 8
    """KER: reflections per episode (2 n_ker episodes stored per real one; 0 = off)"""
    n_ger: int = 4
    """GER: copies of each minibatch with goals moved inside the success ball (0 = off)"""
    ger_radius: float = 0.05
    """GER: radius of the ball goals move in (metres; the Fetch success threshold)"""
    replay_strategy: str = "future"
    """HER relabelling: future, final, episode or none"""
    replay_k: int = 4
    """HER: relabel with probability 1 - 1/(1 + replay_k)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions (whole episodes are stored)"""
    buffer_overwrite: str = "random"
    """once the replay is full, new episodes replace random ones (baselines' HER buffer, as ITER) or the oldest"""
    gamma: float | None = None
    """discount factor; None: 1 - 1/T as baselines (0.98 at Fetch's T = 50)"""
    ddpm: bool = False
    """ITER-Diffusion: add episodes generated by a trajectory diffusion model"""
    ddpm_time_steps: int = 50
    """DDPM denoising steps (cosine schedule: unlike the reference's linear one, it reaches noise)"""
    ddpm_tol: float = 0.05
    """reject generated episodes whose consistency error exceeds this (metres)"""
    ddpm_train_start: int = 100
    """first epoch that trains the diffusion model (it then trains every epoch)"""
    ddpm_aug_start: int = 150
    """first epoch that may generate episodes"""
    ddpm_aug_freq: int = 20
    """generate at epochs >= ddpm_aug_start divisible by this"""
    ddpm_n_synth: int = 1000
    """episodes generated per augmentation event (before rejection)"""
    ddpm_n_train_episodes: int = 500
    """real episodes the diffusion model trains on each epoch"""
    ddpm_train_steps: int = 80
    """diffusion gradient steps per epoch (the reference: 10 passes over 500 episodes in batches of 64)"""
    ddpm_dim: int = 32
    """temporal UNet base width"""
    ddpm_lr: float = 1e-3
    """diffusion learning rate (the reference: 1e-4; see EpisodeDiffusionSettings.lr)"""
    ddpm_prediction: str = "x0"
    """the UNet predicts the clean episode (x0) or the noise (epsilon, the reference's; see
    EpisodeDiffusionSettings.prediction)"""
    ddpm_batch_size: int = 64
    """diffusion batch size (episodes)"""
    synthetic_ratio: float = 0.05
    """fraction of each HER minibatch drawn from the synthetic episodes (the reference's 1000 of 20000 episodes)"""
    synthetic_capacity: int = 2000
    """synthetic episodes kept (the oldest are replaced first)"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps 50)"""
    eval_every: int = 1
    """evaluate every this many epochs"""
    log_every: int = 1
    """write a metrics row every this many epochs"""
    checkpoint_every: int = 1
    """write a checkpoint every this many epochs (and at the end)"""

    RESUMABLE: ClassVar[frozenset[str]] = RunConfig.RESUMABLE | {"epochs"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "n_cycles", "rollouts_per_cycle", "n_batches", "before_ger_minibatch_size",
                     "buffer_size", "ddpm_time_steps", "ddpm_aug_freq", "ddpm_n_synth", "ddpm_n_train_episodes",
                     "ddpm_train_steps", "ddpm_dim", "ddpm_batch_size", "synthetic_capacity", "ger_radius"):
            check_positive(name, getattr(self, name))
        for name in ("n_ker", "n_ger", "replay_k", "ddpm_train_start", "ddpm_aug_start", "ddpm_tol"):
            check_non_negative(name, getattr(self, name))
        check_choice("replay_strategy", self.replay_strategy, HER_STRATEGIES)
        check_choice("buffer_overwrite", self.buffer_overwrite, OVERWRITE)
        check_choice("ddpm_prediction", self.ddpm_prediction, ("x0", "epsilon"))
        check_positive("ddpm_lr", self.ddpm_lr)
        check(0.0 <= self.synthetic_ratio <= 1.0, "synthetic_ratio", self.synthetic_ratio, "in [0, 1]")
        check(self.ddpm_aug_start >= self.ddpm_train_start, "ddpm_aug_start", self.ddpm_aug_start,
              f">= ddpm_train_start={self.ddpm_train_start} (the model must be trained before it generates)")
        check(self.max_episode_steps is None or self.max_episode_steps > 0, "max_episode_steps",
              self.max_episode_steps, "> 0")


PRESETS: dict[str, dict[str, Any]] = {
    # minutes on 2 CPU cores; plain HER (--n-ker 0 --n-ger 0) solves FetchReach-v4 with it
    "quick": dict(epochs=10, n_cycles=10, n_batches=40, eval_episodes=10, ddpm_train_start=3, ddpm_aug_start=4,
                  ddpm_aug_freq=2, ddpm_n_synth=200, ddpm_train_steps=80),
    # the ITER README command: 1e6 env steps = 200 epochs of 100 cycles, KER 8, GER 4, DDPM 100/150/20
    "paper": dict(epochs=200, n_cycles=100, n_batches=40, eval_episodes=10, n_ker=8, n_ger=4,
                  before_ger_minibatch_size=256, ddpm_time_steps=50, ddpm_tol=0.05, ddpm_train_start=100,
                  ddpm_aug_start=150, ddpm_aug_freq=20, ddpm_n_synth=1000, ddpm_dim=64),
}


def load_config(run_dir: Path) -> ITERConfig:
    """The config a run was started with (from its ``config.yaml``)."""
    saved = read_config(run_dir)
    if saved.get("pipeline") != PIPELINE:
        raise CheckpointError(f"{run_dir} is a {saved.get('pipeline')} run, not a `diffrl iter` run.")
    return from_dict(ITERConfig, saved["config"])


def agent_params(cfg: ITERConfig, T: int) -> ITERConfig:  # noqa: N803
    """``cfg`` with its discount resolved: ``gamma = None`` is baselines' ``1 - 1/T``."""
    return dataclasses.replace(cfg, gamma=cfg.gamma if cfg.gamma is not None else 1.0 - 1.0 / T)


def reward_function(env: Any) -> RewardFn:
    """The env's own vectorised ``compute_reward(achieved_goal, goal, info)`` as ``(ag, g) -> rewards``."""
    compute = env.unwrapped.compute_reward
    return lambda ag, g: np.asarray(compute(ag, g, None), dtype=np.float32)


def rollout(env: Any, agent: DDPGHER, seed: int, T: int) -> tuple[dict[str, np.ndarray], float]:
    """One exploration episode of ``T`` steps: the episode (leading dimension 1) and its final ``is_success``."""
    obs, _ = env.reset(seed=seed)
    o, ag, g, a = [obs["observation"]], [obs["achieved_goal"]], [], []
    info: dict[str, Any] = {}
    for _ in range(T):
        action = agent.act({k: v[None] for k, v in obs.items()})[0]
        g.append(obs["desired_goal"])
        a.append(action)
        obs, _, _, _, info = env.step(action)  # Fetch never terminates; the time limit ends the episode at T
        o.append(obs["observation"])
        ag.append(obs["achieved_goal"])
    episode = {"obs": np.stack(o), "ag": np.stack(ag), "g": np.stack(g), "act": np.stack(a)}
    return {k: v[None].astype(np.float32) for k, v in episode.items()}, float(info.get("is_success", 0.0))


def her_batch(real: EpisodeBuffer, synthetic: EpisodeBuffer | None, cfg: ITERConfig, reward_fn: RewardFn) -> Batch:
    """A HER minibatch with ``synthetic_ratio`` of its rows from the synthetic episodes (when there are any)."""
    B = cfg.before_ger_minibatch_size
    n_syn = int(round(cfg.synthetic_ratio * B)) if synthetic is not None and len(synthetic) else 0
    parts = [real.sample_her(B - n_syn, reward_fn, cfg.replay_strategy, cfg.replay_k)] if n_syn < B else []
    if n_syn:
        parts.append(synthetic.sample_her(n_syn, reward_fn, cfg.replay_strategy, cfg.replay_k))  # type: ignore[union-attr]
    return parts[0] if len(parts) == 1 else Batch.cat(parts)


def run(cfg: ITERConfig) -> Path:
    """Train DDPG+HER (with KER / GER / generated episodes as configured); returns the run directory."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup
    seed_everything(cfg.seed)
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    eval_env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    if not is_goal_env(env):
        raise ConfigError(f"{cfg.env} is not a goal-conditioned task; `diffrl iter` trains on Fetch tasks "
                          "(e.g. FetchPush-v4). Use `diffrl train` for flat-observation envs.")
    if cfg.n_ker or cfg.n_ger:
        fetch_task(cfg.env)  # KER / GER support only Fetch tasks: fail with one sentence before any work
    T = int(env.spec.max_episode_steps)  # type: ignore[union-attr]
    spaces = env.observation_space
    d_obs, d_goal = spaces["observation"].shape[0], spaces["desired_goal"].shape[0]  # type: ignore[index]
    d_act = env.action_space.shape[0]  # type: ignore[index]
    signature = env_signature(cfg.env, env)
    reward_fn = reward_function(env)
    # success of generated / context episodes by distance: the Dense variants' compute_reward is -distance
    success_threshold = float(getattr(env.unwrapped, "distance_threshold", FETCH_SUCCESS_THRESHOLD))
    params = agent_params(cfg, T)
    agent = DDPGHER(d_obs, d_goal, d_act, params, device)
    real = EpisodeBuffer(max(cfg.buffer_size // T, 1), T, d_obs, d_act, d_goal, device=device, seed=cfg.seed,
                         overwrite=cfg.buffer_overwrite)
    synthetic = EpisodeBuffer(cfg.synthetic_capacity, T, d_obs, d_act, d_goal, device=device,
                              seed=derive_seed(cfg.seed, 1)) if cfg.ddpm else None
    generator = EpisodeGenerator(d_obs, d_act, d_goal, T, object_task=d_obs != 10, seed=cfg.seed, device=device,
                                 settings=EpisodeDiffusionSettings(
                                     num_steps=cfg.ddpm_time_steps, tol=cfg.ddpm_tol, dim=cfg.ddpm_dim,
                                     batch_size=cfg.ddpm_batch_size, n_train_episodes=cfg.ddpm_n_train_episodes,
                                     train_steps=cfg.ddpm_train_steps, lr=cfg.ddpm_lr,
                                     prediction=cfg.ddpm_prediction)) if cfg.ddpm else None
    rng = np.random.default_rng(cfg.seed)  # KER angles, GER offsets

    epoch, episodes_done, best_success = 0, 0, -1.0
    timers = {"env_s": 0.0, "ker_s": 0.0, "update_s": 0.0, "eval_s": 0.0}
    if cfg.ddpm:
        timers.update(diffusion_train_s=0.0, sampling_s=0.0)
    wall_offset, last_eval = 0.0, None
    resumed = cfg.resume is not None
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        check_resumable(run_dir, PIPELINE, cfg)
        manifest, parts = ckpt.load_checkpoint(run_dir)
        ckpt.check_env(manifest, signature, run_dir, resume=True)
        state = parts["state"]
        agent.load_state_dict(state["agent"])
        real.load_state_dict(parts["real"])
        if synthetic is not None and generator is not None:
            synthetic.load_state_dict(parts["synthetic"])
            generator.load_state_dict(parts["generator"])
        loop = state["loop"]
        epoch, episodes_done, best_success = int(loop["epoch"]), int(loop["episodes"]), float(loop["best_success"])
        timers, wall_offset, last_eval = dict(loop["timers"]), float(loop["wall_s"]), loop["last_eval"]
        set_generator_state(rng, loop["rng"])
        set_rng_state(state["rng"])
    else:
        run_dir = new_run_dir(PIPELINE, cfg.env, cfg.seed, cfg.runs_root, cfg.run_dir)
    write_config(run_dir, PIPELINE, to_dict(cfg))
    logger = Logger(run_dir, resume_step=episodes_done * T if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))

    def save() -> None:
        state = {"agent": agent.state_dict(), "rng": get_rng_state(),
                 "loop": {"epoch": epoch, "episodes": episodes_done, "best_success": best_success, "timers": timers,
                          "wall_s": logger.wall_s(), "last_eval": last_eval, "rng": generator_state(rng)}}
        meta = {"env": signature, "pipeline": PIPELINE, "env_steps": episodes_done * T, "epoch": epoch,
                "gradient_steps": agent.num_updates, "seed": cfg.seed}
        parts: dict[str, Any] = {"state": state, "real": real.state_dict()}
        if synthetic is not None and generator is not None:
            parts.update(synthetic=synthetic.state_dict(), generator=generator.state_dict())
        ckpt.save_checkpoint(run_dir / "checkpoints", episodes_done * T, parts, meta, keep_last=cfg.keep_checkpoints)

    # ------------------------------------------------------------------ loop
    bar = Progress(cfg.epochs * cfg.n_cycles, initial=epoch * cfg.n_cycles, desc=f"iter {cfg.env}", unit="cycle",
                   enabled=cfg.progress)
    while epoch < cfg.epochs:
        metrics: dict[str, torch.Tensor] = {}
        train_success: list[float] = []
        for _ in range(cfg.n_cycles):
            t0 = time.perf_counter()
            new = []
            for _ in range(cfg.rollouts_per_cycle):
                episode, success = rollout(env, agent, derive_seed(cfg.seed, TRAIN_SEED_STREAM, episodes_done), T)
                new.append(episode)
                train_success.append(success)
                episodes_done += 1
            episodes = {k: np.concatenate([e[k] for e in new]) for k in new[0]}
            t1 = time.perf_counter()
            if cfg.n_ker:  # the reflections are stored as real episodes (ITER)
                episodes = ker_augment(episodes, cfg.n_ker, rng, cfg.env)
            real.add_episodes(episodes)
            update_normalizers(agent, episodes, reward_fn, cfg, derive_seed(cfg.seed, NORM_SEED_STREAM, episodes_done),
                               device)
            t2 = time.perf_counter()
            for _ in range(cfg.n_batches):
                batch = ger_minibatch(her_batch(real, synthetic, cfg, reward_fn), cfg.n_ger, rng, cfg.env, reward_fn,
                                      cfg.ger_radius)
                metrics = agent.update(batch)
            agent.update_target()
            t3 = time.perf_counter()
            timers["env_s"] += t1 - t0
            timers["ker_s"] += t2 - t1
            timers["update_s"] += t3 - t2
            bar.update(1, **({"success": last_eval["eval/success_rate"]} if last_eval else {}))
        row: dict[str, float] = {k: float(v) for k, v in metrics.items()}
        row["train/success_rate"] = float(np.mean(train_success))
        if generator is not None and synthetic is not None and epoch >= cfg.ddpm_train_start:
            row.update(diffusion_epoch(generator, real, synthetic, cfg, epoch, success_threshold, timers))
        epoch += 1
        done_all = epoch >= cfg.epochs
        if (cfg.eval_every and epoch % cfg.eval_every == 0) or done_all:
            t4 = time.perf_counter()
            result = evaluate(agent, eval_env, cfg.eval_episodes, seed=cfg.seed)
            timers["eval_s"] += time.perf_counter() - t4
            last_eval = result.metrics()
            best_success = max(best_success, result.success_rate or 0.0)
            row.update(last_eval)
        if epoch % cfg.log_every == 0 or done_all:
            row.update(epoch=float(epoch), gradient_steps=float(agent.num_updates), real_episodes=float(real.added),
                       **{f"perf/{k}": v for k, v in timers.items()})
            check_finite(row, episodes_done * T, run_dir)
            logger.log(episodes_done * T, row, env_steps=episodes_done * T)
        if epoch % cfg.checkpoint_every == 0 or done_all:
            save()
    bar.close()
    logger.close()

    # ------------------------------------------------------------------ summary
    wall = logger.wall_s()
    summary = {"pipeline": PIPELINE, "env_id": cfg.env, "seed": cfg.seed, "epochs": epoch, "gamma": params.gamma,
               "env_steps": episodes_done * T, "gradient_steps": agent.num_updates, "wall_s": wall,
               "env_steps_per_s": episodes_done * T / max(wall, 1e-9),
               "success_rate": last_eval.get("eval/success_rate") if last_eval else None,
               "best_success_rate": best_success if best_success >= 0 else None,
               "eval_return_mean": last_eval["eval/return_mean"] if last_eval else None,
               "eval_return_std": last_eval["eval/return_std"] if last_eval else None,
               "eval_episodes": cfg.eval_episodes, "real_episodes": real.added,
               "synthetic_episodes": synthetic.added if synthetic is not None else 0,
               "time_breakdown_s": timers}
    write_summary(run_dir, summary)
    env.close()
    eval_env.close()
    return run_dir


def update_normalizers(agent: DDPGHER, episodes: dict[str, np.ndarray], reward_fn: RewardFn, cfg: ITERConfig,
                       seed: int, device: torch.device) -> None:
    """baselines' normaliser update: HER transitions sampled from the new episodes (T per episode)."""
    n, T = episodes["act"].shape[:2]
    fresh = EpisodeBuffer(n, T, episodes["obs"].shape[-1], episodes["act"].shape[-1], episodes["g"].shape[-1],
                          device=device, seed=seed)
    fresh.add_episodes(episodes)
    batch = fresh.sample_her(n * T, lambda ag, g: np.zeros(len(ag), np.float32), cfg.replay_strategy, cfg.replay_k)
    agent.update_normalizers(batch.obs, batch.goal)


def diffusion_epoch(generator: EpisodeGenerator, real: EpisodeBuffer, synthetic: EpisodeBuffer, cfg: ITERConfig,
                    epoch: int, success_threshold: float, timers: dict[str, float]) -> dict[str, float]:
    """ITER-Diffusion's per-epoch step: train the episode model; on augmentation epochs generate, filter, store."""
    t0 = time.perf_counter()
    # the generator draws its episodes with its own (checkpointed) streams: the agent's HER minibatches are the
    # ITER run's until synthetic episodes enter them, so ITER vs ITER-Diffusion is a paired comparison
    train = real.sample_episodes(cfg.ddpm_n_train_episodes, generator.trainer.gen)
    fit = generator.fit(train, cfg.ddpm_train_steps)
    t1 = time.perf_counter()
    timers["diffusion_train_s"] += t1 - t0
    row = {"ddpm/loss_mean": fit["loss_mean"], "ddpm/loss_std": fit["loss_std"]}
    if epoch >= cfg.ddpm_aug_start and epoch % cfg.ddpm_aug_freq == 0:
        contexts, stats = successful_contexts(real.sample_episodes(max(cfg.ddpm_n_synth, 1000), generator.sample_gen),
                                              threshold=success_threshold)
        episodes, gen_stats = generator.generate(contexts, cfg.ddpm_n_synth, success_threshold=success_threshold)
        if gen_stats["accepted"]:
            synthetic.add_episodes(episodes)
            row.update({f"ddpm/{k}": float(v) for k, v in component_stats(train, episodes).items()})
        # an event that rejects every episode has no synthetic success rate (NaN): leave it out of the row rather
        # than let the divergence check stop the run
        row.update({f"ddpm/{k}": float(v) for k, v in {**stats, **gen_stats}.items() if np.isfinite(v)})
        timers["sampling_s"] += time.perf_counter() - t1
    row.update({"buffer/real_episodes": float(len(real)), "buffer/synthetic_episodes": float(len(synthetic))})
    return row


def evaluate_run(run_dir: Path, episodes: int = 10, device: str = "auto", seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an ``iter`` run with :func:`diffrl.eval.evaluate` (success rate)."""
    cfg = load_config(run_dir)
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state",))
    signature = env_signature(cfg.env, env)
    ckpt.check_env(manifest, signature, run_dir)
    s = env.observation_space
    agent = DDPGHER(s["observation"].shape[0], s["desired_goal"].shape[0], env.action_space.shape[0],  # type: ignore[index]
                    agent_params(cfg, int(env.spec.max_episode_steps)), resolve_device(device))  # type: ignore[union-attr]
    agent.load_state_dict(parts["state"]["agent"])
    result = evaluate(agent, env, episodes, seed=cfg.seed if seed is None else seed)
    env.close()
    return {"run_dir": str(run_dir), "env_id": cfg.env, "checkpoint_step": manifest["step"], "episodes": episodes,
            **result.to_dict()}
