"""DPPO building blocks: per-step log-probs, clip schedule, frozen/fine-tuned routing (training AND eval), the PPO
update, the chunk env wrapper, min-max normalisation, the chunk dataset, GAE, reward scaling, the Gaussian
baseline and exact state round trips."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffrl.agents.dppo import DPPO, DiffusionPolicy, DPPOParams, dppo_model_spec
from diffrl.agents.ppo import GaussianPolicy, GaussianPPO, GaussianPPOParams
from diffrl.agents.ppo_utils import PPOBatch, RunningRewardScaler, gae, ppo_minibatches
from diffrl.data.datasets import OfflineDataset
from diffrl.data.sequence import ChunkDataset
from diffrl.diffusion.spec import build_model
from diffrl.envs import make_env
from diffrl.envs.wrappers import ActionChunkEnv, MinMaxNormalization
from diffrl.errors import ConfigError, DatasetError
from diffrl.runs.checkpoint import flatten_tree, unflatten_tree
from diffrl.runs.logger import episode_stats

DO, DA, TA, TO = 3, 2, 4, 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_dppo(seed: int = 0, **kw) -> DPPO:
    base = dict(denoising_steps=8, ft_denoising_steps=4, horizon_steps=TA, act_steps=2, cond_steps=TO,
                critic_hidden=(32, 32, 32))
    params = DPPOParams(**{**base, **kw})
    torch.manual_seed(seed)
    model = build_model(dppo_model_spec(DO, DA, params, hidden=32))
    return DPPO(model, DO, params)


def rollout(agent, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, TO, DO, generator=g)
    _, chains = agent.sample(obs, generator=g)
    return obs, chains, agent.chain_log_probs(obs, chains)


def minibatch(agent, n: int = 6, seed: int = 1, batch_size: int = 1000) -> PPOBatch:
    obs, chains, old = rollout(agent, n, seed)
    g = torch.Generator().manual_seed(seed)
    adv, ret = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return next(ppo_minibatches(obs, chains, old, adv, ret, agent.values(obs), batch_size, generator=g))


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# --------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("ddim", [False, True])
@pytest.mark.parametrize("floor", [0.1, 0.02])  # 0.02: log-probs above 2 exist, so the clamp is exercised
def test_log_probs_equal_normal_of_recorded_means_and_floored_stds_clamped_truncated_and_averaged(ddim, floor):
    kw = dict(use_ddim=True, ddim_steps=4, ft_denoising_steps=3) if ddim else {}
    agent = make_dppo(min_sampling_std=floor, min_logprob_std=floor, **kw)
    policy = agent.policy
    obs = torch.randn(5, TO, DO)
    chain = policy.chain(obs, generator=torch.Generator().manual_seed(3))
    k, first = policy.ft_steps, policy.first_ft
    chains = chain.xs[first:].transpose(0, 1)  # (B, K' + 1, Ta, Da), as sample returns them
    ref, raw = [], []
    for i in range(k):
        std = chain.stds[first + i].expand_as(chain.means[first + i]).clamp(min=floor)
        lp = torch.distributions.Normal(chain.means[first + i], std).log_prob(chain.xs[first + i + 1])
        raw.append(lp)
        ref.append(lp.clamp(-5, 2)[:, :2].mean(dim=(1, 2)))  # clamp, first act_steps = 2 actions, mean
    ref_t = torch.stack(ref, 1)  # (B, K')
    torch.testing.assert_close(agent.chain_log_probs(obs, chains), ref_t, rtol=1e-5, atol=1e-5)
    # a minibatch of MIXED (env step, transition) pairs gives the same numbers
    step = torch.tensor([4, 0, 2, 1, 3, 0, 4, 2])
    idx = torch.tensor([0, k - 1, 1, k - 1, 0, 1, k - 1, 0])
    mixed = agent.log_probs(obs[step], chains[step, idx], chains[step, idx + 1], idx)
    torch.testing.assert_close(mixed, ref_t[step, idx], rtol=1e-5, atol=1e-5)
    # the truncation to act_steps matters: the full-chunk mean differs
    full = torch.stack([lp.clamp(-5, 2).mean(dim=(1, 2)) for lp in raw], 1)
    assert not torch.allclose(full, ref_t)
    if floor == 0.02:
        assert max(float(lp.detach().max()) for lp in raw) > 2.0


def test_log_probs_reach_only_the_fine_tuned_network():
    agent = make_dppo()
    obs, chains, _ = rollout(agent)
    idx = torch.arange(6) % agent.num_transitions
    agent.log_probs(obs, chains[torch.arange(6), idx], chains[torch.arange(6), idx + 1], idx).sum().backward()
    assert all(p.grad is None for p in agent.policy.base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.policy.ft_net.parameters())


# --------------------------------------------------------------------------------------------- schedules
def test_clip_schedule_is_base_at_the_noisiest_step_coef_at_the_final_step_and_monotone():
    agent = make_dppo(denoising_steps=20, ft_denoising_steps=10, clip_ploss_coef=0.01, clip_ploss_coef_base=1e-3)
    c = agent.clip_coef(torch.arange(10))
    assert c[0].item() == pytest.approx(1e-3) and c[-1].item() == pytest.approx(0.01)
    assert torch.all(c[1:] > c[:-1])
    # exponential interpolation with rate 3 at the midpoint of the chain
    mid = 1e-3 + (0.01 - 1e-3) * math.expm1(3 * 4 / 9) / math.expm1(3)
    assert c[4].item() == pytest.approx(mid)
    single = make_dppo(ft_denoising_steps=1)
    assert single.clip_coef(torch.zeros(1, dtype=torch.long)).item() == pytest.approx(0.01)


def test_denoising_discount_leaves_the_final_step_undiscounted():
    agent = make_dppo(ft_denoising_steps=4, gamma_denoising=0.9)
    torch.testing.assert_close(agent.denoising_discount(torch.arange(4)), torch.tensor([0.729, 0.81, 0.9, 1.0]))


# --------------------------------------------------------------------------------------------- routing
class _TimestepRecorder:
    def __init__(self, module: torch.nn.Module) -> None:
        self.ts: list[int] = []
        module.register_forward_hook(lambda m, args, out: self.ts.extend(args[1].long().unique().tolist()))


@pytest.mark.parametrize("ddim", [False, True])
def test_only_the_last_k_prime_transitions_use_the_fine_tuned_copy_in_training_and_eval(ddim):
    kw = dict(denoising_steps=20, use_ddim=True, ddim_steps=5, ft_denoising_steps=2) if ddim else \
        dict(denoising_steps=8, ft_denoising_steps=3)
    agent = make_dppo(**kw)
    base, ft = _TimestepRecorder(agent.policy.base.net), _TimestepRecorder(agent.policy.ft_net)
    # DDIM "leading" steps of 20 in 5: 16, 12, 8, 4, 0; DDPM: 7 .. 0
    want_base, want_ft = ([16, 12, 8], [4, 0]) if ddim else ([7, 6, 5, 4, 3], [2, 1, 0])
    for deterministic in (False, True):
        base.ts.clear()
        ft.ts.clear()
        agent.sample(torch.randn(3, TO, DO), deterministic=deterministic)
        assert base.ts == want_base and ft.ts == want_ft
    s = agent.policy.chain_steps
    assert [agent.policy.net_for_step(i) is agent.policy.ft_net for i in range(s)] == \
        [i >= s - agent.num_transitions for i in range(s)]


def test_perturbing_the_fine_tuned_copy_changes_fine_tuned_transitions_and_the_eval_action_only():
    agent = make_dppo()
    obs = torch.randn(4, TO, DO)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        _, chains = agent.sample(obs, generator=torch.Generator().manual_seed(5))
        # eval: the mean path from x_S ~ N(0, I) (as DPPO), so the initial noise is seeded too
        return chains, agent.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(6))[0]

    chains0, eval0 = sample()
    with torch.no_grad():
        for p in agent.policy.ft_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    chains1, eval1 = sample()
    torch.testing.assert_close(chains1[:, 0], chains0[:, 0])  # produced by the frozen base network
    assert not torch.allclose(chains1[:, 1:], chains0[:, 1:])
    assert not torch.allclose(eval1, eval0)  # evaluation uses the fine-tuned copy (DPPO issue #29)
    with torch.no_grad():
        for p in agent.policy.base.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    chains2, _ = sample()
    assert not torch.allclose(chains2[:, 0], chains1[:, 0])


def test_ddpm_evaluation_keeps_the_posterior_noise_except_at_the_last_step_and_ddim_is_the_mean_path():
    # DPPO's deterministic DDPM sampling: std floored at 1e-3, noise clamped, none at t = 0 (not the mean path)
    agent = make_dppo()
    obs = torch.randn(1, TO, DO).expand(64, TO, DO)
    chain = agent.policy.chain(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    noise = (chain.xs[1:] - chain.means) / chain.stds
    assert torch.all(chain.stds >= 1e-3) and torch.equal(chain.xs[-1], chain.means[-1])
    assert torch.all(noise[:-1].std(dim=1) > 0.5) and torch.all(noise.abs() <= 3.0 + 1e-4)  # clamped at 3
    first = agent.act(obs.numpy(), deterministic=True)
    assert np.std(first[:, 0, 0]) > 1e-3  # one observation, 64 samples: not collapsed to one action
    ddim = make_dppo(denoising_steps=20, use_ddim=True, ddim_steps=5, ft_denoising_steps=2)
    a, b = (ddim.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(s))[0] for s in (0, 1))
    c = ddim.policy.chain(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.xs[1:], c.means)  # eta 0: every step is its mean
    # the action is the chain's end; only the starting noise (the seed) varies it
    torch.testing.assert_close(a, ddim.policy.base.normalizer.unnormalize(c.xs[-1]))
    assert not torch.allclose(a, b)


def test_the_ddpm_mean_path_takes_every_mean_through_the_fine_tuned_routing_and_only_at_evaluation():
    agent = make_dppo(denoising_steps=8, ft_denoising_steps=3)
    policy = agent.policy
    obs = torch.randn(1, TO, DO).expand(64, TO, DO)
    base, ft = _TimestepRecorder(policy.base.net), _TimestepRecorder(policy.ft_net)
    chain = policy.chain(obs, deterministic=True, generator=torch.Generator().manual_seed(0), mean_path=True)
    assert base.ts == [7, 6, 5, 4, 3] and ft.ts == [2, 1, 0]  # the same routing as DPPO's evaluation
    torch.testing.assert_close(chain.xs[1:], chain.means)  # no noise after the initial draw
    sampled = policy.chain(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled.xs[0], chain.xs[0])  # same start, ...
    assert not torch.allclose(sampled.xs[-1], chain.xs[-1])  # ... different path
    gaussian = make_gaussian().policy  # the Gaussian baseline's deterministic action is its mean either way
    torch.testing.assert_close(gaussian.sample(obs, True, mean_path=True)[0], gaussian(obs))
    with pytest.raises(ValueError, match="needs deterministic=True"):
        policy.sample(obs, deterministic=False, mean_path=True)


class ActionRewardEnv(gym.Env):
    """obs = zeros(DO); reward = the sum of the action; six steps."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (DO,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (DA,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(DO), {}

    def step(self, action):
        self.t += 1
        return np.zeros(DO), float(np.sum(action)), False, self.t >= 6, {}


