"""Networks shared by the agents: MLPs, a batched critic ensemble and the two actor heads.

Shapes: ``B`` batch, ``E`` ensemble members, ``Do`` obs dim, ``Da`` action dim, ``H`` hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffrl.diffusion.nets import ACTIVATIONS

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # as Stable-Baselines3's SAC (CleanRL uses -5)


def mlp(d_in: int, hidden: Sequence[int], d_out: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear -> act`` for each hidden width, then a final ``Linear`` to ``d_out``."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), act()]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers evaluated with one batched matmul.

    Input ``(B, d_in)`` (shared by all members) or ``(E, B, d_in)``; output ``(E, B, d_out)``.
    Each member is initialised like ``nn.Linear`` (uniform in +-1/sqrt(d_in)).
    """

    def __init__(self, num_members: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(num_members, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_members, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``members``: indices ``(E',)`` of the members to evaluate (None: all), output ``(E', B, d_out)``."""
        weight, bias = self.weight, self.bias
        if members is not None:
            weight, bias = weight.index_select(0, members), bias.index_select(0, members)
        if x.dim() == 2:  # (B, d_in) shared by every member: an expanded view, no copy
            # (a broadcasting matmul folds and copies (E, B, d_out) activations in forward and backward; this is
            # 6% faster per SAC update and 4% per REDQ update on a 2-core CPU)
            x = x.expand(weight.shape[0], *x.shape)
        return torch.baddbmm(bias, x, weight)  # (E, B, d_out)


class EnsembleQ(nn.Module):
    """``E`` Q-networks ``Q_e(s, a)`` in one module: ``forward(obs (B,Do), act (B,Da)) -> (E, B)``.

    Default: ``Linear -> ReLU`` per hidden width, then a linear head (SAC, TD3, REDQ, ...). Options:

    - ``activation``: a name of :data:`diffrl.diffusion.nets.ACTIVATIONS` (``relu``, the default, ``mish``, ...);
    - ``residual``: DPPO's ``ResidualMLP`` trunk (``model/common/mlp.py``): ``Linear(Do + Da, H)``, then
      ``(len(hidden) - 1) / 2`` pre-activation blocks ``x + L2(act(L1(act(x))))``, then the head, with no activation
      before it; ``hidden`` must be an odd number of equal widths. DPPO's ``CriticObsAct`` as its configs ask for it
      is ``hidden=(256, 256, 256), activation="mish", residual=True`` (one block).

    ``layers`` holds the trunk's linear maps in order (residual: the input map, then each block's two).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], num_members: int,
                 orthogonal_init: bool = False, *, activation: str = "relu", residual: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if residual and (len(set(hidden)) != 1 or len(hidden) % 2 != 1):
            raise ValueError(f"a residual critic needs an odd number of equal hidden widths (e.g. (256, 256, 256): "
                             f"Linear, one two-layer block, head), got {tuple(hidden)}")
        self.num_members = num_members
        self.activation, self.residual = activation, residual
        self.nonlinearity = ACTIVATIONS[activation]()  # parameter-free: state_dict keys unchanged
        dims = [obs_dim + act_dim, *hidden]
        self.layers = nn.ModuleList(EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(num_members, dims[-1], 1)
        if orthogonal_init:  # CQL's reference init: orthogonal, gain sqrt(2) inside and 1e-2 at the head, zero bias
            with torch.no_grad():
                for layer, gain in [*((l, math.sqrt(2.0)) for l in self.layers), (self.head, 1e-2)]:
                    for w in layer.weight:  # one (d_in, d_out) matrix per member
                        nn.init.orthogonal_(w, gain=gain)
                    layer.bias.zero_()

    def forward(self, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``(E, B)`` values; ``members``: indices ``(E',)`` of the members to evaluate (REDQ's target subset),
        ``(E', B)``."""
        x = torch.cat([obs, act], dim=-1)  # (B, Do+Da)
        m = members
        if self.residual:
            x = self.layers[0](x, m)  # (E, B, H), no activation after the input map (DPPO's ResidualMLP)
            for l1, l2 in zip(self.layers[1::2], self.layers[2::2]):
                x = x + l2(self.nonlinearity(l1(self.nonlinearity(x), m)), m)  # pre-activation block; skip kept
        elif self.activation == "relu":
            for layer in self.layers:
                x = F.relu_(layer(x, m))  # (E, B, H); in place: the matmul's backward does not need its output
        else:
            for layer in self.layers:
                x = self.nonlinearity(layer(x, m))
        return self.head(x, m).squeeze(-1)  # (E, B)


class TanhGaussianActor(nn.Module):
    """SAC's policy: a Gaussian in pre-tanh space squashed by tanh into [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.trunk = mlp(obs_dim, hidden[:-1], hidden[-1])
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)

    def _dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu_(self.trunk(obs))
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action ``tanh(mean)``, shape ``(B, Da)``."""
        return torch.tanh(self._dist(obs)[0])

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample and its log-probability: ``(B, Da)``, ``(B,)``."""
        mean, log_std = self._dist(obs)
        eps = torch.randn_like(mean)
        u = mean + log_std.exp() * eps
        # log N(u; mean, std) minus the tanh Jacobian, log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        # (the numerically stable form, as in SpinningUp).
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob


class DeterministicActor(nn.Module):
    """TD3 / DDPG policy: ``tanh(MLP(obs))`` in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class GaussianActor(nn.Module):
    """IQL's policy: ``N(tanh(MLP(obs)), exp(log_std))`` with a state-independent, learned ``log_std``.

    ``log_prob(obs, act)`` scores dataset actions (no tanh correction: the mean is squashed, not the sample).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: the mean, ``(B, Da)`` in [-1, 1]."""
        return torch.tanh(self.net(obs))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``log N(act; mean(obs), std)`` summed over action dims, shape ``(B,)``."""
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        z = (act - self(obs)) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        mean = self(obs)
        return (mean + self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)
