"""Update rules. Every agent has ``act(obs, deterministic)``, ``update(batch) -> dict`` of detached scalars,
and a complete ``state_dict()`` (networks, target networks, optimizers, temperature, counters).

Online: SAC, REDQ, TD3. Offline: BC, TD3+BC, IQL, CQL, EDAC. Over diffusion chunk policies (DPPO's baselines):
Diffusion-QL, IDQL, DIPO, QSM (on :mod:`diffrl.agents.diffusion_q`), DRWR and DAWR (:mod:`diffrl.agents.rwr`); the
PPO family is in :mod:`diffrl.agents.ppo`, :mod:`diffrl.agents.dppo` and :mod:`diffrl.agents.dpoer`.
"""

from diffrl.agents.base import Agent
from diffrl.agents.bc import BC, BCParams
from diffrl.agents.cql import CQL, CQLParams
from diffrl.agents.dipo import DIPO, DIPOParams
from diffrl.agents.dql import DQL, DQLParams
from diffrl.agents.edac import EDAC, EDACParams
from diffrl.agents.idql import IDQL, IDQLParams
from diffrl.agents.iql import IQL, IQLParams
from diffrl.agents.qsm import QSM, QSMParams
from diffrl.agents.rwr import DAWR, DRWR, AWRParams, RWRParams
from diffrl.agents.sac import REDQ, SAC, REDQParams, SACParams
from diffrl.agents.td3 import TD3, TD3Params
from diffrl.agents.td3bc import TD3BC, TD3BCParams

__all__ = ["Agent", "SAC", "SACParams", "REDQ", "REDQParams", "TD3", "TD3Params", "BC", "BCParams", "TD3BC",
           "TD3BCParams", "IQL", "IQLParams", "CQL", "CQLParams", "EDAC", "EDACParams", "DQL", "DQLParams", "IDQL",
           "IDQLParams", "DIPO", "DIPOParams", "QSM", "QSMParams", "DRWR", "RWRParams", "DAWR", "AWRParams"]
