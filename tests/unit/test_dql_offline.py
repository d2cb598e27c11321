"""Diffusion-QL with Wang et al.'s offline settings (`agents/dql.py` options, `diffusion/schedules.py`'s vp betas,
`pipelines/offline.py`'s DQLConfig): the VP schedule against the integrated SDE, the plain posterior chain, the EMA
target actor's schedule, critic clipping, cosine learning rates, candidate selection, save/load with all of it, and
learning a one-step bandit from a fixed dataset."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.agents.dql import DQL, EVAL_SEED, DQLParams, QSelection, dql_offline_model
from diffrl.data import Batch
from diffrl.diffusion.schedules import vp_betas
from diffrl.errors import ConfigError
from diffrl.pipelines.offline import DQLConfig, build
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree

# Wang et al.'s offline options on small networks; Do = 3, Da = 2
OFFLINE = dict(horizon_steps=1, act_steps=1, cond_steps=1, critic_hidden=(16, 16), min_sampling_std=0.0,
               noise_clip=None, target_actor="ema", eval_candidates=6, max_grad_norm=5.0, critic_max_grad_norm=5.0)


def agent(obs_dim: int = 3, act_dim: int = 2, hidden: int = 16, seed: int = 5, **kw) -> DQL:
    torch.manual_seed(0)
    return DQL(dql_offline_model(obs_dim, act_dim, hidden=hidden, time_dim=4), obs_dim,
               DQLParams(**{**OFFLINE, **kw}), seed=seed)


def batch(b: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 3, generator=g), act=torch.rand(b, 2, generator=g) * 2 - 1,
                 rew=torch.randn(b, generator=g), next_obs=torch.randn(b, 3, generator=g),
                 done=torch.tensor([0.0, 1.0] * (b // 2)))


def twin(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------------ the model
def test_vp_betas_integrate_the_linear_vp_sde_and_the_offline_model_uses_five_of_them():
    # alpha_bar(k / K) = exp(-int_0^{k/K} beta(s) ds), beta(s) = 0.1 + 9.9 s (Song et al.'s VP SDE)
    for k_steps in (5, 20):
        s = torch.arange(1, k_steps + 1, dtype=torch.float64) / k_steps
        want = torch.exp(-(0.1 * s + 0.5 * 9.9 * s ** 2))
        torch.testing.assert_close(torch.cumprod(1 - vp_betas(k_steps), 0), want, rtol=1e-12, atol=0)
    m = dql_offline_model(11, 3)
    assert m.num_steps == 5 and m.event_shape == (1, 3) and m.cond_dim == 11 and m.clip_x0 == 1.0
    torch.testing.assert_close(m.schedule.betas, vp_betas(5).float())
    assert m.prediction == "epsilon"


def test_offline_chain_has_the_plain_posterior_std_no_noise_at_t0_and_a_clipped_x0():
    a = agent()
    with torch.no_grad():  # a denoiser predicting eps = -20 everywhere: x0 = (x + 20 s1a) / sa, far above 1
        for p in a.actor.ft_net.parameters():
            p.zero_()
        a.actor.ft_net.net[-1].bias.fill_(-20.0)
    obs = torch.randn(4, 1, 3)
    chain = a.actor.chain(obs, False, torch.Generator().manual_seed(0))  # the training chain
    post = a.actor.base.schedule.posterior_variance.sqrt().flip(0)  # transition i runs t = K - 1 - i
    torch.testing.assert_close(chain.stds[:, 0].flatten(), post)  # no std floor
    assert float(post[-1]) == 0.0 and torch.equal(chain.xs[-1], chain.means[-1])  # t = 0: the mean, no noise
    assert torch.equal(chain.xs[-1], torch.ones_like(chain.xs[-1]))  # the clipped x0 (coef1 = 1 at t = 0)
    assert np.array_equal(a.act(obs[:, 0].numpy(), deterministic=True), np.ones((4, 2), np.float32))
    dppo = agent(min_sampling_std=0.1)  # DPPO's floor adds noise at t = 0
    chain = dppo.actor.chain(obs, False, torch.Generator().manual_seed(0))
    assert not torch.equal(chain.xs[-1], chain.means[-1])


# ------------------------------------------------------------------------------------------------ the EMA actor
def test_td_target_draws_a_prime_from_the_ema_actor_not_the_trained_one():
    a = agent(ema_start=0)
    with torch.no_grad():  # the trained actor moves away; the EMA copy keeps the old weights
        for p in a.actor.ft_net.parameters():
            p.add_(0.3)
    b = batch()
    gen = twin(a.generator)
    y = a.td_target(b)
    with torch.no_grad():
        a_next = a.ema.shadow.sample(b.next_obs[:, None], False, gen).action  # (B, 1, Da)
        q = a.critic_target(b.next_obs, a_next.flatten(1))
    torch.testing.assert_close(y, b.rew + a.p.gamma * (1 - b.done) * q.min(0).values)
    assert a.sampler is a.ema.shadow and a.sampler is not a.actor
    with torch.no_grad():
        trained = a.actor.sample(b.next_obs[:, None], False, twin(gen)).action
    assert not torch.allclose(trained, a_next)


def test_ema_actor_copies_until_ema_start_then_moves_by_one_minus_decay_every_ema_every_updates():
    a = agent(ema_start=2, ema_every=2, ema_decay=0.75)
    b = batch()
    for u in range(1, 7):  # update u (1-based) ends with the EMA's step u
        before = weights(a.ema.shadow.ft_net)
        a.update(b)
        live, shadow = weights(a.actor.ft_net), weights(a.ema.shadow.ft_net)
        if u <= 2:
            want = live
        elif u % 2 == 0:
            want = [0.75 * s + 0.25 * w for s, w in zip(before, live, strict=True)]
        else:
            want = before
        for s, w in zip(shadow, want, strict=True):
            torch.testing.assert_close(s, w)
        assert (u > 2) == any(not torch.equal(s, w) for s, w in zip(shadow, live, strict=True))


def test_offline_config_has_wang_et_al_settings():
    cfg = DQLConfig(dataset="d")
    assert (cfg.target_actor, cfg.ema_decay, cfg.ema_start, cfg.ema_every) == ("ema", 0.995, 1000, 5)
    assert (cfg.actor_lr, cfg.critic_lr, cfg.gamma, cfg.tau, cfg.eta, cfg.batch_size) == (3e-4, 3e-4, 0.99, 0.005,
                                                                                          1.0, 256)
    assert (cfg.max_grad_norm, cfg.critic_max_grad_norm, cfg.eval_candidates) == (5.0, 5.0, 50)
    assert (cfg.denoising_steps, cfg.beta_schedule, cfg.min_sampling_std, cfg.noise_clip) == (5, "vp", 0.0, None)
    assert cfg.critic_hidden == (256, 256, 256) and cfg.critic_activation == "mish" and not cfg.critic_residual
    assert not cfg.normalize_states and not cfg.normalize_reward  # their Data_Sampler, reward_tune 'no'
    a = build(cfg, 11, 3, torch.device("cpu"))
    assert a.p.lr_decay_steps == cfg.steps and isinstance(a.policy, QSelection)
    assert build(DQLConfig(dataset="d", lr_decay=False), 11, 3, torch.device("cpu")).p.lr_decay_steps is None
    with pytest.raises(ConfigError, match="horizon_steps"):
        DQLConfig(dataset="d", horizon_steps=2, act_steps=2)
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        DQLConfig(dataset="d", lr_decay=False, lr_decay_steps=10)


# ------------------------------------------------------------------------------------------------ optimisation
def test_critic_step_clips_the_critic_gradient_norm_and_reports_the_unclipped_one():
    b = batch()
    for clip in (None, 1e-3):
        a = agent(critic_max_grad_norm=clip)
        y = a.td_target(b)
        ref = copy.deepcopy(a.critic)
        (ref(b.obs, b.act) - y).pow(2).mean(1).sum().backward()
        unclipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        m = a.critic_step(b, y)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.critic.parameters()]))
        if clip is None:
            assert "critic_grad_norm" not in m
            torch.testing.assert_close(norm, unclipped)
        else:
            torch.testing.assert_close(m["critic_grad_norm"], unclipped)
            assert float(unclipped) > 1.0 and float(norm) == pytest.approx(clip, rel=1e-4)


def test_learning_rates_follow_torch_cosine_annealing_to_zero_over_lr_decay_steps():
    a = agent(lr_decay_steps=10, actor_lr=2e-3, critic_lr=5e-3)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    b = batch()
    for _ in range(12):
        a.update(b)
        actor_lr, critic_lr = a.actor_opt.param_groups[0]["lr"], a.critic_opt.param_groups[0]["lr"]
        if a.num_updates <= 10:
            assert actor_lr == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-15)
            assert critic_lr == pytest.approx(2.5 * actor_lr, rel=1e-9, abs=1e-15)
        else:
            assert actor_lr == critic_lr == 0.0  # stays at the end of the schedule
        opt.step()
        sched.step()


def test_state_dict_round_trip_continues_identically_with_the_ema_actor_and_lr_decay():
    a, b = agent(ema_start=1, ema_every=2, lr_decay_steps=8), batch()
    for _ in range(3):
        a.update(b)
    skeleton, tensors = flatten_tree(a.state_dict())
    restored = agent(ema_start=1, ema_every=2, lr_decay_steps=8, seed=99)
    restored.load_state_dict(unflatten_tree(json.loads(json.dumps(skeleton)), tensors))
    assert restored.ema.step == 3 and "policy_target" in a.state_dict()["nets"]
    for _ in range(3):  # EMA steps 4 (average) and 5, 6 (skip, average); lrs of updates 3-5
        m_a, m_r = a.update(b), restored.update(b)
        assert all(torch.equal(m_a[k], m_r[k]) for k in m_a)
    assert all(torch.equal(p, q) for p, q in zip(a.ema.shadow.parameters(), restored.ema.shadow.parameters()))
    obs = b.obs[:3].numpy()
    assert np.array_equal(a.act(obs, True), restored.act(obs, True))
    assert np.array_equal(a.act(obs), restored.act(obs))  # the generators too


# ------------------------------------------------------------------------------------------------ acting
class ActionValue(nn.Module):
    """A hand-made twin critic: ``Q_1 = scale a_1``, ``Q_2 = Q_1 + 1`` (so ``min Q = scale a_1``)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        q = self.scale * act[:, 0]
        return torch.stack([q, q + 1])


