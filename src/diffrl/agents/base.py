"""The Agent contract and what every agent shares: a complete, checked ``state_dict``."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.errors import CheckpointError, ConfigError


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of hyper-parameter dataclasses; subclasses validate in ``__post_init__`` and call super."""

    def __post_init__(self) -> None:
        pass


def check_hidden(hidden: tuple[int, ...]) -> None:
    if len(hidden) == 0 or any(int(h) <= 0 for h in hidden):
        raise ConfigError(f"invalid hidden={hidden!r}: it must be one or more positive layer widths.")


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- (1 - tau) target + tau source`` (one fused op over all tensors)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


class Agent:
    """Base class: subclasses fill ``self.nets`` (modules) and ``self.optims`` (optimizers) and implement
    ``act`` and ``update``. Counters and other tensors go in ``extra_state`` / ``load_extra_state``."""

    nets: dict[str, nn.Module]
    optims: dict[str, torch.optim.Optimizer]
    device: torch.device

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions in [-1, 1] for a batch of observations ``(N, Do) -> (N, Da)``."""
        raise NotImplementedError

    def update(self, batch: Any) -> dict[str, torch.Tensor]:
        """One gradient update; returns detached scalar metrics."""
        raise NotImplementedError

    def _obs_tensor(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(obs, dtype=torch.float32, device=self.device)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: networks, target nets, optimizers, counters."""
        return {"nets": {k: m.state_dict() for k, m in self.nets.items()},
                "optims": {k: o.state_dict() for k, o in self.optims.items()},
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a network of another shape is a :class:`CheckpointError`."""
        for name, module in self.nets.items():
            if name not in state["nets"]:
                raise CheckpointError(f"the checkpoint has no network {name!r}; it was written by another agent.")
            own = module.state_dict()
            saved = state["nets"][name]
            for key, value in own.items():
                if key not in saved:
                    raise CheckpointError(f"the checkpoint's {name} lacks {key}; it was written by another "
                                          "agent or version.")
                if tuple(saved[key].shape) != tuple(value.shape):
                    raise CheckpointError(f"the checkpoint's {name}.{key} has shape {tuple(saved[key].shape)} but "
                                          f"this config builds {tuple(value.shape)}; network sizes differ from "
                                          "the saved run.")
            module.load_state_dict(saved)
        for name, opt in self.optims.items():
            # deepcopy: torch keeps the given moment tensors, which would alias another live agent's
            opt.load_state_dict(copy.deepcopy(state["optims"][name]))
        self.load_extra_state(state["extra"])
