"""Dydiff's single-step models (Zhao et al. 2024, arXiv:2405.19189, ``FineArtz/DyDiff``), built as in MBPO / MOPO:
a Gaussian ensemble ``p(s' - s | s, a)`` that seeds and re-labels the diffusion rollouts, and a reward model
``r(s, a)`` that scores them.

Both are fitted by :func:`fit` methods that share one recipe: a seeded holdout split (``holdout_fraction`` of the
rows, at most ``max_holdout``), the inputs ``[s, a]`` z-scored with the training split's statistics (a
:class:`~diffrl.diffusion.normalize.DataNormalizer`, so the statistics travel with ``state_dict``), Adam epochs
over shuffled batches, and :class:`EarlyStopping` on the holdout MSE, which restores each member's best weights.

Shapes: ``N`` rows of a dataset, ``B`` batch, ``M`` ensemble members, ``Do`` obs dim, ``Da`` action dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffrl.agents.nets import EnsembleLinear, mlp
from diffrl.config import check, check_non_negative, check_positive, check_unit_interval
from diffrl.diffusion.normalize import DataNormalizer

LOGVAR_PENALTY = 0.01  # MBPO's weight on sum(max_logvar) - sum(min_logvar)
MAX_LOGVAR_INIT, MIN_LOGVAR_INIT = 0.5, -10.0  # MBPO's (and DyDiff's BNN) initial bounds


@dataclasses.dataclass(frozen=True)
class ModelFitSettings:
    """How :meth:`EnsembleDynamics.fit` and :meth:`RewardModel.fit` train (DyDiff's ``dyn_model`` / ``rew_model``
    specs)."""

    lr: float = 1e-4
    """Adam learning rate"""
    batch_size: int = 256
    """rows per gradient step (per member for the ensemble)"""
    holdout_fraction: float = 0.2
    """fraction of the rows held out for early stopping and elite selection"""
    max_holdout: int = 5000
    """cap on the number of held-out rows"""
    patience: int = 7
    """epochs without a >1% holdout improvement (of any member) before stopping"""
    max_epochs: int | None = None
    """cap on the epochs (None: until early stopping); quick presets use a cap"""
    weight_decay: float = 5e-5
    """L2 weight decay on weight matrices (not biases, not the log-variance bounds); MBPO decays its five layers
    by 2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4; we use one value, its second; DyDiff's reward model uses 0"""

    def __post_init__(self) -> None:
        check_positive("lr", self.lr)
        check(self.batch_size >= 1, "batch_size", self.batch_size, "a positive integer")
        check_unit_interval("holdout_fraction", self.holdout_fraction, high_open=True)
        check(self.max_holdout >= 1, "max_holdout", self.max_holdout, "a positive integer")
        check(self.patience >= 1, "patience", self.patience, "a positive integer")
        check(self.max_epochs is None or self.max_epochs >= 1, "max_epochs", self.max_epochs,
              "None or a positive integer")
        check_non_negative("weight_decay", self.weight_decay)


class EarlyStopping:
    """MBPO's early stopping over ``M`` members, each with its own best holdout loss and best weights.

    A member improves when its holdout loss falls more than ``min_improvement`` (relative) below its best; then its
    best loss and its weights are recorded. Training stops once ``patience`` consecutive epochs pass in which no
    member improved (MBPO stops after ``patience + 1``, DyDiff counts any decrease as an improvement).

    Args:
        members: tensors whose first axis indexes the members ``(M, ...)``; their storage is snapshotted and
            restored in place (pass ``p.unsqueeze(0)`` for a single model's parameter ``p``).
        patience: epochs without an improvement before :meth:`update` says stop.
        min_improvement: relative decrease that counts as an improvement (MBPO's 1%).
    """

    def __init__(self, members: Sequence[torch.Tensor], patience: int, *, min_improvement: float = 0.01) -> None:
        self.members = [m.detach() for m in members]  # same storage: restore() writes into the live weights
        sizes = {m.shape[0] for m in self.members}
        if len(sizes) != 1:
            raise ValueError(f"every member tensor needs the same leading (member) axis, got sizes {sorted(sizes)}.")
        self.patience, self.min_improvement = patience, min_improvement
        self.best_loss = torch.full((sizes.pop(),), math.inf)
        self.best = [m.clone() for m in self.members]
        self.stale_epochs = 0

    @torch.no_grad()
    def update(self, losses: torch.Tensor) -> bool:
        """Record one epoch's holdout losses ``(M,)``; returns True when training should stop."""
        losses = losses.detach().float().cpu()
        improved = losses < self.best_loss * (1.0 - self.min_improvement)  # (best - loss) / best > 1%; NaN never
        if improved.any():
            self.best_loss[improved] = losses[improved]
            rows = improved.nonzero().squeeze(1)
            for live, best in zip(self.members, self.best):
                best[rows.to(best.device)] = live[rows.to(live.device)]
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        return self.stale_epochs >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        """Write each member's best weights back (members that never improved keep their initial weights)."""
        for live, best in zip(self.members, self.best):
            live.copy_(best)


