"""GER: goal augmentation (ITER, Lin et al.), copies of a minibatch with each goal moved inside a small ball.

Shapes: ``B`` transitions, ``K = n_ger`` copies, goals are 3-d positions. The ball's radius defaults to 0.05 m, the
Fetch success threshold (``distance_threshold``), ITER's ``err_distance``. Rewards of the moved goals are recomputed
by the env's own ``compute_reward`` (passed in as ``reward_fn``).
"""

from __future__ import annotations

import numpy as np
import torch

from diffrl.augment.ker import fetch_task
from diffrl.data.batch import Batch
from diffrl.data.episodes import RewardFn
from diffrl.errors import ConfigError, DatasetError

SLIDE_TABLE_X = (0.695, 1.945)
SLIDE_TABLE_Y = (0.3, 1.2)
# ITER's Slide clip box. v4's slide.xml table (centre (1.3244, 0.7502), half sizes (0.625, 0.45)) spans
# x in [0.6994, 1.9494], y in [0.3002, 1.2002]: the box is the table to within 4.4 mm (at x_min) and 0.2 mm elsewhere.

GER_KEYS = ("goal", "next_achieved_goal")


def ger_goals(g: np.ndarray, n_ger: int, rng: np.random.Generator, env_id: str, radius: float = 0.05) -> np.ndarray:
    """``n_ger`` copies of the goals, each moved by a point drawn uniformly in the ball of ``radius``.

    Uniform in volume: a normal direction times ``radius * u^(1/3)``. For Slide the z offset is dropped (the puck
    stays on the table; ITER does the same, so xy offsets are the ball's projection) and the goals are clipped to
    the table (``SLIDE_TABLE_X``, ``SLIDE_TABLE_Y``). Push keeps ITER's z offsets, although Push goals are on the table.

    Args:
        g: goals ``(B, 3)``.
        n_ger: number of copies (ITER's ``n_GER``).
        rng: source of the offsets.
        env_id: a Fetch v4 id; others raise ``ConfigError`` (a ValueError). ITER silently added no noise there.
        radius: ball radius in metres.
    Returns:
        ``(n_ger, B, 3)`` moved goals, in ``g``'s dtype (``.reshape(-1, 3)`` stacks the copies one after another).
    """
    task = fetch_task(env_id)
    g = np.asarray(g)
    if g.ndim != 2 or g.shape[1] != 3:
        raise DatasetError(f"GER needs goals of shape (B, 3), got {g.shape}.")
    if n_ger < 0 or radius < 0:
        raise ConfigError(f"n_ger and radius must be >= 0, got {n_ger} and {radius}.")
    direction = rng.standard_normal((n_ger, g.shape[0], 3))
    direction /= np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
    offset = direction * radius * rng.uniform(size=(n_ger, g.shape[0], 1)) ** (1.0 / 3.0)  # (K, B, 3)
    if task == "Slide":
        offset[..., 2] = 0.0
    out = g[None].astype(np.float64) + offset
    if task == "Slide":
        out[..., 0] = np.clip(out[..., 0], *SLIDE_TABLE_X)
        out[..., 1] = np.clip(out[..., 1], *SLIDE_TABLE_Y)
    return out.astype(g.dtype)


def ger_minibatch(batch: Batch, n_ger: int, rng: np.random.Generator, env_id: str, reward_fn: RewardFn,
                  radius: float = 0.05) -> Batch:
    """The minibatch followed by ``n_ger`` copies with moved goals (:func:`ger_goals`), rewards recomputed.

    Args:
        batch: a :class:`~diffrl.data.Batch` with the goal keys (``goal``, ``next_achieved_goal``, ...), after HER
            relabelling; every key is repeated, ``goal`` moved in the copies, ``rew`` recomputed.
        n_ger, rng, env_id, radius: as in :func:`ger_goals` (``n_ger = 0`` returns ``batch`` itself).
        reward_fn: ``reward_fn(next_ag (M, 3), g (M, 3)) -> (M,)``, e.g. the env's ``compute_reward(ag, g, None)``.
    Returns:
        A batch of ``B * (1 + n_ger)`` rows (copy ``k`` in rows ``k*B .. (k+1)*B``, copy 0 the original) whose
        ``rew`` = ``reward_fn(next_achieved_goal, goal)`` as float32, recomputed for all rows.
    """
    missing = [k for k in GER_KEYS if k not in batch]
    if missing:
        raise DatasetError(f"GER needs a batch with keys {', '.join(GER_KEYS)}; missing {', '.join(missing)}.")
    if n_ger == 0:
        return batch
    b, goal = len(batch), batch.goal
    goals = ger_goals(goal.cpu().numpy(), n_ger, rng, env_id, radius).reshape(n_ger * b, 3)
    out = Batch({k: v.repeat(1 + n_ger, *([1] * (v.dim() - 1))) for k, v in batch.items()})
    out["goal"] = torch.cat([goal, torch.as_tensor(goals, dtype=goal.dtype, device=goal.device)])
    rew = reward_fn(out.next_achieved_goal.cpu().numpy(), out.goal.cpu().numpy())
    out["rew"] = torch.as_tensor(np.asarray(rew), dtype=torch.float32, device=goal.device).reshape(len(out))
    return out
