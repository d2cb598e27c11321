"""Tensors at rest: the Batch contract and the replay buffer."""

from diffrl.data.batch import GOAL_KEYS, TRANSITION_KEYS, Batch
from diffrl.data.replay import MixedSampler, ReplayBuffer

__all__ = ["Batch", "TRANSITION_KEYS", "GOAL_KEYS", "ReplayBuffer", "MixedSampler"]
