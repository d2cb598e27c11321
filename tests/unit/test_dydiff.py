"""Dydiff's pieces: windows, the action-conditioned window model, policy injection, the termination cut, the
filters and the augment hook's real/model split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffrl.augment.dydiff import (
    PAD_EPS,
    DydiffAugment,
    RolloutSettings,
    WindowLayout,
    condition_mask,
    cut_at_termination,
    model_spec,
    pad_windows,
    policy_injection,
    sample_states,
    select_rollouts,
    trajectory_windows,
)
from diffrl.data.replay import ReplayBuffer
from diffrl.diffusion.spec import build_model
from diffrl.envs.termination import termination_rule
from diffrl.errors import DatasetError

LAYOUT = WindowLayout(obs_dim=3, act_dim=2, horizon=6)


def tiny_model(layout: WindowLayout = LAYOUT):
    spec = model_spec(layout, dim=8, dim_mults=(1, 2), sampler="heun", steps=4, s_churn=60.0, s_tmin=0.37,
                      s_tmax=52.24, s_noise=1.002)
    model = build_model(spec)
    model.normalizer.fit(torch.randn(100, layout.horizon, layout.channels) * 2)
    return model.eval()


def test_windows_pad_terminated_episodes_and_keep_only_whole_windows_of_truncated_ones() -> None:
    obs = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    act = -np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    episodes = [slice(0, 4), slice(4, 10)]  # 4 steps that terminate, 6 steps cut by a time limit
    windows, real = trajectory_windows(obs, act, episodes, [True, False], horizon=5)
    # terminated: a window at each of its 4 steps (padded); truncated: 6 - 5 + 1 = 2 whole windows
    assert windows.shape == (6, 5, 5) and real.shape == (6, 5)
    assert real.sum(1).tolist() == [4, 3, 2, 1, 5, 5]
    assert np.array_equal(windows[1, :3, :3], obs[1:4]) and np.array_equal(windows[1, :3, 3:], act[1:4])
    assert np.isnan(windows[1, 3:]).all()
    assert np.array_equal(windows[5, :, :3], obs[5:10])
    with pytest.raises(DatasetError, match="--horizon 10 or less"):
        trajectory_windows(obs, act, [slice(0, 10)], [True], horizon=11)



def test_padding_rows_sit_just_below_the_normalised_range() -> None:
    model = tiny_model()
    w = torch.randn(4, LAYOUT.horizon, LAYOUT.channels)
    real = torch.ones(4, LAYOUT.horizon, dtype=torch.bool)
    real[:, 4:] = False
    padded = pad_windows(w, real, model)
    assert torch.equal(padded[:, :4], w[:, :4])
    assert torch.allclose(model.normalizer(padded[:, 4:]), torch.full_like(padded[:, 4:], -1 - PAD_EPS), atol=1e-5)


def test_window_model_keeps_s0_and_the_given_actions_exactly_through_a_full_sampling_run() -> None:
    model = tiny_model()
    s0, actions = torch.randn(5, 3), torch.rand(5, LAYOUT.horizon, 2) * 2 - 1
    mask = condition_mask(LAYOUT)
    assert mask[0, :3].all() and mask[:, 3:].all() and not mask[1:, :3].any()
    for sampler, steps in (("heun", 4), ("dpmpp_2m_sde", 5)):
        values = torch.zeros(5, LAYOUT.horizon, LAYOUT.channels)
        values[:, 0, :3], values[:, :, 3:] = s0, actions
        from diffrl.diffusion.inpaint import Inpaint
        rows = model.sample(5, inpaint=Inpaint(mask, values, clean=True), sampler=sampler, steps=steps,
                            generator=torch.Generator().manual_seed(0))
        assert torch.equal(rows[:, 0, :3], s0) and torch.equal(rows[:, :, 3:], actions)
    states = sample_states(model, LAYOUT, s0, actions, torch.Generator().manual_seed(0))
    assert states.shape == (5, LAYOUT.horizon, 3) and torch.equal(states[:, 0], s0)


class _ShiftDynamics:
    """s' = s + mean(a) on every dim."""

    def predict(self, obs, act, generator=None):
        return obs + act.mean(1, keepdim=True)


