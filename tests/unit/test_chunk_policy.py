"""Chunk policies across runs: the policy spec reads and writes the exact dict layout checkpoints have always stored
(runs written before the spec was a dataclass still load), the two loading paths, and the one sampling signature
both chunk policies share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrl.agents.dppo import DiffusionPolicy, DPPOParams, dppo_model_spec
from diffrl.agents.ppo import ChunkPPO, ChunkSample, GaussianPolicy, PPOParams
from diffrl.diffusion.spec import build_model
from diffrl.envs.wrappers import MinMaxNormalization
from diffrl.errors import CheckpointError
from diffrl.pipelines.chunk_policy import GaussianSpec, PolicySpec, PretrainedPolicy, build_agent

DO, DA, TA, TO = 3, 2, 4, 2


def old_diffusion_meta(denoiser: str = "mlp") -> dict:
    """``policy_meta`` as ``diffrl dppo pretrain`` wrote it before PolicySpec (same keys, same order)."""
    shape = DPPOParams(horizon_steps=TA, act_steps=2, cond_steps=TO, denoising_steps=5, ft_denoising_steps=1,
                       clip_x0=1.0)
    spec = dppo_model_spec(DO, DA, shape, hidden=32, blocks=1, time_dim=16, activation="relu")
    if denoiser == "unet":
        spec["denoiser"] = {"type": "unet", "dim": 8, "dim_mults": [1, 2]}
    meta = {"type": "diffusion", "obs_dim": DO, "act_dim": DA, "horizon_steps": TA, "act_steps": 2, "cond_steps": TO}
    meta.update(denoising_steps=5, model_spec=spec)
    return meta


def old_gaussian_meta() -> dict:
    meta = {"type": "gaussian", "obs_dim": DO, "act_dim": DA, "horizon_steps": TA, "act_steps": 2, "cond_steps": TO}
    meta["gaussian"] = {"hidden": [32, 32, 32], "residual": True, "activation": "mish", "std": 0.1}
    return meta


@pytest.mark.parametrize("old", [old_diffusion_meta(), old_diffusion_meta("unet"), old_gaussian_meta()],
                         ids=["diffusion-mlp", "diffusion-unet", "gaussian"])
def test_policy_spec_round_trips_the_dict_layout_of_checkpoints_written_before_it(old):
    stored = json.loads(json.dumps(old))  # as a manifest gives it back
    spec = PolicySpec.from_dict(stored)
    assert spec.policy_type == old["type"] and (spec.horizon_steps, spec.act_steps, spec.cond_steps) == (TA, 2, TO)
    assert spec.to_dict() == stored
    assert json.dumps(spec.to_dict()) == json.dumps(old)  # same keys in the same order: manifests are unchanged
    # the policy it builds takes weights saved from the model the old layout described
    torch.manual_seed(0)
    if old["type"] == "diffusion":
        saved = build_model(old["model_spec"]).state_dict()
        policy = spec.build_policy(saved)
        assert isinstance(policy, DiffusionPolicy)
        assert all(torch.equal(policy.base.state_dict()[k], v) for k, v in saved.items())
        assert all(torch.equal(policy.ft_net.state_dict()[k], saved[f"net.{k}"]) for k in policy.ft_net.state_dict())
    else:
        saved = GaussianPolicy(DO, DA, TA, TO, hidden=(32, 32, 32)).state_dict()
        policy = spec.build_policy(saved)
        assert isinstance(policy, GaussianPolicy)
        assert all(torch.equal(policy.state_dict()[k], v) for k, v in saved.items())
        torch.testing.assert_close(policy.std(), torch.full((DA,), 0.1))


def test_gaussian_spec_clamps_the_pretrained_std_into_the_finetuning_bounds():
    spec = PolicySpec("gaussian", DO, DA, TA, 2, TO, gaussian=GaussianSpec((32, 32, 32), True, "mish", 0.5))
    torch.testing.assert_close(spec.gaussian_policy(0.01, 0.2).std(), torch.full((DA,), 0.2))


@pytest.mark.parametrize("broken", [{k: v for k, v in old_gaussian_meta().items() if k != "gaussian"},
                                    {**old_diffusion_meta(), "type": "gmm"},
                                    {k: v for k, v in old_diffusion_meta().items() if k != "obs_dim"}])
def test_an_incomplete_or_unknown_policy_spec_is_a_checkpoint_error(broken):
    with pytest.raises(CheckpointError, match="policy spec"):
        PolicySpec.from_dict(broken)


def test_a_spec_with_parts_of_both_policy_types_is_refused():
    with pytest.raises(ValueError, match="gaussian policy spec"):
        PolicySpec("gaussian", DO, DA, TA, 2, TO, denoising_steps=5, gaussian=GaussianSpec((32,), False, "relu", 0.1))


def test_fresh_loading_carries_the_ema_weights_and_resume_loading_none():
    norm = MinMaxNormalization.fit(np.random.default_rng(0).normal(size=(10, DO)),
                                   np.random.default_rng(1).uniform(-1, 1, (10, DA)))
    meta = {"policy": old_diffusion_meta(), "env": {"env_id": "Toy-v0"}, "ref_scores": {"min": 0.0, "max": 1.0},
            "dataset": "d.hdf5"}
    torch.manual_seed(0)
    ema = build_model(old_diffusion_meta()["model_spec"]).state_dict()
    fresh = PretrainedPolicy.from_pretraining("pre", {"meta": meta},
                                              {"policy": {"ema": {"shadow": ema}}, "normalization": norm.state_dict()})
    resumed = PretrainedPolicy.from_finetuning("pre", {"meta": meta}, {"normalization": norm.state_dict()})
    assert fresh.weights is ema and resumed.weights is None
    assert fresh.spec == resumed.spec and fresh.ref_scores == {"min": 0.0, "max": 1.0} and fresh.dataset == "d.hdf5"
    params = DPPOParams(horizon_steps=TA, act_steps=2, cond_steps=TO, denoising_steps=5, ft_denoising_steps=2,
                        critic_hidden=(16, 16, 16))
    agent = build_agent(fresh, params, torch.device("cpu"))
    assert all(torch.equal(agent.policy.base.state_dict()[k], v) for k, v in ema.items())
    with pytest.raises(TypeError, match="DPPOParams"):
        build_agent(fresh, PPOParams(horizon_steps=TA, act_steps=2, cond_steps=TO), torch.device("cpu"))


def test_both_chunk_policies_sample_through_one_signature():
    torch.manual_seed(0)
    spec = PolicySpec.from_dict(old_diffusion_meta())
    policies = [spec.build_policy(spec.diffusion_model().state_dict()), GaussianPolicy(DO, DA, TA, TO, hidden=(16,),
                                                                                        residual=False)]
    obs = torch.randn(3, TO, DO)
    for policy in policies:
        train = policy.sample(obs, False, torch.Generator().manual_seed(0))
        evaluation = policy.sample(obs, True, torch.Generator().manual_seed(0), mean_path=True)
        assert isinstance(train, ChunkSample) and isinstance(evaluation, ChunkSample)
        assert train.action.shape == (3, TA, DA) and train.chain.shape == (3, policy.num_transitions + 1, TA, DA)
        assert evaluation.chain is None and policy.event_shape == (TA, DA)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ChunkPPO(object(), DO, PPOParams(horizon_steps=TA, act_steps=2, cond_steps=TO))  # type: ignore[arg-type]
