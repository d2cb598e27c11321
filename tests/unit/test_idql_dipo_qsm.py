"""DPPO's off-policy diffusion baselines IDQL, DIPO and QSM (`agents/idql.py`, `agents/dipo.py`, `agents/qsm.py` on
`agents/diffusion_q.py`): each loss and acting rule against an independent computation with the same draws, DIPO's
write-back through the chunk off-policy loop, critic warm-up, save/load, and QSM learning a one-step bandit."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.agents.dipo import DIPO, DIPOParams
from diffrl.agents.idql import IDQL, CandidateSelection, IDQLParams, expectile_weights
from diffrl.agents.qsm import QSM, QSMParams
from diffrl.data import Batch
from diffrl.diffusion.spec import build_model
from diffrl.errors import ConfigError
from diffrl.pipelines.chunk_offpolicy import chunk_buffer, update
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree

K = 3
PARAMS = {IDQL: IDQLParams, DIPO: DIPOParams, QSM: QSMParams}
AGENTS = [IDQL, DIPO, QSM]


def model(ta: int = 2, da: int = 2, cond: int = 3, hidden: int = 16, steps: int = K, prediction: str = "epsilon"):
    return build_model({"type": "ddpm", "event_shape": [ta, da], "cond_dim": cond,
                        "denoiser": {"type": "chunk_mlp", "hidden": hidden, "blocks": 1, "time_dim": 4,
                                     "activation": "mish"}, "normalizer": {"kind": "none"},
                        "diffusion": {"num_steps": steps, "schedule": "cosine", "prediction": prediction,
                                      "clip_x0": 1.0}, "sampler": {"sampler": "ddpm"}})


def make(cls, seed: int = 5, **kw):
    torch.manual_seed(0)
    settings = {"horizon_steps": 2, "act_steps": 2, "cond_steps": 1, "critic_hidden": (16, 16)}
    if cls is IDQL:
        settings["value_hidden"] = (16, 16, 16)
    return cls(model(), 3, PARAMS[cls](**{**settings, **kw}), seed=seed)


def batch(b: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 3, generator=g), act=torch.rand(b, 4, generator=g) * 2 - 1,
                 rew=torch.randn(b, generator=g), next_obs=torch.randn(b, 3, generator=g),
                 done=torch.tensor([0.0, 1.0] * (b // 2)))


def twin(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


def shift(module: nn.Module, by: float) -> None:
    with torch.no_grad():
        for q in module.parameters():
            q.add_(by)


def expectile(u: torch.Tensor, tau: float) -> torch.Tensor:
    return (torch.where(u > 0, tau, 1 - tau) * u ** 2).mean()


# ------------------------------------------------------------------------------------------------ IDQL
def test_idql_value_loss_is_the_08_expectile_of_min_target_q_minus_v_on_a_hand_built_batch():
    a = make(IDQL)
    shift(a.critic, 0.5)  # the online critic moves away: V must regress on the target critic
    b = batch()
    q1, q2 = a.critic_target(b.obs, b.act)
    with torch.no_grad():  # centre V on the batch so that u takes both signs
        a.value.net[-1].bias.add_((torch.minimum(q1, q2) - a.value(b.obs)).median())
    loss, adv = a.value_loss(b)
    u = torch.minimum(q1, q2) - a.value(b.obs)
    assert (u > 0).sum() >= 2 and (u < 0).sum() >= 2
    torch.testing.assert_close(loss, expectile(u, 0.8))
    torch.testing.assert_close(adv, u.detach())
    assert not torch.allclose(loss, expectile(u, 0.7))  # 0.8, not IQL's usual 0.7


def test_idql_update_steps_v_first_then_regresses_q_on_reward_plus_discounted_updated_v_and_moves_the_target():
    a = make(IDQL, tau=0.1, gamma=0.9)
    b = batch()
    critic0, target0, value0 = copy.deepcopy(a.critic), copy.deepcopy(a.critic_target), copy.deepcopy(a.value)
    ft0 = copy.deepcopy(a.actor.ft_net)
    m = a.update(b)
    with torch.no_grad():
        u = target0(b.obs, b.act).min(0).values - value0(b.obs)
        torch.testing.assert_close(m["value_loss"], expectile(u, 0.8))
        y = b.rew + 0.9 * (1 - b.done) * a.value(b.next_obs)  # V after its step (nothing later touches V)
        want = ((critic0(b.obs, b.act) - y) ** 2).mean(1).sum()
        torch.testing.assert_close(m["critic_loss"], want)
        y_before = b.rew + 0.9 * (1 - b.done) * value0(b.next_obs)
        assert not torch.allclose(want, ((critic0(b.obs, b.act) - y_before) ** 2).mean(1).sum())  # order is seen
    for t0, c1, t1 in zip(target0.parameters(), a.critic.parameters(), a.critic_target.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * c1)
    assert a.num_actor_updates == 1 and {"actor_loss", "actor_grad_norm"} <= set(m)
    assert any(not torch.equal(p, q) for p, q in zip(a.actor.ft_net.parameters(), ft0.parameters()))


def test_idql_evaluation_takes_the_candidate_of_highest_min_target_q_from_the_evaluation_chain():
    a = make(IDQL, num_candidates=5)
    shift(a.critic, 0.5)  # selecting with the online critic would pick other candidates
    obs = torch.randn(6, 1, 3, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    out = a.policy.sample(obs, True, twin(gen)).action
    cand = a.actor.sample(obs.repeat(5, 1, 1), True, gen).action.view(5, 6, 2, 2)  # candidate s of state b: s B + b
    with torch.no_grad():
        q = torch.stack([a.critic_target(obs.flatten(1), cand[s].flatten(1)).min(0).values for s in range(5)])
    best = q.argmax(0)
    assert torch.equal(out, cand[best, torch.arange(6)])
    assert (best != 0).any() and len(best.unique()) > 1
    state = a.generator.get_state()
    assert np.array_equal(a.act(obs.numpy(), True), a.act(obs.numpy(), True))  # fixed evaluation noise
    assert torch.equal(a.generator.get_state(), state)


def test_expectile_weights_are_07_where_q_beats_v_and_03_elsewhere_normalised_per_state():
    adv = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [0.0, -1.0]])  # (S, B): state 0 has one positive candidate
    want = torch.tensor([[0.7 / 1.3, 0.7 / 1.7], [0.3 / 1.3, 0.7 / 1.7], [0.3 / 1.3, 0.3 / 1.7]])
    torch.testing.assert_close(expectile_weights(adv, 0.7), want)


class FirstCoordinateQ(nn.Module):
    """Two critics whose minimum is the first executed action coordinate."""

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return torch.stack([act[:, 0], act[:, 0] + 1.0])


class ConstantV(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full((len(obs),), self.value)


def test_idql_exploration_draws_each_candidate_with_its_normalised_expectile_weight():
    a = make(IDQL)
    n, s = 3000, 4
    obs = torch.zeros(n, 1, 3)
    gen = torch.Generator().manual_seed(0)
    cand = a.actor.sample(obs.repeat(s, 1, 1), False, twin(gen)).action.view(s, n, 2, 2)
    v = float(cand[:, :, 0, 0].median())  # V splits the candidates in halves
    sel = CandidateSelection(a.actor, FirstCoordinateQ(), ConstantV(v), s, 2, True, 0.7)
    out = sel.sample(obs, False, twin(gen)).action
    a.actor.sample(obs.repeat(s, 1, 1), False, gen)  # the same chain draws
    adv = cand[:, :, 0, 0] - v  # Q' - V of each candidate
    w = torch.where(adv > 0, 0.7, 0.3)
    w = w / w.sum(0)
    idx = torch.multinomial(w.T, 1, generator=gen).squeeze(1)
    assert torch.equal(out, cand[idx, torch.arange(n)])
    # the weights shift the odds: positive-advantage picks happen at the weighted rate, not the uniform one
    picked = float((out[:, 0, 0] > v).float().mean())
    weighted, uniform = float((w * (adv > 0)).sum(0).mean()), float((adv > 0).float().mean())
    assert 0.4 < uniform < 0.6 and weighted - uniform > 0.05
    assert abs(picked - weighted) < 4 * math.sqrt(weighted * (1 - weighted) / n)
    argmax = CandidateSelection(a.actor, FirstCoordinateQ(), ConstantV(v), s, 2, False, 0.7)  # no expectile exploration
    assert torch.equal(argmax.sample(obs, False, torch.Generator().manual_seed(0)).action,
                       cand[adv.argmax(0), torch.arange(n)])


# ------------------------------------------------------------------------------------------------ DIPO
def hand_ascent(critic: nn.Module, obs: torch.Tensor, act: torch.Tensor, lr: float, steps: int, max_norm: float,
                clip: bool = True, clamp: bool = True) -> torch.Tensor:
    """Adam (Kingma & Ba 2015, Algorithm 1; betas 0.9 / 0.999, eps 1e-5) on -sum min(Q1, Q2) over the batch of
    actions, each gradient scaled to global norm <= max_norm (torch's clip_grad_norm_ rule), clamp after each step."""
    a, m, v = act.clone(), torch.zeros_like(act), torch.zeros_like(act)
    for k in range(1, steps + 1):
        x = a.clone().requires_grad_(True)
        q = critic(obs, x)
        (g,) = torch.autograd.grad(-torch.minimum(q[0], q[1]).sum(), x)
        if clip:
            g = g * min(1.0, max_norm / (float(g.norm()) + 1e-6))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        a = a - lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-5)
        if clamp:
            a = a.clamp(-1.0, 1.0)
    return a


