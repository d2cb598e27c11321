"""Diffusion-core hooks for DPPO's fine-tuning baselines: the per-sample weighted denoising loss (DRWR, DAWR),
DDPM's forward noising ``q_sample`` (QSM) and the denoising chain with gradients (Diffusion-QL)."""

from __future__ import annotations

import pytest
import torch

from diffrl.diffusion import samplers
from diffrl.diffusion.models import DDPM, EDM, DiffusionModel
from diffrl.diffusion.nets import ChunkMLPDenoiser

B, H, D, C = 6, 4, 3, 5  # batch, chunk horizon, action dim, condition dim


def tiny_edm() -> EDM:
    torch.manual_seed(0)
    return EDM(ChunkMLPDenoiser([H, D], hidden=16), [H, D], sigma_data=0.5, p_mean=-0.8, p_std=1.5)


def tiny_ddpm(prediction: str = "epsilon", cond_drop_prob: float = 0.0) -> DDPM:
    torch.manual_seed(0)
    cond_dim = C if cond_drop_prob > 0 else 0
    return DDPM(ChunkMLPDenoiser([H, D], cond_dim=cond_dim, hidden=16), [H, D], cond_dim=cond_dim, num_steps=10,
                prediction=prediction, cond_drop_prob=cond_drop_prob)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, H, D, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- old loss formulas, copied verbatim
def old_edm_loss(model: EDM, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    sigma = (model.p_mean + model.p_std * torch.randn(n, device=x.device, generator=generator)).exp()
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    weight = (s ** 2 + model.sigma_data ** 2) / (s * model.sigma_data) ** 2
    return (weight * (model.denoise(x + s * noise, sigma, None) - x) ** 2).mean()


def old_ddpm_loss(model: DDPM, x: torch.Tensor, cond: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor:
    cond = model._drop_cond(cond, generator)
    t = torch.randint(0, model.num_steps, (x.shape[0],), device=x.device, generator=generator)
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    sched = model.schedule
    x_t = (sched.at("sqrt_alphas_cumprod", t, x.ndim) * x
           + sched.at("sqrt_one_minus_alphas_cumprod", t, x.ndim) * noise)
    out = model.network(x_t, t.float(), cond)
    return ((out - (noise if model.prediction == "epsilon" else x)) ** 2).mean()


# ------------------------------------------------------------------------------------------ weighted loss
def test_default_edm_loss_is_bit_identical_to_the_old_formula_with_the_same_generator() -> None:
    model, x = tiny_edm(), batch()
    assert torch.equal(model.loss(x, generator=gen()), old_edm_loss(model, x, gen()))


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
def test_default_ddpm_loss_is_bit_identical_to_the_old_formula_with_the_same_generator(prediction: str) -> None:
    model, x = tiny_ddpm(prediction), batch()
    assert torch.equal(model.loss(x, generator=gen()), old_ddpm_loss(model, x, None, gen()))
    # with classifier-free dropout the condition draw still comes first
    model = tiny_ddpm(prediction, cond_drop_prob=0.5).train()
    cond = torch.randn(B, C, generator=gen(2))
    assert torch.equal(model.loss(x, cond, generator=gen()), old_ddpm_loss(model, x, cond, gen()))


def test_edm_per_sample_losses_equal_a_recomputation_from_the_same_draws() -> None:
    model, x = tiny_edm(), batch()
    got = model.loss(x, generator=gen(), reduction="none")
    g = gen()
    sigma = (model.p_mean + model.p_std * torch.randn(B, generator=g)).exp()  # ln sigma ~ N(P_mean, P_std^2)
    noise = torch.randn(B, H, D, generator=g)
    s = sigma[:, None, None]
    lam = (s ** 2 + model.sigma_data ** 2) / (s * model.sigma_data) ** 2  # Karras et al. Table 1
    want = (lam * (model.denoise(x + s * noise, sigma) - x) ** 2).mean(dim=(1, 2))
    assert got.shape == (B,)
    torch.testing.assert_close(got, want)
    assert got.std() > 0.1 * got.mean()  # the samples' losses differ, so a mixed-up order would show


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
def test_ddpm_per_sample_losses_equal_a_recomputation_from_the_same_draws(prediction: str) -> None:
    model, x = tiny_ddpm(prediction), batch()
    got = model.loss(x, generator=gen(), reduction="none")
    g = gen()
    t = torch.randint(0, model.num_steps, (B,), generator=g)
    noise = torch.randn(B, H, D, generator=g)
    abar = torch.cumprod(1 - model.schedule.betas, 0)[t][:, None, None]
    out = model.net(abar.sqrt() * x + (1 - abar).sqrt() * noise, t.float(), None)
    want = ((out - (noise if prediction == "epsilon" else x)) ** 2).mean(dim=(1, 2))
    assert got.shape == (B,)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make", [tiny_edm, tiny_ddpm])
def test_weighted_loss_is_the_mean_of_weights_times_per_sample_losses(make) -> None:
    model, x = make(), batch()
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 0.25])
    per_sample = model.loss(x, generator=gen(), reduction="none")
    weighted = model.loss(x, generator=gen(), weights=w)
    torch.testing.assert_close(weighted, (w * per_sample).sum() / B)
    torch.testing.assert_close(model.loss(x, generator=gen(), weights=w, reduction="none"), w * per_sample)
    assert abs(weighted.item() - per_sample.mean().item()) > 1e-3 * per_sample.mean().item()  # weights matter here
    # gradients carry the weights: a zero weight on every sample gives zero gradients
    model.zero_grad()
    model.loss(x, generator=gen(), weights=torch.zeros(B)).backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.net.parameters())


