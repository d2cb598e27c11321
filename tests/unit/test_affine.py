"""The shared affine normalisation: min-max statistics map the data range onto [-1, 1], the inverse is exact,
and NumPy arrays and tensors get the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from diffrl import affine


def test_minmax_statistics_map_the_data_range_onto_minus_one_one() -> None:
    x = np.random.default_rng(0).normal(size=(100, 3)) * [1.0, 10.0, 0.1] + [0.0, -5.0, 3.0]
    shift, scale = affine.minmax_shift_scale(x.min(0), x.max(0))
    y = affine.normalize(x, shift, scale)
    np.testing.assert_allclose(y.min(0), -1.0, atol=1e-12)
    np.testing.assert_allclose(y.max(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(affine.unnormalize(y, shift, scale), x, atol=1e-12)


def test_numpy_and_torch_give_bitwise_equal_results() -> None:
    rng = np.random.default_rng(1)
    x, lo = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    hi = lo + rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    shift, scale = affine.minmax_shift_scale(lo, hi)
    t_shift, t_scale = affine.minmax_shift_scale(torch.from_numpy(lo), torch.from_numpy(hi))
    np.testing.assert_array_equal(t_shift.numpy(), shift)
    np.testing.assert_array_equal(t_scale.numpy(), scale)
    np.testing.assert_array_equal(affine.normalize(torch.from_numpy(x), t_shift, t_scale).numpy(),
                                  affine.normalize(x, shift, scale))
    np.testing.assert_array_equal(affine.unnormalize(torch.from_numpy(x), t_shift, t_scale).numpy(),
                                  affine.unnormalize(x, shift, scale))
