"""DPPO's GMM baseline (`agents/ppo.py` GMMPolicy / GMMPPO, `pipelines/chunk_policy.py` its spec): the joint
log-density against a hand computation and DPPO's clamp on it, the std bounds, the approximate entropy, mode
proportions of the samples, NLL pre-training that keeps two modes apart (the Gaussian cannot), PPO moving the mass
toward the better mode of a bandit, and the spec's stored layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.agents.ppo import GMMPPO, GaussianPolicy, GaussianPPOParams, GMMPolicy, GMMPPOParams
from diffrl.agents.ppo_utils import PPOBatch
from diffrl.envs.vector import StepResult
from diffrl.errors import ConfigError
from diffrl.pipelines.chunk_policy import GMMSpec, PolicySpec, PretrainedPolicy, build_agent
from diffrl.pipelines.onpolicy import advantages, collect, ppo_update

DO, TO = 3, 1


class Fixed(nn.Module):
    """A network head with a fixed output, the same for every history: ``(B, d_in) -> (B, len(out))``."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("out", out.flatten().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(len(x), -1)


def hand_built(means: torch.Tensor, logits: torch.Tensor, std: torch.Tensor, **kw) -> GMMPolicy:
    """A GMM policy whose mode means ``(C, Ta, Da)``, logits ``(C,)`` and std ``(C, Da)`` are the given ones."""
    c, ta, da = means.shape
    policy = GMMPolicy(DO, da, ta, TO, num_modes=c, hidden=(8,), residual=False, **kw)
    policy.mean_net = Fixed(torch.atanh(means))  # tanh(atanh(m)) = m
    policy.logit_net = Fixed(logits)
    with torch.no_grad():
        policy.log_std.copy_(std.log())
    return policy


# two modes over chunks Ta = 2, Da = 2; weights softmax(0.3, -0.4); per-(mode, Da) stds
MEANS = torch.tensor([[[0.1, -0.2], [0.3, 0.0]], [[-0.5, 0.4], [0.6, -0.1]]])
LOGITS = torch.tensor([0.3, -0.4])
STD = torch.tensor([[0.1, 0.05], [0.15, 0.08]])


def hand_log_prob(x: np.ndarray, steps: int = 2) -> float:
    """log sum_c w_c prod_{t < steps, d} N(x_td; mu_ctd, sigma_cd^2), written out with math."""
    w = np.exp(LOGITS.numpy()) / np.exp(LOGITS.numpy()).sum()
    terms = []
    for c in range(2):
        lp = math.log(w[c])
        for t in range(steps):
            for d in range(2):
                mu, s = float(MEANS[c, t, d]), float(STD[c, d])
                lp += -0.5 * ((x[t, d] - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
        terms.append(lp)
    m = max(terms)
    return m + math.log(sum(math.exp(v - m) for v in terms))


def chunks() -> torch.Tensor:
    """Chunks (4, Ta, Da): near mode 0, near mode 1, two stds off mode 0, far from both."""
    return torch.tensor([[[0.12, -0.19], [0.28, 0.01]], [[-0.45, 0.38], [0.62, -0.05]],
                         [[0.3, -0.1], [0.4, 0.05]], [[0.9, 0.9], [-0.9, 0.9]]])


def test_log_prob_is_the_logsumexp_over_modes_of_the_joint_normal_density():
    policy = hand_built(MEANS, LOGITS, STD)
    obs, x = torch.randn(4, TO, DO), chunks()
    lp = policy.transition_log_prob(obs, x, x, torch.zeros(4, dtype=torch.long))
    assert lp.shape == (4,)  # one joint value per env step, not element-wise
    want = torch.tensor([hand_log_prob(xi.numpy()) for xi in x])
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-4)
    # DPPO's distribution object gives the same numbers
    dist = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=LOGITS.expand(4, 2)),
        torch.distributions.Independent(torch.distributions.Normal(
            MEANS.flatten(1).expand(4, -1, -1), STD.repeat(1, 2).expand(4, -1, -1)), 1))
    torch.testing.assert_close(lp, dist.log_prob(x.flatten(1)), rtol=1e-5, atol=1e-4)
    # the marginal of the first step keeps the weights, and ignores the second step
    first = policy.transition_log_prob(obs, x, x, torch.zeros(4), steps=1)
    torch.testing.assert_close(first, torch.tensor([hand_log_prob(xi.numpy(), steps=1) for xi in x]), rtol=1e-5,
                               atol=1e-4)
    moved = x.clone()
    moved[:, 1] += 0.3
    torch.testing.assert_close(policy.transition_log_prob(obs, x, moved, torch.zeros(4), steps=1), first)


