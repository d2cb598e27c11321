"""Inpainting: entries of a sample kept fixed while sampling (e.g. the first state of a trajectory, given actions).

The samplers re-impose them at every step at the current noise level; ``DiffusionModel.sample`` makes them exact
in its output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class Inpaint:
    """Entries to keep fixed while sampling: where ``mask`` is true the sample equals ``values`` (data units).

    Both broadcast against ``(n, *event_shape)``; entries of ``values`` outside the mask are ignored.
    """

    mask: torch.Tensor
    values: torch.Tensor

    def expand(self, shape: Sequence[int], device: torch.device) -> Inpaint:
        """Both fields broadcast to ``shape`` on ``device`` (mask bool, values float32)."""
        mask = torch.as_tensor(self.mask, dtype=torch.bool, device=device).expand(*shape)
        values = torch.as_tensor(self.values, dtype=torch.float32, device=device).expand(*shape)
        return Inpaint(mask, values)
