"""A toy system, defined inside the tests, registered at run time and driven through the CLI (test_registry.py).

It is the example of docs/adding-a-system.md: a linear policy on ``envs_for_tests:ToyReach-v0`` improved by random
search (one perturbation per step, kept when it scores better on a seeded episode), written on the run session
and declared with ``SYSTEM``. Nothing in ``diffrl`` knows it: ``registry.register("toy", "toy_system")`` is all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

import envs_for_tests  # noqa: F401  (registers ToyReach-v0)
from diffrl.config import check_positive
from diffrl.envs import env_signature, make_env
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig, evaluate_checkpoint
from diffrl.registry import Command, System
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RunSession, due

ENV = "envs_for_tests:ToyReach-v0"


@dataclasses.dataclass(frozen=True)
class ToyConfig(RunConfig):
    """``diffrl toy``: random search for a linear policy on a toy reaching task."""

    steps: int = 40
    """search steps"""
    seed: int = 0
    """run seed"""
    sigma: float = 0.3
    """perturbation scale"""
    eval_every: int = 10
    """evaluate every this many steps"""
    eval_episodes: int = 2
    """evaluation episodes"""
    log_every: int = 5
    """write a metrics row every this many steps"""
    checkpoint_every: int = 10
    """write a checkpoint every this many steps"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("steps", self.steps)
        check_positive("sigma", self.sigma)


class Linear:
    """``act(obs) = clip(W obs)``: the policy contract of :func:`diffrl.eval.evaluate`."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return np.clip(np.asarray(obs, np.float32) @ self.w.numpy().T, -1.0, 1.0)


@dataclasses.dataclass
class Counters:
    step: int = 0
    best: float = -np.inf
    last_eval: dict[str, float] | None = None


def run(cfg: ToyConfig) -> Path:
    """Search, log, evaluate and checkpoint on the run session; returns the run directory."""
    seed_everything(cfg.seed)
    env = make_env(ENV)
    w = torch.zeros(env.action_space.shape[0], env.observation_space.shape[0])
    session = RunSession(cfg, "toy", ENV, signature=env_signature(ENV, env))
    if session.resumed:
        w = session.parts["state"]["w"]
    c = session.start(Counters())
    session.progress_bar(cfg.steps, c.step, desc="toy", unit="step")
    while c.step < cfg.steps:
        before = c.step
        candidate = w + cfg.sigma * torch.randn_like(w)  # the global torch RNG: restored exactly on resume
        score_w, score_c = (evaluate(Linear(x), env, 1, seed=cfg.seed + c.step).return_mean for x in (w, candidate))
        if score_c > score_w:
            w = candidate
        c.step += 1
        row: dict[str, float] = {}
        if due(cfg.eval_every, before, c.step):
            c.last_eval = evaluate(Linear(w), env, cfg.eval_episodes, seed=cfg.seed).metrics()
            c.best = max(c.best, c.last_eval["eval/return_mean"])
            row.update(c.last_eval)
        if due(cfg.log_every, before, c.step):
            row["train/score"] = max(score_w, score_c)
            session.check_finite(row, c.step)
        session.log(c.step, row)
        session.progress(1)
        if due(cfg.checkpoint_every, before, c.step) or c.step == cfg.steps:
            session.save(c.step, state={"w": w})
    env.close()
    last = c.last_eval or {}
    return session.finish({"env_id": ENV, "gradient_steps": c.step, "env_steps": 0, "updates_per_s": 0.0,
                           "eval_return_mean": last.get("eval/return_mean"),
                           "eval_return_std": last.get("eval/return_std"), "eval_episodes": cfg.eval_episodes,
                           "best_eval_return": float(c.best)})


def evaluate_run(run_dir: Path, cfg: ToyConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    return evaluate_checkpoint(run_dir, ENV, make_env(ENV), lambda manifest, parts: Linear(parts["state"]["w"]),
                               episodes, cfg.seed if seed is None else seed)


SYSTEM = System("toy", "random search on a toy reaching task (a test system)", commands=(
    Command("", {"": ToyConfig}, run, {"": {"quick": dict(steps=20)}}, pipelines={"toy": ToyConfig},
            evaluate=evaluate_run),))
