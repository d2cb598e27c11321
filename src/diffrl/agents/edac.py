"""EDAC (An et al., 2021, arXiv:2110.01548): SAC with N critics whose action-gradients are diversified.

Critic loss: the N critics' TD errors (target = min over all N, minus the entropy term) plus
``eta / (N - 1) * sum_{i != j} <g_i, g_j>`` averaged over the batch, ``g_i`` the normalised gradient of
``Q_i(s, a)`` with respect to the dataset action (eq. (6)). One ensemble forward serves both terms.
As CORL (which found it better, following the EDAC code), actor and temperature are updated before the critic.
Differences from CORL kept on purpose: the temperature loss reuses the actor's sample instead of drawing a
second one, log-std is clipped to [-20, 2] (CORL: [-5, 2]) and layers use PyTorch's default init (CORL: bias
0.1, output layers U(+-3e-3)).
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.agents.sac import SAC, SACParams
from diffrl.config import check_non_negative
from diffrl.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class EDACParams(SACParams):
    """EDAC hyper-parameters (CORL's defaults)."""

    hidden: tuple[int, ...] = (256, 256, 256)
    """hidden layer widths of the policy"""
    critic_hidden: tuple[int, ...] | None = (256, 256, 256)
    """hidden layer widths of the critics"""
    num_critics: int = 10
    """critics in the ensemble (N)"""
    target_subset: int = 10
    """the target takes the min over all N critics"""
    eta: float = 1.0
    """weight of the gradient-diversity term"""
    actor_first: bool = True
    """actor and temperature before the critic (CORL / the EDAC code's order)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative("eta", self.eta)


class EDAC(SAC):
    """SAC with the ensemble gradient-diversity regulariser."""

    p: EDACParams

    def _critic_loss(self, batch: Batch, alpha: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self._target(batch, alpha)
        n = self.p.num_critics
        obs = batch.obs.unsqueeze(0).expand(n, -1, -1)  # (N, B, Do)
        act = batch.act.unsqueeze(0).expand(n, -1, -1).clone().requires_grad_(True)  # (N, B, Da)
        q = self.critic(obs, act)  # (N, B)
        td_loss = (q - target).pow(2).mean(1).sum()
        metrics = {"q_mean": q.detach().mean(), "td_loss": td_loss.detach()}
        if self.p.eta == 0 or n < 2:
            return td_loss, metrics
        grad = torch.autograd.grad(q.sum(), act, create_graph=True)[0]  # (N, B, Da)
        grad = grad / (grad.norm(dim=-1, keepdim=True) + 1e-10)
        sim = torch.einsum("nbd,mbd->bnm", grad, grad)  # (B, N, N) pairwise cosine similarities
        off_diag = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)  # (B,)
        diversity = off_diag.mean() / (n - 1)
        metrics["diversity_loss"] = diversity.detach()
        return td_loss + self.p.eta * diversity, metrics
