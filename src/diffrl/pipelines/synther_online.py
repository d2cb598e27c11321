"""SynthER online (Lu, Ball et al. 2023): SAC or REDQ at a high update-to-data ratio on batches that mix real and
diffusion-generated transitions.

    diffrl synther online --env ID [--agent sac|redq] [--utd G] [--synthetic-ratio R] [--retrain-every K]
        [--num-samples N] [--diffusion-steps S] [--warm-start] [--preset quick|paper] [--seed S]

The online loop of ``diffrl train`` with one addition (``augment.synther.SynthERGenerator``): every
``retrain_every`` env steps a diffusion model is trained on the whole real buffer (fresh normaliser statistics),
and the synthetic buffer is replaced by ``num_samples`` new samples; each batch then takes ``synthetic_ratio`` of
its rows from it (real only before the first retrain). ``--synthetic-ratio 0`` trains no model at all: the same
loop, agent and update-to-data ratio on real data only, the control that isolates the synthetic data. The agent
follows SynthER's code, which runs SAC through REDQ's (see ``SynthEROnlineSettings.actor_q``). ``summary.json``
and ``metrics.csv`` break the wall clock down into env stepping, agent updates, diffusion training and sampling.
Resume is exact (the synthetic buffer and, with ``--warm-start``, the diffusion trainer are in the checkpoint).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from diffrl.augment import TransitionLayout
from diffrl.augment.synther import GeneratorSettings, SynthERGenerator
from diffrl.config import check, check_positive
from diffrl.data import ReplayBuffer
from diffrl.diffusion.trainer import TrainerSettings
from diffrl.envs import make_env
from diffrl.envs.termination import termination_rule
from diffrl.envs.vector import obs_dim
from diffrl.pipelines import online
from diffrl.pipelines.common import DiffusionSettings, extend_configs
from diffrl.registry import Command, System
from diffrl.runs.device import resolve_device

PREFIX = "synther_online_"


@dataclasses.dataclass(frozen=True)
class SynthEROnlineSettings(DiffusionSettings):
    """SynthER's online settings (config/online/sac_synther_*.gin)."""

    utd: int = 20
    """update-to-data ratio (SynthER: 20)"""
    synthetic_ratio: float = 0.5
    """fraction of each batch drawn from the synthetic buffer (SynthER: 0.5)"""
    retrain_every: int = 10_000
    """retrain the diffusion model and regenerate every this many env steps (SynthER: 10k)"""
    num_samples: int = 1_000_000
    """synthetic transitions after each retrain (SynthER's README: 1M)"""
    diffusion_width: int = 1024
    """residual MLP width (SynthER online: 1024)"""
    diffusion_dim_t: int = 256
    """time embedding width (SynthER online: 256)"""
    warm_start: bool = False
    """continue the previous diffusion model at each retrain instead of training from scratch (not in the paper;
    with a quarter of the diffusion steps it lost return on HalfCheetah: see benchmarks/RESULTS.md)"""
    model_terminals: bool | None = None
    """model the terminal flag; None: as SynthER's configs, yes for Gymnasium tasks, no for DMC (never terminates)"""
    normalize_reward: bool | None = None
    """z-score rewards inside the diffusion model; None: as SynthER's configs, yes for Gymnasium tasks, no for DMC
    (its ``skip_reward_norm``)"""
    # SynthER runs SAC through REDQ's code (redq_sac with num_Q = 2): the actor maximises the mean of the critics,
    # and each update computes the critic's target and the actor's loss from the same pre-update networks, the
    # actor and temperature stepping before the critics. `diffrl train sac` keeps SAC's own choices (min, critic
    # first); --actor-q min --no-actor-first --no-target-first gives them here.
    actor_q: Literal["min", "mean"] = "mean"
    """how the actor aggregates the critics: mean (REDQ's code, which SynthER runs) or min (SAC)"""
    actor_first: bool = True
    """update actor and temperature before the critics, from the pre-update critics (REDQ's code, as SynthER)"""
    target_first: bool = True
    """compute the critics' target before the actor step, from the pre-update actor (REDQ's code, as SynthER)"""

    def resolved(self, env_id: str) -> tuple[bool, bool]:
        """``(model_terminals, normalize_reward)`` for ``env_id``: the set values, else SynthER's per-family ones."""
        gym_task = not env_id.startswith("dm_control/")
        return (gym_task if self.model_terminals is None else self.model_terminals,
                gym_task if self.normalize_reward is None else self.normalize_reward)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.synthetic_ratio <= 1.0, "synthetic_ratio", self.synthetic_ratio, "in [0, 1]")
        for name in ("retrain_every", "num_samples"):
            check_positive(name, getattr(self, name))

    def generator_settings(self, layout: TransitionLayout, normalize_reward: bool = True) -> GeneratorSettings:
        skip = [d for d in (layout.terminal_index,) if d is not None]
        if not normalize_reward:
            skip.append(layout.reward_index)
        sampler: dict[str, Any] = {"sampler": self.sampler, "steps": self.sample_steps}
        spec = {"type": "edm", "event_shape": [layout.dim],
                "denoiser": {"type": "resmlp", "width": self.diffusion_width, "depth": self.diffusion_depth,
                             "dim_t": self.diffusion_dim_t},
                "normalizer": {"kind": "zscore", "skip_dims": skip}, "sampler": sampler}
        # the real buffer stays far below SynthER's 800k-transition threshold for the larger batch
        trainer = TrainerSettings(steps=self.diffusion_steps, batch_size=self.diffusion_batch_for(0),
                                  lr=self.diffusion_lr, bf16=self.bf16)
        return GeneratorSettings(spec=spec, trainer=trainer, num_samples=self.num_samples, sampler=sampler,
                                 sample_batch_size=self.sample_batch_size, warm_start=self.warm_start,
                                 out_of_range=self.out_of_range, terminals=self.terminals,
                                 rule=termination_rule(self.env, required=self.terminals == "rule"))