def test_evaluation_is_reproducible_and_leaves_the_global_rng_alone():
    from diffrl.eval import evaluate

    agent = make_dppo(denoising_steps=4, ft_denoising_steps=2)
    env = ActionChunkEnv(ActionRewardEnv(), act_steps=2, cond_steps=TO, horizon_steps=TA)
    state = torch.get_rng_state()
    first, again, other = (evaluate(agent, env, 3, seed=s).returns for s in (3, 3, 4))
    assert first == again and first != other  # the chain's noise is seeded per evaluation episode
    assert torch.equal(torch.get_rng_state(), state)


def test_act_returns_numpy_chunks_and_training_chains_end_at_the_action():
    agent = make_dppo()
    obs = np.random.default_rng(0).normal(size=(3, TO, DO)).astype(np.float32)
    assert agent.act(obs, deterministic=True).shape == (3, TA, DA)
    actions, chains = agent.sample(obs)
    assert chains.shape == (3, agent.num_transitions + 1, TA, DA)
    torch.testing.assert_close(chains[:, -1], actions)
    with pytest.raises(ValueError, match="observation histories"):
        agent.act(obs[:, :1])


# --------------------------------------------------------------------------------------------- update
def test_update_leaves_the_frozen_base_untouched_and_moves_fine_tuned_copy_and_critic():
    agent = make_dppo()
    base, ft, critic = params_of(agent.policy.base), params_of(agent.policy.ft_net), params_of(agent.critic)
    assert not any(p.requires_grad for p in agent.policy.base.parameters())
    for _ in range(2):
        metrics = agent.update(minibatch(agent))
    assert all(torch.equal(a, b) for a, b in zip(base, params_of(agent.policy.base)))
    assert all(p.grad is None for p in agent.policy.base.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(ft, params_of(agent.policy.ft_net)))
    assert not all(torch.equal(a, b) for a, b in zip(critic, params_of(agent.critic)))
    assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in metrics.values())


