"""PPO-DAP's value-guided proposals (DiffPPO v6, Gao et al., arXiv:2409.01427; brief section B, step 3).

For each on-policy state the action prior draws ``num`` actions; each takes one gradient-ascent step on the critic,
``a' = clip(a + alpha grad_a Q(s, a))``; the proposals are weighted by ``softmax(beta Q(s, a'))`` over the state's
``num`` proposals (``beta`` annealed 0 -> 1 by the caller, :func:`beta_schedule`), and the top ``keep`` fraction is
kept. The policy then gets a small auxiliary likelihood loss on them; nothing here carries gradients to the prior
or the critic: the returned tensors are detached.

Shapes: ``B`` states, ``N`` proposals per state (``num``), ``k`` kept, ``Do`` / ``Da`` observation / action dim.

Deviations from the reference code (``algo/diffppo.py``, ``_vg_proposals``), each chosen for a reason:

- the gradient is the raw ``grad_a Q`` (as there, ``a + alpha * grad_a``, alpha 0.3), so the step scales with Q's
  units; ``max_move`` optionally caps its L2 norm per proposal (paper-v6's guided sampler caps ``||alpha grad||``
  at 0.1), and the moved action is clipped to the action bounds (the reference does not clip);
- the kept proposals are the ``k`` of highest weight, ties in draw order (the reference draws ``ceil(0.2 N)`` with
  replacement from the softmax): deterministic, and at ``beta = 0`` the uniform weights keep the first ``k`` draws,
  a uniformly random subset of i.i.d. prior samples, so an untrained critic does not yet pick them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

__all__ = ["Proposals", "propose", "beta_schedule"]


@dataclasses.dataclass(frozen=True)
class Proposals:
    """The kept proposals of each state, detached."""

    actions: torch.Tensor
    """``(B, k, Da)`` the moved, clipped actions"""
    weights: torch.Tensor
    """``(B, k)`` ``softmax(beta Q)`` renormalised over the kept proposals (each row sums to 1)"""
    q: torch.Tensor
    """``(B, k)`` ``Q(s, a')`` at the moved actions"""

    def take(self, rows: torch.Tensor) -> Proposals:
        """The proposals of states ``rows`` (``(b,)`` long indices), in that order."""
        return Proposals(self.actions[rows], self.weights[rows], self.q[rows])


def _q_values(q: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], obs: torch.Tensor,
              actions: torch.Tensor) -> torch.Tensor:
    values = q(obs, actions)
    if values.shape not in ((actions.shape[0],), (actions.shape[0], 1)):
        raise ValueError(f"q(obs, actions) must return ({actions.shape[0]},) or ({actions.shape[0]}, 1) values for "
                         f"{actions.shape[0]} state-action pairs, got shape {tuple(values.shape)}")
    return values.reshape(-1)


def propose(prior_sample: Callable[[torch.Tensor, int], torch.Tensor],
            q: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], obs: torch.Tensor, *, num: int = 10,
            step: float = 0.3, beta: float, keep: float = 0.2, action_low: float | torch.Tensor = -1.0,
            action_high: float | torch.Tensor = 1.0, max_move: float | None = None) -> Proposals:
    """Value-guided proposals from an action prior (module docstring).

    Args:
        prior_sample: ``(obs (B, Do), num) -> (B, num, Da)`` prior actions (e.g. a diffusion prior's sampler).
        q: ``(obs (M, Do), actions (M, Da)) -> (M,)`` or ``(M, 1)`` critic values; differentiable in the actions.
        obs: ``(B, Do)`` states.
        num: ``N``, proposals per state (the paper's K = 10).
        step: ``alpha``, the size of the gradient step on the raw ``grad_a Q`` (the paper's 0.3).
        beta: inverse temperature of the weights, ``>= 0`` (annealed 0 -> 1 by the caller).
        keep: fraction of each state's proposals kept, ``k = max(1, round(keep * num))`` (the paper's 0.2).
        action_low, action_high: bounds (scalars or ``(Da,)``) the moved actions are clipped to.
        max_move: if given, the L2 norm of each step ``alpha grad_a Q`` is capped at it (None: uncapped).
    Returns:
        :class:`Proposals`, detached. Works under ``torch.no_grad()`` too (the gradient step enables grad
        locally); the critic's parameters get no ``.grad``.
    """
    if num < 1:
        raise ValueError(f"num must be a positive number of proposals per state, got {num}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite inverse temperature >= 0, got {beta}")
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"step must be a finite step size >= 0, got {step}")
    if max_move is not None and not max_move > 0:
        raise ValueError(f"max_move must be positive or None, got {max_move}")
    obs = obs.detach()
    b = obs.shape[0]
    with torch.no_grad():
        a = prior_sample(obs, num)
    if a.ndim != 3 or a.shape[:2] != (b, num):
        raise ValueError(f"prior_sample(obs, {num}) must return (B={b}, {num}, Da) actions, got {tuple(a.shape)}")
    low = torch.as_tensor(action_low, dtype=a.dtype, device=a.device)
    high = torch.as_tensor(action_high, dtype=a.dtype, device=a.device)
    if not bool((low < high).all()):
        raise ValueError(f"action_low must be below action_high, got {action_low} and {action_high}")
    da = a.shape[-1]
    obs_rep = obs.repeat_interleave(num, dim=0)  # (B * N, Do), row b * N + j is state b

    # one ascent step on the raw gradient: a' = clip(a + alpha grad_a Q(s, a)) (reference: a + alpha * grad_a)
    with torch.enable_grad():
        a_flat = a.detach().reshape(b * num, da).requires_grad_(True)
        (grad,) = torch.autograd.grad(_q_values(q, obs_rep, a_flat).sum(), a_flat)  # (B * N, Da); no param .grad
    move = step * grad
    if max_move is not None:  # paper-v6's guided sampler: ||alpha grad|| <= 0.1
        move = move * (max_move / move.norm(dim=-1, keepdim=True).clamp(min=max_move))
    moved = torch.clamp(a_flat.detach() + move, low, high)  # (B * N, Da)

    with torch.no_grad():
        q_moved = _q_values(q, obs_rep, moved).view(b, num)  # (B, N)
        weights = torch.softmax(beta * q_moved, dim=1)
        k = max(1, round(keep * num))
        order = torch.sort(weights, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k), ties: draw order
        kept_w = weights.gather(1, order)
        return Proposals(actions=moved.view(b, num, da).gather(1, order[..., None].expand(b, k, da)).detach(),
                         weights=(kept_w / kept_w.sum(1, keepdim=True)).detach(),
                         q=q_moved.gather(1, order).detach())


def beta_schedule(progress: float, start: float = 0.0, end: float = 1.0) -> float:
    """Linear annealing of the weights' inverse temperature: ``start`` at ``progress = 0``, ``end`` at 1 and after.

    ``progress`` is the caller's fraction of the annealing period, clipped to ``[0, 1]`` (the reference code
    anneals 0 -> 1 over the first 30% of iterations: ``progress = iteration / (0.3 * iterations)``).
    """
    if not math.isfinite(progress):
        raise ValueError(f"progress must be a finite fraction, got {progress}")
    return start + (end - start) * min(1.0, max(0.0, progress))
