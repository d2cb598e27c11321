"""Transitions as flat vectors for a diffusion model, in SynthER's column order.

``[obs (Do), action (Da), reward (1), next_obs (Do), terminal (1, optional)]``: SynthER's ``make_inputs``
order, with the terminal flag last so it can be left out of normalisation and thresholded on the way back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from diffrl.errors import ConfigError, DatasetError
from diffrl.runs.seeding import derive_seed

if TYPE_CHECKING:
    from diffrl.diffusion.models import DiffusionModel
    from diffrl.envs.termination import TerminationRule

SAMPLE_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


@dataclasses.dataclass(frozen=True)
class TransitionLayout:
    """Where each part of a transition sits in the vector, and how to turn generated vectors back into data."""

    obs_dim: int
    act_dim: int
    terminals: bool = True
    """model the terminal flag (a last column, not normalised, thresholded when splitting)"""
    action_low: float = -1.0
    action_high: float = 1.0
    """bounds generated actions are clipped to (diffrl's envs act in [-1, 1])"""

    @property
    def dim(self) -> int:
        return 2 * self.obs_dim + self.act_dim + 1 + int(self.terminals)

    @property
    def reward_index(self) -> int:
        return self.obs_dim + self.act_dim

    @property
    def terminal_index(self) -> int | None:
        return self.dim - 1 if self.terminals else None

    def join(self, data: dict[str, np.ndarray] | Any) -> np.ndarray:
        """``(N, dim)`` float32 from a mapping or object with SynthER's keys (an ``OfflineDataset`` works)."""
        get = data.get if isinstance(data, dict) else lambda k: getattr(data, k)
        obs, act = np.asarray(get("observations")), np.asarray(get("actions"))
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim or act.ndim != 2 or act.shape[1] != self.act_dim:
            raise DatasetError(f"transitions have observation/action dims {obs.shape[1:]} / {act.shape[1:]}, the "
                               f"layout expects ({self.obs_dim},) / ({self.act_dim},).")
        parts = [obs, act, np.asarray(get("rewards")).reshape(-1, 1), np.asarray(get("next_observations"))]
        if self.terminals:
            parts.append(np.asarray(get("terminals")).reshape(-1, 1))
        return np.concatenate([p.astype(np.float32) for p in parts], axis=1)

    def split(self, x: np.ndarray, terminal_threshold: float = 0.5, clip_actions: bool = True) -> dict[str, np.ndarray]:
        """Generated vectors ``(N, dim)`` back to SynthER's npz layout: terminals thresholded to 0/1 (zeros when
        not modelled), actions clipped to the bounds. Rewards and terminals are 1-D."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DatasetError(f"generated samples have shape {x.shape}, the layout expects (N, {self.dim}).")
        o, a = self.obs_dim, self.act_dim
        actions = x[:, o:o + a]
        if clip_actions:
            actions = np.clip(actions, self.action_low, self.action_high)
        if self.terminals:
            terminals = (x[:, -1] > terminal_threshold).astype(np.float32)
        else:
            terminals = np.zeros(len(x), np.float32)
        return {"observations": x[:, :o].copy(), "actions": actions.copy(), "rewards": x[:, o + a].copy(),
                "next_observations": x[:, o + a + 1:o + a + 1 + o].copy(), "terminals": terminals}

    def in_range(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` mask of generated vectors whose every action entry lies within the bounds."""
        actions = np.asarray(x)[:, self.obs_dim:self.obs_dim + self.act_dim]
        return np.all((actions >= self.action_low) & (actions <= self.action_high), axis=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransitionLayout:
        return cls(**d)


OUT_OF_RANGE = ("clip", "reject", "keep")
TERMINALS = ("model", "rule")
MIN_ACCEPTANCE = 0.02
"""``reject`` gives up when fewer than this fraction of the samples drawn so far are in range"""


def generate_transitions(model: DiffusionModel, layout: TransitionLayout, num: int, *, out_of_range: str = "clip",
                         terminals: str = "model", rule: TerminationRule | None = None, seed: int = 0,
                         batch_size: int = 100_000, progress: bool = False,
                         **options: Any) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """``num`` generated transitions in SynthER's npz layout, and generation figures.

    ``out_of_range`` decides what happens to a sample with an action outside the bounds: ``clip`` it to the bounds
    (diffrl's default, not SynthER's: the envs clip executed actions, so the bound is the action that would have
    produced the sample's next state, and the agents' actors never propose actions beyond it), ``keep`` it as
    generated (SynthER's code: its z-score normaliser does not clamp), or ``reject`` it and draw more until ``num``
    are in range. Clipping piles the overshooting mass onto the bounds (a sizeable share of Hopper samples, where
    the real data has almost none: benchmarks/RESULTS.md); rejection keeps the in-range part of the model's
    distribution instead. The first draw is the same in every mode (seed ``seed``); ``reject`` tops it up with
    draws seeded from ``seed``.

    ``terminals``: ``model`` keeps the model's thresholded terminal column (SynthER); ``rule`` labels each
    transition by the env's known termination ``rule`` applied to its generated next observation
    (``diffrl.envs.termination``). Given a ``rule``, the figures report in both modes how often the model's flag
    disagrees with it.

    Figures: ``samples_per_s`` (kept samples per second, sampling included), ``out_of_range_fraction`` (of
    everything drawn), ``terminal_rate`` and ``terminal_rule_disagreement`` (None without a rule or a modelled
    terminal column).
    """
    from diffrl.diffusion.samplers import generate

    if out_of_range not in OUT_OF_RANGE:
        raise ConfigError(f"out_of_range must be one of {', '.join(OUT_OF_RANGE)}, got {out_of_range!r}.")
    if terminals not in TERMINALS:
        raise ConfigError(f"terminals must be one of {', '.join(TERMINALS)}, got {terminals!r}.")
    if terminals == "rule" and rule is None:
        raise ConfigError("terminals='rule' needs the env's termination rule; none was given.")
    t0 = time.perf_counter()
    x, _ = generate(model, num, batch_size=batch_size, seed=seed, progress=progress, **options)
    ok = layout.in_range(x)
    drawn, accepted = len(x), int(ok.sum())
    if out_of_range == "reject":
        kept, draw = [x[ok]], 0
        while accepted < num:
            if accepted < MIN_ACCEPTANCE * drawn:
                raise ConfigError(f"only {accepted} of {drawn} generated transitions have in-range actions: the "
                                  "model is too poor to reject from; train it longer or use out_of_range=clip.")
            draw += 1
            more, _ = generate(model, math.ceil((num - accepted) * drawn / accepted * 1.1), batch_size=batch_size,
                               seed=derive_seed(seed, draw), progress=progress, **options)
            ok = layout.in_range(more)
            kept.append(more[ok])
            drawn, accepted = drawn + len(more), accepted + int(ok.sum())
        x = np.concatenate(kept)[:num]
    samples = layout.split(x, clip_actions=out_of_range != "keep")
    figures: dict[str, float | None] = {"out_of_range_fraction": 1.0 - accepted / max(drawn, 1),
                                        "terminal_rule_disagreement": None}
    if rule is not None:
        by_rule = np.asarray(rule(samples["next_observations"]), dtype=bool)
        if layout.terminals:
            figures["terminal_rule_disagreement"] = float(np.mean(by_rule != (samples["terminals"] > 0.5)))
        if terminals == "rule":
            samples["terminals"] = by_rule.astype(np.float32)
    figures["terminal_rate"] = float(samples["terminals"].mean())
    figures["samples_per_s"] = num / max(time.perf_counter() - t0, 1e-9)
    return samples, figures