def test_first_update_has_ratio_one_no_clipping_and_the_vanilla_policy_gradient():
    agent = make_dppo()
    mb = minibatch(agent)
    # expected actor gradient: -mean(A_norm * gamma_d^(K'-1-i) * ratio), ratio = 1 but differentiable
    new = agent.log_probs(mb.obs, mb.chain_x, mb.chain_next, mb.denoise_idx)
    adv = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
    surrogate = -(adv * agent.denoising_discount(mb.denoise_idx) * (new - mb.old_log_prob).exp()).mean()
    expected = torch.autograd.grad(surrogate, list(agent.policy.ft_net.parameters()))
    metrics = agent.update(mb)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_min"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["clipfrac"].item() == 0.0
    for g, p in zip(expected, agent.policy.ft_net.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_critic_only_update_steps_the_critic_and_not_the_actor():
    agent = make_dppo()
    ft, critic = params_of(agent.policy.ft_net), params_of(agent.critic)
    agent.update(minibatch(agent), critic_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ft, params_of(agent.policy.ft_net)))
    assert not all(torch.equal(a, b) for a, b in zip(critic, params_of(agent.critic)))
    assert (agent.num_updates, agent.num_actor_updates) == (1, 0)


def test_value_loss_is_half_mse_and_clipped_value_loss_is_the_max_of_both():
    agent = make_dppo()
    mb = minibatch(agent)
    v = agent.values(mb.obs)
    assert agent.update(mb, critic_only=True)["v_loss"].item() == pytest.approx(
        0.5 * float(((v - mb.returns) ** 2).mean()), rel=1e-5)
    clipped = make_dppo(clip_vloss_coef=0.01)
    mb = minibatch(clipped)
    mb.old_values = mb.old_values + 1.0  # far from the current values: the clipped branch dominates
    v = clipped.values(mb.obs)
    vc = mb.old_values + (v - mb.old_values).clamp(-0.01, 0.01)
    want = 0.5 * float(torch.max((v - mb.returns) ** 2, (vc - mb.returns) ** 2).mean())
    assert clipped.update(mb, critic_only=True)["v_loss"].item() == pytest.approx(want, rel=1e-5)


