"""SynthER's online generator: a transition diffusion model retrained on the real replay buffer, whose samples
replace a separate synthetic buffer after every retrain.

The real buffer is only read (``ReplayBuffer.all``): generation writes to the generator's own buffer, so real
rollouts cannot be corrupted (the bug SynthER fixed in its PR #10, where the insertion loop overwrote the live
observation). Timeouts never become terminals (the real buffer stores ``terminated`` only); modelled terminals
are thresholded at 0.5.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from diffrl.augment.transitions import TransitionLayout, generate_transitions
from diffrl.data import MixedSampler, ReplayBuffer
from diffrl.diffusion.models import DiffusionModel
from diffrl.diffusion.spec import build_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs.termination import TerminationRule
from diffrl.runs.seeding import derive_seed


@dataclasses.dataclass(frozen=True)
class GeneratorSettings:
    """What the generator needs (a pipeline config maps its flags onto it)."""

    spec: dict[str, Any]
    """diffusion model spec (diffrl.diffusion.spec); its event_shape must match the layout"""
    trainer: TrainerSettings
    """optimisation of each retrain (``trainer.steps`` gradient steps per retrain)"""
    num_samples: int
    """synthetic transitions generated after each retrain (the synthetic buffer's size)"""
    sampler: dict[str, Any]
    """sampler options: sampler, steps, ... (model.sample keywords)"""
    sample_batch_size: int = 100_000
    warm_start: bool = False
    """continue the previous model (weights, EMA, optimiser) instead of training a fresh one"""
    out_of_range: str = "clip"
    """generated actions outside the bounds: clip (diffrl's default), keep (SynthER's code) or reject and draw again
    (``generate_transitions`` says why clip is the default)"""
    terminals: str = "model"
    """synthetic terminal flags: the model's (SynthER) or ``rule``'s"""
    rule: TerminationRule | None = None
    """the env's known termination rule (``diffrl.envs.termination``): the labels with ``terminals='rule'``, else
    a diagnostic (how often the model's flags disagree with it)"""


class SynthERGenerator:
    """Owns the synthetic buffer and the diffusion model; ``retrain(real)`` refreshes both."""

    def __init__(self, layout: TransitionLayout, settings: GeneratorSettings, device: torch.device,
                 seed: int) -> None:
        if settings.spec["event_shape"] != [layout.dim]:
            raise ValueError(f"model event shape {settings.spec['event_shape']} does not match the layout "
                             f"({layout.dim})")
        self.layout, self.settings, self.device, self.seed = layout, settings, device, seed
        self.synthetic = ReplayBuffer.for_transitions(settings.num_samples, layout.obs_dim, layout.act_dim,
                                                      device=device, seed=derive_seed(seed, 7))
        self.retrains = 0
        self.trainer: DiffusionTrainer | None = None
        self.timers = {"diffusion_train_s": 0.0, "sampling_s": 0.0}

    def sampler(self, real: ReplayBuffer, synthetic_ratio: float) -> MixedSampler:
        """Batches with ``synthetic_ratio`` of their rows synthetic (real only until the first retrain)."""
        return MixedSampler(real, self.synthetic, synthetic_ratio)

    def _real_vectors(self, real: ReplayBuffer) -> torch.Tensor:
        b = real.all()
        arrays = {"observations": b["obs"], "actions": b["act"], "rewards": b["rew"],
                  "next_observations": b["next_obs"], "terminals": b["done"]}
        return torch.as_tensor(self.layout.join({k: v.cpu().numpy() for k, v in arrays.items()}), device=self.device)

    def _model(self, data: torch.Tensor) -> DiffusionTrainer:
        """A trainer for this retrain: fresh (SynthER) or the previous one continued (warm start)."""
        seed = derive_seed(self.seed, 1000 + self.retrains)
        if self.settings.warm_start and self.trainer is not None:
            trainer = self.trainer
            trainer.data = data
            trainer.step = 0  # a new cosine schedule over this retrain's steps
        else:
            self.trainer = None  # free the previous model, EMA and optimiser before building the next one
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the agent's global RNG
                torch.manual_seed(seed)
                model: DiffusionModel = build_model(self.settings.spec).to(self.device)
            trainer = DiffusionTrainer(model, data, self.settings.trainer, seed=seed)
        # fresh statistics of the whole real buffer at every retrain (SynthER's update_normalizer)
        trainer.model.normalizer.fit(data)
        trainer.ema.shadow.normalizer.load_state_dict(trainer.model.normalizer.state_dict())
        if self.settings.warm_start and self.retrains > 0:
            # the continued weights were averaged under the old statistics: restart the average from the live
            # weights, so the EMA model never mixes networks trained for differently normalised inputs
            trainer.ema.reset()
        return trainer

    def retrain(self, real: ReplayBuffer) -> dict[str, float]:
        """Train on the whole real buffer, then replace the synthetic buffer with fresh samples."""
        t0 = time.perf_counter()
        data = self._real_vectors(real)
        trainer = self._model(data)
        losses = [trainer.train_step() for _ in range(self.settings.trainer.steps)]
        self.trainer = trainer
        t1 = time.perf_counter()
        model = trainer.ema.shadow
        model.amp_dtype = torch.bfloat16 if self.settings.trainer.bf16 else None
        samples, figures = generate_transitions(
            model, self.layout, self.settings.num_samples, out_of_range=self.settings.out_of_range,
            terminals=self.settings.terminals, rule=self.settings.rule,
            seed=derive_seed(self.seed, 2000 + self.retrains), batch_size=self.settings.sample_batch_size,
            **self.settings.sampler)
        self.synthetic.ptr = self.synthetic.size = 0  # replaced, not appended (SynthER's reset_diffusion_buffer)
        self.synthetic.add_batch(obs=samples["observations"], act=samples["actions"], rew=samples["rewards"],
                                 next_obs=samples["next_observations"], done=samples["terminals"])
        t2 = time.perf_counter()
        self.retrains += 1
        self.timers["diffusion_train_s"] += t1 - t0
        self.timers["sampling_s"] += t2 - t1
        tail = torch.stack(losses[-max(len(losses) // 10, 1):]).mean()
        return {"diffusion/loss": float(tail), "diffusion/retrains": float(self.retrains),
                "diffusion/train_s": t1 - t0, "diffusion/sample_s": t2 - t1,
                "diffusion/synthetic_terminal_rate": float(samples["terminals"].mean()),
                "diffusion/out_of_range_fraction": figures["out_of_range_fraction"],
                **({"diffusion/terminal_rule_disagreement": figures["terminal_rule_disagreement"]}
                   if figures["terminal_rule_disagreement"] is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"synthetic": self.synthetic.state_dict(), "retrains": self.retrains, "timers": dict(self.timers),
                "trainer": self.trainer.state_dict() if (self.settings.warm_start and self.trainer) else None}

    def load_state_dict(self, state: dict[str, Any], real: ReplayBuffer) -> None:
        self.synthetic.load_state_dict(state["synthetic"])
        self.retrains = int(state["retrains"])
        self.timers = {k: float(v) for k, v in state["timers"].items()}
        if state.get("trainer") is not None:
            model = build_model(self.settings.spec).to(self.device)
            self.trainer = DiffusionTrainer(model, self._real_vectors(real), self.settings.trainer)
            self.trainer.load_state_dict(state["trainer"])
