"""The goal-conditioned episode buffer, HER relabelling and the DDPG+HER agent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.agents.ddpg_her import DDPGHER, DDPGHERParams, RunningNormalizer
from diffrl.data.episodes import EpisodeBuffer
from diffrl.envs.make import make_env

T, N = 6, 5


def coded_episodes(n: int = N, offset: int = 0) -> dict[str, np.ndarray]:
    """Episodes whose entries encode (episode, step): obs[i, t] = (i, t, ...), ag[i, j] = (i, j, 100 + i)."""
    i = np.arange(offset, offset + n, dtype=np.float32)[:, None]
    steps = np.arange(T + 1, dtype=np.float32)[None, :]
    obs = np.stack([np.broadcast_to(i, (n, T + 1)), np.broadcast_to(steps, (n, T + 1))], -1)
    ag = np.stack([np.broadcast_to(i, (n, T + 1)), np.broadcast_to(steps, (n, T + 1)),
                   np.broadcast_to(100 + i, (n, T + 1))], -1)
    g = np.full((n, T, 3), -7.0, np.float32)  # the desired goal is never an achieved goal
    act = np.zeros((n, T, 2), np.float32)
    return {"obs": obs.astype(np.float32), "ag": ag.astype(np.float32), "g": g, "act": act}


def zero_reward(ag: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.zeros(len(ag), np.float32)


def filled(capacity: int = 10) -> EpisodeBuffer:
    buf = EpisodeBuffer(capacity, T, 2, 2, 3, seed=3)
    buf.add_episodes(coded_episodes())
    return buf


@pytest.mark.parametrize("strategy", ["future", "final", "episode", "none"])
def test_her_goals_come_from_the_same_episode_at_the_strategy_steps(strategy):
    b = filled().sample_her(4000, zero_reward, strategy, replay_k=4)
    ep, t = b.obs[:, 0], b.obs[:, 1]
    assert torch.equal(b.next_obs[:, 1], t + 1) and torch.equal(b.next_achieved_goal[:, 1], t + 1)
    relabelled = b.goal[:, 0] != -7.0
    frac = relabelled.float().mean().item()
    if strategy == "none":
        assert frac == 0.0
        return
    assert frac == pytest.approx(0.8, abs=0.03)  # 1 - 1/(1 + replay_k)
    g = b.goal[relabelled]
    assert torch.equal(g[:, 0], ep[relabelled]) and torch.equal(g[:, 2], 100 + ep[relabelled])  # same episode
    j, tt = g[:, 1], t[relabelled]
    if strategy == "future":
        assert bool((j > tt).all()) and bool((j <= T).all())
        assert set(torch.unique(j - tt).tolist()) == set(range(1, T + 1))  # every future offset occurs
    elif strategy == "final":
        assert bool((j == T).all())
    else:
        assert set(torch.unique(j).tolist()) == set(range(T + 1))


def test_her_rewards_are_the_sparse_fetch_reward_of_the_stored_next_achieved_goal_and_the_relabelled_goal():
    # The reward of a transition t -> t+1 is FetchReach's -(||ag_{t+1} - goal|| > 0.05) (Plappert et al. 2018),
    # with goal the relabelled one; checked against the stored episodes and the formula, not the env's function.
    env = make_env("FetchReach-v4")
    assert env.unwrapped.distance_threshold == 0.05 and env.unwrapped.reward_type == "sparse"
    rng = np.random.default_rng(0)
    n = 8
    obs = rng.normal(size=(n, T + 1, 10)).astype(np.float32)
    obs[:, :, 0], obs[:, :, 1] = np.arange(n)[:, None], np.arange(T + 1)[None, :]  # (episode, step) codes
    ag = rng.uniform(0, 0.1, size=(n, T + 1, 3)).astype(np.float32)
    g = rng.uniform(0, 0.1, size=(n, T, 3)).astype(np.float32)
    buf = EpisodeBuffer(n, T, 10, 4, 3)
    buf.add_episodes({"obs": obs, "ag": ag, "g": g, "act": rng.uniform(-1, 1, size=(n, T, 4))})
    b = buf.sample_her(512, lambda a, goal: env.unwrapped.compute_reward(a, goal, None))
    ep, t = b.obs[:, 0].long().numpy(), b.obs[:, 1].long().numpy()
    next_ag, goal = ag[ep, t + 1], b.goal.numpy()
    np.testing.assert_array_equal(b.next_achieved_goal.numpy(), next_ag)
    # each goal is the episode's desired goal at t, or one of its achieved goals after t (strategy "future")
    original = np.all(goal == g[ep, t], axis=-1)
    future = np.array([any(np.array_equal(goal[k], ag[ep[k], j]) for j in range(t[k] + 1, T + 1))
                       for k in range(len(goal))])
    assert np.all(original | future) and 0.1 < original.mean() < 0.3  # 1 / (1 + replay_k) kept
    expected = -(np.linalg.norm(next_ag - goal, axis=-1) > 0.05).astype(np.float32)
    np.testing.assert_array_equal(b.rew.numpy(), expected)
    assert 0.1 < (expected == 0).mean() < 0.9  # both successes and failures occur
    assert torch.equal(b.done, torch.zeros(512))


def test_episode_ring_overwrites_oldest_and_state_dict_round_trips():
    buf = filled(capacity=7)
    buf.add_episodes(coded_episodes(4, offset=N))  # 9 episodes into 7 slots: episodes 0 and 1 are gone
    assert len(buf) == 7 and buf.added == 9
    assert sorted(buf.episodes()["obs"][:, 0, 0].tolist()) == list(range(2, 9))
    copy = EpisodeBuffer(7, T, 2, 2, 3)
    copy.load_state_dict(buf.state_dict())
    a, b = buf.sample_her(64, zero_reward), copy.sample_her(64, zero_reward)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_overwrite_fills_free_slots_then_replaces_distinct_random_episodes():
    # baselines' HER buffer (ITER): once full, new episodes take random slots, so old data decays gradually
    buf = EpisodeBuffer(7, T, 2, 2, 3, seed=3, overwrite="random")
    buf.add_episodes(coded_episodes())  # 5 of 7 slots, in order
    assert buf.episodes()["obs"][:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    buf.add_episodes(coded_episodes(4, offset=N))  # 2 free slots, then 2 random old episodes are replaced
    ids = buf.episodes()["obs"][:, 0, 0].tolist()
    assert len(buf) == 7 and buf.added == 9 and ids[5:] == [5, 6] and {7, 8} <= set(ids)
    assert len(set(ids)) == 7 and len(set(ids) & {0, 1, 2, 3, 4}) == 3  # distinct slots: nothing new is lost
    survivors = []
    for seed in range(20):  # which old episodes survive depends on the buffer's seed, not on their age
        b = EpisodeBuffer(7, T, 2, 2, 3, seed=seed, overwrite="random")
        b.add_episodes(coded_episodes())
        b.add_episodes(coded_episodes(4, offset=N))
        survivors.append(tuple(sorted(set(b.episodes()["obs"][:, 0, 0].tolist()) & {0, 1, 2, 3, 4})))
    assert len(set(survivors)) > 1 and any(0 in s for s in survivors)
    big = EpisodeBuffer(3, T, 2, 2, 3, overwrite="random")
    big.add_episodes(coded_episodes())  # more than the capacity at once: the last 3 are kept
    assert sorted(big.episodes()["obs"][:, 0, 0].tolist()) == [2, 3, 4]
    with pytest.raises(ValueError, match="overwrite"):
        EpisodeBuffer(3, T, 2, 2, 3, overwrite="newest")


def test_episode_buffer_rejects_bad_shapes():
    buf = EpisodeBuffer(4, T, 2, 2, 3)
    bad = coded_episodes()
    bad["g"] = bad["g"][:, :-1]
    with pytest.raises(ValueError, match="g"):
        buf.add_episodes(bad)


def test_running_normalizer_matches_numpy_and_clips():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(3, 2, size=(100, 4)), rng.normal(3, 2, size=(50, 4))
    norm = RunningNormalizer(4, eps=0.01, clip=5.0)
    norm.update(torch.as_tensor(x1))
    norm.update(torch.as_tensor(x2))
    x = np.concatenate([x1, x2])
    np.testing.assert_allclose(norm.mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), x.std(0), rtol=1e-5)
    out = norm(torch.tensor([[1e6, -1e6, 3.0, 3.0]], dtype=torch.float32))
    assert out[0, 0] == 5.0 and out[0, 1] == -5.0


def agent_and_batch(**params):
    torch.manual_seed(0)
    agent = DDPGHER(5, 3, 2, DDPGHERParams(hidden=(16, 16), **params))
    B = 32
    batch = {"obs": torch.randn(B, 5), "act": torch.rand(B, 2) * 2 - 1, "rew": -(torch.rand(B) > 0.5).float(),
             "next_obs": torch.randn(B, 5), "done": torch.zeros(B), "goal": torch.randn(B, 3),
             "achieved_goal": torch.randn(B, 3), "next_achieved_goal": torch.randn(B, 3)}
    from diffrl.data.batch import Batch

    return agent, Batch(batch)


def test_ddpg_targets_move_only_in_update_target_by_polyak():
    agent, batch = agent_and_batch()
    before = [p.clone() for p in agent.actor_target.parameters()]
    agent.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.actor_target.parameters()))
    agent.update_target()
    for old, new, main in zip(before, agent.actor_target.parameters(), agent.actor.parameters()):
        torch.testing.assert_close(new, 0.95 * old + 0.05 * main)


def test_ddpg_target_is_clipped_to_the_return_range():
    agent, batch = agent_and_batch(gamma=0.5)
    with torch.no_grad():  # a target critic that predicts huge values either way
        agent.critic_target[-1].bias.fill_(1e3)
    q_big = agent.update(batch)["critic_loss"]
    agent2, _ = agent_and_batch(gamma=0.5, clip_return=False)
    with torch.no_grad():
        agent2.critic_target[-1].bias.fill_(1e3)
    assert agent2.update(batch)["critic_loss"] > 100 * q_big  # unclipped targets are ~500, clipped ones <= 0


def test_ddpg_exploration_and_deterministic_actions():
    agent, _ = agent_and_batch(random_eps=1.0, noise_eps=0.0)
    obs = {"observation": np.zeros((2000, 5), np.float32), "desired_goal": np.zeros((2000, 3), np.float32)}
    a = agent.act(obs)
    assert a.min() >= -1 and a.max() <= 1 and abs(a.mean()) < 0.05 and a.std() == pytest.approx(1 / np.sqrt(3), 0.05)
    # deterministic: the actor's tanh output on [norm(o), norm(g)], normalised by hand with the running statistics
    # (clip_obs 200 first, then (x - mean) / max(std, 0.01) clipped to +-5), with no exploration noise
    rng = np.random.default_rng(1)
    seen_o, seen_g = rng.normal(2, 3, size=(500, 5)), rng.normal(-1, 0.5, size=(500, 3))
    seen_o[:, 4] = 7.0  # a constant dimension: its std is floored at norm_eps
    agent.update_normalizers(torch.as_tensor(seen_o), torch.as_tensor(seen_g))
    o, goal = rng.normal(2, 6, size=(64, 5)).astype(np.float32), rng.normal(-1, 2, size=(64, 3)).astype(np.float32)
    o[0, 0] = 1e4  # beyond clip_obs and the normalised clip
    d = agent.act({"observation": o, "desired_goal": goal}, deterministic=True)

    def norm(x, seen):
        return np.clip((np.clip(x, -200, 200) - seen.mean(0)) / np.maximum(seen.std(0), 0.01), -5, 5)

    x = torch.as_tensor(np.concatenate([norm(o, seen_o), norm(goal, seen_g)], 1), dtype=torch.float32)
    with torch.no_grad():
        want = agent.actor(x).numpy()
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5)
    assert d.std(0).min() > 0.01 and not np.allclose(agent.act({"observation": o, "desired_goal": goal}), d)


def test_ddpg_state_dict_round_trip_continues_identically():
    agent, batch = agent_and_batch()
    agent.update_normalizers(batch.obs, batch.goal)
    agent.update(batch)
    other, _ = agent_and_batch()
    other.load_state_dict(agent.state_dict())
    m1, m2 = agent.update(batch), other.update(batch)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(agent.o_norm.mean, other.o_norm.mean)
