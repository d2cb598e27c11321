"""DiffPPO's system pieces (pipelines/diffppo.py) on tiny nets: the prior's adaptation inside the system changes only
its adapters, the per-minibatch loss reaches only the PPO policy, the observation map between the loop's running
normalisation and the prior's dataset z-scores, the hooks' state round trip, the real episodes' returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.agents.ppo import GaussianPPO
from diffrl.agents.ppo_utils import PPOBatch, RunningObsNormalizer, RunningRewardScaler
from diffrl.data import OfflineDataset
from diffrl.diffusion.spec import build_model
from diffrl.errors import ConfigError
from diffrl.pipelines import onpolicy
from diffrl.pipelines.diffppo import DiffPPOConfig, PriorHooks, discounted_returns, prior_spec

DO, DA, T, N = 5, 2, 4, 2


def config(**kw) -> DiffPPOConfig:
    return DiffPPOConfig(dataset="data.hdf5", n_envs=N, n_steps=T, num_minibatches=2, hidden=(8, 8),
                         critic_hidden=(8, 8), q_hidden=(8, 8), prior_hidden=8, prior_denoising_steps=4,
                         num_proposals=4, **kw)


def setup(cfg: DiffPPOConfig, seed: int = 0) -> tuple[PriorHooks, GaussianPPO, RunningObsNormalizer]:
    torch.manual_seed(seed)
    prior = build_model(prior_spec(DO, DA, cfg.prior_hidden, cfg.prior_denoising_steps))
    hooks = PriorHooks(cfg, prior, np.full(DO, 0.5), np.full(DO, 2.0), torch.device("cpu"))
    agent = GaussianPPO(DO, DA, cfg)
    norm = RunningObsNormalizer(DO)
    norm(np.random.default_rng(seed).normal(1.0, 3.0, size=(50, DO)))
    hooks.setup(agent, norm, RunningRewardScaler(N, per_step=True))
    return hooks, agent, norm


def rollout(seed: int = 0) -> onpolicy.Rollout:
    g = torch.Generator().manual_seed(seed)
    term = np.zeros((T, N), dtype=bool)
    term[1, 0] = True
    return onpolicy.Rollout(obs=torch.randn(T, N, 1, DO, generator=g), chains=torch.randn(T, N, 2, 1, DA, generator=g),
                            rewards=np.ones((T, N)), terminated=term, truncated=np.zeros((T, N), dtype=bool),
                            final_obs={}, last_obs=np.zeros((N, 1, DO), dtype=np.float32), env_steps=T * N,
                            episodes=[])


def test_prior_adaptation_in_the_system_changes_only_the_adapters_and_only_every_prior_every_iterations():
    hooks, agent, _ = setup(config(prior_every=2, lora_lr=1e-2))
    named = dict(hooks.prior.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    q_before = [p.detach().clone() for p in hooks.q.parameters()]
    out = hooks.after_update(1, rollout(), agent, None)  # not an adaptation iteration: the Q head only
    assert "diffppo/prior_loss" not in out and hooks.adapter_steps == 0
    assert all(torch.equal(named[k], before[k]) for k in named)
    assert any(not torch.equal(p, q) for p, q in zip(hooks.q.parameters(), q_before))
    out = hooks.after_update(2, rollout(1), agent, None)
    assert np.isfinite(out["diffppo/prior_loss"]) and hooks.adapter_steps == 1
    changed = {k for k in named if not torch.equal(named[k], before[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)  # pre-trained weights untouched
    assert any(k.endswith("lora_B") for k in changed)
    assert not any(p.requires_grad for p in hooks.prior.parameters())  # frozen again outside the adapter step


def test_minibatch_loss_reaches_the_ppo_policy_only_never_the_prior_or_the_q_head():
    hooks, agent, _ = setup(config())
    hooks.begin_iteration(5, 10)
    assert hooks.beta == 1.0  # 5 / (0.3 * 10) > 1: annealed
    ro = rollout()
    obs = ro.obs.flatten(0, 1)
    batch = PPOBatch(obs, ro.chains[:, :, 0].flatten(0, 1), ro.chains[:, :, 1].flatten(0, 1),
                     torch.zeros(len(obs), dtype=torch.long), torch.zeros(len(obs)), torch.zeros(len(obs)),
                     torch.zeros(len(obs)), torch.zeros(len(obs)))
    loss, metrics = hooks.extra_loss(batch)
    loss.backward()
    assert {"diffppo/aux_nll", "diffppo/kl_bound", "diffppo/proposal_q"} <= set(metrics)
    assert agent.policy.log_std.grad is not None and agent.policy.log_std.grad.abs().sum() > 0
    assert all(p.grad is not None for p in agent.policy.mean_net.parameters())
    assert all(p.grad is None for p in (*hooks.prior.parameters(), *hooks.q.parameters()))


@pytest.mark.parametrize("fresh", [False, True])
def test_proposals_are_drawn_once_per_iteration_for_its_states_unless_fresh_per_minibatch(fresh, monkeypatch):
    hooks, agent, _ = setup(config(fresh_proposals=fresh))
    hooks.begin_iteration(5, 10)
    ro = rollout()
    obs = ro.obs.flatten(0, 1)                                   # (M, 1, Do)
    draws: list[int] = []
    sample = hooks.prior_sample
    monkeypatch.setattr(hooks, "prior_sample", lambda o, n: draws.append(len(o)) or sample(o, n))
    hooks.before_update(ro)
    assert draws == ([] if fresh else [T * N])                   # every state of the rollout, once
    rows = torch.tensor([3, 0, 5])
    batch = PPOBatch(obs[rows], ro.chains[:, :, 0].flatten(0, 1)[rows], ro.chains[:, :, 1].flatten(0, 1)[rows],
                     torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3),
                     env_step=rows)
    _, metrics = hooks.extra_loss(batch)
    if fresh:
        assert hooks.proposals is None and draws == [3]          # the minibatch's states, drawn in the loss
        return
    assert draws == [T * N]                                       # the loss drew nothing
    props = hooks.proposals.take(rows)
    assert torch.equal(props.actions, hooks.proposals.actions[rows])
    b, k, _ = props.actions.shape
    lp = agent.policy.log_prob(obs[rows].repeat_interleave(k, dim=0), props.actions.reshape(b * k, 1, DA))
    expected = -(props.weights * lp.view(b, k)).sum(1).mean()
    assert torch.allclose(metrics["diffppo/aux_nll"], expected.detach())


def test_condition_maps_the_loops_running_normalised_observations_to_the_priors_dataset_z_scores():
    hooks, _, norm = setup(config())
    raw = np.random.default_rng(3).normal(1.0, 3.0, size=(6, DO))
    z = hooks.condition(torch.as_tensor(norm(raw, update=False)))
    assert torch.allclose(z, torch.as_tensor((raw - 0.5) / 2.0, dtype=torch.float32), atol=1e-5)


def test_hooks_state_round_trips_adapters_q_head_and_generators():
    a, agent, _ = setup(config(prior_every=1, lora_lr=1e-2))
    a.after_update(1, rollout(), agent, None)
    b, _, _ = setup(config(prior_every=1))  # the same pre-trained prior (the stage's), fresh adapters and Q head
    obs = torch.randn(3, DO)
    assert not torch.equal(a.prior_sample(obs, 2), b.prior_sample(obs, 2))
    b.load_state_dict(a.state_dict())
    assert b.adapter_steps == 1
    for k in ("adapters", "q"):
        sa, sb = a.state_dict()[k], b.state_dict()[k]
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert torch.equal(a.prior_sample(obs, 2), b.prior_sample(obs, 2))  # same adapters, same proposal noise


def test_discounted_returns_restart_at_each_episode_and_do_not_bootstrap():
    ds = OfflineDataset(observations=np.zeros((5, 1), np.float32), actions=np.zeros((5, 1), np.float32),
                        rewards=np.array([1, 1, 1, 2, 2], np.float32), next_observations=np.zeros((5, 1), np.float32),
                        terminals=np.array([0, 0, 1, 0, 0], bool), timeouts=np.array([0, 0, 0, 0, 1], bool))
    assert discounted_returns(ds, 0.5) == pytest.approx([1.75, 1.5, 1.0, 3.0, 2.0])


@pytest.mark.parametrize("flags, sentence", [(dict(mode="online"), "invalid mode='online'"),
                                            (dict(data_fraction=0.0), "invalid data_fraction=0.0"),
                                            (dict(kl_num_t=0), "invalid kl_num_t=0")])
def test_config_refuses_bad_values_in_one_sentence(flags, sentence):
    with pytest.raises(ConfigError, match=sentence):
        config(**flags)
    with pytest.raises(ConfigError, match="--dataset is required"):
        DiffPPOConfig()
