"""Per-dimension z-score normalisation of observations, with statistics fixed from a dataset.

Offline agents (TD3+BC, IQL, CQL in CORL) normalise states with the dataset's mean and std (``eps = 1e-3``
added to the std); the same statistics are applied to the evaluation env's observations, and they travel with
the checkpoint (``state_dict``) so ``diffrl eval`` normalises exactly as training did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Normalizer:
    """``(x - mean) / std`` on NumPy arrays or tensors of shape ``(..., D)``.

    Args:
        mean: per-dimension mean ``(D,)``.
        std: per-dimension std ``(D,)`` (already including any epsilon).
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean and std must be 1-D of one shape, got {self.mean.shape} and {self.std.shape}")
        if not np.all(self.std > 0):
            raise ValueError("std must be > 0 in every dimension")

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-3) -> Normalizer:
        """Statistics of ``x`` ``(N, D)``; ``eps`` is added to the std (CORL's convention)."""
        x = np.asarray(x, dtype=np.float64)
        return cls(x.mean(0), x.std(0) + eps)

    @classmethod
    def identity(cls, dim: int) -> Normalizer:
        return cls(np.zeros(dim), np.ones(dim))

    def __call__(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            mean = torch.as_tensor(self.mean, device=x.device)
            std = torch.as_tensor(self.std, device=x.device)
            return (x - mean) / std
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Normalizer:
        return cls(np.asarray(state["mean"]), np.asarray(state["std"]))