def gmm_agent(policy: GMMPolicy | None = None, obs_dim: int = DO, act_dim: int = 2, **kw) -> GMMPPO:
    params = GMMPPOParams(**{**dict(horizon_steps=2, act_steps=2, cond_steps=TO, num_modes=2, hidden=(8,),
                                    residual=False, critic_hidden=(8, 8, 8)), **kw})
    return GMMPPO(obs_dim, act_dim, params, policy=policy)


def test_ppo_clamps_the_joint_log_prob_to_minus_5_2_for_new_and_old_alike():
    agent = gmm_agent(hand_built(MEANS, LOGITS, STD))
    obs, x = torch.randn(4, TO, DO), chunks()
    joint = torch.tensor([hand_log_prob(xi.numpy()) for xi in x])
    assert joint[0] > 2 and joint[1] > 2 and joint[3] < -5 and -5 < joint[2] < 2  # both bounds take effect
    idx = torch.zeros(4, dtype=torch.long)
    new = agent.log_probs(obs, x, x, idx)
    torch.testing.assert_close(new, joint.clamp(-5, 2), rtol=1e-5, atol=1e-4)
    # the rollout's old log-probs go through the same clamp, so a saturated sample has ratio exactly 1
    chains = torch.stack([x, x], dim=1)  # (M, 2, Ta, Da)
    old = agent.chain_log_probs(obs, chains)
    assert old.shape == (4, 1)
    torch.testing.assert_close(old[:, 0], new)
    # the joint, not the Gaussian's per-element mean: near a mode that mean is inside the bounds, the joint is not
    assert torch.all(joint[:2] / 4 < 2) and torch.all(new[:2] == 2)
    # a saturated sample gets no gradient; one inside the bounds does
    agent.policy.log_std.grad = None
    agent.log_probs(obs[:1], x[:1], x[:1], idx[:1]).sum().backward()
    assert agent.policy.log_std.grad is not None and torch.all(agent.policy.log_std.grad == 0)
    agent.policy.log_std.grad = None
    agent.log_probs(obs[2:3], x[2:3], x[2:3], idx[2:3]).sum().backward()
    assert torch.any(agent.policy.log_std.grad != 0)
    # the update reports the share of the minibatch on a bound (chunks 0, 1 at 2, chunk 3 at -5)
    batch = PPOBatch(obs, x, x, idx, old[:, 0], torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.zeros(4), torch.zeros(4))
    assert agent.update(batch)["logprob_clamped_frac"].item() == pytest.approx(0.75)


