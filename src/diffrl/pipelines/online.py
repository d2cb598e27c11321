"""Online off-policy RL: SAC, TD3 and REDQ on any ``make_env`` task (``diffrl train sac|td3|redq``).

Reads top to bottom: setup (or resume), then the loop — act, step, store, ``utd`` updates per env step,
log, evaluate, checkpoint — then the summary. SynthER's online pipeline builds on the same pieces.

Resume is exact on CPU: the checkpoint holds the agent (networks, targets, optimizers, temperature,
counters), the replay buffer with its sampling generator, every RNG, the loop counters and the running
episodes (replayed from their seeds, see :class:`diffrl.envs.VecEnv`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents import REDQ, SAC, TD3, Agent, REDQParams, SACParams, TD3Params
from diffrl.agents.base import Params
from diffrl.config import check, check_positive, from_dict, to_dict
from diffrl.data import ReplayBuffer
from diffrl.envs import VecEnv, env_signature, make_env
from diffrl.envs.vector import obs_dim
from diffrl.errors import CheckpointError, ConfigError
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, read_config, write_config, write_summary
from diffrl.runs.seeding import generator_state, get_rng_state, seed_everything, set_generator_state, set_rng_state


@dataclasses.dataclass(frozen=True)
class OnlineConfig(RunConfig):
    """Settings of the online loop, shared by every off-policy agent."""

    env: str = "HalfCheetah-v5"
    """environment id (Gymnasium MuJoCo v5, dm_control/... via shimmy)"""
    steps: int = 100_000
    """total environment steps"""
    seed: int = 0
    """run seed (networks, buffer sampling, exploration, episode resets)"""
    utd: int = 1
    """update-to-data ratio: gradient updates per environment step"""
    batch_size: int = 256
    """minibatch size"""
    buffer_size: int = 1_000_000
    """replay capacity (transitions)"""
    learning_starts: int = 5_000
    """environment steps of uniform random actions before learning starts"""
    n_envs: int = 1
    """parallel environments (stepped synchronously)"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one)"""
    checkpoint_every: int = 10_000
    """write a checkpoint every this many env steps (and always at the end)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("steps", self.steps)
        for name in ("utd", "batch_size", "buffer_size", "n_envs"):
            check_positive(name, getattr(self, name))
        check(self.learning_starts >= 0, "learning_starts", self.learning_starts, ">= 0")
        check(self.batch_size <= self.buffer_size, "batch_size", self.batch_size,
              f"<= buffer_size={self.buffer_size}")
        check(self.max_episode_steps is None or self.max_episode_steps > 0, "max_episode_steps",
              self.max_episode_steps, "> 0")


@dataclasses.dataclass(frozen=True)
class SACConfig(SACParams, OnlineConfig):
    """``diffrl train sac``: Soft Actor-Critic."""

    actor_update_every: int | None = None  # type: ignore[assignment]
    """critic updates per actor update; None = once per env step (= utd), i.e. every update at utd 1"""


@dataclasses.dataclass(frozen=True)
class REDQConfig(REDQParams, OnlineConfig):
    """``diffrl train redq``: REDQ (N critics, random subset M, high update-to-data ratio)."""

    utd: int = 20
    """update-to-data ratio G"""
    actor_update_every: int | None = None  # type: ignore[assignment]
    """critic updates per actor update; None = once per env step (= utd), as REDQ"""


@dataclasses.dataclass(frozen=True)
class TD3Config(TD3Params, OnlineConfig):
    """``diffrl train td3``: TD3."""


ALGOS: dict[str, tuple[type[OnlineConfig], type[Agent]]] = {
    "sac": (SACConfig, SAC), "redq": (REDQConfig, REDQ), "td3": (TD3Config, TD3)}

# Named presets: `quick` shows learning in minutes on 2 CPU cores; `paper` follows the papers (GPU-sized).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sac": {"quick": dict(steps=15_000, learning_starts=2_000, eval_every=5_000, eval_episodes=3,
                          checkpoint_every=5_000),
            "paper": dict(steps=1_000_000, learning_starts=10_000, eval_every=10_000, eval_episodes=10)},
    "td3": {"quick": dict(steps=15_000, learning_starts=2_000, eval_every=5_000, eval_episodes=3,
                          checkpoint_every=5_000),
            "paper": dict(steps=1_000_000, learning_starts=25_000, eval_every=5_000, eval_episodes=10)},
    "redq": {"quick": dict(steps=5_000, learning_starts=1_000, eval_every=2_500, eval_episodes=3,
                           checkpoint_every=2_500),
             "paper": dict(steps=300_000, learning_starts=5_000, eval_every=5_000, eval_episodes=10)},
}


def _agent_params(cfg: OnlineConfig) -> Params:
    if isinstance(cfg, (SACConfig, REDQConfig)):
        every = cfg.actor_update_every if cfg.actor_update_every is not None else cfg.utd
        return dataclasses.replace(cfg, actor_update_every=every)
    return cfg


def algo_name(cfg: OnlineConfig) -> str:
    """The agent of a config (also of configs that extend an agent's config, e.g. SynthER's)."""
    return next(name for name, (cls, _) in ALGOS.items() if isinstance(cfg, cls))


class Augment(Protocol):
    """Extra experience mixed into the agent's batches (SynthER online). The loop calls ``sampler`` once,
    ``after_step`` after every env step (before the updates), and checkpoints ``state_dict``."""

    def sampler(self, real: ReplayBuffer) -> Any: ...

    def after_step(self, env_steps: int, before: int, real: ReplayBuffer) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], real: ReplayBuffer) -> None: ...

    def timers(self) -> dict[str, float]: ...


def build(cfg: OnlineConfig, env_sig_obs: int, act_dim: int, device: torch.device) -> Agent:
    """The agent ``cfg`` describes, for the given observation and action sizes."""
    return ALGOS[algo_name(cfg)][1](env_sig_obs, act_dim, _agent_params(cfg), device)  # type: ignore[arg-type]


def load_config(run_dir: Path) -> OnlineConfig:
    """The config a run was started with (from its ``config.yaml``)."""
    saved = read_config(run_dir)
    name = saved["pipeline"].removeprefix("train_")
    if name not in ALGOS:
        raise CheckpointError(f"{run_dir} is a {saved['pipeline']} run, not an online SAC/TD3/REDQ run.")
    return from_dict(ALGOS[name][0], saved["config"])


def run(cfg: OnlineConfig, augment: Augment | None = None, pipeline: str | None = None) -> Path:
    """Train ``cfg``'s agent online; returns the run directory (see DESIGN.md, "Run directory").

    ``augment`` mixes extra experience into the batches (SynthER); ``pipeline`` names the run's pipeline.
    """
    algo = algo_name(cfg)
    pipeline = pipeline or f"train_{algo}"
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup
    # Everything that can fail on user input (env id, checkpoint, config) is checked before anything is written.
    seed_everything(cfg.seed)
    envs = VecEnv(cfg.env, cfg.n_envs, cfg.seed, max_episode_steps=cfg.max_episode_steps)
    eval_env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    if isinstance(envs.single_observation_space, gym.spaces.Dict):
        raise ConfigError(f"{cfg.env} has dict (goal-conditioned) observations; SAC/TD3/REDQ here take flat "
                          "observations, and goal-conditioned Fetch tasks need a HER agent.")
    signature = env_signature(cfg.env, envs.envs[0])
    d_obs, d_act = obs_dim(envs.single_observation_space), obs_dim(envs.single_action_space)
    agent = build(cfg, d_obs, d_act, device)
    buffer = ReplayBuffer.for_transitions(cfg.buffer_size, d_obs, d_act, device=device, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # exploration before learning_starts

    env_steps, best_eval, last_eval = 0, -np.inf, None
    timers = {"env_s": 0.0, "update_s": 0.0, "eval_s": 0.0}
    ep_stats: list[tuple[float, int]] = []
    wall_offset = 0.0
    resumed = cfg.resume is not None
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        check_resumable(run_dir, pipeline, cfg)
        manifest, parts = ckpt.load_checkpoint(run_dir)
        ckpt.check_env(manifest, signature, run_dir, resume=True)
        state = parts["state"]
        agent.load_state_dict(state["agent"])
        buffer.load_state_dict(parts["buffer"])
        if augment is not None:
            augment.load_state_dict(parts["augment"], buffer)
        loop = state["loop"]
        env_steps, best_eval = int(loop["env_steps"]), float(loop["best_eval"])
        last_eval, timers, wall_offset = loop["last_eval"], dict(loop["timers"]), float(loop["wall_s"])
        ep_stats = [(float(r), int(n)) for r, n in loop["ep_stats"]]
        set_generator_state(rng, loop["rng"])
        obs = envs.load_state_dict(state["envs"])
        set_rng_state(state["rng"])  # last: replaying the episodes must not disturb any RNG we restore
    else:
        run_dir = new_run_dir(pipeline, cfg.env, cfg.seed, cfg.runs_root, cfg.run_dir)
        obs = envs.reset()
    write_config(run_dir, pipeline, to_dict(cfg))
    logger = Logger(run_dir, resume_step=env_steps if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))

    def save() -> None:
        state = {"agent": agent.state_dict(), "rng": get_rng_state(), "envs": envs.state_dict(),
                 "loop": {"env_steps": env_steps, "best_eval": float(best_eval), "last_eval": last_eval,
                          "timers": timers, "wall_s": logger.wall_s(), "ep_stats": ep_stats,
                          "rng": generator_state(rng)}}
        meta = {"env": signature, "pipeline": pipeline, "env_steps": env_steps,
                "gradient_steps": agent.num_updates, "seed": cfg.seed}  # type: ignore[attr-defined]
        parts = {"state": state, "buffer": buffer.state_dict()}
        if augment is not None:
            parts["augment"] = augment.state_dict()
        ckpt.save_checkpoint(run_dir / "checkpoints", env_steps, parts, meta, keep_last=cfg.keep_checkpoints)

    def crossed(every: int, before: int) -> bool:
        return every > 0 and env_steps // every > before // every

    # ------------------------------------------------------------------ loop
    bar = Progress(cfg.steps, initial=env_steps, desc=f"{algo} {cfg.env}", unit="env-step", enabled=cfg.progress)
    metrics: dict[str, torch.Tensor] = {}
    sampler = augment.sampler(buffer) if augment is not None else buffer
    pending: dict[str, float] = {}  # augmentation metrics waiting for the next logged row
    t_rate, steps_rate = time.perf_counter(), env_steps
    while env_steps < cfg.steps:
        before = env_steps
        t0 = time.perf_counter()
        if env_steps < cfg.learning_starts:
            actions = rng.uniform(-1.0, 1.0, size=(cfg.n_envs, d_act)).astype(np.float32)
        else:
            actions = agent.act(obs.astype(np.float32))
        step = envs.step(actions)
        buffer.add_batch(obs=obs, act=actions, rew=step.reward, next_obs=step.next_obs,
                         done=step.terminated.astype(np.float32))  # truncation is not termination
        obs = step.obs
        ep_stats.extend((ret, length) for _, ret, length, _ in step.finished)
        env_steps += cfg.n_envs
        t1 = time.perf_counter()
        timers["env_s"] += t1 - t0
        if augment is not None:
            pending.update(augment.after_step(env_steps, before, buffer))
            t1 = time.perf_counter()
        if env_steps >= cfg.learning_starts and len(buffer) >= cfg.batch_size:
            for _ in range(cfg.utd * cfg.n_envs):
                metrics = agent.update(sampler.sample(cfg.batch_size))
            timers["update_s"] += time.perf_counter() - t1

        done_all = env_steps >= cfg.steps
        row: dict[str, float] = {}
        # Evaluate on the eval_every grid (logged) and once at the end (summary only when off the grid, so
        # a run stopped early and resumed logs exactly the rows of an uninterrupted one).
        on_grid = crossed(cfg.eval_every, before)
        if on_grid or done_all:
            t2 = time.perf_counter()
            result = evaluate(agent, eval_env, cfg.eval_episodes, seed=cfg.seed)
            timers["eval_s"] += time.perf_counter() - t2
            last_eval = result.metrics()
            if on_grid:
                best_eval = max(best_eval, result.return_mean)
                row.update(last_eval)
        if crossed(cfg.log_every, before) or done_all:
            now = time.perf_counter()
            row.update({k: float(v) for k, v in metrics.items()})
            row.update(pending)
            pending = {}
            check_finite(row, env_steps, run_dir)
            if ep_stats:
                row["train/episode_return"] = float(np.mean([r for r, _ in ep_stats]))
                row["train/episode_length"] = float(np.mean([n for _, n in ep_stats]))
                ep_stats = []
            row["perf/env_steps_per_s"] = (env_steps - steps_rate) / max(now - t_rate, 1e-9)
            if augment is not None:  # cumulative wall-clock breakdown (env, updates, eval, diffusion, sampling)
                row.update({f"perf/{k}": v for k, v in {**timers, **augment.timers()}.items()})
            row["gradient_steps"] = agent.num_updates  # type: ignore[attr-defined]
            t_rate, steps_rate = now, env_steps
        if row:
            logger.log(env_steps, row, env_steps=env_steps)
        bar.update(env_steps - before, **({"eval": last_eval["eval/return_mean"]} if last_eval else {}))
        if crossed(cfg.checkpoint_every, before) or env_steps >= cfg.steps:
            save()
    bar.close()
    logger.close()

    # ------------------------------------------------------------------ summary
    wall = logger.wall_s()
    summary = {"pipeline": pipeline, "env_id": cfg.env, "seed": cfg.seed, "env_steps": env_steps,
               "gradient_steps": agent.num_updates,  # type: ignore[attr-defined]
               "wall_s": wall, "env_steps_per_s": env_steps / max(wall, 1e-9),
               "eval_return_mean": last_eval["eval/return_mean"] if last_eval else None,
               "eval_return_std": last_eval["eval/return_std"] if last_eval else None,
               "success_rate": last_eval.get("eval/success_rate") if last_eval else None,
               "best_eval_return": max(float(best_eval), last_eval["eval/return_mean"]) if last_eval else None,
               "eval_episodes": cfg.eval_episodes,
               "time_breakdown_s": {**timers, **(augment.timers() if augment is not None else {})}}
    write_summary(run_dir, summary)
    envs.close()
    eval_env.close()
    return run_dir


def evaluate_run(run_dir: Path, episodes: int = 10, device: str = "auto", seed: int | None = None,
                 cfg: OnlineConfig | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an online run with :func:`diffrl.eval.evaluate`.

    Uses the run's env and seed (so the same eval episodes as during training) unless ``seed`` is given.
    Returns a dict with the checkpoint step and the :class:`~diffrl.eval.EvalResult` fields.
    """
    cfg = cfg if cfg is not None else load_config(run_dir)
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state",))
    signature = env_signature(cfg.env, env)
    ckpt.check_env(manifest, signature, run_dir)
    agent = build(cfg, obs_dim(env.observation_space), obs_dim(env.action_space), resolve_device(device))
    agent.load_state_dict(parts["state"]["agent"])
    result = evaluate(agent, env, episodes, seed=cfg.seed if seed is None else seed)
    env.close()
    return {"run_dir": str(run_dir), "env_id": cfg.env, "checkpoint_step": manifest["step"], "episodes": episodes,
            **result.to_dict()}
