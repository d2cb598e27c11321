"""Goal-conditioned episodes at rest, and hindsight experience replay (Andrychowicz et al. 2017, arXiv:1707.01495).

Shapes: ``N`` episodes, ``T`` steps per episode, ``Do`` obs, ``Da`` action, ``Dg`` goal dims. An episode is::

    obs (T+1, Do)   ag (T+1, Dg)   g (T, Dg)   act (T, Da)

(``ag`` is the achieved goal, ``g`` the desired goal.) All ``T`` transitions of an episode are kept: OpenAI
baselines' rollout stored ``T - 1`` of them, because its loop broke on the time-limit ``done`` (ITER brief).

HER relabels a sampled transition's goal with an achieved goal of the same episode and recomputes the reward with
the env's own vectorised ``compute_reward``: ``future`` (a later achieved goal, with probability
``1 - 1/(1 + replay_k)``), ``final`` (the last achieved goal) or ``episode`` (any achieved goal of the episode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from diffrl.data.batch import Batch
from diffrl.errors import CheckpointError

EPISODE_KEYS = ("obs", "ag", "g", "act")
HER_STRATEGIES = ("future", "final", "episode", "none")
OVERWRITE = ("oldest", "random")

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``reward_fn(achieved_goal (B, Dg), goal (B, Dg)) -> rewards (B,)``, e.g. a Fetch env's ``compute_reward``."""


def episode_shapes(T: int, obs_dim: int, act_dim: int, goal_dim: int) -> dict[str, tuple[int, int]]:
    """Per-episode shapes of each key."""
    return {"obs": (T + 1, obs_dim), "ag": (T + 1, goal_dim), "g": (T, goal_dim), "act": (T, act_dim)}


