"""The off-policy loop over chunk policies: DPPO's off-policy fine-tuning baselines (Diffusion-QL today; DIPO, IDQL
and QSM next) on a replay buffer of chunk transitions.

One iteration, as DPPO's ``agent/finetune/train_{dql,dipo,idql,qsm}_diffusion_agent.py``::

    ro = collect(agent, envs, obs, n_steps, buffer, act_steps, scale)   # n_steps chunks from each of N envs, stored
    n = updates_per_iteration(n_steps, N, batch_size, replay_ratio)      # int(n_steps N / batch_size * replay_ratio)
    metrics = update(agent, buffer, n, batch_size, critic_only=itr < n_critic_warmup_itr)

A chunk transition is ``(s, a[:act_steps], scale * sum of the executed rewards, s', terminated)``: the history
``s`` flattened to ``To * Do`` values, only the EXECUTED actions ``act_steps * Da`` (the reference stores
``samples[:, :act_steps]``), the reward summed over them by the chunk env and scaled by ``scale_reward_factor``
(0.01 in the reference: "scale down mujoco reward for better critic training"), ``s'`` the true final history
where an episode ended (the reference's ``info["final_obs"]`` on truncation) and ``done`` = termination only, so
critics bootstrap through time limits.

:func:`train` runs the iterations with everything else a loop does, through the
:class:`~diffrl.runs.session.RunSession` the system opened: evaluation on the ``eval_every`` grid (and of the
starting policy) with :func:`~diffrl.pipelines.chunk_policy.evaluate_chunk_policy`, metrics rows, checkpoints
(agent with its optimisers and generator, replay buffer, running episodes, RNGs, counters) and exact resume on CPU.
The agent is any :class:`ChunkOffPolicyAgent`.

Shapes: ``N`` envs, ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length / action dim,
``act_steps <= Ta`` executed actions per chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents.ppo import ChunkPolicy
from diffrl.config import check, check_non_negative, check_positive
from diffrl.data import Batch, ReplayBuffer
from diffrl.envs import VecEnv
from diffrl.envs.wrappers import ActionChunkEnv
from diffrl.errors import ConfigError
from diffrl.pipelines.chunk_policy import evaluate_chunk_policy
from diffrl.pipelines.common import RunConfig
from diffrl.runs.logger import episode_stats
from diffrl.runs.session import RunSession, due

__all__ = ["ChunkOffPolicyAgent", "ChunkOffPolicyConfig", "Collected", "Counters", "chunk_buffer",
           "chunk_transitions", "collect", "update", "updates_per_iteration", "train"]


# ------------------------------------------------------------------------------------------------ the agent
class ChunkOffPolicyAgent(Protocol):
    """What the loop needs from an off-policy chunk agent (:class:`~diffrl.agents.dql.DQL`; DIPO, IDQL, QSM next).

    The agent stays loop-free (an offline loop may call ``update`` on dataset batches); batches follow the Batch
    contract with the chunk layout of :func:`chunk_transitions`.
    """

    device: torch.device
    """where its networks live (the replay buffer is put there too)"""
    num_updates: int
    """update() calls so far (logged as gradient_steps)"""
    rewrites_actions: bool
    """True when ``update`` replaces ``batch["act"]`` by improved actions that the loop must write back into the
    sampled buffer rows (DIPO); False otherwise"""

    @property
    def policy(self) -> ChunkPolicy:
        """The chunk policy evaluation samples (deterministically) through :func:`evaluate_chunk_policy`."""
        ...

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """Exploration chunks ``(N, Ta, Da)`` for histories ``(N, To, Do)`` (the agent's own randomness)."""
        ...

    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """One gradient update on a batch; ``critic_only`` during the critic warm-up. Detached scalar metrics."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly: networks, optimisers, counters, generators."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class ChunkLoopConfig(RunConfig):
    """The run settings every chunk fine-tuning loop has (this one and :mod:`diffrl.pipelines.chunk_rwr`); steps of
    eval_every / log_every / checkpoint_every are iterations."""

    seed: int = 0
    """run seed (agent init and noise, batch draws, episode resets)"""
    n_envs: int = 40
    """parallel environments (stepped in sequence)"""
    n_steps: int = 500
    """action chunks per env per iteration"""
    n_train_itr: int = 1000
    """fine-tuning iterations"""
    eval_every: int = 10
    """evaluate every this many iterations, and once before fine-tuning (0: only at the end)"""
    log_every: int = 1
    """write a metrics row every this many iterations"""
    checkpoint_every: int = 100
    """write a checkpoint every this many iterations (and at the end)"""

    RESUMABLE: ClassVar[frozenset[str]] = RunConfig.RESUMABLE | {"n_train_itr"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_envs", "n_steps", "n_train_itr"):
            check_positive(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class ChunkOffPolicyConfig(ChunkLoopConfig):
    """Settings of the chunk off-policy loop (defaults: DPPO's Gym DQL config); a system's config extends it with
    its agent's parameters."""

    batch_size: int = 1000
    """transitions per gradient step"""
    replay_ratio: float = 16.0
    """gradient steps per iteration = int(n_steps * n_envs / batch_size * replay_ratio) (DQL 16, DIPO 64, IDQL 128)"""
    buffer_size: int = 1_000_000
    """replay capacity in chunk transitions"""
    n_critic_warmup_itr: int = 5
    """first iterations whose updates train only the critic"""
    scale_reward_factor: float = 0.01
    """factor on the stored chunk rewards (the reference scales MuJoCo rewards down for the critic)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "replay_ratio", "buffer_size", "scale_reward_factor"):
            check_positive(name, getattr(self, name))
        check_non_negative("n_critic_warmup_itr", self.n_critic_warmup_itr)
        check(updates_per_iteration(self.n_steps, self.n_envs, self.batch_size, self.replay_ratio) > 0,
              "replay_ratio", self.replay_ratio, f"large enough for one gradient step per iteration: n_steps * n_envs "
              f"/ batch_size * replay_ratio = {self.n_steps} * {self.n_envs} / {self.batch_size} * "
              f"{self.replay_ratio} < 1")


def updates_per_iteration(n_steps: int, n_envs: int, batch_size: int, replay_ratio: float) -> int:
    """Gradient steps per iteration: ``int(n_steps * n_envs / batch_size * replay_ratio)``, the reference's
    ``num_batch`` (Hopper: 500 * 40 / 1000 * 16 = 320). ``replay_ratio`` is thus the expected number of times a
    freshly collected transition is sampled in its own iteration."""
    return int(n_steps * n_envs * replay_ratio / batch_size)


# ------------------------------------------------------------------------------------------------ transitions
def chunk_buffer(capacity: int, obs_shape: tuple[int, int], act_dim: int, act_steps: int,
                 device: torch.device | str = "cpu", seed: int = 0) -> ReplayBuffer:
    """A :class:`~diffrl.data.ReplayBuffer` of chunk transitions: ``obs`` / ``next_obs`` ``(To Do,)``, ``act``
    ``(act_steps Da,)``, ``rew`` and ``done`` scalars. ``obs_shape``: ``(To, Do)``."""
    return ReplayBuffer.for_transitions(capacity, int(np.prod(obs_shape)), act_steps * act_dim, device=device,
                                        seed=seed)


def chunk_transitions(obs: np.ndarray, chunks: np.ndarray, next_obs: np.ndarray, reward: np.ndarray,
                      terminated: np.ndarray, act_steps: int, scale_reward_factor: float) -> dict[str, np.ndarray]:
    """One vector step's chunk transitions, as :meth:`ReplayBuffer.add_batch` keywords.

    Args:
        obs: ``(N, To, Do)`` histories acted from.
        chunks: ``(N, Ta, Da)`` chunks sent to the envs.
        next_obs: ``(N, To, Do)`` histories reached (the true final one where an episode ended).
        reward: ``(N,)`` rewards summed over the executed actions (the chunk env's).
        terminated: ``(N,)`` terminations (never truncations).
        act_steps: executed actions per chunk.
        scale_reward_factor: factor on the stored rewards.
    """
    n = len(obs)
    return {"obs": obs.reshape(n, -1), "act": chunks[:, :act_steps].reshape(n, -1),
            "rew": np.asarray(reward, dtype=np.float64) * scale_reward_factor, "next_obs": next_obs.reshape(n, -1),
            "done": np.asarray(terminated, dtype=np.float32)}


@dataclasses.dataclass
class Collected:
    """What one iteration's collection returns (its transitions are in the buffer)."""

    last_obs: np.ndarray            # (N, To, Do) where the next collection starts
    env_steps: int                  # env steps executed (early episode ends inside a chunk counted exactly)
    episodes: list[tuple[float, int]]  # (return, length in env steps) of the episodes finished here


def collect(agent: ChunkOffPolicyAgent, envs: VecEnv, obs: np.ndarray, n_steps: int, buffer: ReplayBuffer,
            act_steps: int, scale_reward_factor: float) -> Collected:
    """Step every env ``n_steps`` times with the agent's exploration chunks and store the chunk transitions
    (:func:`chunk_transitions`). Episodes run on across iterations (the reference's ``reset_at_iteration: False``)."""
    env_steps, episodes = 0, []
    for _ in range(n_steps):
        chunks = agent.explore(torch.as_tensor(obs, dtype=torch.float32, device=agent.device)).cpu().numpy()
        step = envs.step(chunks)
        buffer.add_batch(**chunk_transitions(obs, chunks, step.next_obs, step.reward, step.terminated,  # type: ignore[arg-type]
                                             act_steps, scale_reward_factor))
        env_steps += step.env_steps
        episodes += [(ret, length) for _, ret, length, _ in step.finished]
        obs = step.obs  # type: ignore[assignment]
    return Collected(obs, env_steps, episodes)


def update(agent: ChunkOffPolicyAgent, buffer: ReplayBuffer, n_updates: int, batch_size: int,
           critic_only: bool) -> dict[str, float]:
    """``n_updates`` gradient steps on uniform batches (with replacement, as the reference); an agent that
    ``rewrites_actions`` gets its improved ``batch["act"]`` written back into the sampled rows. Returns the metrics
    averaged over the steps, with ``train/updates`` and ``train/critic_only``."""
    history: list[dict[str, torch.Tensor]] = []
    for _ in range(n_updates):
        if agent.rewrites_actions:
            batch, idx = buffer.sample(batch_size, return_indices=True)
            history.append(agent.update(batch, critic_only=critic_only))
            buffer.overwrite(idx, act=batch["act"])
        else:
            history.append(agent.update(buffer.sample(batch_size), critic_only=critic_only))
    out = {k: float(torch.stack([h[k] for h in history]).mean()) for k in history[0]} if history else {}
    return {**out, "train/updates": float(n_updates), "train/critic_only": float(critic_only)}


# ------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Counters:
    """The loop's counters (saved in every checkpoint's ``state["loop"]``)."""

    itr: int = 0
    env_steps: int = 0
    best_eval: float = -np.inf
    last_eval: dict[str, float] | None = None
    initial_eval: dict[str, float] | None = None  # the starting policy


def _act_steps(envs: VecEnv) -> int:
    env = envs.envs[0]
    if not isinstance(env, ActionChunkEnv):
        raise ConfigError(f"the chunk off-policy loop steps chunk envs (diffrl.envs.chunking.chunk_envs), got "
                          f"{type(env).__name__} envs of {envs.env_id}.")
    return env.act_steps


def train(cfg: ChunkOffPolicyConfig, session: RunSession, agent: ChunkOffPolicyAgent, envs: VecEnv,
          eval_env: gym.Env, *, ref_scores: dict[str, float] | None = None, eval_mean_path: bool = False,
          parts: Mapping[str, Any] | None = None, summary: Mapping[str, Any] | None = None) -> Path:
    """Run ``cfg.n_train_itr`` iterations (from where a resumed ``session`` stopped); returns the run directory.

    The system builds everything first (seeding, ``envs`` from :func:`~diffrl.envs.chunking.chunk_envs`, the eval
    env, the agent, the session with its meta); this function restores the loop's own state on resume (agent,
    buffer, running episodes), then counters and RNGs through ``session.start``.

    Args:
        cfg: the loop settings (a system config extending :class:`ChunkOffPolicyConfig`).
        session: the run session, not yet started.
        agent: the agent; ``envs``: ``cfg.n_envs`` chunk envs; ``eval_env``: one chunk env for evaluation.
        ref_scores: reference returns ``{"min", "max"}`` for normalised scores.
        eval_mean_path: evaluate along the noise-free mean path (:class:`~diffrl.pipelines.chunk_policy.ChunkActor`).
        parts: further checkpoint parts the system saves with every checkpoint (e.g. the normalisation).
        summary: further ``summary.json`` entries of the system.
    """
    if envs.num_envs != cfg.n_envs:
        raise ConfigError(f"the loop got {envs.num_envs} envs but n_envs={cfg.n_envs}; build cfg.n_envs envs.")
    act_steps = _act_steps(envs)
    obs_shape = envs.single_observation_space.shape  # (To, Do)
    act_dim = envs.single_action_space.shape[-1]  # type: ignore[index]
    buffer = chunk_buffer(cfg.buffer_size, obs_shape, act_dim, act_steps, agent.device, cfg.seed)  # type: ignore[arg-type]
    n_updates = updates_per_iteration(cfg.n_steps, cfg.n_envs, cfg.batch_size, cfg.replay_ratio)
    if session.resumed:
        agent.load_state_dict(session.parts["state"]["agent"])
        buffer.load_state_dict(session.parts["buffer"])
        obs = envs.load_state_dict(session.parts["state"]["envs"])  # replays the running episodes
    else:
        obs = envs.reset()
    return iterate(
        cfg, session, agent, envs, eval_env, obs,
        rollout=lambda o: collect(agent, envs, o, cfg.n_steps, buffer, act_steps,  # type: ignore[arg-type]
                                  cfg.scale_reward_factor),
        update=lambda ro, itr: update(agent, buffer, n_updates, cfg.batch_size,
                                      critic_only=itr < cfg.n_critic_warmup_itr),
        counts=lambda: {"buffer_size": float(len(buffer))}, loop_parts=lambda: {"buffer": buffer.state_dict()},
        ref_scores=ref_scores, eval_mean_path=eval_mean_path, parts=parts,
        summary=lambda: {"updates_per_iteration": n_updates, **dict(summary or {})})


def iterate(cfg: ChunkLoopConfig, session: RunSession, agent: Any, envs: VecEnv, eval_env: gym.Env,
            obs: np.ndarray, *, rollout: Callable[[np.ndarray], Any], update: Callable[[Any, int], dict[str, Any]],
            counts: Callable[[], dict[str, float]], loop_parts: Callable[[], dict[str, Any]],
            ref_scores: dict[str, float] | None, eval_mean_path: bool, parts: Mapping[str, Any] | None,
            summary: Callable[[], Mapping[str, Any]]) -> Path:
    """The iterations every chunk fine-tuning loop shares (this one and :mod:`diffrl.pipelines.chunk_rwr`), from
    ``obs`` (the envs' observations, restored on resume) on: start the session, evaluate the starting policy, then per
    iteration ``rollout(obs)`` (anything with ``last_obs``, ``env_steps`` and ``episodes``) and ``update(rollout,
    iteration) -> metrics``, evaluation / metrics row / checkpoint on their grids, and the summary. ``counts()``:
    the loop's own figures in every metrics row (buffer fill, critic steps); ``loop_parts()``: its checkpoint parts
    (the buffer); ``summary()``: the loop's and the system's further summary entries, read at the end."""
    c = session.start(Counters(), timers={"rollout_s": 0.0, "update_s": 0.0, "eval_s": 0.0})
    timers = session.timers

    def evaluate_agent() -> dict[str, float]:
        with timers.time("eval_s"):
            return evaluate_chunk_policy(agent.policy, eval_env, cfg.eval_episodes, cfg.seed, agent.device,
                                         ref_scores, eval_mean_path)

    if not session.resumed and cfg.eval_every > 0:  # the starting (pre-trained) policy
        c.initial_eval = evaluate_agent()
        session.log(0, {"itr": 0.0, **c.initial_eval}, env_steps=0)
    session.progress_bar(cfg.n_train_itr, c.itr, desc=f"{session.pipeline} {envs.env_id}", unit="itr")
    while c.itr < cfg.n_train_itr:
        spent = dict(timers)
        with timers.time("rollout_s"):
            ro = rollout(obs)
        with timers.time("update_s"):
            metrics = update(ro, c.itr)
        obs, c.env_steps, c.itr = ro.last_obs, c.env_steps + ro.env_steps, c.itr + 1

        done_all = c.itr >= cfg.n_train_itr
        row: dict[str, float] = {}
        on_grid = due(cfg.eval_every, c.itr - 1, c.itr)
        if on_grid or done_all:  # off-grid final evaluation: summary only (see pipelines.online)
            c.last_eval = evaluate_agent()
            if on_grid:
                c.best_eval = max(c.best_eval, c.last_eval["eval/return_mean"])
                row.update(c.last_eval)
        if due(cfg.log_every, c.itr - 1, c.itr) or done_all:
            row.update({**metrics, **episode_stats(ro.episodes)})
            session.check_finite(row, c.env_steps)
            rolled, upd = timers["rollout_s"] - spent["rollout_s"], timers["update_s"] - spent["update_s"]
            row.update({"itr": float(c.itr), "gradient_steps": float(agent.num_updates), **counts(),
                        "perf/rollout_s": rolled, "perf/update_s": upd,
                        "perf/env_steps_per_s": ro.env_steps / max(rolled + upd, 1e-9)})
        session.log(c.env_steps, row, env_steps=c.env_steps)
        session.progress(1, **({"eval": c.last_eval["eval/return_mean"]} if c.last_eval else {}))
        if due(cfg.checkpoint_every, c.itr - 1, c.itr) or done_all:
            session.save(c.env_steps, state={"agent": agent.state_dict(), "envs": envs.state_dict()},
                         parts={**loop_parts(), **dict(parts or {})},
                         meta={"iteration": c.itr, "env_steps": c.env_steps, "gradient_steps": agent.num_updates})
    if c.last_eval is None:  # resumed at the end: evaluate once more for the summary
        c.last_eval = evaluate_agent()
    last, initial = c.last_eval, c.initial_eval
    wall = session.wall_s()
    return session.finish({
        "env_id": envs.env_id, "iterations": c.itr, "env_steps": c.env_steps, "gradient_steps": agent.num_updates,
        "wall_s": wall, "env_steps_per_s": c.env_steps / max(wall, 1e-9),
        "eval_return_mean": last["eval/return_mean"], "eval_return_std": last["eval/return_std"],
        "normalized_score": last.get("eval/normalized_score"),
        "best_eval_return": max(float(c.best_eval), last["eval/return_mean"]),
        "initial_eval_return": initial["eval/return_mean"] if initial else None,
        "initial_normalized_score": initial.get("eval/normalized_score") if initial else None,
        "eval_episodes": cfg.eval_episodes, "eval_mean_path": eval_mean_path, "time_breakdown_s": dict(timers),
        **summary()})
