"""Inpainting: entries of a sample kept fixed while sampling (e.g. the first state of a trajectory, given actions).

Two ways to impose them, which must match how the model was trained:

- noised (default): at every sampler step the fixed entries are replaced by their values brought to the step's
  noise level; the model was trained on ordinary noised data (inpainting by replacement, as in RePaint);
- clean (``clean=True``): they are replaced by the clean values themselves, for a model trained with the same
  entries held clean in its noised input (``DiffusionModel.loss(..., fixed=mask)``; Diffuser's
  ``apply_conditioning`` and Dydiff's ``cond_on_action``).

``DiffusionModel.sample`` makes them exact in its output either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class Inpaint:
    """Entries to keep fixed while sampling: where ``mask`` is true the sample equals ``values`` (data units).

    Both broadcast against ``(n, *event_shape)``; entries of ``values`` outside the mask are ignored. ``clean``:
    impose the clean values at every step (see the module docstring).
    """

    mask: torch.Tensor
    values: torch.Tensor
    clean: bool = False

    def expand(self, shape: Sequence[int], device: torch.device) -> Inpaint:
        """Both fields broadcast to ``shape`` on ``device`` (mask bool, values float32)."""
        mask = torch.as_tensor(self.mask, dtype=torch.bool, device=device).expand(*shape)
        values = torch.as_tensor(self.values, dtype=torch.float32, device=device).expand(*shape)
        return Inpaint(mask, values, self.clean)