def test_should_stop_only_above_target_kl():
    assert not make_dppo().should_stop({"approx_kl": torch.tensor(5.0)})
    agent = make_dppo(target_kl=0.1)
    assert agent.should_stop({"approx_kl": torch.tensor(0.2)})
    assert not agent.should_stop({"approx_kl": torch.tensor(0.05)})


def test_minibatches_cover_every_env_step_and_transition_once_per_epoch():
    agent = make_dppo()
    obs, chains, old = rollout(agent, n=5)
    seen = []
    for mb in ppo_minibatches(obs, chains, old, torch.arange(5.0), torch.zeros(5), torch.zeros(5), 4):
        step = mb.advantages.long()  # advantages encode the env step
        seen += list(zip(step.tolist(), mb.denoise_idx.tolist()))
        torch.testing.assert_close(mb.chain_x, chains[step, mb.denoise_idx])
        torch.testing.assert_close(mb.chain_next, chains[step, mb.denoise_idx + 1])
        torch.testing.assert_close(mb.old_log_prob, old[step, mb.denoise_idx])
        assert torch.equal(mb.env_step, step) and torch.equal(mb.obs, obs[mb.env_step])  # the pair's env step
    assert len(seen) == len(set(seen)) == 20  # 5 env steps x K'=4, five full minibatches of 4


