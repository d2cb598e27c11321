"""Offline agents: each one's own term is what its paper says, and its update moves things the right way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.agents import BC, CQL, EDAC, IQL, TD3BC, BCParams, CQLParams, EDACParams, IQLParams, TD3BCParams
from diffrl.agents.iql import expectile_loss
from diffrl.data import Batch, Normalizer, ReplayBuffer

DO, DA, H = 5, 2, (32, 32)


def batch(n: int = 64, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.for_transitions(n, DO, DA, seed=seed)
    buf.add_batch(obs=rng.normal(size=(n, DO)), act=rng.uniform(-0.9, 0.9, (n, DA)), rew=rng.normal(size=n),
                  next_obs=rng.normal(size=(n, DO)), done=(rng.random(n) < 0.1).astype(np.float32))
    return buf.all()


def test_expectile_loss_weights_negative_errors_by_one_minus_tau():
    diff = torch.tensor([2.0, -2.0])
    assert expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 4 + 0.3 * 4) / 2)
    assert expectile_loss(torch.tensor([-1.0]), 0.9).item() == pytest.approx(0.1)
    assert expectile_loss(torch.tensor([1.0]), 0.9).item() == pytest.approx(0.9)


def test_bc_drives_the_policy_towards_dataset_actions():
    torch.manual_seed(0)
    agent, b = BC(DO, DA, BCParams(hidden=H, actor_lr=1e-2)), batch()
    first = agent.update(b)["actor_loss"].item()
    for _ in range(200):
        last = agent.update(b)["actor_loss"].item()
    assert last < 0.2 * first


def test_td3bc_lambda_is_alpha_over_mean_abs_q():
    torch.manual_seed(0)
    agent, b = TD3BC(DO, DA, TD3BCParams(hidden=H, alpha=2.5)), batch()
    with torch.no_grad():
        q = agent.critic(b.obs, agent.actor(b.obs))[0]
    _, metrics = agent._actor_loss(b)
    assert metrics["lambda"].item() == pytest.approx(2.5 / q.abs().mean().item(), rel=1e-5)


def test_iql_value_learns_an_upper_expectile_of_q():
    # 8 states, each with 8 different actions: V(s) regresses onto the 0.9-expectile of Q(s, .) over those actions,
    # so it sits above most of them (with one action per state V can fit each Q exactly and the sign is noise)
    torch.manual_seed(0)
    b = batch()
    b["obs"] = b.obs[:8].repeat(8, 1)
    agent = IQL(DO, DA, IQLParams(hidden=H, expectile=0.9, value_lr=1e-2))
    for _ in range(300):
        agent.update(b)
    with torch.no_grad():
        adv = agent.critic_target(b.obs, b.act).min(0).values - agent.value(b.obs).squeeze(-1)
    assert (adv < 0).float().mean() > 0.6  # V sits above most target Qs at expectile 0.9


def test_iql_actor_schedule_reaches_zero_at_the_end():
    agent = IQL(DO, DA, IQLParams(hidden=H, actor_lr_steps=10))
    for _ in range(10):
        agent.update(batch())
    assert agent.actor_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cql_pushes_q_of_out_of_distribution_actions_below_dataset_actions():
    torch.manual_seed(0)
    agent, b = CQL(DO, DA, CQLParams(hidden=H, critic_hidden=H, cql_alpha=5.0, critic_lr=1e-3)), batch()
    for _ in range(150):
        metrics = agent.update(b)
    with torch.no_grad():
        q_data = agent.critic(b.obs, b.act).mean()
        q_rand = agent.critic(b.obs, torch.empty_like(b.act).uniform_(-1, 1)).mean()
    assert q_rand < q_data
    assert metrics["cql_gap"].item() > 0  # logsumexp over sampled actions exceeds Q(s, a_data)


def test_cql_orthogonal_init_gives_orthogonal_member_weights():
    agent = CQL(DO, DA, CQLParams(hidden=H, critic_hidden=H))
    w = agent.critic.layers[1].weight[0]  # (32, 32)
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(32), atol=1e-4, rtol=1e-4)  # gain sqrt(2)
    torch.testing.assert_close(agent.critic_target.layers[1].weight, agent.critic.layers[1].weight)


def test_edac_diversity_term_equals_an_independent_computation():
    torch.manual_seed(0)
    n = 3
    agent, b = EDAC(DO, DA, EDACParams(hidden=H, critic_hidden=H, num_critics=n, target_subset=n, eta=1.0)), batch()
    _, metrics = agent._critic_loss(b, agent.alpha)
    grads = []
    for i in range(n):  # gradient of each member separately, through plain autograd
        a = b.act.clone().requires_grad_(True)
        q = agent.critic(b.obs, a)[i].sum()
        g = torch.autograd.grad(q, a)[0]
        grads.append(g / (g.norm(dim=-1, keepdim=True) + 1e-10))
    total = sum((grads[i] * grads[j]).sum(-1) for i in range(n) for j in range(n) if i != j)
    torch.testing.assert_close(metrics["diversity_loss"], total.mean() / (n - 1), atol=1e-5, rtol=1e-5)


def test_normalizer_round_trips_and_matches_corl_statistics():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 4))
    norm = Normalizer.fit(x)
    np.testing.assert_allclose(norm.std, x.std(0) + 1e-3, rtol=1e-6)
    y = norm(x)
    assert abs(y.mean()) < 1e-5 and y.dtype == np.float32
    again = Normalizer.from_state_dict(norm.state_dict())
    np.testing.assert_array_equal(again(x), y)
    torch.testing.assert_close(norm(torch.as_tensor(x, dtype=torch.float32)), torch.as_tensor(y))
