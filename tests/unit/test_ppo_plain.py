"""Plain PPO (`diffrl train ppo`, pipelines/ppo.py) on the shared on-policy pieces: GAE through `collect` with a
termination and a truncation, the clipped policy and value losses and the joint gradient clip against an independent
computation, the running observation / reward statistics against NumPy, PPO solving a one-step bandit, and the
registry merging two modules' same-named commands."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffrl import registry
from diffrl.agents.ppo import GaussianPPO
from diffrl.agents.ppo_utils import PPOBatch, RunningObsNormalizer, RunningRewardScaler
from diffrl.envs.vector import StepResult
from diffrl.errors import ConfigError
from diffrl.pipelines.onpolicy import advantages, collect, ppo_update
from diffrl.pipelines.ppo import PPOConfig
from diffrl.registry import Command, System


def plain_agent(d_obs: int, d_act: int, **overrides) -> GaussianPPO:
    """PPO's agent with `diffrl train ppo`'s defaults (64x64 tanh, orthogonal init, joint clip 0.5, ...)."""
    torch.manual_seed(0)
    return GaussianPPO(d_obs, d_act, PPOConfig(**overrides))


class ScriptedEnvs:
    """One env (Do = Da = 1, one-step histories) replaying a script; duck-types the VecEnv `collect` steps."""

    def __init__(self, script: list[dict]) -> None:
        self.num_envs, self.script, self.t = 1, script, 0

    def step(self, actions: np.ndarray) -> StepResult:
        s = self.script[self.t]
        self.t += 1
        o = lambda v: np.full((1, 1, 1), v, np.float32)  # noqa: E731
        return StepResult(o(s["next"]), np.array([s["r"]]), np.array([s.get("term", False)]),
                          np.array([s.get("trunc", False)]), o(s["obs"]), [{}], [], 1)


# observations acted from: 1, 2 (terminated there: 3 is the next episode's first), 3, 4 (truncated there with true
# final observation 50; 5 is the reset's), 5, and the rollout ends with last_obs 6
SCRIPT = [dict(r=1.0, next=2.0, obs=2.0), dict(r=-2.0, next=30.0, obs=3.0, term=True),
          dict(r=0.5, next=4.0, obs=4.0), dict(r=3.0, next=50.0, obs=5.0, trunc=True), dict(r=-1.0, next=6.0, obs=6.0)]


class ObsValue(nn.Module):
    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # V(o) = o for (B, 1, 1) histories
        return obs.flatten(1).sum(1)


def test_gae_bootstraps_a_truncation_from_the_true_final_observation_and_never_a_termination():
    g, lam = 0.9, 0.8
    agent = plain_agent(1, 1)
    agent.critic = ObsValue()
    ro = collect(agent, ScriptedEnvs(SCRIPT), np.full((1, 1, 1), 1.0, np.float32), 5, torch.Generator())
    values, adv, ret, _ = advantages(agent, ro, g, lam, scaler=None)
    a = np.zeros(5)  # by hand: V(o) = o
    a[4] = -1.0 + g * 6.0 - 5.0                  # the rollout ends mid-episode: V(last_obs)
    a[3] = 3.0 + g * 50.0 - 4.0                  # truncated: V(true final obs 50), not V(reset obs 5); recursion stops
    a[2] = 0.5 + g * 4.0 - 3.0 + g * lam * a[3]
    a[1] = -2.0 - 2.0                            # terminated: no bootstrap (not V(30)), recursion stops
    a[0] = 1.0 + g * 2.0 - 1.0 + g * lam * a[1]
    np.testing.assert_allclose(values.numpy(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(adv.numpy(), a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret.numpy(), a + [1, 2, 3, 4, 5], rtol=1e-6, atol=1e-6)


def test_collect_normalises_observations_as_they_arrive_and_a_final_observation_without_counting_it():
    agent = plain_agent(1, 1)
    norm = RunningObsNormalizer(1)
    start = norm(np.full((1, 1, 1), 1.0))
    ro = collect(agent, ScriptedEnvs(SCRIPT), start, 5, torch.Generator(), obs_norm=norm)
    seen = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # every observation acted from (never 50, never 30)
    n = 1e-4 + len(seen)
    assert norm.count == pytest.approx(n) and norm.mean[0] == pytest.approx(seen.sum() / n, rel=1e-12)
    after = [RunningObsNormalizer(1) for _ in range(5)]  # the statistics of each step
    for k, s in enumerate(after):
        for v in seen[:k + 2]:
            s(np.full((1, 1), v))
    np.testing.assert_allclose(ro.obs[1:, 0, 0, 0].numpy(), [after[k](np.full(1, seen[k + 1]), update=False)[0]
                                                             for k in range(4)], rtol=1e-6)
    # the truncated step's final observation 50: normalised with the statistics after its step, not counted in them
    assert ro.final_obs[(3, 0)][0, 0] == pytest.approx(after[3](np.full(1, 50.0), update=False)[0], rel=1e-6)
    assert ro.last_obs[0, 0, 0] == pytest.approx(after[4](np.full(1, 6.0), update=False)[0], rel=1e-6)


def test_clipped_policy_and_value_losses_and_the_joint_gradient_clip_match_an_independent_computation():
    agent = plain_agent(3, 2)
    gen = torch.Generator().manual_seed(1)
    B = 64
    obs = torch.randn(B, 1, 3, generator=gen)
    with torch.no_grad():
        mean, std = agent.policy(obs), agent.policy.log_std.exp()          # (B, 1, 2), (2,)
        action = mean + std * torch.randn(B, 1, 2, generator=gen)
        lp = torch.distributions.Normal(mean, std).log_prob(action).sum((1, 2))  # the joint density: PPO's
        values = agent.critic(obs)
    old_lp = lp + 0.6 * (torch.rand(B, generator=gen) - 0.5)                # ratios in [0.74, 1.35]: some clipped
    adv = torch.randn(B, generator=gen)
    ret = 50 * torch.randn(B, generator=gen)                                # a large value error: a large gradient
    old_values = values + 0.8 * (torch.rand(B, generator=gen) - 0.5)        # value changes beyond +-0.2
    batch = PPOBatch(obs, mean, action, torch.zeros(B, dtype=torch.long), old_lp,
                     adv, ret, old_values)

    ratio = (lp - old_lp).exp()
    a = (adv - adv.mean()) / (adv.std() + 1e-8)                             # per-minibatch normalisation
    pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
    v_clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    vl = 0.5 * torch.max((values - ret) ** 2, (v_clipped - ret) ** 2).mean()
    assert abs(float(pg - (-a * ratio).mean())) > 1e-3                      # the ratio clip is active here
    assert abs(float(vl - 0.5 * ((values - ret) ** 2).mean())) > 1e-3       # and so is the value clip

    m = agent.update(batch)
    assert float(m["pg_loss"]) == pytest.approx(float(pg), rel=1e-5)
    assert float(m["v_loss"]) == pytest.approx(float(vl), rel=1e-5)
    assert float(m["clipfrac"]) == pytest.approx(float(((ratio - 1).abs() > 0.2).float().mean()))
    assert float(m["entropy"]) == pytest.approx(2 * (0.5 + 0.5 * math.log(2 * math.pi)), rel=1e-6)  # Da = 2, std 1
    # one clip over actor and critic: the gradients before it were far above 0.5, after it their joint norm is 0.5
    before = math.hypot(float(m["actor_grad_norm"]), float(m["critic_grad_norm"]))
    grads = [p.grad for p in [*agent.actor_params, *agent.critic.parameters()]]
    assert before > 5 and float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) == pytest.approx(
        0.5, rel=1e-4)


def moments_with_prior(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the rows of x pooled with baselines' prior (mean 0, var 1, weight 1e-4), closed form."""
    n = 1e-4 + len(x)
    mean = x.sum(0) / n
    return mean, (1e-4 * 1.0 + (x ** 2).sum(0)) / n - mean ** 2