@pytest.mark.parametrize("kw, msg", [(dict(ft_denoising_steps=9), "ft_denoising_steps"),
                                     (dict(act_steps=5), "act_steps"),
                                     (dict(ddim_steps=4), "ddim_steps"),
                                     (dict(use_ddim=True), "ddim_steps"),
                                     (dict(ent_coef=0.01), "ent_coef"),
                                     (dict(logprob_clamp=(2.0, -5.0)), "logprob_clamp"),
                                     (dict(critic_hidden=(32, 64, 32)), "critic_hidden")])
def test_bad_params_raise_config_error_naming_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        make_dppo(**kw)


def test_model_that_disagrees_with_params_is_rejected():
    params = DPPOParams(denoising_steps=8, ft_denoising_steps=4, horizon_steps=TA, act_steps=2, cond_steps=TO)
    model = build_model(dppo_model_spec(DO, DA, params, hidden=16))
    with pytest.raises(ConfigError, match="denoising steps"):
        DPPO(model, DO, DPPOParams(denoising_steps=10, ft_denoising_steps=4, horizon_steps=TA, act_steps=2,
                                   cond_steps=TO))
    with pytest.raises(ConfigError, match="conditioned"):
        DPPO(model, DO + 1, params)
    with pytest.raises(ConfigError, match="ft_denoising_steps"):
        DiffusionPolicy(model, 9)


# --------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip_through_checkpoint_codec_continues_identically():
    src = make_dppo(seed=0)
    for s in range(2):
        src.update(minibatch(src, seed=s))
    dst = make_dppo(seed=1)  # other random weights: everything must come from the checkpoint
    skeleton, tensors = flatten_tree(src.state_dict())
    dst.load_state_dict(unflatten_tree(json.loads(json.dumps(skeleton)), tensors))
    assert set(src.state_dict()["nets"]) == {"policy", "critic"}
    assert all(len(o["state"]) > 0 for o in src.state_dict()["optims"].values())
    for s in (5, 6):
        m_src, m_dst = src.update(minibatch(src, seed=s)), dst.update(minibatch(dst, seed=s))
        assert all(torch.equal(m_src[k], m_dst[k]) for k in m_src)
    for a, b in zip(src.policy.parameters(), dst.policy.parameters()):
        assert torch.equal(a, b)
    obs = torch.randn(2, TO, DO)
    det = [a.sample(obs, True, torch.Generator().manual_seed(0))[0] for a in (src, dst)]
    assert torch.equal(*det)
    assert (dst.num_updates, dst.num_actor_updates) == (4, 4)


# --------------------------------------------------------------------------------------------- Gaussian
def make_gaussian(**kw) -> GaussianPPO:
    return GaussianPPO(DO, DA, GaussianPPOParams(**{**dict(horizon_steps=TA, act_steps=2, cond_steps=TO,
                                                          hidden=(32, 32, 32), critic_hidden=(32, 32, 32)), **kw}))


def test_gaussian_std_starts_at_0_1_and_stays_in_its_bounds():
    agent = make_gaussian(actor_lr=0.5)
    torch.testing.assert_close(agent.policy.std(), torch.full((DA,), 0.1))
    with torch.no_grad():
        agent.policy.log_std.copy_(torch.tensor([-20.0, 20.0]))
    torch.testing.assert_close(agent.policy.std(), torch.tensor([0.01, 0.2]))
    with torch.no_grad():
        agent.policy.log_std.fill_(math.log(0.1))
    for s in range(5):  # large steps push the std around: it never leaves [0.01, 0.2]
        agent.update(minibatch(agent, seed=s))
        std = agent.policy.std()
        assert torch.all(std >= 0.01 - 1e-7) and torch.all(std <= 0.2 + 1e-7)


