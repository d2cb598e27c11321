"""Online off-policy RL: SAC, TD3 and REDQ on any ``make_env`` task (``diffrl train sac|td3|redq``).

Reads top to bottom: setup (or resume), then the loop — act, step, store, ``utd`` updates per env step,
log, evaluate, checkpoint — then the summary. SynthER's online pipeline builds on the same pieces.

Resume is exact on CPU: the checkpoint holds the agent (networks, targets, optimizers, temperature,
counters), the replay buffer with its sampling generator, every RNG, the loop counters and the running
episodes (replayed from their seeds, see :class:`diffrl.envs.VecEnv`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents import REDQ, SAC, TD3, Agent, REDQParams, SACParams, TD3Params
from diffrl.agents.base import Params
from diffrl.config import check, check_positive
from diffrl.data import ReplayBuffer
from diffrl.envs import VecEnv, env_signature, make_env
from diffrl.envs.vector import obs_dim
from diffrl.errors import ConfigError
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig, evaluate_checkpoint
from diffrl.registry import Command, System
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import episode_stats
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RateMeter, RunSession, due


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
    agent_bf16: bool = False
    """run the agent's updates under bf16 autocast (opt-in: faster only where the CPU or GPU has native bf16 matmul,
    and it changes the numbers; see benchmarks/RESULTS.md before using it for a claim)"""

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


EnvFactory = Callable[[OnlineConfig], tuple[VecEnv, gym.Env]]
"""Builds the loop's training envs (a :class:`~diffrl.envs.VecEnv`) and its evaluation env from the config."""


def make_envs(cfg: OnlineConfig) -> tuple[VecEnv, gym.Env]:
    """The default :data:`EnvFactory`: ``cfg.n_envs`` copies of ``cfg.env`` and one evaluation copy."""
    return (VecEnv(cfg.env, cfg.n_envs, cfg.seed, max_episode_steps=cfg.max_episode_steps),
            make_env(cfg.env, max_episode_steps=cfg.max_episode_steps))


@dataclasses.dataclass
class Counters:
    """The off-policy loop's counters (saved in every checkpoint)."""

    env_steps: int = 0
    best_eval: float = -np.inf
    last_eval: dict[str, float] | None = None
    ep_stats: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # finished episodes since the last row