class _ConstantModel:
    """A 'diffusion model' whose states are all ``c`` (rows keep the given s0 and actions)."""

    def __init__(self, c: float) -> None:
        self.c, self.calls = c, 0

    def sample(self, n, inpaint=None, generator=None, **options):
        self.calls += 1
        rows = torch.full(inpaint.values.shape, self.c)
        return torch.where(inpaint.mask, inpaint.values, rows)


def test_policy_injection_averages_the_model_states_and_relabels_every_action() -> None:
    policy = lambda s: torch.tanh(s[:, :2])  # noqa: E731
    s0 = torch.tensor([[0.1, -0.2, 0.3], [1.0, 0.5, -0.5]])
    dyn, model = _ShiftDynamics(), _ConstantModel(2.0)
    # by hand: the autoregressive rollout, then K rounds of (average with c, relabel)
    states = [s0]
    for _ in range(LAYOUT.horizon - 1):
        states.append(dyn.predict(states[-1], policy(states[-1])))
    expect = torch.stack(states, 1)
    for _ in range(2):
        expect = 0.5 * (expect.clone().fill_(2.0) + expect)
        expect[:, 0] = s0
    got_s, got_a = policy_injection(policy, dyn, model, LAYOUT, s0, rounds=2)
    assert model.calls == 2
    assert torch.allclose(got_s, expect) and torch.equal(got_s[:, 0], s0)
    assert torch.allclose(got_a, policy(got_s.flatten(0, 1)).view(2, LAYOUT.horizon, 2))
    s_zero, a_zero = policy_injection(policy, dyn, model, LAYOUT, s0, rounds=0)  # K = 0: the single-step rollout
    assert torch.allclose(s_zero, torch.stack(states, 1))


def test_rollouts_are_cut_after_their_first_terminal() -> None:
    rule = termination_rule("Hopper-v5")
    healthy = np.array([1.25, 0.0] + [0.0] * 9, dtype=np.float32)
    fallen = healthy.copy()
    fallen[0] = 0.5  # z below 0.7
    next_obs = np.stack([np.stack([healthy, fallen, healthy, fallen]), np.stack([healthy] * 4)])
    done, keep = cut_at_termination(next_obs, rule)
    assert done.tolist() == [[False, True, False, True], [False] * 4]
    assert keep.tolist() == [[True, True, False, False], [True] * 4]


def test_hardmax_keeps_exactly_the_top_fraction() -> None:
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = select_rollouts(scores, 0.6, "hardmax")
    assert len(kept) == 600 and len(set(kept.tolist())) == 600
    assert scores[kept].min() >= torch.sort(scores).values[400 - 1]
    assert len(select_rollouts(scores, 0.6, "none")) == 1000


def test_softmax_keeps_the_fraction_and_draws_as_its_distribution() -> None:
    scores = torch.arange(10.0)
    # the first draw without replacement is the softmax itself: count how often each index comes first
    gen = torch.Generator().manual_seed(0)
    firsts = torch.tensor([int(select_rollouts(scores, 0.2, "softmax", 2.0, gen)[0]) for _ in range(3000)])
    z = (scores - scores.mean()) / scores.std(unbiased=False)
    p = torch.softmax(z / 2.0, 0) + 1e-6
    p = p / p.sum()
    freq = torch.bincount(firsts, minlength=10).float() / 3000
    assert torch.allclose(freq, p, atol=0.03)
    kept = select_rollouts(torch.randn(500), 0.6, "softmax", 0.05, gen)
    assert len(kept) == 300 and len(set(kept.tolist())) == 300
    # the reference's temperature 0.05 on z-scores: the few best rollouts are always kept, and once they are drawn
    # the epsilon smoothing dominates, so the rest of the kept set is close to uniform (between none and hardmax)
    s = torch.randn(500, generator=gen)
    soft = select_rollouts(s, 0.2, "softmax", 0.05, gen)
    assert set(torch.topk(s, 5).indices.tolist()) <= set(soft.tolist())
    assert 0.1 < float(s[soft].mean()) < float(s[select_rollouts(s, 0.2, "hardmax")].mean()) - 0.5


class _Normalizer:
    def __call__(self, x):
        return np.asarray(x) * 2.0