def test_gaussian_log_prob_is_normal_clamped_truncated_and_averaged():
    agent = make_gaussian()
    obs, chains, old = rollout(agent)
    assert chains.shape == (6, 2, TA, DA) and old.shape == (6, 1)
    mean, std = agent.policy(obs), agent.policy.std()
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(chains[:, 1])[:, :2]
    torch.testing.assert_close(old[:, 0], ref.mean(dim=(1, 2)).clamp(-5, 2))  # the mean is clamped (DPPO)
    with torch.no_grad():  # a std of 0.02: most elements' log-probs exceed 2, their mean does not always
        agent.policy.log_std.fill_(math.log(0.02))
    obs, chains, old = rollout(agent)
    elems = torch.distributions.Normal(agent.policy(obs), torch.full_like(agent.policy(obs), 0.02)).log_prob(
        chains[:, 1])[:, :2]
    torch.testing.assert_close(old[:, 0], elems.mean(dim=(1, 2)).clamp(-5, 2))
    assert not torch.allclose(old[:, 0], elems.clamp(-5, 2).mean(dim=(1, 2)))
    assert torch.all((chains[:, 1] - mean).abs() <= 3 * 0.1 + 1e-6)  # noise clamped at 3 std


def test_gaussian_first_update_has_ratio_one_and_constant_clip():
    agent = make_gaussian()
    metrics = agent.update(minibatch(agent))
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_coef_mean"].item() == pytest.approx(0.01)


def test_gaussian_bc_loss_fits_the_mean_and_leaves_the_std():
    policy = GaussianPolicy(DO, DA, TA, TO, hidden=(32, 32, 32))
    obs, target = torch.randn(64, TO, DO), torch.rand(64, TA, DA) * 0.5
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    first = policy.bc_loss(obs, target).item()
    for _ in range(100):
        loss = policy.bc_loss(obs, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    torch.testing.assert_close(policy.std(), torch.full((DA,), 0.1))
    agent = GaussianPPO(DO, DA, GaussianPPOParams(horizon_steps=TA, act_steps=2, cond_steps=TO,
                                                  hidden=(32, 32, 32)), policy=policy)
    torch.testing.assert_close(agent.act(obs[:3].numpy(), deterministic=True), policy(obs[:3]).detach().numpy())


# --------------------------------------------------------------------------------------------- GAE, scaler
def test_gae_matches_a_hand_computation_and_bootstraps_through_truncation_only():
    gamma, lam = 0.9, 0.8
    rew = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    val = torch.tensor([[0.5, 0.5], [0.6, 0.6], [0.7, 0.7]])
    nxt = torch.tensor([[0.6, 0.6], [10.0, 10.0], [0.8, 0.8]])  # step 1 reaches a final observation worth 10
    term = torch.tensor([[False, False], [True, False], [False, False]])
    trunc = torch.tensor([[False, False], [False, True], [False, False]])
    adv, ret = gae(rew, val, nxt, term, gamma, lam, truncated=trunc)
    d2 = 3.0 + gamma * 0.8 - 0.7
    d1_term, d1_trunc = 2.0 - 0.6, 2.0 + gamma * 10.0 - 0.6  # no bootstrap at termination, bootstrap at truncation
    d0 = 1.0 + gamma * 0.6 - 0.5
    want = torch.tensor([[d0 + gamma * lam * d1_term, d0 + gamma * lam * d1_trunc],
                         [d1_term, d1_trunc],  # the recursion stops at both episode ends
                         [d2, d2]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + val)
    # without `truncated` (DPPO's loop) the advantage flows across the truncation, not the termination
    adv2, _ = gae(rew, val, nxt, term, gamma, lam)
    assert adv2[1, 0].item() == pytest.approx(d1_term)
    assert adv2[1, 1].item() == pytest.approx(d1_trunc + gamma * lam * d2)


def test_reward_scaler_divides_by_the_std_of_the_discounted_return_and_resets_at_episode_ends():
    rng = np.random.default_rng(0)
    scaler = RunningRewardScaler(num_envs=3, gamma=0.9)
    rewards, ends = rng.normal(2.0, 1.0, (50, 3)), rng.random((50, 3)) < 0.1
    out1 = scaler(rewards[:25], ends[:25])
    out2 = scaler(rewards[25:], ends[25:])
    rets, running = np.empty_like(rewards), np.zeros(3)
    for t in range(50):  # the discounted returns, by hand
        running = rewards[t] + 0.9 * running
        rets[t] = running
        running[ends[t]] = 0.0
    assert scaler.var == pytest.approx(rets.var(), rel=1e-4)  # the pooled variance (prior weight 1e-4)
    assert scaler.mean == pytest.approx(rets.mean(), rel=1e-4)
    np.testing.assert_allclose(out2, np.clip(rewards[25:] / np.sqrt(scaler.var + 1e-8), -10, 10), rtol=1e-6)
    assert out1.shape == (25, 3) and out1.dtype == np.float32
    # clipping at +-10 and an exact state round trip
    assert np.abs(scaler.scale(np.array([1e6, -1e6]))).max() == 10.0
    copy_ = RunningRewardScaler(num_envs=3, gamma=0.9)
    copy_.load_state_dict(json.loads(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                                                 for k, v in scaler.state_dict().items()})))
    np.testing.assert_array_equal(copy_(rewards[:5], ends[:5]), scaler(rewards[:5], ends[:5]))



