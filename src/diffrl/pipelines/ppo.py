"""PPO for continuous control (Schulman et al. 2017, arXiv:1707.06347) as CleanRL's ``ppo_continuous_action.py`` and
Stable-Baselines3's ``PPO`` run it on MuJoCo tasks: ``diffrl train ppo --env Hopper-v5``.

Reads top to bottom: setup (or resume), then each iteration — anneal the learning rate, roll out ``n_steps`` steps
from each of ``n_envs`` envs (observations normalised by running statistics as they arrive), scale the rewards by the
running std of the discounted return, GAE, ``update_epochs`` epochs of ``num_minibatches`` minibatches of the clipped
objective — then log, evaluate, checkpoint; then the summary.

It is the on-policy loop of :mod:`diffrl.pipelines.onpolicy` (``collect``, ``advantages``, ``ppo_update``) with the
plain Gaussian policy: a :class:`~diffrl.agents.ppo.GaussianPPO` over one-action chunks (``Ta = To = 1``, through
:class:`~diffrl.envs.wrappers.ActionChunkEnv`, which then only adds the chunk axes) with CleanRL's and SB3's networks
and settings as :class:`PPOConfig`'s defaults. This module is a loop, not a system: it knows no paper, and a system
(DiffPPO) composes it, which systems may do with loops but never with each other.

Where it differs from the references, and why:

- Time limits are truncations, not terminations: a truncated step bootstraps from the critic's value of the TRUE
  final observation (normalised with the statistics of its step) and GAE stops there. SB3 does the same (it adds
  ``gamma V(final)`` to that reward). CleanRL ends the episode (``next_done = terminations | truncations``), so it
  never bootstraps at a time limit: a bias on every time-limited task, not reproduced here.
- Observation and reward statistics are pooled over the envs and a final observation does not enter them (SB3's
  ``VecNormalize``); CleanRL normalises each env by its own gymnasium wrappers. The return tracked for the reward
  scale restarts at either episode end (SB3; gymnasium's ``NormalizeReward`` carries it over a truncation).
- The learning rate falls linearly per iteration, ``lr (1 - (i - 1) / n)`` at iteration ``i`` of ``n`` (CleanRL; SB3
  anneals from the progress after the first rollout). ``target_kl`` (off by default, as in both) stops the whole
  update after the first minibatch above it (DPPO's rule; CleanRL checks after each epoch, SB3 before each step at
  1.5 target_kl).
- Values and old log-probabilities are computed after the rollout from the stored normalised observations; the
  networks do not change during a rollout, so they are the ones CleanRL and SB3 record while sampling.
- SB3's value loss is ``MSE`` (no 1/2) and its value clipping keeps only the clipped prediction; this is CleanRL's
  ``0.5 * max(unclipped, clipped)`` (``clip_vloss_coef``, None: ``0.5 * MSE``).

Resume is exact on CPU: checkpoints are written at iteration boundaries and hold the agent (networks, optimisers,
counters), the observation normaliser, the reward scaler with each env's running return, the rollout-noise and
minibatch generators, every RNG, the loop counters and the running episodes, which :class:`~diffrl.envs.VecEnv`
replays from their seeds and actions (the project's mechanism, as DPPO's fine-tuning and the off-policy loop). The
observation to act from next is renormalised with the restored statistics, which reproduces it bit for bit. A budget
raised on resume (``--steps``) re-spreads the rest of the learning-rate schedule over the new number of iterations.

A system composes the loop through :class:`PPOHooks` (``run(cfg, hooks)``): its own pipeline name, run directory,
data fingerprint and summary figures; a pre-training step before the first iteration of a fresh run; an extra actor
loss per minibatch (:attr:`~diffrl.agents.ppo.ChunkPPO.extra_loss`); a step after each iteration's update; and its
state, saved as the checkpoint's ``hooks`` entry so a resume stays exact. Without hooks the loop is unchanged.

Shapes: ``N`` envs, ``T`` rollout steps per env, ``Do`` / ``Da`` observation / action dim.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents.ppo import GaussianPPO, GaussianPPOParams
from diffrl.agents.ppo_utils import PPOBatch, RunningObsNormalizer, RunningRewardScaler
from diffrl.config import check, check_positive, check_unit_interval
from diffrl.envs import VecEnv, env_signature, make_env
from diffrl.envs.vector import obs_dim
from diffrl.envs.wrappers import ActionChunkEnv
from diffrl.errors import ConfigError
from diffrl.eval import evaluate
from diffrl.pipelines import online, onpolicy
from diffrl.pipelines.common import RunConfig, evaluate_checkpoint
from diffrl.registry import Command, System
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import episode_stats
from diffrl.runs.memory import peak_rss_mib
from diffrl.runs.seeding import derive_seed, seed_everything
from diffrl.runs.session import RateMeter, RunSession, due

PIPELINE = "train_ppo"
SAMPLE_STREAM, MINIBATCH_STREAM = 49_979_687, 86_028_121  # derive_seed streams of rollout noise and minibatches


@dataclasses.dataclass(frozen=True)
class PPOConfig(GaussianPPOParams, RunConfig):
    """``diffrl train ppo``: PPO with a Gaussian policy, CleanRL's ppo_continuous_action / SB3's PPO settings.
    Steps of eval_every / log_every / checkpoint_every are env steps, checked at iteration ends."""

    env: str = "Hopper-v5"
    """environment id (Gymnasium MuJoCo v5, dm_control/... via shimmy, module:EnvId)"""
    steps: int = 1_000_000
    """total environment steps (whole iterations: rounded up to a multiple of n_envs * n_steps)"""
    seed: int = 0
    """run seed (networks, rollout noise, minibatches, episode resets)"""
    n_envs: int = 1
    """parallel environments (stepped synchronously)"""
    n_steps: int = 2048
    """rollout steps per env per iteration"""
    update_epochs: int = 10
    """epochs over each iteration's n_envs * n_steps samples"""
    num_minibatches: int = 32
    """minibatches per epoch (must divide n_envs * n_steps)"""
    gamma: float = 0.99
    """discount (also of the return whose std scales the rewards)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    anneal_lr: bool = True
    """anneal both learning rates linearly towards 0 over the iterations"""
    norm_obs: bool = True
    """normalise observations by their running mean and std"""
    clip_obs: float = 10.0
    """bound of the normalised observations"""
    norm_reward: bool = True
    """divide rewards by the running std of the discounted return"""
    clip_reward: float = 10.0
    """bound of the scaled rewards"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one)"""
    eval_every: int = 20_000
    """evaluate every this many env steps (0: only at the end)"""
    checkpoint_every: int = 20_000
    """write a checkpoint every this many env steps (and always at the end)"""

    # the agent (CleanRL's and SB3's PPO defaults on MuJoCo)
    horizon_steps: int = 1
    """predicted action chunk length Ta (1: plain PPO)"""
    act_steps: int = 1
    """actions of a chunk executed (1: plain PPO)"""
    cond_steps: int = 1
    """observation history length To (1: plain PPO)"""
    noise_clip: float | None = None
    """clamp of the standard-normal sampling noise (None: unclipped, as PPO; the env clips actions to its bounds)"""
    logprob_clamp: tuple[float, float] = (-math.inf, math.inf)
    """clamp of the joint log-probabilities before the ratio ((-inf, inf): none, as PPO)"""
    clip_ploss_coef: float = 0.2
    """PPO ratio clip epsilon"""
    clip_vloss_coef: float | None = 0.2
    """clip of the value change around the rollout values (CleanRL's clip_vloss with clip_coef); None: 0.5 * MSE"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    max_grad_norm: float | None = 0.5
    """clip the gradient norm of actor and critic together (joint_grad_clip); None: no clipping"""
    joint_grad_clip: bool = True
    """clip the actor's and critic's gradients as one vector (CleanRL, SB3)"""
    orthogonal_init: bool = True
    """orthogonal init: sqrt(2) hidden, 0.01 policy head, 1 value head (CleanRL, SB3)"""
    critic_hidden: tuple[int, ...] = (64, 64)
    """hidden widths of the V(s) critic"""
    critic_residual: bool = False
    """residual critic (equal widths, odd count) or a plain MLP"""
    critic_activation: str = "tanh"
    """activation of the critic"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden widths of the policy's mean network"""
    residual: bool = False
    """residual mean network (equal widths, odd count) or a plain MLP"""
    activation: str = "tanh"
    """activation of the mean network"""
    squash_mean: bool = False
    """tanh on the mean (False: a linear head, as PPO)"""
    std_init: float = 1.0
    """initial std of every action dimension (log-std 0)"""
    std_min: float = 0.0
    """lower bound of the std (0: none)"""
    std_max: float = math.inf
    """upper bound of the std (inf: none)"""
    logprob_reduction: str = "sum"
    """sum: the joint log-density of the action (PPO's ratio); mean: DPPO's per-element mean"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("steps", self.steps)
        for name in ("n_envs", "n_steps", "update_epochs", "num_minibatches", "clip_obs", "clip_reward"):
            check_positive(name, getattr(self, name))
        check(self.batch_size % self.num_minibatches == 0, "num_minibatches", self.num_minibatches,
              f"a divisor of n_envs * n_steps = {self.batch_size}")
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("gae_lambda", self.gae_lambda, low_open=False)
        for name in ("horizon_steps", "act_steps", "cond_steps"):
            check(getattr(self, name) == 1, name, getattr(self, name), "1: diffrl train ppo acts one action from "
                  "one observation (chunked Gaussian policies are fine-tuned by diffrl dppo finetune)")
        check(self.max_episode_steps is None or self.max_episode_steps > 0, "max_episode_steps",
              self.max_episode_steps, "> 0")

    @property
    def batch_size(self) -> int:
        """Samples per iteration, ``n_envs * n_steps``."""
        return self.n_envs * self.n_steps

    @property
    def iterations(self) -> int:
        """Iterations of the run: ``steps`` rounded up to whole iterations."""
        return -(-self.steps // self.batch_size)


# `quick` shows learning in a few minutes on one CPU core (Hopper-v5, 2026-12: 100k env steps in ~2 min on one
# core of a loaded 2-core machine, eval return ~200 -> ~1700); `paper` is CleanRL's / SB3's 1M-step MuJoCo run.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {"quick": dict(steps=100_000, eval_every=10_000, eval_episodes=5, checkpoint_every=20_000),
            "paper": dict(steps=1_000_000, eval_every=20_000, eval_episodes=10, checkpoint_every=50_000)},
}


def build(cfg: PPOConfig, d_obs: int, d_act: int, device: torch.device) -> GaussianPPO:
    """The agent ``cfg`` describes, for the given observation and action sizes (fresh weights)."""
    return GaussianPPO(d_obs, d_act, cfg, device)


def make_envs(cfg: PPOConfig) -> tuple[VecEnv, gym.Env]:
    """``cfg.n_envs`` training copies of ``cfg.env`` taking one-action chunks ``(1, Da)`` and returning one-observation
    histories ``(1, Do)`` (raw units: the normaliser is the loop's), and one plain evaluation copy."""
    eval_env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    space = eval_env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        eval_env.close()
        raise ConfigError(f"{cfg.env} has {space} observations; diffrl train ppo takes flat Box observations "
                          "(goal-conditioned Fetch tasks need a HER agent: diffrl iter).")
    envs = VecEnv(cfg.env, cfg.n_envs, cfg.seed, wrap=lambda env: ActionChunkEnv(env, act_steps=1),
                  max_episode_steps=cfg.max_episode_steps)
    return envs, eval_env


class PPOActor:
    """The trained policy as :func:`diffrl.eval.evaluate` sees it on a plain env: raw observations ``(B, Do)``,
    normalised with the run's statistics (frozen: evaluation never updates them), to the Gaussian's mean ``(B, Da)``.

    Args:
        agent: the PPO agent.
        obs_norm: the run's observation normaliser, or None when the run does not normalise.
    """

    def __init__(self, agent: GaussianPPO, obs_norm: RunningObsNormalizer | None) -> None:
        self.agent, self.obs_norm = agent, obs_norm

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float32)  # the precision the training envs return (ActionChunkEnv)
        if self.obs_norm is not None:
            o = self.obs_norm(o, update=False)
        return self.agent.sample(o[:, None], deterministic).action[:, 0].cpu().numpy()  # (B, 1, Da) -> (B, Da)