def test_std_is_learnable_per_mode_and_action_dim_and_stays_in_0_01_0_2():
    agent = gmm_agent(actor_lr=0.5, std_init=0.1)
    policy = agent.policy
    assert policy.log_std.shape == (2, 2) and policy.log_std.requires_grad
    torch.testing.assert_close(policy.std(), torch.full((2, 2), 0.1))
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([[-20.0, 20.0], [math.log(0.05), math.log(0.3)]]))
    torch.testing.assert_close(policy.std(), torch.tensor([[0.01, 0.2], [0.05, 0.2]]))
    with torch.no_grad():
        policy.log_std.fill_(math.log(0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # large steps push the std around: it never leaves [0.01, 0.2]
        obs = torch.randn(16, TO, DO, generator=g)
        sample = agent.sample(obs, generator=g)
        old = agent.chain_log_probs(obs, sample.chain)[:, 0]
        agent.update(PPOBatch(obs, sample.chain[:, 0], sample.chain[:, 1], torch.zeros(16), old,
                              torch.randn(16, generator=g), torch.randn(16, generator=g), torch.zeros(16)))
        std = agent.policy.std()
        assert torch.all(std >= 0.01 - 1e-7) and torch.all(std <= 0.2 + 1e-7)
    assert not torch.allclose(agent.policy.std(), torch.full((2, 2), 0.1))  # and it did move
    with pytest.raises(ConfigError, match="std_init"):
        GMMPPOParams(std_init=0.3)


def test_entropy_is_the_weighted_sum_of_the_modes_joint_entropies():
    policy = hand_built(MEANS, LOGITS, STD)
    obs = torch.randn(5, TO, DO)
    w = torch.softmax(LOGITS, 0)
    modes = torch.distributions.Independent(torch.distributions.Normal(MEANS.flatten(1), STD.repeat(1, 2)), 1)
    torch.testing.assert_close(policy.entropy(obs), (w * modes.entropy()).sum())
    by_hand = sum(float(w[c]) * 2 * sum(0.5 * math.log(2 * math.pi * math.e * float(STD[c, d]) ** 2)
                                        for d in range(2)) for c in range(2))
    assert policy.entropy(obs).item() == pytest.approx(by_hand, rel=1e-5)
    # state-dependent weights: the agent's bonus averages over the minibatch, and reaches the logits and the std
    torch.manual_seed(0)
    agent = gmm_agent(ent_coef=0.1)
    obs = torch.randn(6, TO, DO)
    per_state = [agent.policy.entropy(o[None]) for o in obs]
    torch.testing.assert_close(agent.entropy(obs), torch.stack(per_state).mean())
    agent.entropy(obs).backward()
    assert agent.policy.log_std.grad is not None and torch.any(agent.policy.logit_net[-1].weight.grad != 0)
    with pytest.raises(ValueError, match="pass the histories"):
        agent.policy.entropy()


def test_samples_come_from_each_mode_in_proportion_to_its_weight():
    means = torch.tensor([[[-0.6]], [[0.0]], [[0.6]]])  # three far-apart 1-D modes
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    policy = hand_built(means, logits, torch.tensor([[0.05], [0.1], [0.02]]))
    n, g = 20_000, torch.Generator().manual_seed(0)
    obs = torch.zeros(n, TO, DO)
    out = policy.sample(obs, generator=g)
    a, chain = out.action[:, 0, 0], out.chain
    # the chain records the drawn mode's mean, then the sample
    mode = (chain[:, 0, 0, 0, None] - means[:, 0, 0]).abs().argmin(1)
    torch.testing.assert_close(chain[:, 0, 0, 0], means[mode, 0, 0])
    torch.testing.assert_close(chain[:, 1], out.action)
    freq = torch.bincount(mode, minlength=3).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)  # ~4.5 binomial sds
    nearest = (a[:, None] - means[:, 0, 0]).abs().argmin(1)
    assert (nearest == mode).float().mean() > 0.99  # the samples lie around their drawn mode ...
    for c, s in enumerate((0.05, 0.1, 0.02)):  # ... each spread by its own std, unclipped
        z = (a[mode == c] - means[c, 0, 0]) / s
        assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert (a[mode == 1] - 0.0).abs().max() > 3 * 0.1  # no noise clip (DPPO samples its mixture unclipped)
    # evaluation: a mode's mean drawn by weight (DPPO), or the most likely mode's mean (mean_path)
    det = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(1))
    assert det.chain is None
    det_freq = torch.stack([(det.action[:, 0, 0] == means[c, 0, 0]).float().mean() for c in range(3)])
    torch.testing.assert_close(det_freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    best = policy.sample(obs[:10], deterministic=True, mean_path=True)
    assert torch.all(best.action == -0.6)
    # a fixed generator reproduces the draws
    again = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.action, out.action)