def test_episode_stats_are_the_mean_return_and_length_and_the_count_and_nothing_without_finished_episodes():
    out = episode_stats([(10.0, 4), (20.0, 8), (33.0, 9)])
    assert out == {"train/episode_return": 21.0, "train/episode_length": 7.0, "train/episodes": 3.0}
    assert episode_stats([]) == {}

# --------------------------------------------------------------------------------------------- normalisation
def test_min_max_normalisation_maps_the_range_to_unit_interval_and_round_trips():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(100, 3)).astype(np.float32)
    obs[:, 2] = 4.0  # a constant dimension
    act = rng.uniform(-3, 5, size=(100, 2)).astype(np.float32)
    norm = MinMaxNormalization.fit(obs, act)
    n_obs, n_act = norm.normalize_obs(obs), norm.normalize_act(act)
    np.testing.assert_allclose(n_obs[:, :2].min(0), -1.0, atol=1e-6)
    np.testing.assert_allclose(n_obs[:, :2].max(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(n_obs[:, 2], 0.0)  # constant dim: 0, not a division by zero
    np.testing.assert_allclose(n_act.min(0), -1.0, atol=1e-6)
    np.testing.assert_allclose(n_act.max(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize_obs(n_obs), obs, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize_act(n_act), act, atol=1e-5)
    t = torch.from_numpy(act)
    torch.testing.assert_close(norm.unnormalize_act(norm.normalize_act(t)), t)
    again = MinMaxNormalization.from_state_dict(norm.state_dict())
    np.testing.assert_array_equal(again.normalize_obs(obs), n_obs)
    with pytest.raises(ValueError, match="exceeds"):
        MinMaxNormalization(np.ones(2), np.zeros(2), np.zeros(1), np.ones(1))


# --------------------------------------------------------------------------------------------- chunk env
class CountingEnv(gym.Env):
    """obs = [t, -t]; the reward of step t (1-based) is t; terminates at step ``term_at``; records actions."""

    def __init__(self, term_at: int = 100) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.term_at, self.t, self.actions = term_at, 0, []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.actions = 0, []
        return np.array([0.0, 0.0]), {}

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action))
        return np.array([self.t, -self.t], dtype=np.float64), float(self.t), self.t >= self.term_at, False, {}


def test_chunk_env_sums_rewards_over_act_steps_and_stops_at_termination():
    norm = MinMaxNormalization(np.array([0.0, -10.0]), np.array([10.0, 0.0]), np.array([-0.5]), np.array([0.5]))
    env = ActionChunkEnv(CountingEnv(term_at=5), act_steps=3, cond_steps=2, horizon_steps=4, normalization=norm)
    assert env.observation_space.shape == (2, 2) and env.action_space.shape == (4, 1)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, [[-1.0, 1.0], [-1.0, 1.0]])  # first obs repeated, normalised
    chunk = np.array([[1.0], [0.0], [-1.0], [0.7]], dtype=np.float32)
    obs, rew, term, trunc, info = env.step(chunk)
    assert rew == 1 + 2 + 3 and not term and not trunc and info["env_steps"] == 3
    np.testing.assert_allclose(obs, [[-0.6, 0.6], [-0.4, 0.4]], atol=1e-6)  # obs of steps 2 and 3
    np.testing.assert_allclose(np.concatenate(env.unwrapped.actions), [0.5, 0.0, -0.5])  # un-normalised, 3 only
    obs, rew, term, trunc, info = env.step(chunk)
    assert rew == 4 + 5 and term and not trunc and info["env_steps"] == 2  # stopped inside the chunk
    np.testing.assert_allclose(obs[-1], [0.0, 0.0], atol=1e-6)  # the true final observation (t = 5)
    with pytest.raises(ValueError, match="action chunk"):
        env.step(np.zeros((2, 1)))


