"""DiffPPO (PPO-DAP) building blocks: the DDPM likelihood bound against closed forms on a Gaussian with its exact
denoiser, the value-guided proposals against hand computations, and LoRA adapters (function preserved, only adapters
train, checkpoint round trips, on DPPO's chunk denoiser)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffrl.agents.proposals import Proposals, beta_schedule, propose
from diffrl.diffusion.adapters import LoRALinear, add_lora, lora_parameters, lora_state_dict, merge_lora
from diffrl.diffusion.likelihood import ddpm_nll_bound
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ChunkMLPDenoiser
from diffrl.diffusion.spec import build_model

M, S = 0.3, 0.5  # the 1-D data distribution N(M, S^2)
POINTS = torch.tensor([-1.2, -0.4, 0.0, 0.3, 0.8, 1.6])  # data points, tails included


# ------------------------------------------------------------------------------------------------ likelihood
class ExactGaussianEps(nn.Module):
    """``E[eps | x_t]`` for ``x_0 ~ N(m, s^2)``: ``E[x_0 | x_t] = m + sqrt(abar) s^2 / (abar s^2 + 1 - abar)
    (x_t - sqrt(abar) m)`` and ``eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)``; ``t`` is the step index."""

    def __init__(self, alphas_cumprod: torch.Tensor, m: float, s: float) -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double())
        self.m, self.s = m, s
        self.scale = nn.Parameter(torch.ones(()))  # 1: exact; a parameter so gradients can be checked

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ab = self.abar[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
        sa, xd = ab.sqrt(), x.double()
        x0 = self.m + sa * self.s ** 2 / (ab * self.s ** 2 + 1 - ab) * (xd - sa * self.m)
        return self.scale * ((xd - sa * x0) / (1 - ab).sqrt()).float()


class ZeroNet(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x)


def gaussian_ddpm(num_steps: int, schedule: str = "cosine", m: float = M, s: float = S, **options: float) -> DDPM:
    model = DDPM(ZeroNet(), [1], num_steps=num_steps, schedule=schedule, **options)
    model.net = ExactGaussianEps(model.schedule.alphas_cumprod, m, s)
    return model


def expected_bound(model: DDPM, x0: torch.Tensor, m: float = M, s: float = S) -> torch.Tensor:
    """Closed form of E_q[bound] for 1-D ``x0`` ``(P,)`` under the exact denoiser of N(m, s^2), float64.

    With ``x_n = sqrt(abar) x0 + sqrt(1 - abar) e`` and ``x0_hat = m + g (x_n - sqrt(abar) m)``:
    ``E (x0 - x0_hat)^2 = (1 - g sqrt(abar))^2 (x0 - m)^2 + g^2 (1 - abar)``; step n >= 2 contributes
    ``coef1^2 E(..)^2 / (2 beta~)``, the decoder ``(E(..)^2 / beta_1 + log(2 pi beta_1)) / 2``, L_T its KL."""
    sch = model.schedule
    ab, c1, pv, b1 = (getattr(sch, k).double() for k in ("alphas_cumprod", "posterior_mean_coef1",
                                                        "posterior_variance", "betas"))
    x0 = x0.double()[:, None]  # (P, 1) against steps (K,)
    g = ab.sqrt() * s ** 2 / (ab * s ** 2 + 1 - ab)
    err2 = (1 - g * ab.sqrt()) ** 2 * (x0 - m) ** 2 + g ** 2 * (1 - ab)  # (P, K)
    steps = 0.5 * c1[1:] ** 2 * err2[:, 1:] / pv[1:]
    decoder = 0.5 * (err2[:, 0] / b1[0] + math.log(2 * math.pi) + b1[0].log())
    prior = 0.5 * (ab[-1] * (x0[:, 0] ** 2 - 1) - torch.log1p(-ab[-1]))
    return prior + decoder + steps.sum(1)


def replicated_bound(model: DDPM, x0: torch.Tensor, reps: int, seed: int = 0,
                     **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over ``reps`` independent estimates of the bound at each point ``x0`` ``(P,)``."""
    with torch.no_grad():
        est = ddpm_nll_bound(model, x0.repeat_interleave(reps)[:, None], None,
                             generator=torch.Generator().manual_seed(seed), **kwargs).double().view(-1, reps)
    return est.mean(1), est.std(1) / math.sqrt(reps)


