"""Update rules. Every agent has ``act(obs, deterministic)``, ``update(batch) -> dict`` of detached scalars,
and a complete ``state_dict()`` (networks, target networks, optimizers, temperature, counters)."""

from diffrl.agents.base import Agent
from diffrl.agents.sac import REDQ, SAC, REDQParams, SACParams
from diffrl.agents.td3 import TD3, TD3Params

__all__ = ["Agent", "SAC", "SACParams", "REDQ", "REDQParams", "TD3", "TD3Params"]
