"""D4RL-style normalised scores: a return placed between a task's random (0) and expert (100) reference returns.

The one implementation of the formula; datasets carry the references (``ref_min_score`` / ``ref_max_score`` in
their metadata, recorded by ``diffrl data collect``), checkpoints may carry them as ``{"min": ..., "max": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffrl.data import OfflineDataset
from diffrl.data.datasets import summary_stats
from diffrl.errors import DatasetError


def normalized_score(returns: np.ndarray | float, ref_min: float, ref_max: float) -> np.ndarray:
    """D4RL normalized score x100, elementwise: ``100 (R - ref_min) / (ref_max - ref_min)`` (d4rl/offline_env.py)."""
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def reference_scores(metadata: Mapping[str, Any]) -> dict[str, float] | None:
    """A dataset's reference returns ``{"min": random, "max": expert}`` from its metadata; ``None`` when either
    is missing or they are equal (no scale to normalise by)."""
    lo, hi = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if lo is None or hi is None or hi == lo:
        return None
    return {"min": float(lo), "max": float(hi)}


def dataset_normalized_score(ds: OfflineDataset, returns: np.ndarray | float) -> np.ndarray:
    """:func:`normalized_score` with ``ds``'s references; one sentence (:class:`DatasetError`) if it has none."""
    refs = reference_scores(ds.metadata)
    if refs is None:
        lo, hi = ds.metadata.get("ref_min_score"), ds.metadata.get("ref_max_score")
        raise DatasetError(f"dataset {ds.metadata.get('env_id', '')} has no usable reference scores "
                           f"(ref_min_score={lo}, ref_max_score={hi}) in its metadata; build it with `diffrl "
                           "data collect` (which records them) or set both in ds.metadata.")
    return normalized_score(returns, refs["min"], refs["max"])


def describe_dataset(ds: OfflineDataset) -> dict[str, Any]:
    """``diffrl data info``: :meth:`OfflineDataset.describe` plus the episodes' normalized scores
    (``normalized_mean / _std / _min / _max``) when the dataset has references."""
    out = ds.describe()
    if reference_scores(ds.metadata) is not None:
        out.update(summary_stats("normalized", dataset_normalized_score(ds, ds.episode_returns())))
    return out
