"""Exponential moving average of a model's weights (sampling uses the average, as SynthER and DPPO do)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * weights``, every ``update_every`` calls of ``update``.

    - Until ``start_step`` the shadow is a plain copy of the weights (DPPO resets the EMA to the live weights
      until ``epoch_start_ema``; ema_pytorch, which SynthER uses, copies until ``update_after_step = 100``).
    - ``warmup_power``: if set, the decay ramps up as ``1 - (1 + k) ** -warmup_power`` (k = optimiser steps
      since ``start_step``), capped at ``decay`` -- ema_pytorch's default ramp (power 2/3), which keeps early
      averages from being dominated by the random initial weights. ``None``: constant ``decay`` (DPPO).
    - Buffers (e.g. normaliser statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, update_every: int = 10, start_step: int = 0,
                 warmup_power: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay, self.update_every = decay, update_every
        self.start_step, self.warmup_power = start_step, warmup_power
        self.model = model
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0

    def current_decay(self) -> float:
        if self.warmup_power is None:
            return self.decay
        k = max(self.step - self.start_step - 1, 0)
        return min(self.decay, 1.0 - (1.0 + k) ** -self.warmup_power)

    @torch.no_grad()
    def update(self) -> None:
        """Call once per optimiser step."""
        self.step += 1
        live = [p for p in self.model.parameters()]
        avg = [p for p in self.shadow.parameters()]
        if self.step <= self.start_step:
            torch._foreach_copy_(avg, live)
        elif self.step % self.update_every == 0:
            torch._foreach_lerp_(avg, live, 1.0 - self.current_decay())
        for b_avg, b_live in zip(self.shadow.buffers(), self.model.buffers(), strict=True):
            b_avg.copy_(b_live)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights: ``shadow := weights`` (parameters and buffers), and the
        decay ramp starts again as after ``start_step`` (the next ``update`` copies, then the ramp rises). For when
        the weights' meaning changes, e.g. the model's normaliser was refitted: an average across such changes mixes
        networks trained for different inputs."""
        self.shadow.load_state_dict(self.model.state_dict())
        self.step = self.start_step

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.step = int(state["step"])