def _check_inputs(obs: torch.Tensor, act: torch.Tensor, obs_dim: int, act_dim: int, where: str) -> None:
    for name, x, dim in (("obs", obs, obs_dim), ("act", act, act_dim)):
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"{where}: {name} must have shape (N, {dim}), got {tuple(x.shape)}.")
    if obs.shape[0] != act.shape[0]:
        raise ValueError(f"{where}: obs has {obs.shape[0]} rows but act has {act.shape[0]}; pass one row per pair.")
    if obs.shape[0] == 0:
        raise ValueError(f"{where}: got no rows; pass at least one transition.")


def _check_finite(where: str, **tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if not torch.isfinite(x).all():
            raise ValueError(f"{where}: {name} contains NaN or inf; clean the dataset before fitting a model.")


def _holdout_split(n: int, settings: ModelFitSettings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train, holdout) row indices, holdout = min(max_holdout, int(n * holdout_fraction)) rows."""
    num_holdout = min(settings.max_holdout, int(n * settings.holdout_fraction))
    if num_holdout < 1 or num_holdout >= n:
        need = math.ceil(1.0 / settings.holdout_fraction) + 1
        raise ValueError(f"fit got {n} rows, too few for a holdout fraction of {settings.holdout_fraction} "
                         f"(it needs both splits non-empty); pass at least {need} rows.")
    perm = torch.randperm(n, generator=generator)
    return perm[num_holdout:], perm[:num_holdout]


def _decay_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Adam parameter groups: L2 decay on weight matrices only (MBPO decays weights, not biases)."""
    decay = [p for name, p in params if name.endswith("weight")]
    rest = [p for name, p in params if not name.endswith("weight")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _fit_epochs(batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                holdout_loss: Callable[[], torch.Tensor], stopper: EarlyStopping, optimizer: torch.optim.Optimizer,
                num_rows: int, num_members: int, settings: ModelFitSettings, generator: torch.Generator,
                device: torch.device) -> tuple[int, float]:
    """The epoch loop both models share; ``batch_loss(idx (M, b))`` returns (loss to minimise, value to report).

    Each member visits the training rows in its own random order every epoch (MBPO's ``shuffle_rows``; no
    bootstrap, unlike DyDiff's fixed bootstrap indices). Returns (epochs run, mean reported value of the last epoch).
    """
    epochs, last = 0, math.nan
    while settings.max_epochs is None or epochs < settings.max_epochs:
        order = torch.argsort(torch.rand(num_members, num_rows, generator=generator), dim=1).to(device)  # (M, N)
        total = torch.zeros((), device=device)
        for start in range(0, num_rows, settings.batch_size):
            idx = order[:, start:start + settings.batch_size]  # (M, b)
            loss, report = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += report.detach() * idx.shape[1]
        epochs, last = epochs + 1, float(total) / num_rows
        with torch.no_grad():
            if stopper.update(holdout_loss()):
                break
    stopper.restore()
    return epochs, last


class EnsembleDynamics(nn.Module):
    """``M`` Gaussian MLPs ``N(mu_m(s, a), exp(logvar_m(s, a)))`` over ``delta = s' - s``, one batched matmul per
    layer (DyDiff's ``BNN``: 7 members, 5 elites, 4 x 200 SiLU layers).

    ``logvar`` is soft-clamped between learned bounds ``min_logvar <= logvar <= max_logvar`` (shared by the
    members, ``(1, Do)``), as in MBPO. ``elites`` (a buffer, saved with ``state_dict``) holds the ``num_elites``
    members with the lowest holdout MSE; :meth:`predict` uses only them.
    """

    def __init__(self, obs_dim: int, act_dim: int, *, num_members: int = 7, num_elites: int = 5,
                 hidden: Sequence[int] = (200, 200, 200, 200)) -> None:
        super().__init__()
        if not 1 <= num_elites <= num_members:
            raise ValueError(f"num_elites={num_elites} must be between 1 and num_members={num_members}.")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.num_members, self.num_elites = num_members, num_elites
        self.normalizer = DataNormalizer(obs_dim + act_dim, "zscore")
        dims = [obs_dim + act_dim, *hidden]
        self.layers = nn.ModuleList(EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(num_members, dims[-1], 2 * obs_dim)  # mean and raw log-variance
        self.max_logvar = nn.Parameter(torch.full((1, obs_dim), MAX_LOGVAR_INIT))
        self.min_logvar = nn.Parameter(torch.full((1, obs_dim), MIN_LOGVAR_INIT))
        self.register_buffer("elites", torch.arange(num_elites))

    @property
    def device(self) -> torch.device:
        return self.max_logvar.device

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``delta``, each ``(M, B, Do)``.

        ``obs``/``act`` are ``(B, Do)``/``(B, Da)`` (shared by all members) or ``(M, B, Do)``/``(M, B, Da)``.
        """
        x = self.normalizer(torch.cat([obs, act], dim=-1))
        for layer in self.layers:
            x = F.silu(layer(x))  # (M, B, H)
        mean, raw = self.head(x).chunk(2, dim=-1)  # (M, B, Do) each
        # MBPO's soft clamp: smooth in raw, strictly inside (min_logvar, max_logvar)
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    @torch.no_grad()
    def select_elites(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """Set ``elites`` to the ``num_elites`` members with the lowest MSE of their mean ``delta`` on the given
        rows (ascending); returns every member's MSE ``(M,)``."""
        mse = self._mse(obs, act, next_obs - obs)
        self.elites.copy_(torch.argsort(mse)[: self.num_elites].to(self.elites))
        return mse

    def _mse(self, obs: torch.Tensor, act: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (self(obs, act)[0] - delta).pow(2).mean(dim=(1, 2))  # (M,)

    def fit(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, settings: ModelFitSettings, *,
            seed: int = 0) -> dict[str, float]:
        """Train every member on ``(s, a) -> s' - s`` (MBPO's recipe), then select the elites.

        The input normaliser is fitted on the training split; the loss is MBPO's Gaussian NLL per member, summed
        over members, plus ``0.01 * (sum(max_logvar) - sum(min_logvar))``. Early stopping restores each member's
        best weights (the shared bounds keep their last values, as in MBPO). ``seed`` drives the holdout split and
        the shuffles, so equal initial weights and equal seeds give equal fitted weights.

        Args:
            obs, act, next_obs: ``(N, Do)``, ``(N, Da)``, ``(N, Do)`` float32 on the module's device.
            settings: optimisation and early stopping.
            seed: seed of the split and the shuffles.

        Returns:
            ``epochs``, ``holdout_mse`` (mean over the elites), ``holdout_mse_all`` (mean over all members),
            ``train_nll`` (last epoch, per member: mean of ``(mu - delta)^2 / var + logvar``, twice the Gaussian
            NLL without its constant), mean ``max_logvar`` / ``min_logvar``, ``num_train``, ``num_holdout``.
        """
        _check_inputs(obs, act, self.obs_dim, self.act_dim, "EnsembleDynamics.fit")
        if next_obs.shape != obs.shape:
            raise ValueError(f"EnsembleDynamics.fit: next_obs must have the shape of obs {tuple(obs.shape)}, "
                             f"got {tuple(next_obs.shape)}.")
        _check_finite("EnsembleDynamics.fit", obs=obs, act=act, next_obs=next_obs)
        generator = torch.Generator().manual_seed(seed)
        train, hold = (i.to(obs.device) for i in _holdout_split(obs.shape[0], settings, generator))
        delta = next_obs - obs  # (N, Do)
        self.normalizer.fit(torch.cat([obs[train], act[train]], dim=-1))  # MBPO fits its scaler on the train split
        obs_tr, act_tr, delta_tr = obs[train], act[train], delta[train]

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean, logvar = self(obs_tr[idx], act_tr[idx])  # (M, b, Do): each member its own rows
            nll = ((mean - delta_tr[idx]).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))  # (M,)
            bounds = LOGVAR_PENALTY * (self.max_logvar.sum() - self.min_logvar.sum())
            return nll.sum() + bounds, nll.mean()

        optimizer = torch.optim.Adam(_decay_groups(list(self.named_parameters()), settings.weight_decay),
                                     lr=settings.lr)
        members = [p for layer in [*self.layers, self.head] for p in (layer.weight, layer.bias)]
        stopper = EarlyStopping(members, settings.patience)
        epochs, train_nll = _fit_epochs(batch_loss, lambda: self._mse(obs[hold], act[hold], delta[hold]), stopper,
                                        optimizer, len(train), self.num_members, settings, generator, self.device)
        mse = self.select_elites(obs[hold], act[hold], next_obs[hold])
        return {"epochs": float(epochs), "holdout_mse": float(mse[self.elites].mean()),
                "holdout_mse_all": float(mse.mean()), "train_nll": train_nll,
                "max_logvar": self.max_logvar.mean().item(), "min_logvar": self.min_logvar.mean().item(),
                "num_train": float(len(train)), "num_holdout": float(len(hold))}

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None = None, *,
                sample: bool = False) -> torch.Tensor:
        """Next observations ``(B, Do)``: ``obs`` plus the mean ``delta`` of a uniformly random elite per row
        (DyDiff's rollouts), or a Gaussian sample from that elite with ``sample=True``.

        ``generator`` (on any device) draws the members and the noise.
        """
        _check_inputs(obs, act, self.obs_dim, self.act_dim, "EnsembleDynamics.predict")
        mean, logvar = self(obs, act)  # (M, B, Do)
        b = obs.shape[0]
        draw_device = generator.device if generator is not None else obs.device
        pick = torch.randint(len(self.elites), (b,), generator=generator, device=draw_device).to(obs.device)
        member, rows = self.elites[pick], torch.arange(b, device=obs.device)
        delta = mean[member, rows]  # (B, Do)
        if sample:
            noise = torch.randn(delta.shape, generator=generator, device=draw_device).to(obs.device)
            delta = delta + torch.exp(0.5 * logvar[member, rows]) * noise
        return obs + delta


class RewardModel(nn.Module):
    """DyDiff's reward model: an MLP ``r(s, a)`` (2 x 256 ReLU, its ``FlattenMLP``) on z-scored ``[s, a]``,
    trained with MSE."""

    def __init__(self, obs_dim: int, act_dim: int, *, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.normalizer = DataNormalizer(obs_dim + act_dim, "zscore")
        self.net = mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Predicted rewards ``(B,)`` (differentiable)."""
        return self.net(self.normalizer(torch.cat([obs, act], dim=-1))).squeeze(-1)

    def fit(self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor, settings: ModelFitSettings, *,
            seed: int = 0) -> dict[str, float]:
        """Regress ``rew`` ``(N,)`` on ``(obs, act)`` with the same split, normaliser and early stopping as
        :meth:`EnsembleDynamics.fit`; returns ``epochs``, ``holdout_mse`` (best weights), ``train_mse`` (last epoch),
        ``num_train``, ``num_holdout``."""
        _check_inputs(obs, act, self.obs_dim, self.act_dim, "RewardModel.fit")
        if rew.shape != (obs.shape[0],):
            raise ValueError(f"RewardModel.fit: rew must have shape ({obs.shape[0]},), got {tuple(rew.shape)}.")
        _check_finite("RewardModel.fit", obs=obs, act=act, rew=rew)
        generator = torch.Generator().manual_seed(seed)
        train, hold = (i.to(obs.device) for i in _holdout_split(obs.shape[0], settings, generator))
        self.normalizer.fit(torch.cat([obs[train], act[train]], dim=-1))
        obs_tr, act_tr, rew_tr = obs[train], act[train], rew[train]

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            i = idx[0]  # one member
            loss = F.mse_loss(self(obs_tr[i], act_tr[i]), rew_tr[i])
            return loss, loss

        def holdout_loss() -> torch.Tensor:
            return F.mse_loss(self(obs[hold], act[hold]), rew[hold]).reshape(1)

        optimizer = torch.optim.Adam(_decay_groups(list(self.named_parameters()), settings.weight_decay),
                                     lr=settings.lr)
        stopper = EarlyStopping([p.unsqueeze(0) for p in self.net.parameters()], settings.patience)
        device = next(self.parameters()).device
        epochs, train_mse = _fit_epochs(batch_loss, holdout_loss, stopper, optimizer, len(train), 1, settings,
                                        generator, device)
        with torch.no_grad():
            holdout_mse = float(holdout_loss())
        return {"epochs": float(epochs), "holdout_mse": holdout_mse, "train_mse": train_mse,
                "num_train": float(len(train)), "num_holdout": float(len(hold))}

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Predicted rewards ``(B,)``."""
        _check_inputs(obs, act, self.obs_dim, self.act_dim, "RewardModel.predict")
        return self(obs, act)
