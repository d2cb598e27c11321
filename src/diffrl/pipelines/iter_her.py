"""Goal-conditioned learning on Fetch tasks: DDPG+HER, ITER (KER + GER) and ITER-Diffusion.

    diffrl iter --env FetchPush-v4 [--n-ker 8] [--n-ger 4] [--before-ger-minibatch-size 256] [--ddpm]
        [--ddpm-time-steps 50 --ddpm-tol 0.05 --ddpm-kinematics-tol 0.015 --ddpm-contact-radius 0.14
         --ddpm-train-start 100 --ddpm-aug-start 150 --ddpm-aug-freq 20]
        [--epochs E] [--n-cycles C] [--preset quick|paper] [--seed S]

``--n-ker 0 --n-ger 0`` is plain DDPG+HER (OpenAI baselines' settings). The loop, as baselines' ``her.train``:
epochs of ``n_cycles`` cycles; a cycle collects ``rollouts_per_cycle`` exploration episodes (each stored with its
KER reflections, ``2 n_ker`` episodes per real one), takes ``n_batches`` gradient steps on HER minibatches of
``before_ger_minibatch_size`` transitions that GER extends to ``(1 + n_ger)`` times that, then moves the target
networks. Every epoch ends with ``eval_episodes`` deterministic test episodes (``eval/success_rate``).

ITER-Diffusion (``--ddpm``): from epoch ``ddpm_train_start`` a temporal-UNet DDPM over whole episodes is trained
every epoch on ``ddpm_n_train_episodes`` real episodes (KER reflections count as real); from ``ddpm_aug_start``,
every ``ddpm_aug_freq`` epochs, it generates ``ddpm_n_synth`` episodes for initial states and goals of real
episodes that reached their goal at least once. A filter rejects episodes whose gripper steps break Fetch's mocap
kinematics (``ddpm_kinematics_tol``), whose object starts to move with the gripper farther than
``ddpm_contact_radius``, whose goal moves, or whose raw achieved goals contradict their observations (``ddpm_tol``;
metres throughout); the rejection rate per reason is logged (``ddpm/reject_*``). Accepted ones go to their own
buffer, which supplies ``synthetic_ratio`` of each minibatch (the reference overwrote random real episodes instead,
so the share was never controlled).

Resume is exact on CPU at epoch boundaries (checkpoints are written at the end of epochs).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffrl.agents.ddpg_her import DDPGHER, DDPGHERParams
from diffrl.augment.episodes import (
    FETCH_SUCCESS_THRESHOLD,
    FILTER_CHECKS,
    EpisodeDiffusionSettings,
    EpisodeGenerator,
    successful_contexts,
)
from diffrl.augment.ger import ger_minibatch
from diffrl.augment.ker import fetch_task, ker_augment
from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.data.batch import Batch
from diffrl.data.episodes import HER_STRATEGIES, OVERWRITE, EpisodeBuffer, RewardFn
from diffrl.envs import env_signature, make_env
from diffrl.envs.make import is_goal_env
from diffrl.errors import ConfigError
from diffrl.eval import evaluate
from diffrl.eval.episode_fidelity import component_stats
from diffrl.pipelines import online
from diffrl.pipelines.common import RunConfig, evaluate_checkpoint
from diffrl.registry import Command, System
from diffrl.runs.device import resolve_device
from diffrl.runs.seeding import derive_seed, seed_everything
from diffrl.runs.session import RunSession, Timers, due

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
    """metres: reject generated episodes whose raw achieved goal or object-relative position disagrees with their
    own observation by more than this (the consistency check; the repair overwrites those channels, the dynamics
    checks below judge the stored episode; EpisodeDiffusionSettings.tol); inf turns it off"""
    ddpm_kinematics_tol: float = 0.015
    """metres: reject generated episodes whose gripper steps break Fetch's mocap kinematics (each step between 0 and
    0.05 x action, per axis) by more than this (EpisodeDiffusionSettings.kinematics_tol); inf turns it off"""
    ddpm_contact_radius: float = 0.14
    """metres: reject generated episodes whose object starts to move while the gripper is farther than this from it
    (object tasks; EpisodeDiffusionSettings.contact_radius); inf turns it off"""
    ddpm_object_still: float = 0.005
    """metres per step: the contact check counts the object as moving when a step moves it more than this
    (EpisodeDiffusionSettings.object_still)"""
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
    """diffusion gradient steps per epoch (the reference: 10 passes over 500 episodes in batches of 64); the model
    needs thousands of steps in all before its episodes pass the filter, so a run with few epochs before its first
    generation event needs more per epoch"""
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
                     "ddpm_train_steps", "ddpm_dim", "ddpm_batch_size", "synthetic_capacity", "ger_radius",
                     "ddpm_kinematics_tol", "ddpm_contact_radius", "ddpm_object_still"):
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


@dataclasses.dataclass
class Counters:
    """The loop's counters (saved in every checkpoint's ``state["loop"]``)."""

    epoch: int = 0
    episodes: int = 0  # exploration episodes collected (their number seeds the next one's reset)
    best_success: float = -1.0
    last_eval: dict[str, float] | None = None


def goal_dims(env: Any) -> tuple[int, int, int]:
    """``(d_obs, d_goal, d_act)`` of a goal-conditioned env."""
    spaces = env.observation_space
    return spaces["observation"].shape[0], spaces["desired_goal"].shape[0], env.action_space.shape[0]


def episode_generator(cfg: ITERConfig, d_obs: int, d_act: int, d_goal: int, T: int,  # noqa: N803
                      device: torch.device) -> EpisodeGenerator:
    """ITER-Diffusion's episode model as ``cfg`` sets it (FetchReach's 10-d observation has no object)."""
    return EpisodeGenerator(d_obs, d_act, d_goal, T, object_task=d_obs != 10, seed=cfg.seed, device=device,
                            settings=EpisodeDiffusionSettings(
                                num_steps=cfg.ddpm_time_steps, tol=cfg.ddpm_tol,
                                kinematics_tol=cfg.ddpm_kinematics_tol, contact_radius=cfg.ddpm_contact_radius,
                                object_still=cfg.ddpm_object_still, dim=cfg.ddpm_dim,
                                batch_size=cfg.ddpm_batch_size, n_train_episodes=cfg.ddpm_n_train_episodes,
                                train_steps=cfg.ddpm_train_steps, lr=cfg.ddpm_lr, prediction=cfg.ddpm_prediction))


def run(cfg: ITERConfig) -> Path:
    """Train DDPG+HER (with KER / GER / generated episodes as configured); returns the run directory."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    seed_everything(cfg.seed)
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    eval_env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    if not is_goal_env(env):
        raise ConfigError(f"{cfg.env} is not a goal-conditioned task; `diffrl iter` trains on Fetch tasks "
                          "(e.g. FetchPush-v4). Use `diffrl train` for flat-observation envs.")
    if cfg.n_ker or cfg.n_ger:
        fetch_task(cfg.env)  # KER / GER support only Fetch tasks: fail with one sentence before any work
    T = int(env.spec.max_episode_steps)  # type: ignore[union-attr]
    d_obs, d_goal, d_act = goal_dims(env)
    reward_fn = reward_function(env)
    # success of generated / context episodes by distance: the Dense variants' compute_reward is -distance
    success_threshold = float(getattr(env.unwrapped, "distance_threshold", FETCH_SUCCESS_THRESHOLD))
    params = agent_params(cfg, T)
    agent = DDPGHER(d_obs, d_goal, d_act, params, device)
    real = EpisodeBuffer(max(cfg.buffer_size // T, 1), T, d_obs, d_act, d_goal, device=device, seed=cfg.seed,
                         overwrite=cfg.buffer_overwrite)
    synthetic = EpisodeBuffer(cfg.synthetic_capacity, T, d_obs, d_act, d_goal, device=device,
                              seed=derive_seed(cfg.seed, 1)) if cfg.ddpm else None
    generator = episode_generator(cfg, d_obs, d_act, d_goal, T, device) if cfg.ddpm else None
    rng = np.random.default_rng(cfg.seed)  # KER angles, GER offsets
    session = RunSession(cfg, PIPELINE, cfg.env, signature=env_signature(cfg.env, env))
    if session.resumed:
        agent.load_state_dict(session.parts["state"]["agent"])
        real.load_state_dict(session.parts["real"])
        if synthetic is not None and generator is not None:
            synthetic.load_state_dict(session.parts["synthetic"])
            generator.load_state_dict(session.parts["generator"])
    timers = {"env_s": 0.0, "ker_s": 0.0, "update_s": 0.0, "eval_s": 0.0,
              **({"diffusion_train_s": 0.0, "sampling_s": 0.0} if cfg.ddpm else {})}
    c = session.start(Counters(), timers=timers, generators={"rng": rng})
    session.progress_bar(cfg.epochs * cfg.n_cycles, c.epoch * cfg.n_cycles, desc=f"iter {cfg.env}", unit="cycle")

    # ------------------------------------------------------------------ loop (epochs of n_cycles cycles)
    while c.epoch < cfg.epochs:
        metrics: dict[str, torch.Tensor] = {}
        train_success: list[float] = []
        for _ in range(cfg.n_cycles):
            metrics, successes = train_cycle(cfg, c, env, agent, real, synthetic, reward_fn, rng, T, session.timers)
            train_success += successes
            session.progress(1, **({"success": c.last_eval["eval/success_rate"]} if c.last_eval else {}))
        row: dict[str, float] = {k: float(v) for k, v in metrics.items()}
        row["train/success_rate"] = float(np.mean(train_success))
        if generator is not None and synthetic is not None and c.epoch >= cfg.ddpm_train_start:
            row.update(diffusion_epoch(generator, real, synthetic, cfg, c.epoch, success_threshold, session.timers))
        before, c.epoch = c.epoch, c.epoch + 1
        done_all, step = c.epoch >= cfg.epochs, c.episodes * T
        if due(cfg.eval_every, before, c.epoch) or done_all:
            with session.timers.time("eval_s"):
                result = evaluate(agent, eval_env, cfg.eval_episodes, seed=cfg.seed)
            c.last_eval = result.metrics()
            c.best_success = max(c.best_success, result.success_rate or 0.0)
            row.update(c.last_eval)
        if due(cfg.log_every, before, c.epoch) or done_all:
            row.update(epoch=float(c.epoch), gradient_steps=float(agent.num_updates), real_episodes=float(real.added),
                       **{f"perf/{k}": v for k, v in session.timers.items()})
            session.check_finite(row, step)
            session.log(step, row, env_steps=step)
        if due(cfg.checkpoint_every, before, c.epoch) or done_all:
            parts = {"real": real.state_dict()}
            if synthetic is not None and generator is not None:
                parts.update(synthetic=synthetic.state_dict(), generator=generator.state_dict())
            session.save(step, state={"agent": agent.state_dict()}, parts=parts,
                         meta={"env_steps": step, "epoch": c.epoch, "gradient_steps": agent.num_updates})
    env.close()
    eval_env.close()

    # ------------------------------------------------------------------ summary
    last, wall = c.last_eval, session.wall_s()
    return session.finish({
        "env_id": cfg.env, "epochs": c.epoch, "gamma": params.gamma, "env_steps": c.episodes * T,
        "gradient_steps": agent.num_updates, "wall_s": wall, "env_steps_per_s": c.episodes * T / max(wall, 1e-9),
        "success_rate": last.get("eval/success_rate") if last else None,
        "best_success_rate": c.best_success if c.best_success >= 0 else None,
        "eval_return_mean": last["eval/return_mean"] if last else None,
        "eval_return_std": last["eval/return_std"] if last else None,
        "eval_episodes": cfg.eval_episodes, "real_episodes": real.added,
        "synthetic_episodes": synthetic.added if synthetic is not None else 0,
        **{f"ddpm_{k}": v for k, v in (generator.totals() if generator is not None else {}).items()},
        "time_breakdown_s": dict(session.timers)})


def train_cycle(cfg: ITERConfig, c: Counters, env: Any, agent: DDPGHER, real: EpisodeBuffer,
                synthetic: EpisodeBuffer | None, reward_fn: RewardFn, rng: np.random.Generator, T: int,  # noqa: N803
                timers: Timers) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One cycle of baselines' ``her.train``: ``rollouts_per_cycle`` exploration episodes (``c.episodes`` counts
    them), stored with their KER reflections and fed to the normalisers; ``n_batches`` updates on GER-extended HER
    minibatches; then the target networks move. Returns the last update's metrics and the episodes' final
    ``is_success``."""
    with timers.time("env_s"):
        new, train_success = [], []
        for _ in range(cfg.rollouts_per_cycle):
            episode, success = rollout(env, agent, derive_seed(cfg.seed, TRAIN_SEED_STREAM, c.episodes), T)
            new.append(episode)
            train_success.append(success)
            c.episodes += 1
        episodes = {k: np.concatenate([e[k] for e in new]) for k in new[0]}
    with timers.time("ker_s"):
        if cfg.n_ker:  # the reflections are stored as real episodes (ITER)
            episodes = ker_augment(episodes, cfg.n_ker, rng, cfg.env)
        real.add_episodes(episodes)
        update_normalizers(agent, episodes, reward_fn, cfg, derive_seed(cfg.seed, NORM_SEED_STREAM, c.episodes),
                           agent.device)
    metrics: dict[str, torch.Tensor] = {}
    with timers.time("update_s"):
        for _ in range(cfg.n_batches):
            batch = ger_minibatch(her_batch(real, synthetic, cfg, reward_fn), cfg.n_ger, rng, cfg.env, reward_fn,
                                  cfg.ger_radius)
            metrics = agent.update(batch)
        agent.update_target()
    return metrics, train_success


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
                    epoch: int, success_threshold: float, timers: Timers) -> dict[str, float]:
    """ITER-Diffusion's per-epoch step: train the episode model; on augmentation epochs generate, filter, store."""
    with timers.time("diffusion_train_s"):
        # the generator draws its episodes with its own (checkpointed) streams: the agent's HER minibatches are the
        # ITER run's until synthetic episodes enter them, so ITER vs ITER-Diffusion is a paired comparison
        train = real.sample_episodes(cfg.ddpm_n_train_episodes, generator.trainer.gen)
        fit = generator.fit(train, cfg.ddpm_train_steps)
    row = {"ddpm/loss_mean": fit["loss_mean"], "ddpm/loss_std": fit["loss_std"]}
    if epoch >= cfg.ddpm_aug_start and epoch % cfg.ddpm_aug_freq == 0:
        with timers.time("sampling_s"):
            contexts, stats = successful_contexts(
                real.sample_episodes(max(cfg.ddpm_n_synth, 1000), generator.sample_gen), threshold=success_threshold)
            episodes, gen_stats = generator.generate(contexts, cfg.ddpm_n_synth, success_threshold=success_threshold)
            if gen_stats["accepted"]:
                synthetic.add_episodes(episodes)
                row.update({f"ddpm/{k}": float(v) for k, v in component_stats(train, episodes).items()})
            else:
                warn_all_rejected(gen_stats, generator.trainer.step, epoch)
            # an event that rejects every episode has no synthetic success rate (NaN): leave it out of the row
            # rather than let the divergence check stop the run
            row.update({f"ddpm/{k}": float(v) for k, v in {**stats, **gen_stats}.items() if np.isfinite(v)})
    row.update({"buffer/real_episodes": float(len(real)), "buffer/synthetic_episodes": float(len(synthetic))})
    return row