def check_episodes(episodes: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Validate an episode dict against ``shapes``; returns the number of episodes."""
    missing = [k for k in EPISODE_KEYS if k not in episodes]
    if missing:
        raise KeyError(f"episodes lack key(s) {', '.join(missing)}")
    n = {int(np.shape(episodes[k])[0]) for k in EPISODE_KEYS}
    if len(n) != 1:
        raise ValueError(f"episode arrays disagree on the number of episodes: "
                         f"{ {k: np.shape(episodes[k]) for k in EPISODE_KEYS} }")
    for k in EPISODE_KEYS:
        if tuple(np.shape(episodes[k])[1:]) != tuple(shapes[k]):
            raise ValueError(f"episodes[{k!r}] has shape {np.shape(episodes[k])}, expected (N, {shapes[k]})")
    return n.pop()


class EpisodeBuffer:
    """Fixed-capacity ring buffer of whole episodes (one preallocated tensor per key).

    Args:
        capacity: maximum number of episodes; the oldest are overwritten first.
        T: steps per episode.
        obs_dim, act_dim, goal_dim: sizes of one observation, action and goal.
        device: where the storage lives.
        seed: seed of the buffer's own sampling generator (saved in ``state_dict``).
        overwrite: once full, new episodes replace the ``oldest`` ones (a ring) or ``random`` ones (OpenAI
            baselines' HER buffer, which ITER uses: older data decays instead of vanishing after one buffer's
            worth of episodes). ``random`` draws distinct slots from the buffer's generator (baselines drew them
            with replacement, so part of a large insertion could overwrite itself and be lost).
    """

    def __init__(self, capacity: int, T: int, obs_dim: int, act_dim: int, goal_dim: int,
                 device: str | torch.device = "cpu", seed: int = 0, overwrite: str = "oldest") -> None:
        if capacity <= 0 or T <= 0:
            raise ValueError(f"capacity and T must be > 0, got {capacity} and {T}")
        if overwrite not in OVERWRITE:
            raise ValueError(f"overwrite must be one of {', '.join(OVERWRITE)}, got {overwrite!r}")
        self.overwrite = overwrite
        self.capacity, self.T = int(capacity), int(T)
        self.device = torch.device(device)
        self.shapes = episode_shapes(T, obs_dim, act_dim, goal_dim)
        self.storage = {k: torch.zeros((self.capacity, *s), device=self.device) for k, s in self.shapes.items()}
        self.ptr = 0
        self.size = 0
        self.added = 0  # episodes ever added (counts overwritten ones)
        self.generator = torch.Generator(device=self.device if self.device.type != "mps" else "cpu")
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def transitions(self) -> int:
        return self.size * self.T

    def add_episodes(self, episodes: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Append ``N`` episodes (the layout in the module docstring)."""
        n = check_episodes(episodes, self.shapes)
        if self.overwrite == "random" and self.size + n > self.capacity:
            # fill the free slots in order, then overwrite distinct random occupied ones (baselines'
            # _get_storage_idx); more episodes than the capacity: only the last `capacity` are stored
            keep = slice(max(n - self.capacity, 0), n)
            m = keep.stop - keep.start
            free = torch.arange(self.size, self.capacity)
            chosen = torch.randperm(self.size, generator=self.generator, device=self.device)[: m - len(free)]
            idx = torch.cat([free, chosen.cpu()])
            self.ptr = 0  # unused once full
        else:
            idx = (self.ptr + torch.arange(n)) % self.capacity
            if n > self.capacity:  # only the last `capacity` survive
                idx, keep = idx[-self.capacity:], slice(n - self.capacity, n)
            else:
                keep = slice(0, n)
            self.ptr = (self.ptr + n) % self.capacity
        for k in EPISODE_KEYS:
            self.storage[k][idx.to(self.device)] = torch.as_tensor(np.asarray(episodes[k])[keep], dtype=torch.float32,
                                                                   device=self.device)
        self.size = min(self.size + n, self.capacity)
        self.added += n

    def episodes(self, indices: torch.Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Stored episodes as NumPy arrays (all of them, or ``indices``)."""
        idx = torch.arange(self.size) if indices is None else torch.as_tensor(indices)
        return {k: self.storage[k][idx.to(self.device)].cpu().numpy() for k in EPISODE_KEYS}

    def sample_episodes(self, n: int, generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
        """``n`` stored episodes drawn uniformly with replacement, with ``generator`` (on the buffer's device) or
        the buffer's own (a consumer with its own stream leaves the buffer's minibatch draws unchanged)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty episode buffer")
        gen = self.generator if generator is None else generator
        return self.episodes(torch.randint(self.size, (n,), generator=gen, device=gen.device))

    def sample_her(self, batch_size: int, reward_fn: RewardFn, strategy: str = "future",
                   replay_k: int = 4) -> Batch:
        """A minibatch of transitions with hindsight goals (keys of :class:`Batch` with the goal keys).

        ``done`` is all zeros: Fetch tasks never terminate (the time limit is a truncation).
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty episode buffer")
        if strategy not in HER_STRATEGIES:
            raise ValueError(f"unknown HER strategy {strategy!r}: choose one of {', '.join(HER_STRATEGIES)}")
        gen, dev, T = self.generator, self.device, self.T
        ep = torch.randint(self.size, (batch_size,), generator=gen, device=dev)
        t = torch.randint(T, (batch_size,), generator=gen, device=dev)
        s = self.storage
        goal = s["g"][ep, t]
        if strategy != "none":
            her_p = 1.0 - 1.0 / (1.0 + replay_k)  # future_p = 0.8 at replay_k = 4 (baselines, SB3)
            her = torch.rand(batch_size, generator=gen, device=dev) < her_p
            u = torch.rand(batch_size, generator=gen, device=dev)
            if strategy == "future":  # an achieved goal strictly after t: index in t+1 .. T
                g_t = t + 1 + (u * (T - t)).long().clamp(max=T - 1 - t)
            elif strategy == "final":
                g_t = torch.full_like(t, T)
            else:  # episode: any achieved goal of the episode, 0 .. T
                g_t = (u * (T + 1)).long().clamp(max=T)
            goal = torch.where(her[:, None], s["ag"][ep, g_t], goal)
        next_ag = s["ag"][ep, t + 1]
        rew = reward_fn(next_ag.cpu().numpy(), goal.cpu().numpy())
        return Batch(obs=s["obs"][ep, t], act=s["act"][ep, t],
                     rew=torch.as_tensor(np.asarray(rew), dtype=torch.float32, device=dev).reshape(batch_size),
                     next_obs=s["obs"][ep, t + 1], done=torch.zeros(batch_size, device=dev), goal=goal,
                     achieved_goal=s["ag"][ep, t], next_achieved_goal=next_ag)

    def state_dict(self) -> dict[str, Any]:
        """The stored episodes (only the filled rows), pointers and the sampling generator's state."""
        return {"storage": {k: v[: self.size].clone() for k, v in self.storage.items()},
                "ptr": self.ptr, "size": self.size, "added": self.added, "capacity": self.capacity,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise CheckpointError(f"the saved episode buffer holds {state['capacity']} episodes, this config "
                                  f"{self.capacity}.")
        size = int(state["size"])
        for k, v in state["storage"].items():
            if tuple(v.shape[1:]) != tuple(self.shapes[k]):
                raise CheckpointError(f"the saved episode buffer's {k} has shape {tuple(v.shape[1:])}, this env "
                                      f"needs {self.shapes[k]}.")
            self.storage[k][:size] = v.to(self.device)
        self.ptr, self.size, self.added = int(state["ptr"]), size, int(state["added"])
        self.generator.set_state(state["generator"])