# ------------------------------------------------------------------------------------ two modes, NLL and PPO
LEFT, RIGHT = -0.5, 0.5  # the two actions of the toy data, half each; the bandit rewards RIGHT


def two_mode_data(n: int, g: torch.Generator) -> torch.Tensor:
    """Chunks (n, Ta = 1, Da = 1): LEFT or RIGHT with probability 1/2, plus N(0, 0.05^2)."""
    side = torch.where(torch.rand(n, generator=g) < 0.5, LEFT, RIGHT)
    return (side + 0.05 * torch.randn(n, generator=g)).view(n, 1, 1)


def clone(policy: GMMPolicy | GaussianPolicy, seed: int, steps: int = 400) -> None:
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = policy.bc_loss(torch.zeros(128, 1, 1), two_mode_data(128, g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def near(actions: torch.Tensor, target: float) -> float:
    """Share of ``actions`` within 0.25 of ``target`` (2.5 stds of the pre-trained std 0.1: 98.8% of a mode)."""
    return float(((actions - target).abs() < 0.25).float().mean())


def test_nll_pretraining_recovers_both_modes_where_the_gaussian_averages_them():
    torch.manual_seed(0)
    gmm = GMMPolicy(1, 1, 1, 1, hidden=(32, 32, 32))
    gaussian = GaussianPolicy(1, 1, 1, 1, hidden=(32, 32, 32))
    clone(gmm, seed=0)
    clone(gaussian, seed=0)
    obs, g = torch.zeros(4000, 1, 1), torch.Generator().manual_seed(7)
    a = gmm.sample(obs, generator=g).action.flatten()
    assert near(a, LEFT) == pytest.approx(0.5, abs=0.06) and near(a, RIGHT) == pytest.approx(0.5, abs=0.06)
    torch.testing.assert_close(gmm.std(), torch.full((5, 1), 0.1))  # pre-training holds the std fixed
    b = gaussian.sample(obs, generator=g).action.flatten()
    assert near(b, LEFT) + near(b, RIGHT) < 0.05  # one mean between the two: neither action
    assert abs(float(gaussian(obs[:1]).detach())) < 0.1


class Bandit:
    """N one-step bandits for chunk policies (Ta = Da = To = Do = 1): reward -(a - RIGHT)^2, every step terminates.
    Duck-types the VecEnv that `collect` steps."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs

    def reset(self) -> np.ndarray:
        return np.zeros((self.num_envs, 1, 1), np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        r = -(np.asarray(actions)[:, 0, 0].astype(np.float64) - RIGHT) ** 2
        obs, done = self.reset(), np.ones(self.num_envs, bool)
        return StepResult(obs, r, done, ~done, obs, [{}] * self.num_envs,
                          [(i, float(r[i]), 1, {}) for i in range(self.num_envs)], self.num_envs)


def test_ppo_fine_tuning_moves_the_mass_to_the_bandits_better_mode():
    seed, n_envs = 0, 64
    torch.manual_seed(seed)
    policy = GMMPolicy(1, 1, 1, 1, hidden=(32, 32, 32))
    clone(policy, seed)
    # DPPO's clip 0.01 would need ~20x the iterations: 0.2 and lr 1e-3, as the Gaussian / DPPO bandit test
    agent = gmm_agent(policy, 1, 1, horizon_steps=1, act_steps=1, num_modes=5, hidden=(32, 32, 32), residual=True,
                      actor_lr=1e-3, clip_ploss_coef=0.2)
    probe = torch.zeros(2000, 1, 1)

    def right_share() -> float:
        return near(agent.sample(probe, generator=torch.Generator().manual_seed(123)).action.flatten(), RIGHT)

    before = right_share()
    assert before == pytest.approx(0.5, abs=0.06)
    env, g = Bandit(n_envs), torch.Generator().manual_seed(seed)
    obs = env.reset()
    for _ in range(10):
        ro = collect(agent, env, obs, 1, g)
        values, adv, ret, _ = advantages(agent, ro, 0.99, 0.95, scaler=None)
        ppo_update(agent, ro, values, adv, ret, update_epochs=5, critic_only=False, generator=g,
                   minibatch_size=n_envs // 2)
        obs = ro.last_obs
    after = right_share()
    # measured over seeds 0-3: the share goes from ~0.5 to 0.99 in 10 iterations, by the mode weights (the left
    # modes keep their means and lose their weight); a sign error in the advantages would drain the right modes, no
    # actor step would keep 0.5
    assert after > 0.9, (before, after)
    with torch.no_grad():
        means, logits = agent.policy(probe[:1])
    left_weight = float((torch.softmax(logits, -1) * (means.flatten(1) < 0)).sum())
    assert left_weight < 0.1, left_weight


# ------------------------------------------------------------------------------------------------------- spec
def gmm_spec(std: float = 0.1) -> PolicySpec:
    return PolicySpec("gmm", DO, 2, 4, 2, TO, gmm=GMMSpec(3, (16, 16, 16), True, "mish", std))


def test_gmm_spec_round_trips_its_stored_layout_and_rebuilds_the_policy():
    spec = gmm_spec()
    stored = json.loads(json.dumps(spec.to_dict()))  # as a manifest gives it back
    assert stored == {"type": "gmm", "obs_dim": DO, "act_dim": 2, "horizon_steps": 4, "act_steps": 2,
                      "cond_steps": TO, "gmm": {"num_modes": 3, "hidden": [16, 16, 16], "residual": True,
                                                "activation": "mish", "std": 0.1}}
    assert PolicySpec.from_dict(stored) == spec and PolicySpec.from_dict(stored).to_dict() == stored
    torch.manual_seed(0)
    saved = GMMPolicy(DO, 2, 4, TO, num_modes=3, hidden=(16, 16, 16)).state_dict()
    policy = spec.build_policy(saved)
    assert isinstance(policy, GMMPolicy) and policy.num_modes == 3
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in saved.items())
    # fine-tuning starts from the pre-trained std clamped into its bounds, with DPPO's unclipped sampling
    torch.testing.assert_close(gmm_spec(0.5).gmm_policy(0.01, 0.2).std(), torch.full((3, 2), 0.2))
    with pytest.raises(ValueError, match="a gmm policy spec has gmm and nothing else"):
        PolicySpec("gmm", DO, 2, 4, 2, TO)
    with pytest.raises(ConfigError, match="noise_clip"):
        GMMPPOParams(noise_clip=3.0)


def test_build_agent_fine_tunes_a_gmm_spec_with_gmm_ppo_from_the_ema_weights():
    spec = gmm_spec()
    torch.manual_seed(1)
    ema = GMMPolicy(DO, 2, 4, TO, num_modes=3, hidden=(16, 16, 16)).state_dict()
    pretrained = PretrainedPolicy(Path("pre"), spec, {"env_id": "Toy-v0"}, None, None, "d.hdf5",  # type: ignore[arg-type]
                                  ema)
    params = GMMPPOParams(horizon_steps=4, act_steps=2, cond_steps=TO, num_modes=3, hidden=(16, 16, 16),
                          critic_hidden=(8, 8, 8))
    agent = build_agent(pretrained, params, torch.device("cpu"))
    assert isinstance(agent, GMMPPO) and agent.num_transitions == 1
    assert all(torch.equal(agent.policy.state_dict()[k], v) for k, v in ema.items())
    with pytest.raises(TypeError, match="GMMPPOParams"):
        build_agent(pretrained, GaussianPPOParams(horizon_steps=4, act_steps=2, cond_steps=TO), torch.device("cpu"))