def test_deterministic_act_picks_the_highest_q_of_candidates_drawn_with_a_fixed_noise():
    a = agent()
    a.policy.critic_target = ActionValue()
    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    state = a.generator.get_state()
    out = a.act(obs, deterministic=True)
    assert np.array_equal(out, a.act(obs, deterministic=True))
    assert torch.equal(a.generator.get_state(), state)  # evaluation draws nothing from the training stream
    rep = torch.as_tensor(obs).repeat(6, 1)[:, None]  # candidate n of state b is row n B + b
    cand = a.actor.sample(rep, False, torch.Generator().manual_seed(EVAL_SEED)).action.view(6, 4, 2)
    best = cand[cand[..., 0].argmax(0), torch.arange(4)]
    assert out.shape == (4, 2) and np.array_equal(out, best.numpy())
    assert len({tuple(c) for c in cand[:, 0].tolist()}) == 6  # distinct candidates: the choice mattered


def test_stochastic_act_draws_a_candidate_by_softmax_of_min_q():
    a = agent()
    a.policy.critic_target = ActionValue(scale=3.0)
    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    gen = twin(a.generator)
    out = a.act(obs)
    rep = torch.as_tensor(obs).repeat(6, 1)[:, None]
    cand = a.actor.sample(rep, False, gen).action.view(6, 4, 2)
    idx = torch.multinomial(torch.softmax(3.0 * cand[..., 0], 0).T, 1, generator=gen).squeeze(1)
    assert np.array_equal(out, cand[idx, torch.arange(4)].numpy())