def run(cfg: OnlineConfig, augment: Augment | None = None, pipeline: str | None = None,
        env_factory: EnvFactory = make_envs) -> Path:
    """Train ``cfg``'s agent online; returns the run directory (see DESIGN.md, "Run directory").

    Args:
        augment: mixes extra experience into the batches (SynthER online).
        pipeline: the run's pipeline name (default ``train_<algo>``).
        env_factory: builds the training and evaluation envs (default: ``cfg.env`` as it is; e.g. action-chunked
            or goal-flattened envs). The agent sees the spaces of the envs it returns.
    """
    algo = algo_name(cfg)
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    seed_everything(cfg.seed)
    envs, eval_env = env_factory(cfg)
    if isinstance(envs.single_observation_space, gym.spaces.Dict):
        raise ConfigError(f"{cfg.env} has dict (goal-conditioned) observations; SAC/TD3/REDQ here take flat "
                          "observations, and goal-conditioned Fetch tasks need a HER agent.")
    d_obs, d_act = obs_dim(envs.single_observation_space), obs_dim(envs.single_action_space)
    agent = build(cfg, d_obs, d_act, device)
    buffer = ReplayBuffer.for_transitions(cfg.buffer_size, d_obs, d_act, device=device, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # exploration before learning_starts
    session = RunSession(cfg, pipeline or f"train_{algo}", cfg.env, signature=env_signature(cfg.env, envs.envs[0]))
    if session.resumed:
        agent.load_state_dict(session.parts["state"]["agent"])
        buffer.load_state_dict(session.parts["buffer"])
        if augment is not None:
            augment.load_state_dict(session.parts["augment"], buffer)
        obs = envs.load_state_dict(session.parts["state"]["envs"])  # replays the running episodes
    else:
        obs = envs.reset()
    c = session.start(Counters(), timers={"env_s": 0.0, "update_s": 0.0, "eval_s": 0.0}, generators={"rng": rng})
    session.progress_bar(cfg.steps, c.env_steps, desc=f"{algo} {cfg.env}", unit="env-step")
    timers = session.timers

    # ------------------------------------------------------------------ loop
    metrics: dict[str, torch.Tensor] = {}
    sampler = augment.sampler(buffer) if augment is not None else buffer
    pending: dict[str, float] = {}  # augmentation metrics waiting for the next logged row
    rate = RateMeter(c.env_steps)
    while c.env_steps < cfg.steps:
        before = c.env_steps
        with timers.time("env_s"):
            if c.env_steps < cfg.learning_starts:
                actions = rng.uniform(-1.0, 1.0, size=(cfg.n_envs, d_act)).astype(np.float32)
            else:
                actions = agent.act(obs.astype(np.float32))
            step = envs.step(actions)
            buffer.add_batch(obs=obs, act=actions, rew=step.reward, next_obs=step.next_obs,
                             done=step.terminated.astype(np.float32))  # truncation is not termination
            obs = step.obs
            c.ep_stats.extend((ret, length) for _, ret, length, _ in step.finished)
            c.env_steps += cfg.n_envs
        if augment is not None:
            pending.update(augment.after_step(c.env_steps, before, buffer))
        if c.env_steps >= cfg.learning_starts and len(buffer) >= cfg.batch_size:
            with timers.time("update_s"), torch.autocast(device.type, torch.bfloat16, enabled=cfg.agent_bf16):
                for _ in range(cfg.utd * cfg.n_envs):
                    metrics = agent.update(sampler.sample(cfg.batch_size))

        done_all = c.env_steps >= cfg.steps
        row: dict[str, float] = {}
        # Evaluate on the eval_every grid (logged) and once at the end (summary only when off the grid, so
        # a run stopped early and resumed logs exactly the rows of an uninterrupted one).
        on_grid = due(cfg.eval_every, before, c.env_steps)
        if on_grid or done_all:
            with timers.time("eval_s"):
                result = evaluate(agent, eval_env, cfg.eval_episodes, seed=cfg.seed)
            c.last_eval = result.metrics()
            if on_grid:
                c.best_eval = max(c.best_eval, result.return_mean)
                row.update(c.last_eval)
        if due(cfg.log_every, before, c.env_steps) or done_all:
            row.update({k: float(v) for k, v in metrics.items()})
            row.update(pending)
            pending = {}
            session.check_finite(row, c.env_steps)
            row.update(episode_stats(c.ep_stats, count=False))
            c.ep_stats = []
            row["perf/env_steps_per_s"] = rate.rate(c.env_steps)
            if augment is not None:  # cumulative wall-clock breakdown (env, updates, eval, diffusion, sampling)
                row.update({f"perf/{k}": v for k, v in {**timers, **augment.timers()}.items()})
            row["gradient_steps"] = agent.num_updates  # type: ignore[attr-defined]
        session.log(c.env_steps, row, env_steps=c.env_steps)
        session.progress(c.env_steps - before, **({"eval": c.last_eval["eval/return_mean"]} if c.last_eval else {}))
        if due(cfg.checkpoint_every, before, c.env_steps) or done_all:
            session.save(c.env_steps, state={"agent": agent.state_dict(), "envs": envs.state_dict()},
                         parts={"buffer": buffer.state_dict(),
                                **({"augment": augment.state_dict()} if augment is not None else {})},
                         meta={"env_steps": c.env_steps, "gradient_steps": agent.num_updates})  # type: ignore[attr-defined]
    envs.close()
    eval_env.close()

    # ------------------------------------------------------------------ summary
    return session.finish(summary(cfg, c, agent.num_updates, session.wall_s(),  # type: ignore[attr-defined]
                                  {**timers, **(augment.timers() if augment is not None else {})}))


def summary(cfg: OnlineConfig, c: Counters, gradient_steps: int, wall: float, timers: dict[str, float]
            ) -> dict[str, Any]:
    """``summary.json`` of an off-policy run: the final and best evaluation, steps, rates and the time breakdown."""
    last = c.last_eval
    return {"env_id": cfg.env, "env_steps": c.env_steps, "gradient_steps": gradient_steps, "wall_s": wall,
            "env_steps_per_s": c.env_steps / max(wall, 1e-9),
            "eval_return_mean": last["eval/return_mean"] if last else None,
            "eval_return_std": last["eval/return_std"] if last else None,
            "success_rate": last.get("eval/success_rate") if last else None,
            "best_eval_return": max(float(c.best_eval), last["eval/return_mean"]) if last else None,
            "eval_episodes": cfg.eval_episodes, "time_breakdown_s": timers}


def evaluate_run(run_dir: Path, cfg: OnlineConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of an online run (``cfg``: its saved config) on the run's eval episodes
    (another set with ``seed``)."""
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)

    def policy(manifest: dict[str, Any], parts: dict[str, Any]) -> Agent:
        agent = build(cfg, obs_dim(env.observation_space), obs_dim(env.action_space), resolve_device(device))
        agent.load_state_dict(parts["state"]["agent"])
        return agent

    return evaluate_checkpoint(run_dir, cfg.env, env, policy, episodes, cfg.seed if seed is None else seed)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The wall-clock breakdown line printed after a run's summary."""
    return ["wall clock: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                       for k, v in summary["time_breakdown_s"].items())]


SYSTEM = System("train", "train an off-policy agent online (SAC, TD3, REDQ)", commands=(
    Command("", {name: cls for name, (cls, _) in ALGOS.items()}, run, PRESETS,
            pipelines={f"train_{name}": cls for name, (cls, _) in ALGOS.items()}, evaluate=evaluate_run,
            help="train sac|td3|redq"),))
