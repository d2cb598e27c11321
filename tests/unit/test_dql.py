"""Diffusion-QL (`agents/dql.py`) and the critic options it uses (`EnsembleQ`'s activation and residual trunk): the
TD target and the actor loss against the DDPM chain written out by hand with the same draws, the update's critic
loss, target and warm-up, save/load, and learning a one-step bandit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffrl.agents.dql import DQL, DQLParams
from diffrl.agents.nets import EnsembleLinear, EnsembleQ, mlp
from diffrl.agents.ppo import residual_mlp
from diffrl.data import Batch
from diffrl.diffusion.spec import build_model
from diffrl.errors import ConfigError
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree


# ------------------------------------------------------------------------------------------------ EnsembleQ
class EnsembleQBefore(nn.Module):
    """EnsembleQ as it was before the activation / residual options (commit b16c664), kept verbatim."""

    def __init__(self, obs_dim, act_dim, hidden, num_members, orthogonal_init=False):
        super().__init__()
        self.num_members = num_members
        dims = [obs_dim + act_dim, *hidden]
        self.layers = nn.ModuleList(EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(num_members, dims[-1], 1)
        if orthogonal_init:
            with torch.no_grad():
                for layer, gain in [*((l, math.sqrt(2.0)) for l in self.layers), (self.head, 1e-2)]:
                    for w in layer.weight:
                        nn.init.orthogonal_(w, gain=gain)
                    layer.bias.zero_()

    def forward(self, obs, act):
        x = torch.cat([obs, act], dim=-1)
        for layer in self.layers:
            x = F.relu_(layer(x))
        return self.head(x).squeeze(-1)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_ensemble_q_default_is_bit_identical_to_the_version_before_the_options(orthogonal):
    torch.manual_seed(3)
    old = EnsembleQBefore(5, 3, (32, 32), 2, orthogonal)
    torch.manual_seed(3)
    new = EnsembleQ(5, 3, (32, 32), 2, orthogonal)
    assert list(new.state_dict()) == list(old.state_dict())  # checkpoints keep their keys
    assert all(torch.equal(a, b) for a, b in zip(new.parameters(), old.parameters(), strict=True))  # same init draws
    obs, act = torch.randn(7, 5), torch.randn(7, 3)
    out_new, out_old = new(obs, act), old(obs, act)
    assert torch.equal(out_new, out_old)
    out_new.square().sum().backward()
    out_old.square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(new.parameters(), old.parameters(), strict=True))


def member_weights(q: EnsembleQ, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(l.weight[e], l.bias[e, 0]) for l in [*q.layers, q.head]]


def load_member(net: nn.Sequential, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(weights)
    with torch.no_grad():
        for lin, (w, b) in zip(linears, weights):
            lin.weight.copy_(w.T)
            lin.bias.copy_(b)
    return net


def test_ensemble_q_residual_mish_members_equal_dppos_residual_mlp_and_a_hand_computation():
    torch.manual_seed(0)
    q = EnsembleQ(4, 2, (16, 16, 16), 3, activation="mish", residual=True)
    assert len(q.layers) == 3  # input map + one two-layer block (DPPO's [256, 256, 256])
    obs, act = torch.randn(6, 4), torch.randn(6, 2)
    out = q(obs, act)
    x = torch.cat([obs, act], 1)

    def mish(v):
        return v * torch.tanh(F.softplus(v))

    for e in range(3):
        (w0, b0), (w1, b1), (w2, b2), (wh, bh) = member_weights(q, e)
        h = x @ w0 + b0
        h = h + mish(mish(h) @ w1 + b1) @ w2 + b2
        torch.testing.assert_close(out[e], (h @ wh + bh).squeeze(-1))
        dppo = load_member(residual_mlp(6, (16, 16, 16), 1, "mish"), member_weights(q, e))  # CriticObsAct's trunk
        torch.testing.assert_close(out[e], dppo(x).squeeze(-1))


def test_ensemble_q_plain_mish_members_equal_an_mlp_with_mish():
    torch.manual_seed(0)
    q = EnsembleQ(4, 2, (16, 8), 2, activation="mish")
    obs, act = torch.randn(6, 4), torch.randn(6, 2)
    out = q(obs, act)
    for e in range(2):
        ref = load_member(mlp(6, (16, 8), 1, nn.Mish), member_weights(q, e))
        torch.testing.assert_close(out[e], ref(torch.cat([obs, act], 1)).squeeze(-1))
    assert not torch.allclose(out, EnsembleQ(4, 2, (16, 8), 2)(obs, act))  # relu differs


def test_ensemble_q_rejects_a_residual_trunk_of_unequal_or_even_widths_and_unknown_activations():
    for hidden in [(16, 8, 16), (16, 16)]:
        with pytest.raises(ValueError, match="odd number of equal hidden widths"):
            EnsembleQ(4, 2, hidden, 2, residual=True)
    with pytest.raises(ValueError, match="tanh"):
        EnsembleQ(4, 2, (8,), 2, activation="tanh")


# ------------------------------------------------------------------------------------------------ DQL
K = 3


def model(ta: int = 2, da: int = 2, cond: int = 3, hidden: int = 16, steps: int = K):
    return build_model({"type": "ddpm", "event_shape": [ta, da], "cond_dim": cond,
                        "denoiser": {"type": "chunk_mlp", "hidden": hidden, "blocks": 1, "time_dim": 4,
                                     "activation": "mish"}, "normalizer": {"kind": "none"},
                        "diffusion": {"num_steps": steps, "schedule": "cosine", "prediction": "epsilon",
                                      "clip_x0": 1.0}, "sampler": {"sampler": "ddpm"}})


def agent(**kw) -> DQL:
    torch.manual_seed(0)
    params = DQLParams(**{"horizon_steps": 2, "act_steps": 2, "cond_steps": 1, "critic_hidden": (16, 16), **kw})
    return DQL(model(ta=params.horizon_steps), 3, params, seed=5)


def batch(act_steps: int = 2, b: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 3, generator=g), act=torch.rand(b, act_steps * 2, generator=g) * 2 - 1,
                 rew=torch.randn(b, generator=g), next_obs=torch.randn(b, 3, generator=g),
                 done=torch.tensor([0.0, 1.0] * (b // 2)))


def hand_chain(a: DQL, cond: torch.Tensor, gen: torch.Generator, min_std: float = 0.1, clip: float = 3.0
               ) -> torch.Tensor:
    """DDPM ancestral sampling written out (Ho et al. 2020 eq. 6-7, DPPO's x0 clamp, std floor and noise clip),
    drawing from ``gen`` in the sampler's order: the initial noise, then one noise per step."""
    betas = a.policy.base.schedule.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    x = torch.randn((len(cond), *a.policy.event_shape), generator=gen)
    for t in range(K - 1, -1, -1):
        eps = a.policy.ft_net(x, torch.full((len(cond),), float(t)), cond)
        x0 = ((x - (1 - abar[t]).sqrt().float() * eps) / abar[t].sqrt().float()).clamp(-1, 1)
        c1 = (betas[t] * abar_prev[t].sqrt() / (1 - abar[t])).float()
        c2 = ((1 - abar_prev[t]) * alphas[t].sqrt() / (1 - abar[t])).float()
        std = max(float((betas[t] * (1 - abar_prev[t]) / (1 - abar[t])).sqrt()), min_std)
        x = c1 * x0 + c2 * x + std * torch.randn(x.shape, generator=gen).clamp(-clip, clip)
    return x


def test_td_target_is_reward_plus_discounted_min_target_q_of_a_fresh_floored_chain_sample():
    a = agent(horizon_steps=2, act_steps=1, bc_target="sampled", gamma=0.9)
    with torch.no_grad():  # the online critic moves away: the target must use the target critic
        for q in a.critic.parameters():
            q.add_(0.5)
    b = batch(act_steps=1)
    state = a.generator.get_state()
    y = a.td_target(b)
    gen = torch.Generator().set_state(state)
    with torch.no_grad():
        a_next = hand_chain(a, b.next_obs, gen)  # (B, Ta, Da)
        q_next = a.critic_target(b.next_obs, a_next[:, :1].flatten(1))  # only the executed action
    want = b.rew + 0.9 * (1 - b.done) * torch.minimum(q_next[0], q_next[1])
    torch.testing.assert_close(y, want)
    assert torch.equal(y[1::2], b.rew[1::2])  # terminated: no bootstrap


@pytest.mark.parametrize("bc_target", ["buffer", "sampled"])
def test_actor_loss_is_bc_plus_eta_times_a_random_normalised_q_through_the_whole_chain(bc_target):
    a = agent(bc_target=bc_target, eta=0.7)
    b = batch()
    picked = set()
    for seed in range(8):  # both outcomes of the reference's coin
        a.generator.manual_seed(seed)
        state = a.generator.get_state()
        loss, parts = a.actor_loss(b)
        grads = torch.autograd.grad(loss, list(a.policy.ft_net.parameters()))
        gen = torch.Generator().set_state(state)
        a_new = hand_chain(a, b.obs, gen)  # with gradients through every step
        q = a.critic(b.obs, a_new.flatten(1))
        first = float(torch.rand((), generator=gen)) > 0.5
        picked.add(first)
        q_loss = -q[0].mean() / q[1].abs().mean().detach() if first else -q[1].mean() / q[0].abs().mean().detach()
        x0 = b.act.view(8, 2, 2) if bc_target == "buffer" else a_new
        t = torch.randint(0, K, (8,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = torch.cumprod(1 - a.policy.base.schedule.betas.double(), 0)[t].float().view(8, 1, 1)
        eps = a.policy.ft_net(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t.float(), b.obs)
        bc = ((eps - noise) ** 2).mean()
        want = bc + 0.7 * q_loss
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(parts["q_loss"], q_loss.detach())
        torch.testing.assert_close(parts["bc_loss"], bc.detach())
        for g, w in zip(grads, torch.autograd.grad(want, list(a.policy.ft_net.parameters())), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert picked == {True, False}


def test_pred_start_raises_q_of_the_bc_terms_own_clean_action_estimate_with_one_network_call():
    """DyDiff's Diffusion-QL (use_pred_start): a_new is x0 = clamp((x_t - sqrt(1 - abar) eps) / sqrt(abar)) of the
    BC term's noised buffer action, the Q coin drawn after it; gradients reach the denoiser through that one call."""
    a = agent(q_action="pred_start", eta=0.7)
    b = batch()
    picked = set()
    calls = []
    hook = a.policy.ft_net.register_forward_hook(lambda *_: calls.append(1))
    for seed in range(8):
        a.generator.manual_seed(seed)
        gen = torch.Generator().set_state(a.generator.get_state())
        calls.clear()
        loss, parts = a.actor_loss(b)
        assert len(calls) == 1  # BC and a_new share one denoiser call; no chain
        grads = torch.autograd.grad(loss, list(a.policy.ft_net.parameters()))
        x0 = b.act.view(8, 2, 2)
        t = torch.randint(0, K, (8,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = torch.cumprod(1 - a.policy.base.schedule.betas.double(), 0)[t].float().view(8, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps = a.policy.ft_net(x_t, t.float(), b.obs)
        calls.clear()
        bc = ((eps - noise) ** 2).mean()
        a_new = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        q = a.critic(b.obs, a_new.flatten(1))
        first = float(torch.rand((), generator=gen)) > 0.5
        picked.add(first)
        q_loss = -q[0].mean() / q[1].abs().mean().detach() if first else -q[1].mean() / q[0].abs().mean().detach()
        want = bc + 0.7 * q_loss
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(parts["bc_loss"], bc.detach())
        q_grads = torch.autograd.grad(q_loss, list(a.policy.ft_net.parameters()), retain_graph=True)
        assert any(float(w.abs().sum()) > 0 for w in q_grads)  # the Q term reaches the denoiser through x0
        for g, w in zip(grads, torch.autograd.grad(want, list(a.policy.ft_net.parameters())), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    hook.remove()
    assert picked == {True, False}
    with pytest.raises(ConfigError, match="bc_target='sampled'.*'buffer' with q_action='pred_start'"):
        DQLParams(horizon_steps=2, act_steps=2, q_action="pred_start", bc_target="sampled")


def test_loss_and_x0_is_the_models_loss_with_the_same_draws_and_predicts_x0_from_that_call():
    m = model()
    x, cond = torch.rand(6, 2, 2) * 2 - 1, torch.randn(6, 3)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss, x0 = m.loss_and_x0(x, cond, g1)
    torch.testing.assert_close(loss, m.loss(x, cond, g2))
    g3 = torch.Generator().manual_seed(3)
    t = torch.randint(0, K, (6,), generator=g3)
    x_t = m.q_sample(x, t, torch.randn(x.shape, generator=g3))
    torch.testing.assert_close(x0, m.predict(x_t, t, cond)[0])


def test_update_steps_the_critic_on_the_td_target_then_the_actor_and_moves_the_target_by_tau():
    a = agent(tau=0.1)
    b = batch()
    critic0, target0 = copy.deepcopy(a.critic), copy.deepcopy(a.critic_target)
    ft0, base0 = copy.deepcopy(a.policy.ft_net), copy.deepcopy(a.policy.base)
    state = a.generator.get_state()
    y = a.td_target(b)
    want = ((critic0(b.obs, b.act) - y) ** 2).mean(1).sum()
    a.generator.set_state(state)
    m = a.update(b)
    torch.testing.assert_close(m["critic_loss"], want.detach())
    assert {"actor_loss", "bc_loss", "q_loss", "actor_grad_norm"} <= set(m) and a.num_actor_updates == 1
    for t0, c1, t1 in zip(target0.parameters(), a.critic.parameters(), a.critic_target.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * c1)
    assert any(not torch.equal(p, q) for p, q in zip(a.critic.parameters(), critic0.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.policy.ft_net.parameters(), ft0.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.policy.base.parameters(), base0.parameters()))  # frozen base


def test_critic_only_update_leaves_the_actor_and_reports_no_actor_metrics():
    a = agent()
    ft0 = copy.deepcopy(a.policy.ft_net)
    m = a.update(batch(), critic_only=True)
    assert set(m) == {"critic_loss", "q_mean", "target_mean"} and a.num_updates == 1 and a.num_actor_updates == 0
    assert all(torch.equal(p, q) for p, q in zip(a.policy.ft_net.parameters(), ft0.parameters()))


def test_state_dict_round_trip_through_the_checkpoint_codec_continues_identically():
    a, b = agent(), batch()
    a.update(b, critic_only=True)
    skeleton, tensors = flatten_tree(a.state_dict())
    restored = agent()
    restored.load_state_dict(unflatten_tree(json_round_trip(skeleton), tensors))
    m_a, m_r = a.update(b), restored.update(b)
    assert all(torch.equal(m_a[k], m_r[k]) for k in m_a) and restored.num_updates == 2
    assert np.array_equal(a.act(b.obs[:2].numpy(), True), restored.act(b.obs[:2].numpy(), True))


def json_round_trip(tree):
    import json

    return json.loads(json.dumps(tree))


def test_bad_settings_are_one_sentence_config_errors():
    with pytest.raises(ConfigError, match="act_steps=1.*bc_target='sampled'"):
        DQLParams(horizon_steps=2, act_steps=1)  # buffer BC needs whole chunks
    with pytest.raises(ConfigError, match="critic_hidden"):
        DQLParams(critic_residual=True, critic_hidden=(256, 256))
    with pytest.raises(ConfigError, match="horizon_steps=3"):
        DQL(model(ta=2), 3, DQLParams(horizon_steps=3, act_steps=3))
    with pytest.raises(ConfigError, match="cond_steps \\* obs_dim = 1 \\* 4"):
        DQL(model(ta=2), 4, DQLParams(horizon_steps=2, act_steps=2))


def test_act_is_deterministic_in_evaluation_and_flat_for_a_one_step_transition_agent():
    torch.manual_seed(0)
    a = DQL(model(ta=1, da=2, cond=3), 3, DQLParams(horizon_steps=1, act_steps=1), seed=0)
    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    state = a.generator.get_state()
    out = a.act(obs, deterministic=True)
    assert out.shape == (4, 2) and np.array_equal(out, a.act(obs, deterministic=True))
    assert torch.equal(a.generator.get_state(), state)  # evaluation draws nothing from the training stream
    assert a.act(obs[:, None], deterministic=False).shape == (4, 1, 2)  # histories in, chunks out


def test_dql_moves_a_bc_policy_to_the_best_action_of_a_one_step_bandit():
    """Reward 1 - (a - 0.5)^2, one step per episode; the policy is first behaviour-cloned on actions around -0.5.

    The offset 1 keeps Q away from 0: the actor's Q term is divided by mean |Q|, so with -(a - 0.5)^2 its step grows
    without bound as the policy nears the optimum (there it overshoots to about 0.9 and stays)."""
    torch.manual_seed(0)
    m = model(ta=1, da=1, cond=1, hidden=32, steps=5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        data = (-0.5 + 0.1 * torch.randn(128, 1, 1)).clamp(-1, 1)
        loss = m.loss(data, torch.zeros(128, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = DQL(m, 1, DQLParams(horizon_steps=1, act_steps=1, critic_hidden=(32, 32), actor_lr=1e-3), seed=0)
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
    assert abs(end - 0.5) < 0.15, (start, end)
