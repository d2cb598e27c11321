"""SAC, REDQ and TD3 update rules on tiny networks: metrics, Polyak targets, delayed actors, state round-trips."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from diffrl.agents import REDQ, SAC, TD3, REDQParams, SACParams, TD3Params
from diffrl.data import Batch, ReplayBuffer
from diffrl.errors import CheckpointError
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree

DO, DA, BS = 4, 2, 8
HIDDEN = (32, 32)


def make_agent(kind: str, hidden: tuple[int, ...] = HIDDEN, **kw):
    if kind == "sac":
        return SAC(DO, DA, SACParams(hidden=hidden, **kw))
    if kind == "redq":
        return REDQ(DO, DA, REDQParams(hidden=hidden, num_critics=5, **{"actor_update_every": 1, **kw}))
    return TD3(DO, DA, TD3Params(hidden=hidden, **kw))


def batches(n: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.for_transitions(64, DO, DA, seed=seed)
    buf.add_batch(obs=rng.normal(size=(64, DO)), act=rng.uniform(-1, 1, (64, DA)), rew=rng.normal(size=64),
                  next_obs=rng.normal(size=(64, DO)), done=(rng.random(64) < 0.1).astype(np.float32))
    return [buf.sample(BS) for _ in range(n)]


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


EXPECTED_KEYS = {
    "sac": {"critic_loss", "q_mean", "actor_loss", "entropy", "alpha", "alpha_loss"},
    "redq": {"critic_loss", "q_mean", "actor_loss", "entropy", "alpha", "alpha_loss"},
    "td3": {"critic_loss", "q_mean", "actor_loss"},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", ["sac", "redq", "td3"])
def test_update_returns_detached_finite_scalars_with_expected_keys(kind):
    agent = make_agent(kind)
    for b in batches(2):  # TD3's first actor update happens on call 2
        metrics = agent.update(b)
    assert set(metrics) == EXPECTED_KEYS[kind]
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0, k
        assert not v.requires_grad and v.grad_fn is None, k
        assert torch.isfinite(v), k


@pytest.mark.parametrize("kind", ["sac", "redq", "td3"])
def test_update_changes_actor_and_critic_parameters(kind):
    agent = make_agent(kind, **({"policy_delay": 1} if kind == "td3" else {}))
    actor0, critic0 = params_of(agent.actor), params_of(agent.critic)
    agent.update(batches(1)[0])
    assert all(not torch.equal(a, b) for a, b in zip(params_of(agent.critic), critic0))
    assert not same(params_of(agent.actor), actor0)


def test_sac_temperature_moves_when_autotuned_and_stays_when_not():
    b = batches(1)[0]
    tuned, fixed = make_agent("sac"), make_agent("sac", autotune_alpha=False, init_alpha=0.2)
    alpha0 = tuned.log_alpha.item()
    tuned.update(b)
    fixed.update(b)
    assert tuned.log_alpha.item() != alpha0
    assert fixed.alpha.item() == pytest.approx(0.2)


def test_sac_critic_target_moves_by_polyak_average():
    tau = 0.3
    agent = make_agent("sac", tau=tau)
    old_target = params_of(agent.critic_target)
    agent.update(batches(1)[0])
    new_critic = params_of(agent.critic)
    for t, old, new in zip(agent.critic_target.parameters(), old_target, new_critic):
        torch.testing.assert_close(t, (1 - tau) * old + tau * new)
        assert not torch.equal(t, old)
    assert all(not p.requires_grad for p in agent.critic_target.parameters())


def test_redq_actor_updates_only_every_third_call():
    agent = REDQ(DO, DA, REDQParams(hidden=HIDDEN, num_critics=5, actor_update_every=3))
    bs = batches(3)
    actor0, alpha0 = params_of(agent.actor), agent.log_alpha.item()
    critic_before = params_of(agent.critic)
    m1 = agent.update(bs[0])
    assert "actor_loss" not in m1
    assert not same(params_of(agent.critic), critic_before)  # critics update on every call
    agent.update(bs[1])
    assert same(params_of(agent.actor), actor0) and agent.log_alpha.item() == alpha0
    m3 = agent.update(bs[2])
    assert "actor_loss" in m3
    assert not same(params_of(agent.actor), actor0) and agent.log_alpha.item() != alpha0


def test_redq_target_uses_subset_min():
    # With M = N the REDQ target is SAC's min over all critics; with M < N it is >= that min.
    agent = REDQ(DO, DA, REDQParams(hidden=HIDDEN, num_critics=5, target_subset=2))
    b = batches(1)[0]
    torch.manual_seed(1)
    y_subset = agent._target(b, agent.alpha)
    agent.p = REDQParams(hidden=HIDDEN, num_critics=5, target_subset=5)
    torch.manual_seed(1)
    y_all = agent._target(b, agent.alpha)
    assert bool((y_subset >= y_all - 1e-6).all()) and not torch.allclose(y_subset, y_all)


def test_redq_target_is_the_min_of_the_drawn_subset_of_all_target_critics():
    # the subset's members alone are evaluated: the same values as evaluating all N and picking them
    agent = REDQ(DO, DA, REDQParams(hidden=HIDDEN, num_critics=5, target_subset=2))
    b = batches(1)[0]
    torch.manual_seed(3)
    y = agent._target(b, agent.alpha)
    torch.manual_seed(3)
    with torch.no_grad():
        next_a, next_logp = agent.actor.sample(b.next_obs)
        idx = torch.randperm(5)[:2]
        q_all = agent.critic_target(b.next_obs, next_a)  # (5, B)
        v = q_all[idx].min(0).values - agent.alpha * next_logp
    torch.testing.assert_close(y, b.rew + agent.p.gamma * (1.0 - b.done) * v)
    assert agent.critic_target(b.next_obs, next_a, idx).shape == (2, len(b.rew))


def test_td3_actor_and_targets_update_only_every_policy_delay_calls():
    agent = make_agent("td3", policy_delay=3)
    bs = batches(3)
    actor0, actor_t0, critic_t0 = params_of(agent.actor), params_of(agent.actor_target), params_of(
        agent.critic_target)
    for b in bs[:2]:
        m = agent.update(b)
        assert "actor_loss" not in m
        assert same(params_of(agent.actor), actor0)
        assert same(params_of(agent.actor_target), actor_t0) and same(params_of(agent.critic_target), critic_t0)
    assert "actor_loss" in agent.update(bs[2])
    assert not same(params_of(agent.actor), actor0)
    assert not same(params_of(agent.actor_target), actor_t0) and not same(params_of(agent.critic_target),
                                                                          critic_t0)


def assert_identical_continuation(src, dst, bs: list[Batch]) -> None:
    for b in bs:
        torch.manual_seed(42)
        m_src = src.update(b)
        torch.manual_seed(42)
        m_dst = dst.update(b)
        assert set(m_src) == set(m_dst)
        for k in m_src:
            assert torch.equal(m_src[k], m_dst[k]), k
    for name in src.nets:
        for (pn, p), q in zip(src.nets[name].named_parameters(), dst.nets[name].parameters()):
            assert torch.equal(p, q), f"{name}.{pn}"
    assert src.num_updates == dst.num_updates


def trained_pair(kind: str, bs: list[Batch]):
    kw = {"actor_update_every": 2} if kind == "redq" else {}
    src = make_agent(kind, **kw)
    for b in bs:  # optimizer moments, counters and temperature are all non-trivial now
        src.update(b)
    torch.manual_seed(123)
    return src, make_agent(kind, **kw)


@pytest.mark.parametrize("kind", ["sac", "redq", "td3"])
def test_state_dict_round_trip_through_checkpoint_codec_gives_bit_identical_updates(kind):
    bs = batches(6)
    src, dst = trained_pair(kind, bs[:3])
    skeleton, tensors = flatten_tree(src.state_dict())  # what save_checkpoint writes (tensors are copied)
    dst.load_state_dict(unflatten_tree(json.loads(json.dumps(skeleton)), tensors))
    assert_identical_continuation(src, dst, bs[3:])


@pytest.mark.parametrize("kind", ["sac", "td3"])
def test_state_dict_round_trip_in_memory_gives_bit_identical_updates(kind):
    bs = batches(6)
    src, dst = trained_pair(kind, bs[:3])
    dst.load_state_dict(src.state_dict())
    assert_identical_continuation(src, dst, bs[3:])


def test_state_dict_is_complete():
    agent = make_agent("sac")
    agent.update(batches(1)[0])
    state = agent.state_dict()
    assert set(state["nets"]) == {"actor", "critic", "critic_target"}
    assert set(state["optims"]) == {"actor", "critic"}
    assert all(len(o["state"]) > 0 for o in state["optims"].values())  # Adam moments are included
    # the temperature is the actor optimizer's second parameter group, with its moments saved too
    actor_groups = state["optims"]["actor"]["param_groups"]
    assert len(actor_groups) == 2 and len(state["optims"]["actor"]["state"]) == len(list(agent.actor.parameters())) + 1
    assert state["extra"]["num_updates"] == 1 and "log_alpha" in state["extra"]


@pytest.mark.parametrize("kind", ["sac", "td3"])
def test_loading_state_of_other_network_size_raises_checkpoint_error(kind):
    state = make_agent(kind, hidden=(32, 32)).state_dict()
    with pytest.raises(CheckpointError, match="network sizes"):
        make_agent(kind, hidden=(16, 16)).load_state_dict(state)


def test_loading_state_of_another_agent_raises_checkpoint_error():
    with pytest.raises(CheckpointError, match="another agent"):
        make_agent("td3").load_state_dict(make_agent("sac").state_dict())


@pytest.mark.parametrize("kind", ["sac", "redq", "td3"])
def test_seeded_construction_and_updates_are_deterministic(kind):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        agent = make_agent(kind)
        runs.append([agent.update(b) for b in batches(5, seed=1)])
    for m_a, m_b in zip(*runs):
        for k in m_a:
            assert torch.equal(m_a[k], m_b[k]), k
    torch.manual_seed(1)
    other = make_agent(kind).update(batches(1, seed=1)[0])
    assert not torch.equal(other["critic_loss"], runs[0][0]["critic_loss"])


@pytest.mark.parametrize("kind", ["sac", "redq", "td3"])
def test_act_returns_bounded_actions_and_deterministic_act_is_repeatable(kind):
    agent = make_agent(kind)
    obs = np.random.default_rng(0).normal(size=(7, DO)).astype(np.float32)
    a = agent.act(obs)
    assert isinstance(a, np.ndarray) and a.shape == (7, DA)
    assert np.all(np.abs(a) <= 1)
    d1, d2 = agent.act(obs, deterministic=True), agent.act(obs, deterministic=True)
    np.testing.assert_array_equal(d1, d2)
    assert not np.array_equal(agent.act(obs), agent.act(obs))  # exploration is stochastic


def test_shared_actor_temperature_step_equals_two_separate_adam_steps():
    """One backward of actor_loss + alpha_loss through one two-group Adam == two separate Adam updates."""
    torch.manual_seed(0)
    agent = make_agent("sac")
    batch = batches(1)[0]
    actor_ref = copy.deepcopy(agent.actor)
    log_alpha_ref = agent.log_alpha.detach().clone().requires_grad_(True)
    opt_a = torch.optim.Adam(actor_ref.parameters(), lr=agent.p.actor_lr)
    opt_t = torch.optim.Adam([log_alpha_ref], lr=agent.p.alpha_lr)
    rng_state = torch.get_rng_state()
    alpha = agent.alpha
    agent._update_actor(batch.obs, alpha)
    torch.set_rng_state(rng_state)
    agent.critic.requires_grad_(False)
    a, logp = actor_ref.sample(batch.obs)
    actor_loss = (alpha * logp - agent.critic(batch.obs, a).min(0).values).mean()
    opt_a.zero_grad()
    actor_loss.backward()
    opt_a.step()
    alpha_loss = -(log_alpha_ref * (logp.detach() + agent.target_entropy)).mean()
    opt_t.zero_grad()
    alpha_loss.backward()
    opt_t.step()
    for p, q in zip(agent.actor.parameters(), actor_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(agent.log_alpha.detach(), log_alpha_ref.detach(), rtol=1e-6, atol=1e-7)


# The order of one update, and how the actor aggregates the critics, against the formulas written out: the TD target
# y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s')), the critic loss 0.5 sum_j mean_b (Q_j - y)^2 and
# the actor loss mean_b (alpha log pi(a|s) - agg_j Q_j(s, a)), each from the networks the order says it sees.
def _target_by_hand(agent, actor, alpha, b):
    a2, logp2 = actor.sample(b.next_obs)
    v = agent.critic_target(b.next_obs, a2).min(0).values - alpha * logp2
    return b.rew + agent.p.gamma * (1 - b.done) * v


def _critic_loss_by_hand(critic, y, b):
    return 0.5 * (critic(b.obs, b.act) - y).pow(2).mean(1).sum()


def _actor_loss_by_hand(critic, actor, alpha, b, agg):
    a, logp = actor.sample(b.obs)
    q = critic(b.obs, a)
    return (alpha * logp - (q.mean(0) if agg == "mean" else q.min(0).values)).mean()


@pytest.mark.parametrize(("order", "agg"), [("critic_first", "min"), ("critic_first", "mean"),
                                            ("actor_first", "mean"), ("redq", "mean"), ("redq", "min")])
def test_update_order_and_actor_aggregation_match_the_formulas(order, agg):
    flags = {"critic_first": {}, "actor_first": {"actor_first": True},
             "redq": {"actor_first": True, "target_first": True}}[order]
    agent = make_agent("sac", actor_q=agg, **flags)
    b = batches(1)[0]
    ref = copy.deepcopy(agent)  # the networks before the update
    torch.manual_seed(7)
    m = agent.update(b)
    torch.manual_seed(7)  # the same draws, in the order the update makes them
    with torch.no_grad():
        if order == "critic_first":  # SAC: target from the old actor, critic step, actor on the new critic
            y = _target_by_hand(ref, ref.actor, ref.alpha, b)
            critic = _critic_loss_by_hand(ref.critic, y, b)
            actor = _actor_loss_by_hand(agent.critic, ref.actor, ref.alpha, b, agg)
        elif order == "actor_first":  # CQL / EDAC: actor on the old critic, then a target from the NEW actor
            actor = _actor_loss_by_hand(ref.critic, ref.actor, ref.alpha, b, agg)
            y = _target_by_hand(ref, agent.actor, agent.alpha, b)
            critic = _critic_loss_by_hand(ref.critic, y, b)
        else:  # REDQ's code (SynthER): target and actor loss both from the old networks
            y = _target_by_hand(ref, ref.actor, ref.alpha, b)
            actor = _actor_loss_by_hand(ref.critic, ref.actor, ref.alpha, b, agg)
            critic = _critic_loss_by_hand(ref.critic, y, b)
    assert torch.allclose(m["critic_loss"], critic, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m["actor_loss"], actor, rtol=1e-5, atol=1e-6)


def test_target_first_needs_actor_first():
    with pytest.raises(Exception, match="target_first"):
        SACParams(target_first=True)
