"""Data normalisation inside a diffusion model: an ``nn.Module`` whose statistics are buffers, so they are saved
and loaded with the model's weights and a sampled model always un-normalises with the statistics it was
trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from diffrl import affine

NORMALIZERS = ("zscore", "minmax", "none")


class DataNormalizer(nn.Module):
    """Per-dimension affine map over the last axis: ``(x - shift) / scale``.

    - ``zscore``: ``shift = mean``, ``scale = std + eps`` (SynthER: eps 1e-5, unit target std for EDM's
      ``sigma_data = 1``).
    - ``minmax``: maps the data's ``[min, max]`` to ``[-1, 1]`` per dimension (DPPO); ``scale`` gets ``eps``
      so constant dimensions do not divide by zero.
    - ``none``: identity.

    ``skip_dims`` stay unnormalised (shift 0, scale 1), e.g. a binary terminal flag. Unlike SynthER's min-max
    normaliser, ``skip_dims`` are honoured by every kind. The arithmetic is :mod:`diffrl.affine`'s.
    """

    def __init__(self, dim: int, kind: str = "zscore", skip_dims: Sequence[int] = (), eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {kind!r}: choose one of {', '.join(NORMALIZERS)}")
        bad = [d for d in skip_dims if not -dim <= d < dim]
        if bad:
            raise ValueError(f"skip_dims {bad} are outside a {dim}-dimensional vector")
        self.kind, self.eps = kind, eps
        self.skip_dims = tuple(sorted({d % dim for d in skip_dims}))
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    @torch.no_grad()
    def fit(self, data: torch.Tensor | np.ndarray) -> DataNormalizer:
        """Set the statistics from ``data`` of shape ``(..., dim)`` (all leading axes pooled)."""
        x = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(f"data has {x.shape[-1]} dims, the normalizer {self.dim}")
        if self.kind == "zscore":
            shift, scale = x.mean(0), x.std(0, unbiased=False) + self.eps
        elif self.kind == "minmax":
            shift, half = affine.minmax_shift_scale(x.min(0).values, x.max(0).values)
            scale = half + self.eps
        else:
            shift, scale = torch.zeros(self.dim, dtype=torch.float64), torch.ones(self.dim, dtype=torch.float64)
        skip = list(self.skip_dims)
        shift[skip], scale[skip] = 0.0, 1.0
        self.shift.copy_(shift.to(self.shift))
        self.scale.copy_(scale.to(self.scale))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine.normalize(x, self.shift, self.scale)

    normalize = forward

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return affine.unnormalize(x, self.shift, self.scale)