def test_hook_fills_the_model_buffer_in_the_loop_space_and_sets_the_batch_split() -> None:
    settings = RolloutSettings(rollouts=8, rounds=1, filter="hardmax", keep=0.5, real_ratio=0.6, min_model_rows=30,
                               every=10, capacity=1000)
    start = np.zeros((20, 3), dtype=np.float32)
    start[:, 0] = 1.0

    class Reward:
        def predict(self, obs, act):
            return obs[:, 0]

    hook = DydiffAugment(start, _ConstantModel(1.0), LAYOUT, _ShiftDynamics(), Reward(),
                         termination_rule("HalfCheetah-v5"), settings, seed=0)
    assert hook.real_ratio(0) == 1.0  # empty model buffer: all real
    model_buffer = ReplayBuffer.for_transitions(1000, 3, 2)

    class Policy:
        def act(self, obs, deterministic=False):
            assert deterministic
            return np.zeros((len(obs), 2), dtype=np.float32)

    ctx = dataclasses.make_dataclass("Ctx", ["model", "policy", "normalizer", "reward_scale"])(
        model_buffer, Policy(), _Normalizer(), 3.0)
    metrics = hook(0, ctx)
    # 8 rollouts, half kept, H - 1 = 5 transitions each (no terminal for HalfCheetah): 20 rows
    assert len(model_buffer) == 20 and metrics["dydiff/transitions_added"] == 20
    assert hook.real_ratio(0) == 1.0  # 20 < min_model_rows
    batch = model_buffer.sample(20)
    assert torch.allclose(batch.obs[:, 0], torch.full((20,), 2.0))  # states normalised by the loop's normaliser
    assert torch.allclose(batch.rew, torch.full((20,), 3.0))  # reward model's 1.0, scaled by the loop's 3
    hook(10, ctx)
    assert hook.real_ratio(10) == 0.6
    state = hook.state_dict()
    other = DydiffAugment(start, _ConstantModel(1.0), LAYOUT, _ShiftDynamics(), Reward(),
                          termination_rule("HalfCheetah-v5"), settings, seed=5)
    other.load_state_dict(state)
    assert other.model_rows == 40 and other.real_ratio(0) == 0.6
    assert torch.equal(other.generator.get_state(), hook.generator.get_state())


def test_window_model_learns_a_linear_system_from_s0_and_the_actions() -> None:
    # s' = s + 0.3 a, random starts and actions: trained briefly, the model's states given s0 and the actions must
    # be far closer to the truth than "nothing moves" at every step of the window (a model that ignored its
    # condition, or learnt only the marginal of the states, would not be)
    from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings

    layout = WindowLayout(obs_dim=2, act_dim=2, horizon=8)
    rng = np.random.default_rng(0)
    episodes, length = 200, 20
    obs, act = np.zeros((episodes * length, 2), np.float32), rng.uniform(-1, 1, (episodes * length, 2))
    for e in range(episodes):
        s = rng.uniform(-1, 1, 2)
        for t in range(e * length, (e + 1) * length):
            obs[t], s = s, s + 0.3 * act[t]
    windows, _ = trajectory_windows(obs, act.astype(np.float32), [slice(e * length, (e + 1) * length)
                                                                   for e in range(episodes)], [False] * episodes, 8)
    data = torch.as_tensor(windows)
    torch.manual_seed(0)
    model = build_model(model_spec(layout, dim=16, dim_mults=(1, 2), sampler="dpmpp_2m_sde", steps=16, s_churn=0.0,
                                   s_tmin=0.0, s_tmax=0.0, s_noise=1.0))
    model.normalizer.fit(data.reshape(-1, layout.channels))
    trainer = DiffusionTrainer(model, data, TrainerSettings(steps=1000, batch_size=32, lr=2e-3), seed=0,
                               fixed=condition_mask(layout))
    for _ in range(1000):
        trainer.train_step()
    test = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:256]]
    states = sample_states(model.eval(), layout, test[:, 0, :2], test[:, :, 2:], torch.Generator().manual_seed(0))
    error = (states - test[:, :, :2]).norm(dim=-1).mean(0)  # (H,) mean distance to the true state, per step
    still = (test[:, :1, :2] - test[:, :, :2]).norm(dim=-1).mean(0)
    assert error[0] == 0 and (error[1:] < 0.5 * still[1:]).all(), (error, still)
