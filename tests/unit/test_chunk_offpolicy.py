"""The chunk off-policy loop (`pipelines/chunk_offpolicy.py`) and the replay buffer's write-back: chunk transitions
on a tiny deterministic env (reward sums and scale, termination vs truncation, next histories across episode ends),
gradient steps per iteration and critic warm-up, DIPO-style write-back, and exact resume of a DQL run."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffrl.agents.dql import DQL, DQLParams
from diffrl.agents.ppo import GaussianPolicy
from diffrl.data import Batch, ReplayBuffer
from diffrl.diffusion.spec import build_model
from diffrl.envs import env_signature
from diffrl.envs.chunking import chunk_env, chunk_envs
from diffrl.errors import ConfigError
from diffrl.pipelines.chunk_offpolicy import (
    ChunkOffPolicyConfig,
    chunk_buffer,
    collect,
    train,
    update,
    updates_per_iteration,
)
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.seeding import seed_everything
from diffrl.runs.session import RunSession


# ------------------------------------------------------------------------------------------------ a toy env
class CounterEnv(gym.Env):
    """Observation ``[k]`` after ``k`` steps; reward ``k`` (the new count); terminated when the action exceeds 0.5.
    Deterministic, so chunk rewards and episode ends can be written down by hand."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.k = 0
        return np.array([0.0], np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.k += 1
        return np.array([self.k], np.float32), float(self.k), bool(action[0] > 0.5), False, {}


if "ChunkCounter-v0" not in gym.registry:
    gym.register(id="ChunkCounter-v0", entry_point=CounterEnv, max_episode_steps=5)


@dataclasses.dataclass(frozen=True)
class Chunking:
    horizon_steps: int = 3
    act_steps: int = 2
    cond_steps: int = 2


class ScriptedAgent:
    """Explores with given chunks, one ``(N, Ta, Da)`` array per call."""

    device = torch.device("cpu")

    def __init__(self, chunks: list[np.ndarray]) -> None:
        self.chunks = list(chunks)

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.chunks.pop(0), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ replay write-back
def filled_buffer(n: int = 30, capacity: int = 50) -> ReplayBuffer:
    buf = ReplayBuffer.for_transitions(capacity, 2, 3, seed=4)
    rows = torch.arange(n, dtype=torch.float32)
    buf.add_batch(obs=rows[:, None].repeat(1, 2), act=rows[:, None].repeat(1, 3), rew=rows, next_obs=-rows[:, None]
                  .repeat(1, 2), done=torch.zeros(n))
    return buf


def test_replay_sample_with_indices_draws_the_same_rows_and_overwrite_changes_exactly_those_rows():
    plain, buf = filled_buffer(), filled_buffer()
    before = {k: v.clone() for k, v in buf.storage.items()}
    batch, idx = buf.sample(40, return_indices=True)
    same = plain.sample(40)
    assert all(torch.equal(batch[k], same[k]) for k in batch)  # the same generator draws as sample()
    assert all(torch.equal(batch[k], before[k][idx]) for k in batch)  # the indices are the rows returned
    assert len(idx.unique()) < 40  # with replacement: duplicates occur, and the last write must win
    new_act = torch.arange(40 * 3, dtype=torch.float32).view(40, 3) + 1000.0
    buf.overwrite(idx, act=new_act)
    written = idx.unique()
    untouched = torch.ones(buf.capacity, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(buf.storage["act"][untouched], before["act"][untouched])
    for row in written.tolist():
        last = int(torch.nonzero(idx == row).max())
        assert torch.equal(buf.storage["act"][row], new_act[last])
    assert all(torch.equal(buf.storage[k], before[k]) for k in ("obs", "rew", "next_obs", "done"))
    assert buf.size == 30 and buf.ptr == 30
    assert set(buf.state_dict()) == {"capacity", "ptr", "size", "shapes", "data", "generator"}  # format unchanged


def test_replay_overwrite_refuses_rows_not_stored_and_unknown_keys():
    buf = filled_buffer()
    with pytest.raises(IndexError, match=r"\[0, 30\)"):
        buf.overwrite(torch.tensor([3, 30]), act=torch.zeros(2, 3))
    with pytest.raises(KeyError, match="goal"):
        buf.overwrite(torch.tensor([3]), goal=torch.zeros(1, 3))


def test_loop_update_writes_improved_actions_back_only_for_agents_that_rewrite_them():
    class Improver:
        rewrites_actions = True

        def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
            batch["act"] = batch["act"] + 1000.0  # DIPO's improved actions
            return {"loss": torch.zeros(())}

    buf = filled_buffer()
    gen_state = buf.generator.get_state()
    _, idx = buf.sample(8, return_indices=True)
    buf.generator.set_state(gen_state)  # update() draws the same batch
    before = buf.storage["act"].clone()
    update(Improver(), buf, 1, 8, critic_only=False)  # type: ignore[arg-type]
    changed = (buf.storage["act"] != before).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) == set(idx.tolist())
    assert torch.equal(buf.storage["act"][idx], before[idx] + 1000.0)
    Improver.rewrites_actions = False
    before = buf.storage["act"].clone()
    update(Improver(), buf, 3, 8, critic_only=False)  # type: ignore[arg-type]
    assert torch.equal(buf.storage["act"], before)


# ------------------------------------------------------------------------------------------------ transitions
def test_chunk_transitions_sum_and_scale_rewards_keep_truncation_apart_and_use_the_true_final_history():
    # 2 envs, Ta = 3 (act_steps = 2 executed), To = 2, episodes cut at 5 env steps; env 1 terminates on the first
    # action of its second chunk (the chunk stops after one step)
    z, kill = np.zeros((3, 1)), np.array([[1.0], [0.0], [0.0]])
    chunks = [np.stack([z, z]), np.stack([z, kill]), np.stack([z + 0.1, z]), np.stack([z, z - 0.2])]
    envs = chunk_envs("ChunkCounter-v0", 2, 0, Chunking(), None)  # type: ignore[arg-type]
    buf = chunk_buffer(100, (2, 1), 1, act_steps=2)
    out = collect(ScriptedAgent(chunks), envs, envs.reset(), 4, buf, act_steps=2,  # type: ignore[arg-type]
                  scale_reward_factor=0.01)
    rows = buf.all()
    # (t, env) order; histories [k - 1, k] with the first observation repeated at a reset
    want_obs = [[0, 0], [0, 0], [1, 2], [1, 2], [3, 4], [0, 0], [0, 0], [1, 2]]
    want_next = [[1, 2], [1, 2], [3, 4], [2, 3], [4, 5], [1, 2], [1, 2], [3, 4]]
    want_rew = [1 + 2, 1 + 2, 3 + 4, 3, 5, 1 + 2, 1 + 2, 3 + 4]  # summed over executed steps; 3: stopped early
    want_done = [0, 0, 0, 1, 0, 0, 0, 0]  # env 1 terminated at t = 1; env 0's time limit at t = 2 is not a done
    np.testing.assert_array_equal(rows.obs.numpy(), want_obs)
    np.testing.assert_array_equal(rows.next_obs.numpy(), want_next)  # t = 2: the true final [4, 5], not the reset
    np.testing.assert_allclose(rows.rew.numpy(), 0.01 * np.array(want_rew), rtol=1e-6)
    np.testing.assert_array_equal(rows.done.numpy(), want_done)
    executed = np.stack([c[i, :2, 0] for c in chunks for i in range(2)])  # the executed prefix, even when cut short
    np.testing.assert_array_equal(rows.act.numpy(), executed.astype(np.float32))
    assert out.env_steps == (2 + 2 + 1 + 2) + (2 + 1 + 2 + 2)
    assert sorted(out.episodes) == [(6.0, 3), (15.0, 5)]  # unscaled returns, lengths in env steps
    np.testing.assert_array_equal(out.last_obs[:, :, 0], [[1, 2], [3, 4]])


# ------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass(frozen=True)
class ToyConfig(DQLParams, ChunkOffPolicyConfig):
    """A test system: DQL on the counter env through the loop."""

    horizon_steps: int = 2
    act_steps: int = 2
    cond_steps: int = 1
    critic_hidden: tuple[int, ...] = (16, 16)
    actor_lr: float = 1e-3
    n_envs: int = 2
    n_steps: int = 3
    n_train_itr: int = 4
    batch_size: int = 8
    replay_ratio: float = 4.0
    buffer_size: int = 100
    n_critic_warmup_itr: int = 1
    eval_every: int = 2
    eval_episodes: int = 1
    checkpoint_every: int = 1
    progress: bool = False


def toy_model(cfg: ToyConfig) -> Any:
    return build_model({"type": "ddpm", "event_shape": [cfg.horizon_steps, 1], "cond_dim": cfg.cond_steps,
                        "denoiser": {"type": "chunk_mlp", "hidden": 16, "blocks": 1, "time_dim": 4,
                                     "activation": "mish"}, "normalizer": {"kind": "none"},
                        "diffusion": {"num_steps": 3, "schedule": "cosine", "prediction": "epsilon", "clip_x0": 1.0},
                        "sampler": {"sampler": "ddpm"}})


def run_toy(cfg: ToyConfig, agent_factory: Any = None) -> Path:
    seed_everything(cfg.seed)
    envs = chunk_envs("ChunkCounter-v0", cfg.n_envs, cfg.seed, cfg, None)  # type: ignore[arg-type]
    eval_env = chunk_env("ChunkCounter-v0", cfg, None)  # type: ignore[arg-type]
    agent = agent_factory() if agent_factory else DQL(toy_model(cfg), 1, cfg, seed=cfg.seed)
    session = RunSession(cfg, "chunk_offpolicy_test", "ChunkCounter-v0",
                         signature=env_signature("ChunkCounter-v0", eval_env.env))
    return train(cfg, session, agent, envs, eval_env, parts={"extra": {"x": torch.ones(2)}},
                 summary={"system": "toy"})


class CountingAgent:
    """Records the updates the loop asks for; acts with a small Gaussian chunk policy."""

    device = torch.device("cpu")
    rewrites_actions = False

    def __init__(self) -> None:
        self.policy = GaussianPolicy(1, 1, 2, 1, hidden=(8,), residual=False)
        self.calls: list[bool] = []

    @property
    def num_updates(self) -> int:
        return len(self.calls)

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.sample(obs).action

    def update(self, batch: Batch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        assert batch.obs.shape == (5, 1) and batch.act.shape == (5, 2)  # To Do and act_steps Da
        self.calls.append(critic_only)
        return {"loss": torch.tensor(float(critic_only))}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_updates_per_iteration_is_the_references_int_of_n_steps_n_envs_over_batch_times_replay_ratio():
    assert updates_per_iteration(500, 40, 1000, 16) == 320  # DPPO's Hopper DQL: num_batch
    assert updates_per_iteration(500, 40, 1000, 64) == 1280  # DIPO
    assert updates_per_iteration(3, 2, 5, 4) == 4  # int(4.8)
    with pytest.raises(ConfigError, match="replay_ratio=0.5"):
        ChunkOffPolicyConfig(n_steps=3, n_envs=2, batch_size=20, replay_ratio=0.5)


def test_loop_runs_replay_ratio_updates_per_iteration_critic_only_during_warmup(tmp_path):
    cfg = ToyConfig(run_dir=tmp_path / "run", n_train_itr=3, n_critic_warmup_itr=2, batch_size=5, replay_ratio=4.0)
    agent = CountingAgent()
    run_dir = run_toy(cfg, lambda: agent)
    n = updates_per_iteration(3, 2, 5, 4.0)  # 4
    assert agent.calls == [True] * n + [True] * n + [False] * n
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    train_rows = [r for r in rows if r.get("train/updates")]
    assert [float(r["train/updates"]) for r in train_rows] == [n] * 3
    assert [float(r["train/critic_only"]) for r in train_rows] == [1.0, 1.0, 0.0]
    assert [float(r["gradient_steps"]) for r in train_rows] == [n, 2 * n, 3 * n]
    assert [float(r["buffer_size"]) for r in train_rows] == [6, 12, 18]  # n_steps * n_envs per iteration
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates_per_iteration"] == n and summary["system"] == "toy" and summary["iterations"] == 3


def test_loop_refuses_envs_that_do_not_match_n_envs_before_opening_anything():
    envs = chunk_envs("ChunkCounter-v0", 2, 0, Chunking(), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="2 envs but n_envs=3"):
        train(ToyConfig(n_envs=3), None, CountingAgent(), envs, None)  # type: ignore[arg-type]


def test_resume_of_a_killed_dql_run_reproduces_the_uninterrupted_run(tmp_path):
    full = run_toy(ToyConfig(run_dir=tmp_path / "full"))
    part = run_toy(ToyConfig(run_dir=tmp_path / "part", n_train_itr=2))
    # killed after logging iteration 2 but before its checkpoint landed: the resumed run redoes iteration 2
    newest = ckpt.list_checkpoints(part / "checkpoints")
    shutil.rmtree(newest[-1])
    run_toy(ToyConfig(run_dir=part, resume=part))

    def curve(d: Path) -> list[dict[str, str]]:
        rows = csv.DictReader((d / "metrics.csv").read_text().splitlines())
        return [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("perf/")} for r in rows]

    want = curve(full)
    assert len(want) == 5 and any(r.get("actor_loss") for r in want) and any(r.get("eval/return_mean") for r in want)
    assert curve(part) == want
    s_full, s_part = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert s_part["eval_return_mean"] == s_full["eval_return_mean"] and s_part["gradient_steps"] == 4 * 3
    _, parts = ckpt.load_checkpoint(part, parts=("buffer", "extra"))
    assert int(parts["buffer"]["size"]) == 4 * 3 * 2 and torch.equal(parts["extra"]["x"], torch.ones(2))
