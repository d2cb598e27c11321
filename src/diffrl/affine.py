"""Per-dimension affine normalisation with fixed statistics: ``(x - shift) / scale`` and its exact inverse.

The one implementation of the arithmetic behind the diffusion core's :class:`~diffrl.diffusion.normalize.DataNormalizer`
and DPPO's :class:`~diffrl.envs.wrappers.MinMaxNormalization`. It sits at the package top level (like
``config.py`` and ``errors.py``) because both layers must import it and the diffusion core may not import
``envs``. Each caller keeps its own conventions around it (dtypes, how a constant dimension is handled); the
functions only compute, on NumPy arrays or tensors alike, with the usual broadcasting over leading axes.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def normalize(x: ArrayT, shift: ArrayT, scale: ArrayT) -> ArrayT:
    """``(x - shift) / scale``; ``shift``, ``scale`` ``(D,)`` against ``x`` ``(..., D)``."""
    return (x - shift) / scale


def unnormalize(x: ArrayT, shift: ArrayT, scale: ArrayT) -> ArrayT:
    """``x * scale + shift``, the inverse of :func:`normalize`."""
    return x * scale + shift


def minmax_shift_scale(lo: ArrayT, hi: ArrayT) -> tuple[ArrayT, ArrayT]:
    """Centre ``(hi + lo) / 2`` and half-range ``(hi - lo) / 2``: the affine map of ``[lo, hi]`` onto ``[-1, 1]``.

    A constant dimension gets half-range 0; the caller decides how to keep it finite (an epsilon, or 1).
    """
    return (hi + lo) / 2, (hi - lo) / 2
