"""Behaviour cloning: a deterministic tanh policy regressed onto the dataset's actions (CORL's BC)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffrl.agents.base import Agent, Params, check_hidden
from diffrl.agents.nets import DeterministicActor
from diffrl.config import check_positive
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class BCParams(Params):
    """BC hyper-parameters (CORL's any-percent BC)."""

    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of the policy"""
    actor_lr: float = 3e-4
    """policy learning rate (Adam)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hidden(self.hidden)
        check_positive("actor_lr", self.actor_lr)


class BC(Agent):
    """``update`` minimises the mean squared error between ``pi(obs)`` and the dataset action."""

    def __init__(self, obs_dim: int, act_dim: int, params: BCParams, device: torch.device | str = "cpu") -> None:
        self.p = params
        self.device = torch.device(device)
        self.actor = DeterministicActor(obs_dim, act_dim, tuple(params.hidden)).to(self.device)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=params.actor_lr)
        self.nets = {"actor": self.actor}
        self.optims = {"actor": self.actor_opt}
        self.num_updates = 0

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        return self.actor(self._obs_tensor(obs)).cpu().numpy()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.num_updates += 1
        loss = F.mse_loss(self.actor(batch.obs), batch.act)
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        return {"actor_loss": loss.detach()}

    def extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