def test_dipo_action_ascent_is_ten_clipped_adam_steps_on_min_q_each_followed_by_a_clamp():
    a = make(DIPO, action_lr=0.05)  # a larger step than the reference's 1e-4, so that the clip and the clamp act
    with torch.no_grad():
        a.critic.head.weight.mul_(20.0)  # gradients well above the clip
    g = torch.Generator().manual_seed(4)
    obs = torch.randn(16, 3, generator=g)
    act = torch.rand(16, 4, generator=g) * 2 - 1
    act[:6] = 0.98 * act[:6].sign()  # near the bounds
    got = a.improve_actions(obs, act)
    want = hand_ascent(a.critic, obs, act, 0.05, 10, 0.1 * 2 * 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the setting exercises every part of the rule
    assert not torch.allclose(want, hand_ascent(a.critic, obs, act, 0.05, 10, 0.4, clip=False), atol=1e-3)
    assert not torch.allclose(want, hand_ascent(a.critic, obs, act, 0.05, 10, 0.4, clamp=False), atol=1e-3)
    assert not torch.allclose(want, hand_ascent(a.critic, obs, act, 0.05, 9, 0.4), atol=1e-3)
    assert all(q.requires_grad and q.grad is None for q in a.critic.parameters())  # the critic is left as it was
    p = DIPOParams()  # the reference's trainer: action_lr, action_gradient_steps, eps, 0.1 * Da * act_steps
    assert (p.action_lr, p.action_gradient_steps, p.action_adam_eps, a.action_grad_norm) == (1e-4, 10, 1e-5, 0.4)


def test_dipo_improved_actions_are_what_the_loop_writes_back_into_the_sampled_rows():
    a = make(DIPO)
    buf = chunk_buffer(32, (1, 3), 2, 2, seed=0)
    rng = np.random.default_rng(0)
    buf.add_batch(obs=rng.normal(size=(12, 3)), act=rng.uniform(-1, 1, (12, 4)), rew=rng.normal(size=12),
                  next_obs=rng.normal(size=(12, 3)), done=np.zeros(12))
    before = buf.storage["act"].clone()
    update(a, buf, 1, 8, critic_only=True)  # the critic warm-up improves nothing
    assert torch.equal(buf.storage["act"], before)
    state = buf.generator.get_state()
    update(a, buf, 1, 8, critic_only=False)
    buf.generator.set_state(state)
    rows, idx = buf.sample(8, return_indices=True)  # the rows that update drew
    # the critic after the update's critic step (the actor step and the Polyak steps leave it)
    want = a.improve_actions(rows.obs, before[idx])
    assert torch.equal(buf.storage["act"][idx], want)
    assert not torch.allclose(want, before[idx])
    kept = torch.ones(32, dtype=torch.bool)
    kept[idx] = False
    assert torch.equal(buf.storage["act"][kept], before[kept])


@pytest.mark.parametrize("cls", [DIPO, QSM])
def test_td_target_bootstraps_with_a_training_chain_draw_of_the_acting_chain(cls):
    """DIPO: the EMA actor (which also explores); QSM: the current policy."""
    a = make(cls, tau=0.2, gamma=0.9, actor_lr=0.05)
    a.update(batch(seed=3))  # the actor takes a (large) step: DIPO's EMA copy now trails it
    acting = a.actor_target if cls is DIPO else a.actor
    assert a.policy is acting
    b = batch()
    if cls is DIPO:  # the two chains draw visibly different chunks from the same noise
        gen = twin(a.generator)
        assert not torch.allclose(a.actor.sample(b.next_obs.view(8, 1, 3), False, gen).action,
                                  acting.sample(b.next_obs.view(8, 1, 3), False, twin(a.generator)).action,
                                  atol=1e-2)
    gen = twin(a.generator)
    y = a.td_target(b)
    with torch.no_grad():
        nxt = acting.sample(b.next_obs.view(8, 1, 3), False, gen).action
        want = b.rew + 0.9 * (1 - b.done) * a.critic_target(b.next_obs, nxt.flatten(1)).min(0).values
    torch.testing.assert_close(y, want)
    obs = torch.randn(5, 1, 3)
    gen = twin(a.generator)
    assert torch.equal(a.explore(obs), acting.sample(obs, False, gen).action)


def test_dipo_ema_actor_trails_the_behaviour_cloned_actor_by_tau_every_update():
    a = make(DIPO, tau=0.2)
    ema0 = copy.deepcopy(a.actor_target.ft_net)
    a.update(batch())
    for t0, c1, t1 in zip(ema0.parameters(), a.actor.ft_net.parameters(), a.actor_target.ft_net.parameters(),
                          strict=True):
        torch.testing.assert_close(t1, 0.8 * t0 + 0.2 * c1)
    assert not any(q.requires_grad for q in a.actor_target.parameters())


def epsilon_loss(actor: nn.Module, chunks: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DDPM's epsilon loss (Ho et al. 2020, eq. 14) of chunks under ``actor.ft_net``, drawing t then the noise."""
    n = len(chunks)
    t = torch.randint(0, K, (n,), generator=gen)
    noise = torch.randn(chunks.shape, generator=gen)
    abar = torch.cumprod(1 - actor.base.schedule.betas.double(), 0)[t].float().view(n, 1, 1)
    with torch.no_grad():
        eps = actor.ft_net(abar.sqrt() * chunks + (1 - abar).sqrt() * noise, t.float(), cond)
    return ((eps - noise) ** 2).mean()


def test_idql_actor_behaviour_clones_the_buffer_chunks():
    a = make(IDQL)
    b = batch()
    before, gen = copy.deepcopy(a.actor), twin(a.generator)  # V and Q steps draw nothing
    m = a.update(b)
    torch.testing.assert_close(m["actor_loss"], epsilon_loss(before, b.act.view(8, 2, 2), b.obs, gen))


def test_dipo_actor_behaviour_clones_the_improved_chunks():
    a = make(DIPO, action_lr=0.05)
    b = batch()
    act0, before = b.act.clone(), copy.deepcopy(a)
    m = a.update(b)
    before.td_target(b)  # the same chain draws as the update's
    want = epsilon_loss(before.actor, b["act"].view(8, 2, 2), b.obs, twin(before.generator))
    torch.testing.assert_close(m["actor_loss"], want)
    assert not torch.allclose(want, epsilon_loss(before.actor, act0.view(8, 2, 2), b.obs, twin(before.generator)))
    assert float(m["action_shift"]) > 1e-2


# ------------------------------------------------------------------------------------------------ QSM
def test_qsm_actor_loss_regresses_the_negated_noise_prediction_on_ten_times_the_mean_critic_gradient_at_a_t():
    a = make(QSM)
    shift(a.critic_target, 0.3)  # the gradient must come from the online critic
    b = batch()
    gen = twin(a.generator)
    loss, _ = a.actor_loss(b)
    grads = torch.autograd.grad(loss, list(a.actor.ft_net.parameters()))
    t = torch.randint(0, K, (8,), generator=gen)
    noise = torch.randn((8, 2, 2), generator=gen)
    abar = torch.cumprod(1 - a.actor.base.schedule.betas.double(), 0)[t].float().view(8, 1, 1)
    x_t = (abar.sqrt() * b.act.view(8, 2, 2) + (1 - abar).sqrt() * noise).requires_grad_(True)  # Ho et al. eq. 4
    q1, q2 = a.critic(b.obs, x_t.flatten(1))
    (g1,) = torch.autograd.grad(q1.sum(), x_t, retain_graph=True)
    (g2,) = torch.autograd.grad(q2.sum(), x_t)
    target = 10.0 * (g1 + g2) / 2
    eps = a.actor.ft_net(x_t.detach(), t.float(), b.obs)
    want = ((-eps - target) ** 2).mean()
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, torch.autograd.grad(want, list(a.actor.ft_net.parameters())), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert float(target.abs().mean()) > 1e-2 and not torch.allclose(g1, g2)  # both critics count


def test_qsm_moves_a_bc_policy_to_the_best_action_of_a_one_step_bandit():
    """Reward 1 - (a - 0.5)^2, one step per episode; the policy is first behaviour-cloned on actions around -0.5.

    QSM has no BC term: the noise prediction follows the critic's gradient alone, so the policy runs up the critic's
    linear extrapolation (to the bound 1 at about iteration 15) before the data bend the critic back; the assertion
    is the distance to the optimum halved, not convergence."""
    torch.manual_seed(0)
    m = model(ta=1, da=1, cond=1, hidden=32, steps=5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        data = (-0.5 + 0.1 * torch.randn(128, 1, 1)).clamp(-1, 1)
        loss = m.loss(data, torch.zeros(128, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = QSM(m, 1, QSMParams(horizon_steps=1, act_steps=1, critic_hidden=(32, 32), actor_lr=1e-3), seed=0)
    zeros = torch.zeros(256, 1, 1)
    start = float(a.explore(zeros).mean())
    assert abs(start + 0.5) < 0.15  # the BC start
    buffer = []
    for itr in range(40):
        act = a.explore(torch.zeros(32, 1, 1)).flatten(1)  # (32, 1) chunks of one action
        buffer.append(act)
        acts = torch.cat(buffer)
        for _ in range(6):
            i = torch.randint(len(acts), (64,))
            b = Batch(obs=torch.zeros(64, 1), act=acts[i], rew=1 - (acts[i, 0] - 0.5) ** 2,
                      next_obs=torch.zeros(64, 1), done=torch.ones(64))
            a.update(b, critic_only=itr < 3)
    end = float(a.explore(zeros).mean())
    assert abs(end - 0.5) < 0.5 * abs(start - 0.5), (start, end)


# ------------------------------------------------------------------------------------------------ all three
@pytest.mark.parametrize("cls", AGENTS)
def test_critic_only_update_leaves_the_actor_and_the_batch_actions_and_reports_no_actor_metrics(cls):
    a, b = make(cls), batch()
    act0, ft0 = b.act.clone(), copy.deepcopy(a.actor.ft_net)
    m = a.update(b, critic_only=True)
    assert "actor_loss" not in m and "critic_loss" in m and a.num_updates == 1 and a.num_actor_updates == 0
    assert all(torch.equal(p, q) for p, q in zip(a.actor.ft_net.parameters(), ft0.parameters()))
    assert torch.equal(b["act"], act0)
    m = a.update(b)
    assert "actor_loss" in m and a.num_actor_updates == 1
    assert any(not torch.equal(p, q) for p, q in zip(a.actor.ft_net.parameters(), ft0.parameters()))
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in m.values())


def json_round_trip(tree):
    return json.loads(json.dumps(tree))


@pytest.mark.parametrize("cls", AGENTS)
def test_state_dict_round_trip_through_the_checkpoint_codec_continues_identically(cls):
    a, b = make(cls), batch()
    a.update(Batch(b), critic_only=True)
    a.update(Batch(b))  # every optimiser has moments
    skeleton, tensors = flatten_tree(a.state_dict())
    restored = make(cls, seed=123)
    restored.load_state_dict(unflatten_tree(json_round_trip(skeleton), tensors))
    b_a, b_r = Batch(b), Batch(b)
    m_a, m_r = a.update(b_a), restored.update(b_r)
    assert set(m_a) == set(m_r) and all(torch.equal(m_a[k], m_r[k]) for k in m_a)
    assert torch.equal(b_a["act"], b_r["act"]) and restored.num_updates == 3
    for name, net in a.nets.items():
        assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(),
                                                     restored.nets[name].state_dict().values(), strict=True)), name
    obs = torch.randn(4, 1, 3)
    assert torch.equal(a.explore(obs), restored.explore(obs))


def test_bad_settings_are_one_sentence_config_errors():
    for params, name in [(IDQLParams, "IDQL"), (DIPOParams, "DIPO"), (QSMParams, "QSM")]:
        with pytest.raises(ConfigError, match=f"act_steps=1.*horizon_steps=2 for {name}"):
            params(horizon_steps=2, act_steps=1)  # buffer chunks go through the denoiser
    with pytest.raises(ConfigError, match="expectile=1.0"):
        IDQLParams(expectile=1.0)
    with pytest.raises(ConfigError, match="value_hidden"):
        IDQLParams(value_hidden=(256, 128, 256))
    with pytest.raises(ConfigError, match="num_candidates"):
        IDQLParams(num_candidates=0)
    with pytest.raises(ConfigError, match="action_gradient_steps"):
        DIPOParams(action_gradient_steps=0)
    with pytest.raises(ConfigError, match="q_grad_coeff"):
        QSMParams(q_grad_coeff=0.0)
    with pytest.raises(ConfigError, match="epsilon-predicting"):
        QSM(model(prediction="x0"), 3, QSMParams(horizon_steps=2, act_steps=2))
    with pytest.raises(ConfigError, match="horizon_steps=3"):
        IDQL(model(ta=2), 3, IDQLParams(horizon_steps=3, act_steps=3))
    with pytest.raises(ConfigError, match="cond_steps \\* obs_dim = 1 \\* 4"):
        DIPO(model(), 4, DIPOParams(horizon_steps=2, act_steps=2))