def test_observation_and_per_step_reward_statistics_match_numpy():
    rng = np.random.default_rng(0)
    norm = RunningObsNormalizer(3)
    batches = [rng.normal([1.0, -5.0, 100.0], [0.5, 2.0, 30.0], size=(4, 1, 3)) for _ in range(6)]  # (N, To, Do)
    for b in batches:
        norm(b)
    mean, var = moments_with_prior(np.concatenate(batches).reshape(-1, 3))
    np.testing.assert_allclose(norm.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(norm.var, var, rtol=1e-7)
    one_by_one = RunningObsNormalizer(3)  # one env: a row per step (merge_moments' single-row path)
    for row in np.concatenate(batches).reshape(-1, 1, 1, 3):
        one_by_one(row)
    np.testing.assert_allclose(one_by_one.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(one_by_one.var, var, rtol=1e-7)
    x = np.array([[0.0, -5.0, 1e6]])
    np.testing.assert_allclose(norm(x, update=False), np.clip((x - mean) / np.sqrt(var + 1e-8), -10, 10), rtol=1e-6)
    assert norm(x, update=False)[0, 2] == 10.0  # clipped at 10

    gamma = 0.9
    rewards = rng.normal(3.0, 2.0, size=(8, 2))
    ends = np.zeros((8, 2), bool)
    ends[2, 0], ends[5, 1] = True, True
    scaler = RunningRewardScaler(2, gamma=gamma, per_step=True)
    out = scaler(rewards, ends)
    R, seen, want = np.zeros(2), [], np.zeros((8, 2))
    for t in range(8):  # SB3's VecNormalize: update with this step's returns, scale this step, restart at an end
        R = rewards[t] + gamma * R
        seen.append(R.copy())
        var = moments_with_prior(np.concatenate(seen))[1]
        want[t] = np.clip(rewards[t] / np.sqrt(var + 1e-8), -10, 10)
        R[ends[t]] = 0.0
    np.testing.assert_allclose(out, want, rtol=1e-6)
    pooled = RunningRewardScaler(2, gamma=gamma)(rewards, ends)  # DPPO's: one update, then all scaled alike
    assert not np.allclose(pooled[0], want[0])


class Bandit:
    """N copies of a one-step bandit (Do = Da = 1): constant observation 0, reward -(a - 0.5)^2, every step ends."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs

    def step(self, actions: np.ndarray) -> StepResult:
        r = -(np.asarray(actions)[:, 0, 0].astype(np.float64) - 0.5) ** 2
        obs, done = np.zeros((self.num_envs, 1, 1), np.float32), np.ones(self.num_envs, bool)
        return StepResult(obs, r, done, ~done, obs, [{}] * self.num_envs, [], self.num_envs)


def test_ppo_moves_the_gaussian_mean_of_a_one_step_bandit_to_its_optimum():
    agent = plain_agent(1, 1, actor_lr=3e-3, critic_lr=3e-3)
    env, g = Bandit(16), torch.Generator().manual_seed(0)
    norm, scaler = RunningObsNormalizer(1), RunningRewardScaler(16, per_step=True)
    obs = norm(np.zeros((16, 1, 1)))
    mean = lambda: float(agent.sample(np.zeros((1, 1, 1)), deterministic=True).action)  # noqa: E731
    assert abs(mean()) < 0.05  # the 0.01-gain head starts near 0, 0.5 from the optimum
    n_itr = 15
    for i in range(n_itr):
        agent.set_lr_fraction(1 - i / n_itr)
        ro = collect(agent, env, obs, 16, g, obs_norm=norm)
        values, adv, ret, _ = advantages(agent, ro, 0.99, 0.95, scaler)
        ppo_update(agent, ro, values, adv, ret, update_epochs=10, minibatch_size=64, critic_only=False, generator=g)
        obs = ro.last_obs
    # measured: 0.48-0.52 for seeds 0-3 (std 1 -> 0.39); a sign error in the advantages moves it away, no step leaves 0
    assert abs(mean() - 0.5) < 0.05, mean()
    assert float(agent.policy.std().detach().mean()) < 0.9  # exploration narrows around the optimum


# ------------------------------------------------------------------------------------------------ the registry
@dataclasses.dataclass(frozen=True)
class XConfig:
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class YConfig:
    seed: int = 0


def _module(name: str, system: System) -> types.ModuleType:
    module = types.ModuleType(name)
    module.SYSTEM = system  # type: ignore[attr-defined]
    return module


@pytest.fixture
def two_modules(monkeypatch):
    calls: list[tuple[str, object]] = []
    x = Command("", {"x": XConfig}, lambda cfg: calls.append(("run x", cfg)) or Path("x"), {"x": {"quick": {}}},
                pipelines={"px": XConfig}, evaluate=lambda run_dir, cfg, *a: {"by": "x"},
                summary_lines=lambda s: ["x line"], help="train x")
    y = Command("", {"y": YConfig}, lambda cfg: calls.append(("run y", cfg)) or Path("y"), {"y": {"paper": {}}},
                pipelines={"py": YConfig}, evaluate=lambda run_dir, cfg, *a: {"by": "y"}, help="train y")
    tool_like = Command("other", {"": YConfig}, lambda cfg: Path("o"), {}, pipelines={"po": YConfig})
    monkeypatch.setitem(sys.modules, "merge_a", _module("merge_a", System("merged", "x things", (x,))))
    monkeypatch.setitem(sys.modules, "merge_b", _module("merge_b", System("merged", "y things", (y, tool_like))))
    registry.register("merged", "merge_a", "merge_b")
    yield calls
    registry.unregister("merged")


def test_registry_merges_same_named_commands_of_two_modules_and_dispatches_each_algorithm_to_its_module(two_modules):
    system = registry.get("merged")
    assert system is not None and system.help == "x things; y things"
    assert [c.name for c in system.commands] == ["", "other"]
    merged = system.command("")
    assert merged is registry.get("merged").command("")  # one object: the CLI compares a run's command by identity
    assert dict(merged.configs) == {"x": XConfig, "y": YConfig}
    assert dict(merged.presets) == {"x": {"quick": {}}, "y": {"paper": {}}}
    assert set(merged.pipelines) == {"px", "py"} and merged.help == "train x; train y"
    assert merged.run(YConfig(seed=3)) == Path("y") and merged.run(XConfig()) == Path("x")
    assert two_modules == [("run y", YConfig(seed=3)), ("run x", XConfig())]
    assert merged.evaluate(Path("r"), XConfig(), 1)["by"] == "x" and merged.evaluate(Path("r"), YConfig())["by"] == "y"
    assert merged.summary_lines({"pipeline": "px"}) == ["x line"] and merged.summary_lines({"pipeline": "py"}) == []
    with pytest.raises(ConfigError, match="no evaluation option 'mean_path'"):
        merged.evaluate(Path("r"), XConfig(), mean_path=True)


def test_registry_refuses_to_merge_commands_that_declare_one_algorithm_twice(monkeypatch):
    a = Command("", {"x": XConfig}, lambda cfg: Path("a"), {}, pipelines={"pa": XConfig})
    b = Command("", {"x": YConfig}, lambda cfg: Path("b"), {}, pipelines={"pb": YConfig})
    monkeypatch.setitem(sys.modules, "clash_a", _module("clash_a", System("clash", "a", (a,))))
    monkeypatch.setitem(sys.modules, "clash_b", _module("clash_b", System("clash", "b", (b,))))
    registry.register("clash", "clash_a", "clash_b")
    try:
        with pytest.raises(ConfigError, match="declare the config 'x' twice"):
            registry.get("clash")
    finally:
        registry.unregister("clash")


def test_train_group_offers_the_off_policy_algorithms_and_ppo_as_one_command():
    from diffrl.pipelines import online, ppo

    command = registry.get("train").command("")
    assert set(command.configs) == {"sac", "td3", "redq", "ppo"} and command.configs["ppo"] is ppo.PPOConfig
    assert command.pipelines["train_ppo"] is ppo.PPOConfig and command.pipelines["train_sac"] is online.SACConfig
    assert set(command.presets["ppo"]) == {"quick", "paper"}
