"""Log-density of a diagonal Gaussian, the per-step transition of a denoising chain (DPPO's policy likelihood)."""

from __future__ import annotations

import torch


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise ``log N(x; mean, std^2)`` (the caller reduces over dims; DPPO averages)."""
    var = std ** 2
    return -((x - mean) ** 2) / (2 * var) - std.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi, device=x.device))
