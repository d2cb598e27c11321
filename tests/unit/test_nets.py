"""Agent networks: batched ensemble layers, independent critics, the tanh-Gaussian actor's log-probability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from diffrl.agents.nets import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    DeterministicActor,
    EnsembleLinear,
    EnsembleQ,
    TanhGaussianActor,
)

E, B, DIN, DOUT = 3, 5, 4, 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_ensemble_linear_shared_2d_input_gives_member_wise_affine_maps():
    layer = EnsembleLinear(E, DIN, DOUT)
    x = torch.randn(B, DIN)
    y = layer(x)
    assert y.shape == (E, B, DOUT)
    for e in range(E):
        torch.testing.assert_close(y[e], x @ layer.weight[e] + layer.bias[e, 0])


def test_ensemble_linear_3d_input_gives_each_member_its_own_input():
    layer = EnsembleLinear(E, DIN, DOUT)
    x = torch.randn(E, B, DIN)
    y = layer(x)
    assert y.shape == (E, B, DOUT)
    for e in range(E):
        torch.testing.assert_close(y[e], x[e] @ layer.weight[e] + layer.bias[e, 0])


def test_ensemble_linear_init_matches_nn_linear_bound():
    layer = EnsembleLinear(E, 16, 8)
    bound = 1.0 / 16 ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 4  # not left at zero


def test_ensemble_q_output_shape_and_members_differ():
    q = EnsembleQ(3, 2, (32, 32), num_members=4)
    out = q(torch.randn(B, 3), torch.randn(B, 2))
    assert out.shape == (4, B)
    assert not torch.allclose(out[0], out[1])  # independently initialised members


def test_ensemble_q_member_gradient_touches_only_its_own_weights():
    q = EnsembleQ(3, 2, (32, 32), num_members=3)
    q(torch.randn(B, 3), torch.randn(B, 2))[0].sum().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None, name
        assert p.grad[0].abs().sum() > 0, f"{name}: member 0 got no gradient"
        assert torch.count_nonzero(p.grad[1:]) == 0, f"{name}: member 0's output leaked into other members"


def test_ensemble_q_matches_independent_per_member_mlp():
    q = EnsembleQ(3, 2, (8,), num_members=2)
    obs, act = torch.randn(B, 3), torch.randn(B, 2)
    x = torch.cat([obs, act], -1)
    for e in range(2):
        h = F.relu(x @ q.layers[0].weight[e] + q.layers[0].bias[e, 0])
        ref = (h @ q.head.weight[e] + q.head.bias[e, 0]).squeeze(-1)
        torch.testing.assert_close(q(obs, act)[e], ref)


def test_tanh_gaussian_sample_shapes_and_range():
    actor = TanhGaussianActor(3, 2, (32, 32))
    a, logp = actor.sample(torch.randn(64, 3))
    assert a.shape == (64, 2) and logp.shape == (64,)
    assert bool((a.abs() < 1).all())
    assert torch.isfinite(logp).all()


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    actor = TanhGaussianActor(3, 2, (32, 32))
    obs = torch.randn(64, 3)
    torch.manual_seed(7)
    a, logp = actor.sample(obs)
    # Recompute the same pre-tanh sample independently: same seed, same noise.
    h = F.relu(actor.trunk(obs))
    mean, log_std = actor.mean(h), actor.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
    torch.manual_seed(7)
    u = mean + log_std.exp() * torch.randn_like(mean)
    assert u.abs().max() < 4  # moderate pre-tanh values, where the reference is accurate in float32
    torch.testing.assert_close(a, torch.tanh(u))
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    ref = dist.log_prob(torch.tanh(u.double()).float()).sum(-1)
    torch.testing.assert_close(logp, ref, atol=1e-3, rtol=0)
    # exact reference through the pre-tanh value (no atanh round-off)
    ref_u = Normal(mean, log_std.exp()).log_prob(u).sum(-1) - TanhTransform().log_abs_det_jacobian(
        u, torch.tanh(u)).sum(-1)
    torch.testing.assert_close(logp, ref_u, atol=1e-4, rtol=0)


def test_tanh_gaussian_sample_is_reparameterised():
    actor = TanhGaussianActor(3, 2, (32, 32))
    a, logp = actor.sample(torch.randn(8, 3))
    (a.sum() + logp.sum()).backward()
    assert actor.mean.weight.grad is not None and actor.mean.weight.grad.abs().sum() > 0
    assert actor.log_std.weight.grad is not None and actor.log_std.weight.grad.abs().sum() > 0


def test_tanh_gaussian_deterministic_forward_is_tanh_of_mean():
    actor = TanhGaussianActor(3, 2, (32, 32))
    obs = torch.randn(8, 3)
    mean = actor.mean(F.relu(actor.trunk(obs)))
    torch.testing.assert_close(actor(obs), torch.tanh(mean))
    torch.testing.assert_close(actor(obs), actor(obs), rtol=0, atol=0)


def test_tanh_gaussian_log_std_is_clamped():
    actor = TanhGaussianActor(3, 2, (32, 32))
    with torch.no_grad():
        actor.log_std.bias.fill_(100.0)
    _, log_std = actor._dist(torch.randn(4, 3))
    assert torch.all(log_std == LOG_STD_MAX)


def test_deterministic_actor_output_in_unit_box():
    actor = DeterministicActor(3, 2, (32, 32))
    with torch.no_grad():
        actor.net[-1].bias.fill_(50.0)
    a = actor(torch.randn(8, 3))
    assert a.shape == (8, 2) and bool((a.abs() <= 1).all())