@pytest.mark.parametrize("make", [tiny_edm, tiny_ddpm])
def test_weights_of_ones_and_the_per_sample_mean_equal_the_default_loss(make) -> None:
    model, x = make(), batch()
    default = model.loss(x, generator=gen())
    torch.testing.assert_close(model.loss(x, generator=gen(), weights=torch.ones(B)), default)
    torch.testing.assert_close(model.loss(x, generator=gen(), reduction="none").mean(), default)


@pytest.mark.parametrize(("weights", "match"), [
    (torch.ones(B, 1), r"shape \(6,\)"),
    (torch.ones(B + 1), r"shape \(6,\)"),
    (torch.ones(()), r"shape \(6,\)"),
    ([1.0] * B, r"shape \(6,\).*got list"),
    (torch.tensor([1.0, -0.5, 1.0, 1.0, 1.0, 1.0]), "non-negative.*-0.5"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), "finite"),
])
def test_bad_weights_are_rejected_with_what_was_wrong(weights, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_ddpm().loss(batch(), weights=weights)


def test_unknown_reduction_is_rejected() -> None:
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        tiny_edm().loss(batch(), reduction="sum")


def test_diffusion_models_share_the_weighted_loss() -> None:
    assert EDM.loss is DiffusionModel.loss and DDPM.loss is DiffusionModel.loss


# ------------------------------------------------------------------------------------------------ q_sample
def test_q_sample_equals_the_closed_form_at_hand_picked_steps() -> None:
    model = DDPM(ChunkMLPDenoiser([H, D], hidden=8), [H, D], num_steps=10, schedule="linear")
    x0, noise = batch(0), batch(1)
    t = torch.tensor([0, 0, 3, 5, 9, 9])
    abar = torch.cumprod(1 - model.schedule.betas.double(), 0)  # alpha_bar_t = prod_{s <= t} (1 - beta_s)
    a = abar[t][:, None, None]
    want = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()  # Ho et al. 2020, eq. 4
    got = model.q_sample(x0, t, noise)
    assert got.shape == x0.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # t = 0 is barely noised, the last step is almost pure noise
    assert float((got[0] - x0[0]).abs().max()) < 0.2 and float((got[5] - noise[5]).abs().max()) < 0.2


# -------------------------------------------------------------------------------------- chain with gradients
CHAINS = [
    dict(min_std=0.1, noise_clip=3.0),  # DPPO's training chain: DDPM, std floor, noise clamp
    dict(ddim=True, steps=5, eta=1.0, min_std=0.1, noise_clip=3.0),
    dict(ddim=True, steps=5, eta=0.0, min_std=0.5, noise_clip=0.2),  # floor and clamp both bind
]


@pytest.mark.parametrize("options", CHAINS)
def test_grad_chain_equals_the_no_grad_chain_bit_for_bit(options: dict) -> None:
    model = tiny_ddpm()
    with torch.no_grad():
        plain = samplers.sample_chain(model, (B, H, D), record=False, generator=gen(3), **options)
        recorded = samplers.sample_chain(model, (B, H, D), generator=gen(3), **options)
    grad = samplers.sample_chain_grad(model, (B, H, D), generator=gen(3), **options)
    assert grad.requires_grad and not plain.requires_grad
    assert torch.equal(grad, plain) and torch.equal(grad, recorded.xs[-1])


def test_grad_chain_applies_the_std_floor_and_the_noise_clip_like_dppo() -> None:
    """One DDIM transition with eta 0 (std 0): the sample is ``mean + min_std * clamp(z, -clip, clip)``."""
    model, min_std, clip = tiny_ddpm(), 0.3, 0.5
    got = samplers.sample_chain_grad(model, (B, H, D), ddim=True, steps=1, eta=0.0, min_std=min_std,
                                     noise_clip=clip, generator=gen(4))
    g = gen(4)
    x_start, z = torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)
    mean, std = model.ddim_step(x_start, torch.zeros(B, dtype=torch.long), torch.full((B,), -1), 0.0)
    assert float(std.max()) == 0.0 and float(z.abs().max()) > clip  # without floor and clamp it would differ
    torch.testing.assert_close(got, mean + min_std * z.clamp(-clip, clip))
    # the options reach the chain: another floor or clamp gives another sample
    other = samplers.sample_chain_grad(model, (B, H, D), ddim=True, steps=1, eta=0.0, min_std=min_std,
                                       noise_clip=None, generator=gen(4))
    assert not torch.equal(got, other)


def test_grad_chain_backpropagates_through_every_step_to_the_network_parameters() -> None:
    model = tiny_ddpm()
    first = ChunkMLPDenoiser([H, D], hidden=16)  # the first of the K transitions runs on its own copy
    with torch.no_grad():  # grad mode is switched on inside the chain even here
        x = samplers.sample_chain_grad(model, (B, H, D), min_std=0.1, noise_clip=3.0, generator=gen(5),
                                       net_for_step=lambda i: first if i == 0 else None)
    x.square().mean().backward()
    for net in (model.net, first):  # the last K - 1 steps and the first one
        for name, p in net.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