def exact_nll(x0: torch.Tensor, m: float = M, s: float = S) -> torch.Tensor:
    return -torch.distributions.Normal(m, s).log_prob(x0.double())


# the last case ends at abar_K ~ 0.6, so a wrong L_T shows
@pytest.mark.parametrize("schedule, steps, options", [("cosine", 100, {}), ("linear", 100, {}), ("vp", 5, {}),
                                                      ("linear", 5, {"beta_end": 1e-3})])
def test_nll_bound_estimate_averages_to_the_closed_form_bound_of_the_exact_gaussian_denoiser(schedule, steps,
                                                                                             options) -> None:
    model = gaussian_ddpm(steps, schedule, **options)
    mean, se = replicated_bound(model, POINTS, reps=40_000 // steps)
    # a wrong step index, coefficient, decoder variance or missing term moves the mean by >> 5 SE (SE <~ 0.1)
    assert torch.all((mean - expected_bound(model, POINTS)).abs() < 5 * se + 1e-3)


def test_nll_bound_is_above_the_exact_nll_at_every_point_and_within_a_nat_of_it_at_k100_cosine() -> None:
    model = gaussian_ddpm(100, "cosine")
    mean, se = replicated_bound(model, POINTS, reps=1000)
    gap = mean - exact_nll(POINTS)
    # the model's fixed reverse variance (posterior variance, as its sampler) costs ~0.7 nat here in closed form
    # (linear K = 100: ~1.25; learned variances would close it); gap > 0 with >= 10 SE to spare
    assert torch.all(gap - 5 * se > 0.3) and float(gap.mean()) < 1.0
    closed = expected_bound(model, POINTS) - exact_nll(POINTS)
    assert torch.all(closed > 0.6) and torch.all(closed < 1.2) and float(closed.mean()) < 0.9


def test_nll_bound_of_a_zero_noise_predictor_is_larger_than_of_the_exact_denoiser() -> None:
    exact = gaussian_ddpm(20)
    zero = DDPM(ZeroNet(), [1], num_steps=20)
    good, _ = replicated_bound(exact, POINTS, reps=200)
    bad, _ = replicated_bound(zero, POINTS, reps=200)
    assert torch.all(bad > good + 1.0)


def test_nll_bound_monte_carlo_over_steps_is_unbiased_for_the_exact_sum() -> None:
    model = gaussian_ddpm(10, "linear", m=0.0, s=0.4)
    model.net.m = 0.2  # a denoiser for another Gaussian, so the step terms differ from each other
    points = POINTS[1:5]
    reference = expected_bound(model, points, m=0.2, s=0.4)  # closed form of the exact sum (the net's Gaussian)
    exact_sum, se_sum = replicated_bound(model, points, reps=2000)
    mc, se_mc = replicated_bound(model, points, reps=8000, seed=1, num_t=2)
    assert torch.all((exact_sum - reference).abs() < 5 * se_sum + 1e-3)
    assert torch.all((mc - reference).abs() < 5 * se_mc + 1e-3)
    # without the K / num_t factor the mean would be ~num_t / K of it (L_T ~ 2e-5 here): far outside
    assert torch.all((mc - 0.2 * reference).abs() > 8 * se_mc)


def test_nll_bound_adds_the_log_scale_of_the_normaliser_per_dim() -> None:
    torch.manual_seed(0)
    spec = {"type": "ddpm", "event_shape": [2, 3], "cond_dim": 4,
            "denoiser": {"type": "chunk_mlp", "hidden": 32, "blocks": 1, "time_dim": 16},
            "normalizer": {"kind": "zscore"}, "diffusion": {"num_steps": 8, "clip_x0": 1.0}}
    plain = build_model({**spec, "normalizer": {"kind": "none"}})
    scaled = build_model(spec)
    scaled.load_state_dict(plain.state_dict(), strict=False)  # same network; zscore statistics set below
    scale, shift = torch.tensor([10.0, 1.0, 0.5]), torch.tensor([2.0, -1.0, 0.0])
    scaled.normalizer.scale.copy_(scale)
    scaled.normalizer.shift.copy_(shift)
    z, cond = 0.5 * torch.randn(16, 2, 3), torch.randn(16, 4)
    with torch.no_grad():
        b_z = ddpm_nll_bound(plain, z, cond, generator=torch.Generator().manual_seed(3))
        b_x = ddpm_nll_bound(scaled, z * scale + shift, cond, generator=torch.Generator().manual_seed(3))
    # two rows of the chunk, each + log 10 + log 1 + log 0.5
    torch.testing.assert_close(b_x - b_z, torch.full((16,), 2 * math.log(5.0)), rtol=0, atol=1e-4)


class ConstantX0(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full_like(x, self.value)


def test_nll_bound_uses_the_clamped_x0_prediction_of_the_model_transitions() -> None:
    x0 = torch.rand(32, 1, 2) * 2 - 1
    clipped = DDPM(ConstantX0(5.0), [1, 2], num_steps=6, prediction="x0", clip_x0=1.0)
    at_one = DDPM(ConstantX0(1.0), [1, 2], num_steps=6, prediction="x0")
    unclipped = DDPM(ConstantX0(5.0), [1, 2], num_steps=6, prediction="x0")
    bounds = [ddpm_nll_bound(mdl, x0, generator=torch.Generator().manual_seed(0)) for mdl in (clipped, at_one,
                                                                                              unclipped)]
    torch.testing.assert_close(bounds[0], bounds[1])
    assert torch.all(bounds[2] > bounds[0] + 10)


def test_nll_bound_is_differentiable_in_the_network_and_graph_free_under_no_grad() -> None:
    torch.manual_seed(0)
    model = build_model({"type": "ddpm", "event_shape": [1, 3], "cond_dim": 5,
                         "denoiser": {"type": "chunk_mlp", "hidden": 32, "blocks": 1, "time_dim": 16},
                         "diffusion": {"num_steps": 5, "clip_x0": 1.0}})
    x0, cond = torch.rand(8, 1, 3) * 2 - 1, torch.randn(8, 5)
    bound = ddpm_nll_bound(model, x0, cond, num_t=3)
    assert bound.shape == (8,) and torch.isfinite(bound).all()
    bound.mean().backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert ddpm_nll_bound(model, x0, cond).grad_fn is None


def test_nll_bound_gradient_points_to_the_exact_denoiser() -> None:
    model = gaussian_ddpm(20)
    model.net.scale.data.fill_(1.3)  # an over-confident noise prediction
    x0 = S * torch.randn(512, 1, generator=torch.Generator().manual_seed(0)) + M
    ddpm_nll_bound(model, x0, generator=torch.Generator().manual_seed(1)).mean().backward()
    assert float(model.net.scale.grad) > 0  # descent shrinks the scale back towards 1


def test_nll_bound_rejects_a_wrong_shape_a_missing_condition_and_num_t_zero() -> None:
    model = gaussian_ddpm(5)
    with pytest.raises(ValueError, match="shape"):
        ddpm_nll_bound(model, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="num_t"):
        ddpm_nll_bound(model, torch.zeros(4, 1), num_t=0)
    cond_model = build_model({"type": "ddpm", "event_shape": [1, 3], "cond_dim": 5,
                              "denoiser": {"type": "chunk_mlp", "hidden": 8, "time_dim": 16},
                              "diffusion": {"num_steps": 5}})
    with pytest.raises(ValueError, match="condition"):
        ddpm_nll_bound(cond_model, torch.zeros(4, 1, 3))


# ------------------------------------------------------------------------------------------------- proposals
DO, DA = 3, 2
CENTRE = torch.tensor([[0.5, -0.2, 0.0], [0.0, 0.0, 0.0]])  # c(s) = s @ CENTRE: (Do,) -> (Da,)


def quadratic_q(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``q(s, a) = -||a - c(s)||^2`` with ``c(s) = CENTRE s``; ``grad_a q = 2 (c - a)``."""
    return -((act - obs @ CENTRE.T) ** 2).sum(-1)


def fixed_prior(actions: torch.Tensor):
    calls = []

    def sample(obs: torch.Tensor, num: int) -> torch.Tensor:
        calls.append((obs.shape, num))
        return actions.clone()
    return sample, calls


def test_proposal_move_is_one_raw_gradient_step_clipped_to_the_bounds() -> None:
    obs = torch.tensor([[1.0, 0.5, 2.0], [-1.0, 1.0, 0.0]])  # c = (0.4, 0) and (-0.7, 0)
    a = torch.tensor([[[0.0, 0.0], [0.9, -0.9]], [[-0.95, 0.5], [0.2, 0.1]]])  # (B=2, N=2, Da)
    sample, calls = fixed_prior(a)
    out = propose(sample, quadratic_q, obs, num=2, step=0.3, beta=0.0, keep=1.0, action_low=-0.8, action_high=0.8)
    c = (obs @ CENTRE.T)[:, None]
    expected = (a + 0.3 * 2 * (c - a)).clamp(-0.8, 0.8)
    assert calls == [(torch.Size([2, 3]), 2)]
    # beta = 0 keeps all in draw order (keep = 1)
    torch.testing.assert_close(out.actions, expected)
    torch.testing.assert_close(out.q, quadratic_q(obs.repeat_interleave(2, 0), expected.view(4, 2)).view(2, 2))


def test_proposal_per_dimension_bounds_and_max_move_cap() -> None:
    obs = torch.tensor([[4.0, 0.0, 0.0]])  # c = (2, 0): a large step
    a = torch.zeros(1, 1, 2)
    sample, _ = fixed_prior(a)
    out = propose(sample, quadratic_q, obs, num=1, beta=1.0, keep=1.0, action_low=torch.tensor([-1.0, -1.0]),
                  action_high=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(out.actions, torch.tensor([[[0.5, 0.0]]]))  # 0 + 0.3 * 4 = 1.2, clipped to 0.5
    capped = propose(sample, quadratic_q, obs, num=1, beta=1.0, keep=1.0, max_move=0.1)
    torch.testing.assert_close(capped.actions, torch.tensor([[[0.1, 0.0]]]))  # ||0.3 grad|| = 1.2 capped to 0.1


def test_proposal_weights_are_the_softmax_of_beta_q_renormalised_over_the_kept_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(4, DO, generator=gen)
    a = (torch.rand(4, 10, DA, generator=gen) * 2 - 1) * 0.9
    sample, _ = fixed_prior(a)
    out = propose(sample, quadratic_q, obs, num=10, step=0.1, beta=2.5, keep=0.3)
    moved = (a + 0.1 * 2 * ((obs @ CENTRE.T)[:, None] - a)).clamp(-1, 1)
    q_all = quadratic_q(obs.repeat_interleave(10, 0), moved.view(40, DA)).view(4, 10)
    assert isinstance(out, Proposals) and out.actions.shape == (4, 3, DA) and out.weights.shape == (4, 3)
    top = q_all.topk(3, dim=1)  # the 3 highest-q proposals, best first
    torch.testing.assert_close(out.q, top.values)
    torch.testing.assert_close(out.actions, moved.gather(1, top.indices[..., None].expand(4, 3, DA)))
    w = torch.exp(2.5 * top.values)  # softmax over all 10, renormalised over the kept 3: exp(beta q) / sum kept
    torch.testing.assert_close(out.weights, w / w.sum(1, keepdim=True))
    assert not torch.allclose(out.weights, torch.full_like(out.weights, 1 / 3))


def test_proposals_at_beta_zero_have_uniform_weights_and_keep_the_first_draws() -> None:
    gen = torch.Generator().manual_seed(1)
    obs, a = torch.randn(3, DO, generator=gen), torch.rand(3, 10, DA, generator=gen) - 0.5
    sample, _ = fixed_prior(a)
    out = propose(sample, quadratic_q, obs, num=10, step=0.0, beta=0.0, keep=0.2)
    torch.testing.assert_close(out.weights, torch.full((3, 2), 0.5))
    torch.testing.assert_close(out.actions, a[:, :2])  # no critic preference yet: the first i.i.d. draws


def test_proposals_are_detached_and_leave_no_gradient_on_the_prior_or_the_critic() -> None:
    prior_net, critic = nn.Linear(DO, 5 * DA), nn.Linear(DO + DA, 1)

    def sample(obs: torch.Tensor, num: int) -> torch.Tensor:
        return torch.tanh(prior_net(obs)).view(-1, num, DA)  # would carry a graph if not run without grad

    def q(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return critic(torch.cat([obs, act], -1))

    obs = torch.randn(6, DO, requires_grad=True)
    out = propose(sample, q, obs, num=5, beta=1.0)
    assert out.actions.shape == (6, 1, DA)
    for t in (out.actions, out.weights, out.q):
        assert not t.requires_grad and t.grad_fn is None
    assert all(p.grad is None for p in [*prior_net.parameters(), *critic.parameters()]) and obs.grad is None
    with torch.no_grad():  # the gradient step still works when called without grad
        again = propose(sample, q, obs, num=5, beta=1.0)
    torch.testing.assert_close(again.actions, out.actions)
    moved = propose(sample, q, obs, num=5, beta=1.0, step=0.0).actions
    assert not torch.allclose(moved, out.actions)  # ... and it did move the actions


def test_proposal_argument_errors_name_the_value() -> None:
    sample, _ = fixed_prior(torch.zeros(1, 3, DA))
    obs = torch.zeros(1, DO)
    with pytest.raises(ValueError, match="beta"):
        propose(sample, quadratic_q, obs, num=3, beta=-1.0)
    with pytest.raises(ValueError, match="keep"):
        propose(sample, quadratic_q, obs, num=3, beta=1.0, keep=0.0)
    with pytest.raises(ValueError, match=r"\(B=1, 4, Da\)"):
        propose(sample, quadratic_q, obs, num=4, beta=1.0)
    with pytest.raises(ValueError, match="q\\(obs, actions\\)"):
        propose(sample, lambda s, a: a, obs, num=3, beta=1.0)


def test_beta_schedule_is_linear_and_clipped() -> None:
    assert [beta_schedule(p) for p in (-0.5, 0.0, 0.25, 1.0, 3.0)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert beta_schedule(0.5, start=0.2, end=0.6) == pytest.approx(0.4)


# -------------------------------------------------------------------------------------------------- adapters
def chunk_net() -> ChunkMLPDenoiser:
    torch.manual_seed(0)
    return ChunkMLPDenoiser([1, 3], 11, hidden=32, blocks=1, time_dim=16)


def denoiser_inputs(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 3, generator=gen), torch.randint(0, 5, (n,), generator=gen).float(), \
        torch.randn(n, 11, generator=gen)


def test_add_lora_keeps_the_function_and_freezes_every_original_parameter() -> None:
    net = chunk_net()
    x, t, cond = denoiser_inputs()
    before = net(x, t, cond)
    originals = dict(net.named_parameters())
    params = add_lora(net, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(net(x, t, cond), before)  # B = 0: bit-identical
    n_linear = sum(isinstance(m, LoRALinear) for m in net.modules())
    assert n_linear == 6 and len(params) == 2 * n_linear  # time MLP (2), input, block (2), output layers
    assert all(not p.requires_grad for p in originals.values())
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in params}
    assert {id(p) for p in lora_parameters(net)} == {id(p) for p in params}
    assert all(p.shape in ((4, p.shape[1]), (p.shape[0], 4)) for p in params)
    # the original tensors are still the module's, under their original names
    assert all(dict(net.named_parameters())[k] is p for k, p in originals.items())


def test_only_adapters_change_under_an_optimiser_step() -> None:
    net = chunk_net()
    x, t, cond = denoiser_inputs()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    params = add_lora(net, rank=2)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (net(x, t, cond) ** 2).mean().backward()
        opt.step()
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)
    assert any(m.lora_B.abs().sum() > 0 for m in net.modules() if isinstance(m, LoRALinear))


def test_targets_choose_the_adapted_layers() -> None:
    net = chunk_net()
    params = add_lora(net, rank=2, targets=lambda name, layer: name.startswith("net."))
    wrapped = [n for n, m in net.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["net.0", "net.1.net.2", "net.1.net.5", "net.2"] and len(params) == 8
    assert not any(p.requires_grad for p in net.time.parameters())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(net, rank=2)
    with pytest.raises(ValueError, match="nothing to adapt"):
        add_lora(chunk_net(), rank=2, targets=lambda name, layer: False)


def test_lora_state_dict_round_trips_into_a_module_prepared_the_same_way() -> None:
    net = chunk_net()
    params = add_lora(net, rank=3)
    with torch.no_grad():
        for p in params:
            p.normal_()
    other = chunk_net()
    add_lora(other, rank=3, generator=torch.Generator().manual_seed(9))
    x, t, cond = denoiser_inputs()
    assert not torch.allclose(other(x, t, cond), net(x, t, cond))
    other.load_state_dict(net.state_dict())  # strict: the full state dict of an adapted module
    torch.testing.assert_close(other(x, t, cond), net(x, t, cond), rtol=0, atol=0)
    adapters = lora_state_dict(net)
    assert sorted(adapters) == sorted(f"{n}.{p}" for n, m in net.named_modules() if isinstance(m, LoRALinear)
                                      for p in ("lora_A", "lora_B"))
    third = chunk_net()
    add_lora(third, rank=3)
    missing, unexpected = third.load_state_dict(adapters, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    torch.testing.assert_close(third(x, t, cond), net(x, t, cond), rtol=0, atol=0)
    # a pre-trained (un-adapted) checkpoint loads into an adapted module under its own keys
    fresh = chunk_net()
    add_lora(fresh, rank=3)
    missing, unexpected = fresh.load_state_dict(chunk_net().state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)


def test_merge_lora_folds_the_adapters_into_plain_linear_layers() -> None:
    net = chunk_net()
    for p in add_lora(net, rank=2):
        nn.init.normal_(p)
    x, t, cond = denoiser_inputs()
    adapted = net(x, t, cond)
    merge_lora(net)
    assert not any(isinstance(m, LoRALinear) for m in net.modules())
    assert sorted(net.state_dict()) == sorted(chunk_net().state_dict())
    torch.testing.assert_close(net(x, t, cond), adapted, rtol=1e-5, atol=1e-5)


def test_add_lora_on_the_denoiser_of_a_ddpm_from_a_spec_trains_only_the_adapters() -> None:
    torch.manual_seed(0)
    spec = {"type": "ddpm", "event_shape": [1, 3], "cond_dim": 11,
            "denoiser": {"type": "chunk_mlp", "hidden": 64, "blocks": 1, "time_dim": 16, "activation": "mish"},
            "normalizer": {"kind": "none"}, "diffusion": {"num_steps": 5}}
    model = build_model(spec)
    x, _, cond = denoiser_inputs(16)
    gen = torch.Generator().manual_seed(0)
    loss_before = model.loss(x, cond, generator=gen)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model.net, rank=8)
    assert torch.equal(model.loss(x, cond, generator=torch.Generator().manual_seed(0)), loss_before)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    ddpm_nll_bound(model, x, cond, generator=gen).mean().backward()  # PET: the likelihood of on-policy actions
    opt.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    # the model's checkpoint now carries the adapters; a model rebuilt and adapted the same way takes it
    rebuilt = build_model(spec)
    add_lora(rebuilt.net, rank=8)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt.loss(x, cond, generator=torch.Generator().manual_seed(2)),
                               model.loss(x, cond, generator=torch.Generator().manual_seed(2)))