def test_chunk_env_stops_at_truncation_and_reports_it():
    env = ActionChunkEnv(gym.wrappers.TimeLimit(CountingEnv(), max_episode_steps=5), act_steps=4)
    env.reset(seed=0)
    env.step(np.zeros((4, 1)))
    _, rew, term, trunc, info = env.step(np.zeros((4, 1)))
    assert rew == 5 and trunc and not term and info["env_steps"] == 1


def test_chunk_env_on_hopper_matches_stepping_the_env_by_hand():
    actions = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3)).astype(np.float32)
    env = ActionChunkEnv(make_env("Hopper-v5"), act_steps=4)
    ref = make_env("Hopper-v5")
    obs, _ = env.reset(seed=3)
    ref_obs, _ = ref.reset(seed=3)
    np.testing.assert_allclose(obs[0], ref_obs, rtol=1e-6)
    for chunk in actions:
        obs, rew, term, trunc, info = env.step(chunk)
        total = 0.0
        for a in chunk[:info["env_steps"]]:
            ref_obs, r, *_ = ref.step(a)
            total += r
        assert rew == pytest.approx(total) and info["env_steps"] == 4
        np.testing.assert_allclose(obs[0], ref_obs.astype(np.float32), rtol=1e-6)


# --------------------------------------------------------------------------------------------- chunk dataset
def indexed_dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([5, 2, 4])
    n = int(lengths.sum())
    obs = np.stack([np.arange(n), np.arange(n)], 1).astype(np.float32)  # row index in every column
    act = np.arange(n, dtype=np.float32)[:, None]
    return obs, act, lengths


def test_chunk_dataset_never_crosses_episodes_and_pads_history_with_the_first_state():
    obs, act, lengths = indexed_dataset()
    ds = ChunkDataset(obs, act, lengths, horizon_steps=3, cond_steps=2)
    assert len(ds) == 3 + 0 + 2  # the length-2 episode is shorter than a chunk
    hist, chunk = ds.tensors()
    assert hist.shape == (5, 2, 2) and chunk.shape == (5, 3, 1)
    np.testing.assert_array_equal(chunk[..., 0].numpy(), [[0, 1, 2], [1, 2, 3], [2, 3, 4], [7, 8, 9], [8, 9, 10]])
    np.testing.assert_array_equal(hist[..., 0].numpy(), [[0, 0], [0, 1], [1, 2], [7, 7], [7, 8]])
    with pytest.raises(DatasetError, match="no episode"):
        ChunkDataset(obs, act, lengths, horizon_steps=6)


def test_chunk_dataset_from_offline_normalises_and_samples_reproducibly():
    obs, act, lengths = indexed_dataset()
    ends = np.cumsum(lengths) - 1
    terminals = np.zeros(len(obs), bool)
    timeouts = np.zeros(len(obs), bool)
    terminals[ends[0]] = True
    timeouts[ends[1:]] = True
    off = OfflineDataset(obs, act, np.zeros(len(obs), np.float32), obs, terminals, timeouts)
    norm = MinMaxNormalization.fit(obs, act)
    ds = ChunkDataset.from_offline(off, horizon_steps=3, cond_steps=2, normalization=norm)
    raw = ChunkDataset(obs, act, lengths, horizon_steps=3, cond_steps=2)
    torch.testing.assert_close(ds.tensors()[1], torch.as_tensor(norm.normalize_act(raw.tensors()[1].numpy())))
    torch.testing.assert_close(ds.tensors()[0], torch.as_tensor(norm.normalize_obs(raw.tensors()[0].numpy())))
    a = ds.sample(7, torch.Generator().manual_seed(0))
    b = ds.sample(7, torch.Generator().manual_seed(0))
    assert a[0].shape == (7, 2, 2) and a[1].shape == (7, 3, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
