"""Environments: ``make_env`` for Gymnasium MuJoCo v5, DeepMind Control (shimmy), Fetch v4 and users' own
Gymnasium envs (``module:EnvId``), and a synchronous vector env with explicit, seeded resets."""

from diffrl.envs.make import env_signature, make_env
from diffrl.envs.vector import StepResult, VecEnv

__all__ = ["make_env", "env_signature", "VecEnv", "StepResult"]
