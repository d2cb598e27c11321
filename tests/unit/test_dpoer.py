"""DPOER (DPPO + an entropy temperature): its policy loss and temperature loss against independent computations, the
actor gradient of one update, the temperature's direction, the entropy schedule and estimators, exact state round
trips and bad settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffrl.agents.dpoer import DPOER, DPOERParams
from diffrl.agents.dppo import dppo_model_spec
from diffrl.agents.ppo_utils import PPOBatch, ppo_minibatches
from diffrl.diffusion.spec import build_model
from diffrl.errors import ConfigError
from diffrl.eval.entropy import gmm_rows_entropy, policy_entropy
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree

DO, DA, TA, TO = 3, 2, 4, 2


def make_dpoer(seed: int = 0, **kw) -> DPOER:
    base = dict(denoising_steps=8, ft_denoising_steps=4, horizon_steps=TA, act_steps=2, cond_steps=TO,
                critic_hidden=(32, 32, 32), entropy_samples=8, entropy_states=4)
    params = DPOERParams(**{**base, **kw})
    torch.manual_seed(seed)
    model = build_model(dppo_model_spec(DO, DA, params, hidden=32))
    return DPOER(model, DO, params, seed=seed)


def minibatch(agent: DPOER, n: int = 6, seed: int = 1) -> PPOBatch:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, TO, DO, generator=g)
    _, chains = agent.sample(obs, generator=g)
    old = agent.chain_log_probs(obs, chains)
    adv, ret = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return next(ppo_minibatches(obs, chains, old, adv, ret, agent.values(obs), 1000, generator=g))


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------------ the losses
def test_policy_loss_on_a_hand_built_batch_equals_the_ports_formula_computed_independently():
    agent = make_dpoer(clip_ploss_coef=0.1, clip_ploss_coef_base=0.01, clip_ploss_coef_rate=3.0,
                       gamma_denoising=0.9, lambda_alpha_entropy=10.0)
    new = torch.tensor([-1.0, 0.5, 1.5, -3.0, 0.2, 1.0])
    old = torch.tensor([-1.2, 0.5, 1.2, -2.5, 0.3, 0.4])  # ratios from 0.61 to 1.82: both branches win somewhere
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    idx = torch.tensor([0, 1, 2, 3, 3, 0])
    alpha = 0.7
    loss, ratio, clip = agent.policy_loss(new, old, adv, idx, torch.tensor(alpha))

    # by hand, in float64 numpy: adv z-scored (sample std), then gamma_d^(K' - 1 - i); DPPO's exponential clip
    # schedule from base (i = 0) to coef (i = K' - 1); pg1 = -A r + alpha log pi / lambda, pg2 = -A clip(r)
    n, k = new.numpy().astype(np.float64), 4
    a = adv.numpy().astype(np.float64)
    a = (a - a.mean()) / (a.std(ddof=1) + 1e-8)
    want = []
    for j in range(6):
        i = int(idx[j])
        aj = a[j] * 0.9 ** (k - 1 - i)
        c = 0.01 + (0.1 - 0.01) * (math.exp(3.0 * i / (k - 1)) - 1) / (math.exp(3.0) - 1)
        r = math.exp(n[j] - float(old[j]))
        pg1 = -aj * r + alpha * n[j] / 10.0
        pg2 = -aj * min(max(r, 1 - c), 1 + c)
        want.append(max(pg1, pg2))
    assert loss.item() == pytest.approx(float(np.mean(want)), rel=1e-5)
    torch.testing.assert_close(ratio, (new - old).exp())
    assert clip[0].item() == pytest.approx(0.01) and clip[3].item() == pytest.approx(0.1)
    # with alpha = 0 it is DPPO's clipped surrogate
    loss0, _, _ = agent.policy_loss(new, old, adv, idx, torch.tensor(0.0))
    a_t = torch.as_tensor(a, dtype=torch.float32) * agent.denoising_discount(idx)
    dppo = torch.max(-a_t * ratio, -a_t * ratio.clamp(1 - clip, 1 + clip)).mean()
    assert loss0.item() == pytest.approx(dppo.item(), rel=1e-6) and loss.item() != pytest.approx(loss0.item())


def test_temperature_loss_is_minus_log_alpha_times_target_minus_entropy_and_its_gradient_points_the_right_way():
    agent = make_dpoer(alpha_init=0.272)
    assert agent.target_entropy == -TA * DA  # the port's H_target = -Ta * Da
    for h, grows in ((-20.0, True), (0.0, False)):  # below / above the target -8
        loss = agent.temperature_loss(h)
        assert loss.item() == pytest.approx(-math.log(0.272) * (-8.0 - h), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, agent.log_alpha)
        assert (grad.item() < 0) == grows  # descent raises log alpha iff H < H_target
    assert make_dpoer(target_entropy=-3.0).target_entropy == -3.0


def test_first_update_steps_the_actor_along_the_gradient_of_the_ports_policy_loss():
    agent = make_dpoer(alpha_init=5.0, lambda_alpha_entropy=1.0)  # a temperature large enough to matter
    mb = minibatch(agent)
    new = agent.log_probs(mb.obs, mb.chain_x, mb.chain_next, mb.denoise_idx)
    adv = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
    adv = adv * agent.denoising_discount(mb.denoise_idx)
    ratio = (new - mb.old_log_prob).exp()
    clip = agent.clip_coef(mb.denoise_idx)
    surrogate = torch.max(-adv * ratio + 5.0 * new, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    expected = torch.autograd.grad(surrogate, list(agent.policy.ft_net.parameters()), retain_graph=True)
    without = torch.autograd.grad(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean(),
                                  list(agent.policy.ft_net.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(expected, without))  # the temperature term takes part
    metrics = agent.update(mb)
    assert metrics["alpha"].item() == pytest.approx(5.0)
    assert metrics["pg_loss"].item() == pytest.approx(surrogate.item(), rel=1e-5)
    for g, p in zip(expected, agent.policy.ft_net.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(("target", "grows"), [(100.0, True), (-100.0, False)])
def test_alpha_grows_while_the_entropy_is_below_its_target_and_shrinks_while_above(target, grows):
    agent = make_dpoer(target_entropy=target, delay_alpha_update=1)
    alphas = [agent.alpha.item()]
    for s in range(4):
        metrics = agent.update(minibatch(agent, seed=s))
        assert (metrics["entropy_estimate"].item() < target) == grows
        alphas.append(agent.alpha.item())
    steps = np.diff(alphas)
    assert (steps > 0).all() if grows else (steps < 0).all()
    # Adam's first steps move log alpha by ~lr = 3e-4 each
    assert abs(math.log(alphas[-1] / alphas[0])) == pytest.approx(4 * 3e-4, rel=0.05)


def test_critic_only_updates_still_step_the_temperature_and_not_the_actor():
    agent = make_dpoer(target_entropy=100.0)
    ft = params_of(agent.policy.ft_net)
    before = agent.alpha.item()
    agent.update(minibatch(agent), critic_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ft, params_of(agent.policy.ft_net)))
    assert agent.alpha.item() > before  # as the port: the temperature steps every minibatch
    assert (agent.num_updates, agent.num_actor_updates) == (1, 0)


# ------------------------------------------------------------------------------------------------ the entropy
def test_entropy_is_estimated_on_the_first_and_every_delay_th_minibatch_and_reused_in_between(monkeypatch):
    agent = make_dpoer(delay_alpha_update=3)
    calls = []
    estimate = agent.estimate_entropy

    def counting(batch):
        calls.append(agent.entropy_calls)
        return estimate(batch)

    monkeypatch.setattr(agent, "estimate_entropy", counting)
    seen = [agent.update(minibatch(agent, seed=s))["entropy_estimate"].item() for s in range(7)]
    assert calls == [0, 3, 6]
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[2] != seen[3]


def test_knn_estimate_is_the_whitened_knn_entropy_of_training_chunks_of_the_first_states_of_the_minibatch():
    agent = make_dpoer()  # M = entropy_samples = 8 chunks for each of the first entropy_states = 4 states
    mb = minibatch(agent)
    state = agent.entropy_gen.get_state()
    h = agent.estimate_entropy(mb)

    def draws(whiten: bool) -> float:
        g = torch.Generator().set_state(state)
        return policy_entropy(lambda o: agent.policy.sample(o, False, g).action, mb.obs[:4], 8, whiten=whiten
                              ).mean().item()

    assert h.item() == pytest.approx(draws(True), rel=1e-6) and h.item() != pytest.approx(draws(False), rel=1e-3)
    assert not torch.equal(torch.as_tensor(agent.entropy_gen.get_state()), torch.as_tensor(state))  # it drew


def test_port_estimate_is_the_gmm_over_rows_of_one_resampled_transition_output_per_pair():
    agent = make_dpoer(entropy_estimator="port")
    mb = minibatch(agent)
    state = agent.entropy_gen.get_state()
    h = agent.estimate_entropy(mb)
    # x_{i+1} = mu + max(std, min_sampling_std) * clamp(z, -3, 3), from each pair's recorded x_i
    mean, std = agent.policy.transition(mb.obs, mb.chain_x, mb.denoise_idx)
    z = torch.randn(mean.shape, generator=torch.Generator().set_state(state)).clamp(-3.0, 3.0)
    x = mean + std.expand_as(mean).clamp(min=0.1) * z
    assert h.item() == pytest.approx(gmm_rows_entropy(x).mean().item(), rel=1e-6)


@pytest.mark.parametrize(("raw", "want"), [(9.0, -4.0), (-30.0, -16.0), (-10.0, -10.0)])
def test_clip_entropy_clamps_the_estimate_into_twice_to_half_the_target(monkeypatch, raw, want):
    monkeypatch.setattr("diffrl.agents.dpoer.policy_entropy", lambda *a, **k: torch.tensor([raw]))
    agent = make_dpoer(clip_entropy=True)
    assert agent.estimate_entropy(minibatch(agent)).item() == want  # H_target = -8: [-16, -4]
    agent = make_dpoer()
    assert agent.estimate_entropy(minibatch(agent)).item() == raw  # off by default, as the port's DPOER configs


# ------------------------------------------------------------------------------------------------ state
def test_state_dict_round_trip_through_checkpoint_codec_continues_identically():
    src = make_dpoer(seed=0, delay_alpha_update=2)
    for s in range(3):
        src.update(minibatch(src, seed=s))
    dst = make_dpoer(seed=1, delay_alpha_update=2)  # other weights and generator: everything must come from the state
    skeleton, tensors = flatten_tree(src.state_dict())
    dst.load_state_dict(unflatten_tree(json.loads(json.dumps(skeleton)), tensors))
    assert set(src.state_dict()["optims"]) == {"actor", "critic", "temperature"}
    assert dst.alpha.item() == src.alpha.item() != pytest.approx(0.272, abs=1e-7)
    for s in (5, 6, 7):  # re-estimates at calls 4 and 6 draw from the restored entropy generator
        m_src, m_dst = src.update(minibatch(src, seed=s)), dst.update(minibatch(dst, seed=s))
        assert all(torch.equal(m_src[k], m_dst[k]) for k in m_src), s
    assert torch.equal(src.log_alpha, dst.log_alpha) and dst.entropy_calls == 6
    for a, b in zip(src.policy.parameters(), dst.policy.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kw", "msg"), [(dict(entropy_estimator="gmm"), "entropy_estimator"),
                                         (dict(entropy_estimator="port", horizon_steps=2, act_steps=2),
                                          "horizon_steps"),
                                         (dict(entropy_samples=1), "entropy_samples"),
                                         (dict(alpha_init=0.0), "alpha_init"),
                                         (dict(delay_alpha_update=0), "delay_alpha_update"),
                                         (dict(ent_coef=0.01), "ent_coef")])
def test_bad_params_raise_config_error_naming_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        make_dpoer(**kw)