def warn_all_rejected(gen_stats: dict[str, float], model_steps: int, epoch: int) -> None:
    """Say so when a generation event keeps no episode: the run is then ITER without generated data so far."""
    reasons = ", ".join(f"{c} {gen_stats[f'reject_{c}']:.0%}" for c in FILTER_CHECKS if gen_stats[f"reject_{c}"])
    warnings.warn(f"epoch {epoch}: the episode filter rejected all {int(gen_stats['generated'])} generated episodes "
                  f"({reasons}) after {model_steps} generator training steps, so no synthetic episode entered the "
                  "buffer; an undertrained generator does this: start training earlier (--ddpm-train-start) or "
                  "train more per epoch (--ddpm-train-steps)", stacklevel=2)


def evaluate_run(run_dir: Path, cfg: ITERConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an ``iter`` run (``cfg``: its saved config) on the run's eval episodes
    (another set with ``seed``); the result includes the success rate."""
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)

    def policy(manifest: dict[str, Any], parts: dict[str, Any]) -> DDPGHER:
        params = agent_params(cfg, int(env.spec.max_episode_steps))  # type: ignore[union-attr]
        agent = DDPGHER(*goal_dims(env), params, resolve_device(device))
        agent.load_state_dict(parts["state"]["agent"])
        return agent

    return evaluate_checkpoint(run_dir, cfg.env, env, policy, episodes, cfg.seed if seed is None else seed)


SYSTEM = System("iter", "DDPG+HER, ITER (KER + GER) and ITER-Diffusion on Fetch tasks", commands=(
    Command("", {"": ITERConfig}, run, {"": PRESETS}, pipelines={PIPELINE: ITERConfig}, evaluate=evaluate_run,
            summary_lines=online.summary_lines, report_metric="eval/success_rate"),))
