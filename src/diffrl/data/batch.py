"""The Batch contract: what every producer of experience (buffer, dataset, generator) yields.

Keys and shapes (``B`` = batch size)::

    obs (B, Do)   act (B, Da)   rew (B,)   next_obs (B, Do)   done (B,)
    goal tasks add: goal (B, Dg)   achieved_goal (B, Dg)   next_achieved_goal (B, Dg)

``done`` is *termination* only (1.0 where the episode really ended); a time-limit truncation is never a
``done``, so critics bootstrap through it.
"""

from __future__ import annotations

import torch

TRANSITION_KEYS = ("obs", "act", "rew", "next_obs", "done")
GOAL_KEYS = ("goal", "achieved_goal", "next_achieved_goal")


class Batch(dict[str, torch.Tensor]):
    """A ``dict`` of tensors with attribute access for the fixed keys (``batch.obs``, ``batch["obs"]``)."""

    def __getattr__(self, key: str) -> torch.Tensor:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __len__(self) -> int:  # type: ignore[override]
        return next(iter(self.values())).shape[0] if dict.__len__(self) else 0

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.items()})

    def validate(self) -> Batch:
        """Check the required keys exist and all share one leading dimension; returns self."""
        missing = [k for k in TRANSITION_KEYS if k not in self]
        if missing:
            raise KeyError(f"batch lacks key(s) {', '.join(missing)}")
        sizes = {k: v.shape[0] for k, v in self.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch entries disagree on the batch size: {sizes}")
        for k in ("rew", "done"):
            if self[k].dim() != 1:
                raise ValueError(f"batch[{k!r}] must have shape (B,), got {tuple(self[k].shape)}")
        return self

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        """Concatenate batches with the same keys along the batch dimension."""
        return Batch({k: torch.cat([b[k] for b in batches]) for k in batches[0]})
