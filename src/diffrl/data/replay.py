"""A preallocated torch ring buffer (CPU or any device) and the real/synthetic mixing sampler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, overload

import numpy as np
import torch

from diffrl.data.batch import GOAL_KEYS, TRANSITION_KEYS, Batch
from diffrl.errors import CheckpointError


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions, stored as one preallocated tensor per key.

    Args:
        capacity: maximum number of transitions; the oldest are overwritten first.
        shapes: per-key shape of ONE transition, e.g. ``{"obs": (17,), "act": (6,), "rew": (), ...}``.
        device: where the storage lives (sampling returns batches on this device).
        seed: seed of the buffer's own sampling generator (saved in ``state_dict``).
    """

    def __init__(self, capacity: int, shapes: Mapping[str, tuple[int, ...]], device: str | torch.device = "cpu",
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.storage = {k: torch.zeros((self.capacity, *s), dtype=dtype, device=self.device)
                        for k, s in self.shapes.items()}
        self.ptr = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device if self.device.type != "mps" else "cpu")
        self.generator.manual_seed(seed)

    @classmethod
    def for_transitions(cls, capacity: int, obs_dim: int, act_dim: int, goal_dim: int = 0, **kw: Any) -> ReplayBuffer:
        """Buffer with the Batch contract's keys (goal keys too when ``goal_dim > 0``)."""
        shapes = {"obs": (obs_dim,), "act": (act_dim,), "rew": (), "next_obs": (obs_dim,), "done": ()}
        if goal_dim:
            shapes.update({k: (goal_dim,) for k in GOAL_KEYS})
        return cls(capacity, shapes, **kw)

    def __len__(self) -> int:
        return self.size

    def add_batch(self, **data: np.ndarray | torch.Tensor) -> None:
        """Append ``N`` transitions: keyword arrays with leading dimension ``N`` (keys = the buffer's keys)."""
        if set(data) != set(self.shapes):
            raise KeyError(f"add_batch got keys {sorted(data)}, the buffer holds {sorted(self.shapes)}")
        n = next(iter(data.values())).shape[0]
        if n > self.capacity:  # only the last `capacity` rows survive
            data = {k: v[-self.capacity:] for k, v in data.items()}
            n = self.capacity
        if self.ptr + n <= self.capacity:  # contiguous: plain slice copies (the hot path, one row per env step)
            for k, v in data.items():
                store = self.storage[k]
                store[self.ptr:self.ptr + n] = torch.as_tensor(v).reshape(n, *self.shapes[k]).to(store.dtype)
        else:
            idx = ((torch.arange(n) + self.ptr) % self.capacity).to(self.device)
            for k, v in data.items():
                store = self.storage[k]
                store[idx] = torch.as_tensor(v).reshape(n, *self.shapes[k]).to(store.device, store.dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def add(self, **transition: np.ndarray | float) -> None:
        """Append one transition (unbatched arrays / scalars)."""
        self.add_batch(**{k: np.asarray(v)[None] for k, v in transition.items()})

    @overload
    def sample(self, batch_size: int, return_indices: Literal[False] = False) -> Batch: ...

    @overload
    def sample(self, batch_size: int, return_indices: Literal[True]) -> tuple[Batch, torch.Tensor]: ...

    def sample(self, batch_size: int, return_indices: bool = False) -> Batch | tuple[Batch, torch.Tensor]:
        """Uniformly sample ``batch_size`` transitions (with replacement).

        ``return_indices``: also return the storage rows ``(batch_size,)`` they came from, for :meth:`overwrite`
        (DIPO writes its improved actions back); the draws are the same either way.
        """
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (batch_size,), generator=self.generator, device=self.generator.device)
        idx = idx.to(self.device)
        batch = Batch({k: v.index_select(0, idx) for k, v in self.storage.items()})
        return (batch, idx) if return_indices else batch

    def overwrite(self, indices: torch.Tensor, **data: torch.Tensor | np.ndarray) -> None:
        """Write ``data[key][i]`` into storage row ``indices[i]`` of each given key (rows from ``sample(...,
        return_indices=True)``; only stored rows may be written). Where a row appears several times (sampling is
        with replacement) its last value is kept. Used by DIPO (Yang et al. 2023), which replaces buffer actions
        by their Q-improved versions."""
        unknown = sorted(set(data) - set(self.shapes))
        if unknown:
            raise KeyError(f"overwrite got key(s) {unknown}, the buffer holds {sorted(self.shapes)}")
        idx = torch.as_tensor(indices, device=self.device).long().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.size):
            raise IndexError(f"overwrite rows must be in [0, {self.size}) (the stored transitions), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        # one write per row (index_put with repeated rows keeps an unspecified one on CUDA): its last occurrence
        rows, inverse = torch.unique(idx, return_inverse=True)
        last = torch.full((len(rows),), -1, dtype=torch.long, device=self.device).scatter_reduce_(
            0, inverse, torch.arange(len(idx), device=self.device), reduce="amax")
        for k, v in data.items():
            store = self.storage[k]
            values = torch.as_tensor(v).to(store.device, store.dtype).reshape(len(idx), *self.shapes[k])
            store[rows] = values[last]

    def all(self) -> Batch:
        """Every stored transition in insertion order (oldest first)."""
        order = (torch.arange(self.size) + (self.ptr if self.size == self.capacity else 0)) % self.capacity
        order = order.to(self.device)
        return Batch({k: v.index_select(0, order) for k, v in self.storage.items()})

    def state_dict(self) -> dict[str, Any]:
        """Contents (only the filled part), pointer and the sampling generator's state."""
        return {"capacity": self.capacity, "ptr": self.ptr, "size": self.size,
                "shapes": {k: list(s) for k, s in self.shapes.items()},
                "data": {k: v[: self.size] for k, v in self.storage.items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shapes = {k: tuple(s) for k, s in state["shapes"].items()}
        if shapes != self.shapes or int(state["capacity"]) != self.capacity:
            raise CheckpointError(f"the saved replay buffer holds {shapes} with capacity {state['capacity']}, "
                                  f"this run expects {self.shapes} with capacity {self.capacity}.")
        self.size, self.ptr = int(state["size"]), int(state["ptr"])
        for k, v in state["data"].items():
            self.storage[k][: self.size] = v.to(self.device)
        self.generator.set_state(state["generator"])


class MixedSampler:
    """Draw ``round(ratio * B)`` of each batch from ``synthetic`` and the rest from ``real``.

    Falls back to real data only while the synthetic buffer is empty (as SynthER's online agent does).
    """

    def __init__(self, real: ReplayBuffer, synthetic: ReplayBuffer, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"synthetic ratio must be in [0, 1], got {ratio}")
        self.real, self.synthetic, self.ratio = real, synthetic, ratio

    def sample(self, batch_size: int) -> Batch:
        n_syn = int(round(self.ratio * batch_size)) if len(self.synthetic) else 0
        if n_syn == 0:
            return self.real.sample(batch_size)
        if n_syn == batch_size:
            return self.synthetic.sample(batch_size)
        return Batch.cat([self.real.sample(batch_size - n_syn), self.synthetic.sample(n_syn)])


__all__ = ["ReplayBuffer", "MixedSampler", "TRANSITION_KEYS"]
