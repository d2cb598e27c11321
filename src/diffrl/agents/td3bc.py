"""TD3+BC (Fujimoto & Gu, 2021, arXiv:2106.06860): TD3 whose actor also regresses onto dataset actions.

Actor loss ``-lambda * Q_1(s, pi(s)).mean() + (pi(s) - a)^2.mean()`` with ``lambda = alpha / mean|Q_1|``
(eq. (3)); the paper also normalises states with the dataset's mean and std (done by the pipeline).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffrl.agents.td3 import TD3, TD3Params
from diffrl.config import check_positive
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class TD3BCParams(TD3Params):
    """TD3+BC hyper-parameters (the paper's; exploration noise is unused offline)."""

    alpha: float = 2.5
    """weight of the Q term: lambda = alpha / mean |Q| (the paper's alpha)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("alpha", self.alpha)


class TD3BC(TD3):
    """:class:`TD3` with the behaviour-cloning actor loss."""

    def _actor_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pi = self.actor(batch.obs)
        q = self.critic(batch.obs, pi)[0]
        lmbda = self.p.alpha / q.abs().mean().detach()
        bc = F.mse_loss(pi, batch.act)
        return -lmbda * q.mean() + bc, {"bc_loss": bc.detach(), "lambda": lmbda}
