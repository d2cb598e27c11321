"""Observation-history / action-chunk samples for behaviour cloning a chunked policy (DPPO pre-training).

Shapes: ``N`` transitions, ``M`` samples (valid chunk starts), ``B`` batch, ``To`` history length
(``cond_steps``), ``Ta`` chunk length (``horizon_steps``), ``Do`` / ``Da`` observation / action dims.

A sample starting at row ``s`` of an episode ``[a, b)`` is ``(obs[s - To + 1 .. s], act[s .. s + Ta - 1])``:

- the chunk never crosses the episode's end (``s + Ta <= b``; shorter episodes give no sample);
- history rows before ``a`` repeat the episode's first observation ``obs[a]``;

both as in DPPO's ``StitchedSequenceDataset`` (``agent/dataset/sequence.py``), and both min-max normalised with
the :class:`~diffrl.envs.wrappers.MinMaxNormalization` the env wrapper will use.
"""

from __future__ import annotations

import numpy as np
import torch

from diffrl.data.datasets import OfflineDataset
from diffrl.envs.wrappers import MinMaxNormalization
from diffrl.errors import DatasetError


class ChunkDataset:
    """Every ``(obs history (To, Do), action chunk (Ta, Da))`` pair of a dataset, gathered on demand.

    Args:
        observations: ``(N, Do)``.
        actions: ``(N, Da)``.
        traj_lengths: episode lengths ``(E,)`` summing to ``N`` (episodes stored back to back; DPPO's npz key).
        horizon_steps: chunk length ``Ta``.
        cond_steps: history length ``To``.
        normalization: statistics applied to observations and actions; ``None`` keeps the raw values.
        device: where the tensors live (samples are gathered there).
    """

    def __init__(self, observations: np.ndarray, actions: np.ndarray, traj_lengths: np.ndarray, *,
                 horizon_steps: int, cond_steps: int = 1, normalization: MinMaxNormalization | None = None,
                 device: torch.device | str = "cpu") -> None:
        obs, act = np.asarray(observations, dtype=np.float32), np.asarray(actions, dtype=np.float32)
        lengths = np.asarray(traj_lengths, dtype=np.int64)
        if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act):
            raise DatasetError(f"ChunkDataset needs observations (N, Do) and actions (N, Da) of one length, got "
                               f"{obs.shape} and {act.shape}.")
        if lengths.ndim != 1 or np.any(lengths <= 0) or int(lengths.sum()) != len(obs):
            raise DatasetError(f"traj_lengths must be positive episode lengths summing to N={len(obs)}, got "
                               f"{len(lengths)} lengths summing to {int(lengths.sum())}.")
        if horizon_steps < 1 or cond_steps < 1:
            raise DatasetError(f"horizon_steps and cond_steps must be >= 1, got {horizon_steps} and {cond_steps}.")
        if normalization is not None:
            if (normalization.obs_dim, normalization.act_dim) != (obs.shape[1], act.shape[1]):
                raise DatasetError(f"the normalization is for {normalization.obs_dim}-dim observations and "
                                   f"{normalization.act_dim}-dim actions but the dataset has {obs.shape[1]} and "
                                   f"{act.shape[1]}.")
            obs, act = normalization.normalize_obs(obs), normalization.normalize_act(act)
        self.horizon_steps, self.cond_steps, self.normalization = horizon_steps, cond_steps, normalization
        ends = np.cumsum(lengths)
        firsts = ends - lengths
        starts, first_of = [], []
        for a, b in zip(firsts, ends):
            s = np.arange(a, b - horizon_steps + 1)  # the chunk stays inside [a, b)
            starts.append(s)
            first_of.append(np.full(len(s), a))
        start = np.concatenate(starts)
        if len(start) == 0:
            raise DatasetError(f"no episode has {horizon_steps} steps (longest: {int(lengths.max())}), so there is "
                               "no action chunk to learn from; use a shorter horizon_steps or longer episodes.")
        # row indices of every sample: history (M, To) clamped to the episode's first row, chunk (M, Ta)
        hist = start[:, None] + np.arange(1 - cond_steps, 1)[None]
        hist = np.maximum(hist, np.concatenate(first_of)[:, None])
        chunk = start[:, None] + np.arange(horizon_steps)[None]
        self.device = torch.device(device)
        self._obs = torch.from_numpy(obs).to(self.device)
        self._act = torch.from_numpy(act).to(self.device)
        self._hist = torch.from_numpy(hist).to(self.device)
        self._chunk = torch.from_numpy(chunk).to(self.device)
        self.starts = torch.from_numpy(start).to(self.device)  # (M,) dataset row where each sample's chunk starts

    @classmethod
    def from_offline(cls, ds: OfflineDataset, *, horizon_steps: int, cond_steps: int = 1,
                     normalization: MinMaxNormalization | None = None,
                     device: torch.device | str = "cpu") -> ChunkDataset:
        """Samples of an :class:`OfflineDataset` (episodes end at ``terminals | timeouts``)."""
        lengths = np.array([s.stop - s.start for s in ds.episode_slices()], dtype=np.int64)
        return cls(ds.observations, ds.actions, lengths, horizon_steps=horizon_steps, cond_steps=cond_steps,
                   normalization=normalization, device=device)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self._obs.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self._act.shape[1])

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index`` ``(B,)``: ``obs (B, To, Do)``, ``chunk (B, Ta, Da)``."""
        index = index.to(self.device)
        return self._obs[self._hist[index]], self._act[self._chunk[index]]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` samples drawn uniformly with replacement: ``obs (B, To, Do)``, ``chunk (B, Ta, Da)``."""
        index = torch.randint(len(self), (batch_size,), generator=generator, device=self.device)
        return self.get(index)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once, ``(M, To, Do)`` and ``(M, Ta, Da)`` (e.g. for ``DiffusionTrainer(data, cond)``)."""
        return self.get(torch.arange(len(self), device=self.device))