class PPOHooks:
    """What a system plugs into :func:`run` (DiffPPO). Every method is a no-op here; a system overrides the ones it
    needs. The attributes replace the loop's own run identity: ``pipeline`` (the name in ``config.yaml`` and the
    checkpoints), ``run_dir`` (a directory the system created), ``name`` (the run directory's second level),
    ``fingerprint`` (the data a resume must match)."""

    pipeline: str | None = None
    run_dir: Path | None = None
    name: str | None = None
    fingerprint: str | None = None

    def setup(self, agent: GaussianPPO, obs_norm: RunningObsNormalizer | None,
              scaler: RunningRewardScaler | None) -> None:
        """Once the loop's agent, observation normaliser and reward scaler exist (fresh runs and resumes)."""

    def pretrain(self, agent: GaussianPPO, obs_norm: RunningObsNormalizer | None,
                 scaler: RunningRewardScaler | None) -> None:
        """Before the first iteration of a fresh run (skipped on resume: the checkpoint holds its result)."""

    def begin_iteration(self, itr: int, iterations: int) -> None:
        """Before iteration ``itr`` (0-based) of ``iterations``, after the learning rate is set."""

    def before_update(self, ro: onpolicy.Rollout) -> None:
        """After an iteration's rollout, before its PPO update (timed as update); ``batch.env_step`` of the update's
        minibatches indexes ``ro``'s env steps flattened to ``(T * N,)``."""

    def extra_loss(self, batch: PPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """An extra actor loss on a PPO minibatch and its detached metrics; None (the default) adds nothing."""
        return None

    def after_update(self, itr: int, ro: onpolicy.Rollout, agent: GaussianPPO,
                     scaler: RunningRewardScaler | None) -> dict[str, float]:
        """After iteration ``itr``'s (1-based) PPO update; returns metrics for its row (timed as update)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Figures added to ``summary.json`` at the end."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The hooks' state, saved in every checkpoint (tensors, arrays, numbers; no objects)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output on resume."""


@dataclasses.dataclass
class Counters:
    """The PPO loop's counters (saved in every checkpoint)."""

    itr: int = 0
    env_steps: int = 0
    best_eval: float = -np.inf
    last_eval: dict[str, float] | None = None
    ep_stats: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # finished episodes since the last row


def run(cfg: PPOConfig, hooks: PPOHooks | None = None) -> Path:
    """Train PPO on ``cfg.env``; returns the run directory (see DESIGN.md, "Run directory"). ``hooks``: a system's
    additions (:class:`PPOHooks`); None runs plain PPO."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    seed_everything(cfg.seed)
    envs, eval_env = make_envs(cfg)
    d_obs, d_act = obs_dim(eval_env.observation_space), obs_dim(eval_env.action_space)
    agent = build(cfg, d_obs, d_act, device)
    obs_norm = RunningObsNormalizer(d_obs, cfg.clip_obs) if cfg.norm_obs else None
    scaler = RunningRewardScaler(cfg.n_envs, cfg.gamma, cfg.clip_reward, per_step=True) if cfg.norm_reward else None
    sample_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, SAMPLE_STREAM))  # rollout noise
    minibatch_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, MINIBATCH_STREAM))
    h = hooks or PPOHooks()
    session = RunSession(cfg, h.pipeline or PIPELINE, h.name or cfg.env, signature=env_signature(cfg.env, eval_env),
                         fingerprint=h.fingerprint, run_dir=h.run_dir)
    if hooks is not None:
        hooks.setup(agent, obs_norm, scaler)
        if type(hooks).extra_loss is not PPOHooks.extra_loss:
            agent.extra_loss = hooks.extra_loss  # type: ignore[assignment]
    if session.resumed:
        state = session.parts["state"]
        agent.load_state_dict(state["agent"])
        if obs_norm is not None:
            obs_norm.load_state_dict(state["obs_norm"])
        if scaler is not None:
            scaler.load_state_dict(state["reward_scaler"])
        sample_gen.set_state(state["sample_gen"])
        minibatch_gen.set_state(state["minibatch_gen"])
        if hooks is not None:
            hooks.load_state_dict(state["hooks"])
        obs = envs.load_state_dict(state["envs"])  # replays the running episodes: raw observations
        if obs_norm is not None:  # the statistics already hold these observations: normalise without an update
            obs = obs_norm(obs, update=False)  # type: ignore[arg-type]
    else:
        if hooks is not None:
            hooks.pretrain(agent, obs_norm, scaler)
        obs = envs.reset()
        if obs_norm is not None:
            obs = obs_norm(obs)  # type: ignore[arg-type]
    c = session.start(Counters(), timers={"rollout_s": 0.0, "update_s": 0.0, "eval_s": 0.0})
    timers, n_itr = session.timers, cfg.iterations
    session.progress_bar(n_itr * cfg.batch_size, c.env_steps, desc=f"ppo {cfg.env}", unit="env-step")

    def evaluate_agent() -> dict[str, float]:
        with timers.time("eval_s"):
            return evaluate(PPOActor(agent, obs_norm), eval_env, cfg.eval_episodes, seed=cfg.seed).metrics()

    # ------------------------------------------------------------------ loop
    rate = RateMeter(c.env_steps)
    while c.itr < n_itr:
        if cfg.anneal_lr:
            agent.set_lr_fraction(1.0 - c.itr / n_itr)  # CleanRL: 1 at the first iteration, 1 / n at the last
        if hooks is not None:
            hooks.begin_iteration(c.itr, n_itr)
        spent = dict(timers)
        with timers.time("rollout_s"):
            ro = onpolicy.collect(agent, envs, obs, cfg.n_steps, sample_gen, obs_norm)  # type: ignore[arg-type]
        with timers.time("update_s"):
            # GAE bootstraps a truncated step from V(true final obs) and never a terminated one (module docstring)
            values, adv, ret, stats = onpolicy.advantages(agent, ro, cfg.gamma, cfg.gae_lambda, scaler)
            if hooks is not None:
                hooks.before_update(ro)
            metrics = onpolicy.ppo_update(agent, ro, values, adv, ret, update_epochs=cfg.update_epochs,
                                          minibatch_size=cfg.batch_size // cfg.num_minibatches, critic_only=False,
                                          generator=minibatch_gen)
            if hooks is not None:
                metrics.update(hooks.after_update(c.itr + 1, ro, agent, scaler))
        before = c.env_steps
        obs, c.env_steps, c.itr = ro.last_obs, c.env_steps + ro.env_steps, c.itr + 1
        c.ep_stats.extend(ro.episodes)

        done_all = c.itr >= n_itr
        row: dict[str, float] = {}
        on_grid = due(cfg.eval_every, before, c.env_steps)
        if on_grid or done_all:  # off-grid final evaluation: summary only (see pipelines.online)
            c.last_eval = evaluate_agent()
            if on_grid:
                c.best_eval = max(c.best_eval, c.last_eval["eval/return_mean"])
                row.update(c.last_eval)
        if due(cfg.log_every, before, c.env_steps) or done_all:
            row.update({**metrics, **stats})
            session.check_finite(row, c.env_steps)
            row.update(episode_stats(c.ep_stats))
            c.ep_stats = []
            row.update({"itr": float(c.itr), "gradient_steps": float(agent.num_updates),
                        "train/learning_rate": float(agent.actor_opt.param_groups[0]["lr"]),
                        "perf/env_steps_per_s": rate.rate(c.env_steps),
                        "perf/rollout_s": timers["rollout_s"] - spent["rollout_s"],
                        "perf/update_s": timers["update_s"] - spent["update_s"]})
        session.log(c.env_steps, row, env_steps=c.env_steps)
        session.progress(ro.env_steps, **({"eval": c.last_eval["eval/return_mean"]} if c.last_eval else {}))
        if due(cfg.checkpoint_every, before, c.env_steps) or done_all:
            session.save(c.env_steps, state={
                "agent": agent.state_dict(), "envs": envs.state_dict(), "sample_gen": sample_gen.get_state(),
                "minibatch_gen": minibatch_gen.get_state(),
                **({"obs_norm": obs_norm.state_dict()} if obs_norm is not None else {}),
                **({"reward_scaler": scaler.state_dict()} if scaler is not None else {}),
                **({"hooks": hooks.state_dict()} if hooks is not None else {})},
                meta={"iteration": c.itr, "env_steps": c.env_steps, "gradient_steps": agent.num_updates})
    if c.last_eval is None:  # resumed at the end: evaluate once more for the summary
        c.last_eval = evaluate_agent()
    envs.close()
    eval_env.close()

    # ------------------------------------------------------------------ summary
    return session.finish({**summary(cfg, c, agent.num_updates, session.wall_s(), dict(timers)), **h.summary()})


def summary(cfg: PPOConfig, c: Counters, gradient_steps: int, wall: float, timers: dict[str, float]
            ) -> dict[str, Any]:
    """``summary.json`` of a PPO run: the final and best evaluation, counts, rates and the time breakdown."""
    last = c.last_eval or {}
    train_s = timers["rollout_s"] + timers["update_s"]
    return {"env_id": cfg.env, "iterations": c.itr, "env_steps": c.env_steps, "gradient_steps": gradient_steps,
            "wall_s": wall, "env_steps_per_s": c.env_steps / max(wall, 1e-9),
            "train_env_steps_per_s": c.env_steps / max(train_s, 1e-9),
            "eval_return_mean": last.get("eval/return_mean"), "eval_return_std": last.get("eval/return_std"),
            "success_rate": last.get("eval/success_rate"),
            "best_eval_return": max(float(c.best_eval), last["eval/return_mean"]) if last else None,
            "eval_episodes": cfg.eval_episodes, "time_breakdown_s": timers,
            # the run's peak resident memory (a sweep resets it per trial): DiffPPO reports its ratio to PPO's
            "peak_rss_mib": peak_rss_mib()}


def evaluate_run(run_dir: Path, cfg: PPOConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a PPO run (``cfg``: its saved config) with the run's frozen observation
    statistics, on the run's eval episodes (another set with ``seed``)."""
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)

    def policy(manifest: dict[str, Any], parts: dict[str, Any]) -> PPOActor:
        d_obs = obs_dim(env.observation_space)
        agent = build(cfg, d_obs, obs_dim(env.action_space), resolve_device(device))
        agent.load_state_dict(parts["state"]["agent"])
        obs_norm = None
        if cfg.norm_obs:
            obs_norm = RunningObsNormalizer(d_obs, cfg.clip_obs)
            obs_norm.load_state_dict(parts["state"]["obs_norm"])
        return PPOActor(agent, obs_norm)

    return evaluate_checkpoint(run_dir, cfg.env, env, policy, episodes, cfg.seed if seed is None else seed)


# Merged by the registry with pipelines/online.py's command of the same name (disjoint algorithms): `diffrl train ppo`.
SYSTEM = System("train", "PPO on-policy (CleanRL's and SB3's settings)", commands=(
    Command("", {"ppo": PPOConfig}, run, PRESETS, pipelines={PIPELINE: PPOConfig}, evaluate=evaluate_run,
            summary_lines=online.summary_lines, help="train ppo"),))