def test_eval_draw_evaluates_with_the_softmax_draw_from_the_fixed_evaluation_noise():
    a = agent(eval_draw=True)
    a.policy.critic_target = ActionValue(scale=3.0)
    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    state = a.generator.get_state()
    out = a.act(obs, deterministic=True)
    assert np.array_equal(out, a.act(obs, deterministic=True)) and torch.equal(a.generator.get_state(), state)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    rep = torch.as_tensor(obs).repeat(6, 1)[:, None]
    cand = a.actor.sample(rep, False, gen).action.view(6, 4, 2)
    idx = torch.multinomial(torch.softmax(3.0 * cand[..., 0], 0).T, 1, generator=gen).squeeze(1)
    assert np.array_equal(out, cand[idx, torch.arange(4)].numpy())
    assert not torch.equal(idx, cand[..., 0].argmax(0))  # the draw, not the argmax, for some state
    with pytest.raises(ConfigError, match="eval_draw=True.*eval_candidates"):
        DQLParams(**{**OFFLINE, "eval_candidates": None, "eval_draw": True})


def test_offline_dql_moves_the_policy_of_a_mostly_bad_dataset_to_the_best_action():
    """A one-step bandit from a fixed dataset, reward ``1 - (a - 0.6)^2``: 70% of its actions near -0.6, the rest
    uniform in [-1, 1] (data mean about -0.4). Behaviour cloning alone would follow the data; the Q term must move
    the chain itself towards 0.6, and evaluation must pick an action near it."""
    g = torch.Generator().manual_seed(0)
    n = 512
    bad = torch.rand(n, generator=g) < 0.7
    act = torch.where(bad, -0.6 + 0.1 * torch.randn(n, generator=g), torch.rand(n, generator=g) * 2 - 1).clamp(-1, 1)
    a = agent(obs_dim=1, act_dim=1, hidden=32, critic_hidden=(32, 32), ema_start=0, ema_every=1, ema_decay=0.9,
              eval_candidates=10, actor_lr=3e-3, critic_lr=3e-3, tau=0.05)
    for _ in range(200):
        i = torch.randint(n, (64,), generator=g)
        a.update(Batch(obs=torch.zeros(64, 1), act=act[i, None], rew=1 - (act[i] - 0.6) ** 2,
                       next_obs=torch.zeros(64, 1), done=torch.ones(64)))
    samples = a.actor.sample(torch.zeros(256, 1, 1), False, torch.Generator().manual_seed(1)).action.flatten()
    assert float(act.mean()) < -0.3 and float(samples.mean()) > 0.25, samples  # the chain left the data's mode
    assert abs(float(a.act(np.zeros((1, 1), np.float32), deterministic=True)[0, 0]) - 0.6) < 0.2