ALGOS: dict[str, type] = extend_configs(
    SynthEROnlineSettings, {name: online.ALGOS[name][0] for name in ("sac", "redq")}, __name__,
    "``diffrl synther online --agent {name}``: {what} with SynthER.")
for _cls in ALGOS.values():
    globals()[_cls.__name__] = _cls

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {
        # minutes on 2 CPU cores: two retrains of a width-256 model, 50k samples with 32-evaluation sampling
        "quick": dict(steps=6_000, learning_starts=1_000, eval_every=2_000, eval_episodes=3, checkpoint_every=2_000,
                      retrain_every=2_000, num_samples=50_000, diffusion_steps=3_000, diffusion_width=256,
                      diffusion_dim_t=128, sampler="dpmpp_2m_sde", sample_steps=32),
        # SynthER's settings (100k env steps; DMC: 300k in its code)
        "paper": dict(steps=100_000, learning_starts=5_000, eval_every=5_000, eval_episodes=10,
                      retrain_every=10_000, num_samples=1_000_000, diffusion_steps=100_000, diffusion_width=1024,
                      sampler="heun", sample_steps=128)}
    for name in ALGOS}


class SynthERAugment:
    """Schedules the generator's retrains in the online loop (``online.Augment``)."""

    def __init__(self, cfg: Any, generator: SynthERGenerator) -> None:
        self.cfg, self.generator = cfg, generator

    def sampler(self, real: ReplayBuffer) -> Any:
        return self.generator.sampler(real, self.cfg.synthetic_ratio)

    def after_step(self, env_steps: int, before: int, real: ReplayBuffer) -> dict[str, float]:
        if self.cfg.synthetic_ratio == 0.0:  # real data only (a control arm): no model is trained or sampled
            return {}
        # Retrain at the first env step after every `retrain_every` boundary, before that step's updates. SynthER
        # retrains right after the boundary step's updates: the same updates see the new samples, but it also
        # retrains at the run's last step, where nothing uses the model (a third of the quick preset's diffusion
        # time). Counting boundaries up to `before` makes that one wasted retrain disappear without making a run
        # depend on its step budget: resumed with more steps, it retrains at the next step instead.
        if before // self.cfg.retrain_every > self.generator.retrains and len(real) > 0:
            return self.generator.retrain(real)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.generator.state_dict()

    def load_state_dict(self, state: dict[str, Any], real: ReplayBuffer) -> None:
        self.generator.load_state_dict(state, real)

    def timers(self) -> dict[str, float]:
        return dict(self.generator.timers)


def algo_name(cfg: Any) -> str:
    return online.algo_name(cfg)


def run(cfg: Any) -> Path:
    """Online SAC/REDQ with SynthER; returns the run directory."""
    env = make_env(cfg.env, max_episode_steps=cfg.max_episode_steps)
    model_terminals, normalize_reward = cfg.resolved(cfg.env)
    layout = TransitionLayout(obs_dim(env.observation_space), obs_dim(env.action_space), terminals=model_terminals)
    env.close()
    generator = SynthERGenerator(layout, cfg.generator_settings(layout, normalize_reward), resolve_device(cfg.device),
                                 cfg.seed)
    return online.run(cfg, SynthERAugment(cfg, generator), pipeline=PREFIX + algo_name(cfg))


SYSTEM = System("synther", "SynthER: upsampled offline data, or online SAC/REDQ with synthetic data", commands=(
    Command("online", ALGOS, run, PRESETS, pipelines={PREFIX + name: cls for name, cls in ALGOS.items()},
            algo_flag="--agent", default_algo="sac", evaluate=online.evaluate_run, summary_lines=online.summary_lines,
            help="online SAC/REDQ at a high update-to-data ratio on half-synthetic batches"),))
