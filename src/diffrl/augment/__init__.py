"""Producers of extra experience: the transition layout that SynthER's generator models (and later KER/GER,
the episode generator, Dydiff rollouts, quality filters)."""

from diffrl.augment.transitions import TransitionLayout

__all__ = ["TransitionLayout"]
