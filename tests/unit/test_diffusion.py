"""Diffusion core: schedules against diffusers, samplers on an analytic 2-D mixture, inpainting, EMA,
normaliser, denoisers, trainer, checkpoint round trip and per-step chain log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.diffusion import samplers
from diffrl.diffusion.ema import EMA
from diffrl.diffusion.gaussian import gaussian_log_prob
from diffrl.diffusion.inpaint import Inpaint
from diffrl.diffusion.models import DDPM, EDM
from diffrl.diffusion.nets import ChunkMLPDenoiser, ResidualMLPDenoiser, TemporalUNet
from diffrl.diffusion.normalize import DataNormalizer
from diffrl.diffusion.schedules import VPSchedule, cosine_betas, ddim_timesteps, karras_sigmas, linear_betas
from diffrl.diffusion.spec import build_model, load_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings, lr_factor
from diffrl.runs.checkpoint import save_checkpoint

CENTRES = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
MODE_STD = 0.3


def mixture_samples(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return CENTRES[k] + MODE_STD * torch.randn(n, 2, generator=g)


def posterior_mean(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for the mixture (exact)."""
    s2 = (sigma ** 2).reshape(-1, 1)
    var = MODE_STD ** 2 + s2
    logits = WEIGHTS.log()[None] - ((x[:, None, :] - CENTRES[None]) ** 2).sum(-1) / (2 * var)
    resp = logits.softmax(-1)
    means = CENTRES[None] + (MODE_STD ** 2 / var)[:, None] * (x[:, None, :] - CENTRES[None])
    return (resp[..., None] * means).sum(1)


class AnalyticEDMNet(nn.Module):
    """A 'network' whose preconditioned output is the exact denoiser of the mixture (sigma_data = 1)."""

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = (4 * c_noise).exp().reshape(-1, 1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        x = x_in / c_in
        c_skip, c_out = 1 / (sigma ** 2 + 1), sigma / (sigma ** 2 + 1).sqrt()
        return (posterior_mean(x, sigma.flatten()) - c_skip * x) / c_out


class AnalyticEpsNet(nn.Module):
    """The exact epsilon-prediction of the mixture for a VP schedule."""

    def __init__(self, schedule: VPSchedule) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        abar = self.schedule.alphas_cumprod[t.long()].reshape(-1, 1)
        x = x_t / abar.sqrt()
        sigma = ((1 - abar) / abar).sqrt()
        x0 = posterior_mean(x, sigma.flatten())
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def analytic_edm() -> EDM:
    return EDM(AnalyticEDMNet(), [2])


def analytic_ddpm(steps: int = 100) -> DDPM:
    model = DDPM(nn.Identity(), [2], num_steps=steps, schedule="cosine")
    model.net = AnalyticEpsNet(model.schedule)
    return model


def sliced_w1(a: torch.Tensor, b: torch.Tensor, projections: int = 64) -> float:
    """Sliced 1-Wasserstein distance between two equal-size 2-D samples."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(projections, 2, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return float((pa - pb).abs().mean())


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("K", [20, 50, 100, 1000])
def test_linear_schedule_reaches_noise_for_any_number_of_steps(K: int) -> None:
    # Ho et al.'s 1e-4..2e-2 is for K = 1000; scaled by 1000 / K (improved-diffusion), alpha_bar_K stays ~4e-5
    abar = torch.cumprod(1 - linear_betas(K), 0)[-1].item()
    assert abar < 1e-3 and linear_betas(1000)[0].item() == pytest.approx(1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_step_matches_diffusers(kind: str) -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    K = 50
    betas = linear_betas(K) if kind == "linear" else cosine_betas(K)
    ref = diffusers.DDPMScheduler(num_train_timesteps=K, beta_schedule="linear" if kind == "linear" else
                                  "squaredcos_cap_v2", beta_start=1e-4 * 1000 / K, beta_end=2e-2 * 1000 / K,
                                  clip_sample=False,
                                  prediction_type="epsilon", variance_type="fixed_small")
    torch.testing.assert_close(betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    model = DDPM(nn.Identity(), [3], num_steps=K, schedule=kind)
    x_t, eps = torch.randn(4, 3), torch.randn(4, 3)
    model.network = lambda x, t, cond, guidance=1.0, net=None: eps  # type: ignore[method-assign]
    for t in (K - 1, K // 2, 1, 0):
        mean, std = model.ddpm_step(x_t, torch.full((4,), t))
        out = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
        expected = out.prev_sample
        got = mean + (std * noise if t > 0 else 0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta: float) -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    K, S = 100, 10
    ref = diffusers.DDIMScheduler(num_train_timesteps=K, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                  set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    ref.set_timesteps(S)
    assert ref.timesteps.tolist() == ddim_timesteps(K, S).tolist()
    model = DDPM(nn.Identity(), [3], num_steps=K, schedule="cosine")
    x_t, eps = torch.randn(4, 3), torch.randn(4, 3)
    model.network = lambda x, t, cond, guidance=1.0, net=None: eps  # type: ignore[method-assign]
    ts = ddim_timesteps(K, S).tolist()
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        mean, std = model.ddim_step(x_t, torch.full((4,), t), torch.full((4,), t_prev), eta)
        out = ref.step(eps, t, x_t, eta=eta, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(mean + std * noise if eta > 0 else mean, out.prev_sample, rtol=1e-4, atol=1e-5)


def test_x0_clamping_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    K = 20
    ref = diffusers.DDPMScheduler(num_train_timesteps=K, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                  clip_sample_range=1.0, variance_type="fixed_small")
    model = DDPM(nn.Identity(), [3], num_steps=K, clip_x0=1.0)
    x_t, eps = 3 * torch.randn(8, 3), torch.randn(8, 3)
    model.network = lambda x, t, cond, guidance=1.0, net=None: eps  # type: ignore[method-assign]
    mean, _ = model.ddpm_step(x_t, torch.full((8,), 0))
    torch.testing.assert_close(mean, ref.step(eps, 0, x_t).prev_sample, rtol=1e-4, atol=1e-5)
    x0, _ = model.predict(x_t, torch.full((8,), 5))
    assert x0.abs().max() <= 1.0


def test_edm_preconditioning_and_karras_sigmas_match_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")  # test-only reference (dev extra)
    ref = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0, sigma_schedule="karras",
                                      rho=7.0)
    ref.set_timesteps(18)
    torch.testing.assert_close(karras_sigmas(18).float(), ref.sigmas.float(), rtol=1e-5, atol=1e-6)
    out = torch.randn(5, 3)
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, c_noise, cond=None):
            seen["x"], seen["c_noise"] = x, c_noise
            return out

    model = EDM(Probe(), [3], sigma_data=1.0)
    x, sigma = torch.randn(5, 3), torch.tensor(2.5)
    d = model.denoise(x, sigma)
    torch.testing.assert_close(seen["x"], ref.precondition_inputs(x, sigma))
    torch.testing.assert_close(seen["c_noise"], ref.precondition_noise(sigma).expand(5).float())
    torch.testing.assert_close(d, ref.precondition_outputs(x, out, sigma))


def test_vp_schedule_identities() -> None:
    s = VPSchedule(cosine_betas(30))
    abar = s.alphas_cumprod.double()
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1] < 1e-3  # reaches noise
    # posterior mean coefficients reproduce x_{t-1} exactly when x_t is built from x_0 with zero noise
    torch.testing.assert_close(s.posterior_mean_coef1 * 1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod,
                               s.alphas_cumprod_prev.sqrt(), rtol=1e-5, atol=1e-6)
    assert s.posterior_variance[0] == 0


# ------------------------------------------------------------------------------------------------- samplers
SAMPLER_CASES = [("heun", 128), ("heun", 32), ("euler", 128), ("dpmpp_2m", 16), ("dpmpp_2m_sde", 24), ("ddpm", None),
                 ("ddim", 20)]


@pytest.mark.parametrize(("sampler", "steps"), SAMPLER_CASES)
def test_every_sampler_recovers_the_mixture(sampler: str, steps: int | None) -> None:
    model = analytic_ddpm() if sampler in ("ddpm", "ddim") else analytic_edm()
    n = 4000
    x = model.sample(n, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1),
                     **({"S_churn": 0.0} if sampler == "heun" and steps == 32 else {}))
    truth = mixture_samples(n, seed=2)
    dist = sliced_w1(x, truth)
    # two samples of the true law differ by ~0.02-0.07 here (mostly mode-weight noise), a Gaussian with the same
    # moments by ~0.6
    assert dist < 0.12, dist
    mode = torch.cdist(x, CENTRES).argmin(1)
    frac = torch.bincount(mode, minlength=4).float() / n
    torch.testing.assert_close(frac, WEIGHTS, atol=0.03, rtol=0)
    spread = (x - CENTRES[mode]).std(0)
    assert torch.all((spread > 0.9 * MODE_STD) & (spread < 1.1 * MODE_STD)), spread


def test_ode_solvers_converge_on_a_gaussian() -> None:
    """For N(0, s^2) data the probability-flow ODE maps x_T to x_T * s / sqrt(s^2 + sigma_max^2)."""
    s = 0.5

    class GaussNet(nn.Module):
        def forward(self, x_in, c_noise, cond=None):
            sigma = (4 * c_noise).exp().reshape(-1, 1)
            x = x_in * (sigma ** 2 + 1).sqrt()
            d = x * s ** 2 / (s ** 2 + sigma ** 2)
            return (d - x / (sigma ** 2 + 1)) / (sigma / (sigma ** 2 + 1).sqrt())

    model = EDM(GaussNet(), [2])
    errors = {}
    for sampler, steps in [("heun", 8), ("heun", 32), ("heun", 128), ("dpmpp_2m", 8), ("dpmpp_2m", 32),
                           ("euler", 8), ("euler", 32)]:
        churn = {} if sampler == "dpmpp_2m" else {"S_churn": 0.0}
        x = model.sample(256, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), **churn)
        x_T = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
        errors[sampler, steps] = float((x - x_T * s / math.sqrt(s ** 2 + 80.0 ** 2)).abs().max())
    assert errors["heun", 128] < 5e-3
    # second order: 4x the steps cut the error ~16x (measured 25x and 9x); first order ~4x
    assert errors["heun", 8] / errors["heun", 32] > 8 and errors["dpmpp_2m", 8] / errors["dpmpp_2m", 32] > 6
    assert 2 < errors["euler", 8] / errors["euler", 32] < 6
    assert errors["euler", 32] > 3 * errors["heun", 32]


def test_network_evaluations() -> None:
    assert samplers.network_evaluations("heun", 128) == 255  # SynthER's sampler
    assert samplers.network_evaluations("dpmpp_2m", 16) == 16
    calls = []
    model = analytic_edm()
    real = model.net.forward
    model.net.forward = lambda *a: calls.append(1) or real(*a)
    model.sample(4, sampler="heun", steps=10, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 19


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "dpmpp_2m_sde", "ddpm", "ddim"])
def test_inpainting_is_exact_and_conditions_the_rest(sampler: str) -> None:
    model = analytic_ddpm() if sampler in ("ddpm", "ddim") else analytic_edm()
    fix = Inpaint(torch.tensor([True, False]), torch.tensor([-2.0, 123.0]))
    x = model.sample(2000, sampler=sampler, inpaint=fix, generator=torch.Generator().manual_seed(4))
    assert torch.all(x[:, 0] == -2.0)  # exact, bit for bit
    # given x = -2, y is +2 with prob 0.3 / 0.4 and -2 otherwise (the mixture's conditional); replacement
    # inpainting is an approximation of conditional sampling (measured 0.68-0.77 here), a bad one would give 0.5
    p_up = float((x[:, 1] > 0).float().mean())
    assert abs(p_up - 0.75) < 0.1, p_up


def test_classifier_free_guidance_mixes_conditional_and_unconditional() -> None:
    class CondNet(nn.Module):
        def forward(self, x, t, cond=None):
            return x * 0 + cond.sum(-1, keepdim=True)

    model = EDM(CondNet(), [2], cond_dim=3, cond_drop_prob=0.2)
    with torch.no_grad():
        model.null_cond.fill_(1.0)  # unconditional output 3, conditional output 0 -> guided 3 + w (0 - 3)
    x, cond = torch.randn(4, 2), torch.zeros(4, 3)
    out = model.network(x, torch.zeros(4), cond, guidance=2.0)
    torch.testing.assert_close(out, torch.full((4, 2), -3.0))
    model.train()
    dropped = model._drop_cond(torch.zeros(5000, 3), torch.Generator().manual_seed(0))
    assert abs(float((dropped[:, 0] == 1.0).float().mean()) - 0.2) < 0.03


# ------------------------------------------------------------------------------------------- chain log-probs
def test_chain_log_probs_equal_an_independent_computation() -> None:
    torch.manual_seed(0)
    model = DDPM(ChunkMLPDenoiser([4, 3], cond_dim=5, hidden=32, blocks=1), [4, 3], cond_dim=5, num_steps=10,
                 clip_x0=1.0)
    cond = torch.randn(6, 5)
    for ddim, steps, eta in [(False, None, 1.0), (True, 5, 1.0)]:
        chain = samplers.sample_chain(model, (6, 4, 3), cond, ddim=ddim, steps=steps, eta=eta, min_std=0.1,
                                      noise_clip=3.0, generator=torch.Generator().manual_seed(1))
        n_steps = len(chain.timesteps)
        assert chain.xs.shape == (n_steps + 1, 6, 4, 3) and chain.means.shape == (n_steps, 6, 4, 3)
        lp = samplers.chain_log_prob(model, chain, cond, min_std=0.1)
        for i in range(n_steps):
            dist = torch.distributions.Normal(chain.means[i], chain.stds[i].expand_as(chain.means[i]))
            torch.testing.assert_close(lp[i], dist.log_prob(chain.xs[i + 1]), rtol=1e-4, atol=1e-4)
        # recomputation goes through the network: gradients reach its weights
        model.zero_grad()
        samplers.chain_log_prob(model, chain, cond, min_std=0.1, indices=[n_steps - 1]).mean().backward()
        assert model.net.net[0].weight.grad.abs().sum() > 0
    # gaussian_log_prob is Normal.log_prob
    x, m, s = torch.randn(10), torch.randn(10), torch.rand(10) + 0.1
    torch.testing.assert_close(gaussian_log_prob(x, m, s), torch.distributions.Normal(m, s).log_prob(x))


def test_chain_routes_steps_to_other_networks() -> None:
    model = DDPM(ChunkMLPDenoiser([2, 2], hidden=16), [2, 2], num_steps=6)
    other = ChunkMLPDenoiser([2, 2], hidden=16)
    used = []
    chain = samplers.sample_chain(model, (3, 2, 2), net_for_step=lambda i: (used.append(i), other if i >= 4 else
                                                                           None)[1],
                                  generator=torch.Generator().manual_seed(0))
    assert used == list(range(6)) and chain.xs.shape[0] == 7
    a = samplers.chain_log_prob(model, chain, min_std=0.1)
    b = samplers.chain_log_prob(model, chain, min_std=0.1, net_for_step=lambda i: other if i >= 4 else None)
    torch.testing.assert_close(a[:4], b[:4])
    assert not torch.allclose(a[4:], b[4:])


# --------------------------------------------------------------------------------- denoisers, EMA, normaliser
def test_denoisers_shapes_and_gradients() -> None:
    x, t = torch.randn(3, 7), torch.rand(3)
    for net, inp, cond in [
        (ResidualMLPDenoiser([7], width=32, depth=2, dim_t=16), x, None),
        (ResidualMLPDenoiser([7], cond_dim=2, width=32, depth=2, dim_t=16, layer_norm=True), x, torch.randn(3, 2)),
        (TemporalUNet([16, 5], cond_dim=4, dim=16, dim_mults=(1, 2, 4)), torch.randn(3, 16, 5), torch.randn(3, 4)),
        (ChunkMLPDenoiser([4, 3], cond_dim=11, hidden=32, blocks=2), torch.randn(3, 4, 3), torch.randn(3, 11)),
    ]:
        out = net(inp, t, cond)
        assert out.shape == inp.shape
        out.square().mean().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unet_takes_a_horizon_not_divisible_by_its_downsampling() -> None:
    """A Fetch episode's 51 rows (down-sampling factor 4): padded inside, cropped back, gradients reach x."""
    net = TemporalUNet([51, 5], cond_dim=3, dim=8, dim_mults=(1, 2, 4))
    x = torch.randn(2, 51, 5, requires_grad=True)
    out = net(x, torch.rand(2), torch.randn(2, 3))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.all(x.grad[:, -1].abs().sum(-1) > 0)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert TemporalUNet([10, 5], dim=8, dim_mults=(1, 2, 4))(torch.randn(1, 10, 5), torch.rand(1)).shape == (1, 10, 5)


def test_unet_is_translation_aware_in_time() -> None:
    """The UNet mixes information along the horizon (a change at t=0 moves outputs at later times)."""
    net = TemporalUNet([8, 2], dim=8, dim_mults=(1, 2)).eval()
    x = torch.randn(1, 8, 2)
    y = x.clone()
    y[0, 0] += 1.0
    diff = (net(x, torch.zeros(1)) - net(y, torch.zeros(1))).abs().sum(-1)[0]
    assert diff[4:].sum() > 0


def test_ema_arithmetic() -> None:
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.9, update_every=2, start_step=2)
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    for v in values:
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update()
    # steps 1,2 copy (2.0); step 4: 0.9*2 + 0.1*4; step 6: 0.9*(...) + 0.1*6; steps 3, 5 skipped
    expected = 0.9 * (0.9 * 2.0 + 0.1 * 4.0) + 0.1 * 6.0
    assert abs(float(ema.shadow.weight) - expected) < 1e-6
    warm = EMA(lin, decay=0.999, start_step=10, warmup_power=2 / 3)
    warm.step = 10 + 1 + 99
    assert abs(warm.current_decay() - (1 - 100 ** (-2 / 3))) < 1e-9
    warm.step = 10 ** 7
    assert warm.current_decay() == 0.999


@pytest.mark.parametrize("kind", ["zscore", "minmax", "none"])
def test_normalizer_round_trip_and_skip_dims(kind: str) -> None:
    data = torch.randn(500, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + torch.tensor([5.0, -2.0, 0.0, 1.0])
    data[:, 3] = (data[:, 3] > 1).float()
    norm = DataNormalizer(4, kind, skip_dims=[3]).fit(data)
    z = norm(data)
    torch.testing.assert_close(norm.unnormalize(z), data, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[:, 3], data[:, 3])
    if kind == "zscore":
        torch.testing.assert_close(z[:, :3].mean(0), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(z[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    elif kind == "minmax":
        assert torch.allclose(z[:, :3].min(0).values, -torch.ones(3), atol=1e-4)
        assert torch.allclose(z[:, :3].max(0).values, torch.ones(3), atol=1e-4)
    copy = DataNormalizer(4, kind, skip_dims=[3])
    copy.load_state_dict(norm.state_dict())
    torch.testing.assert_close(copy(data), z)


def test_lr_schedule() -> None:
    assert lr_factor(0, 100, 0, "cosine") == 1.0 and abs(lr_factor(100, 100, 0, "cosine")) < 1e-12
    assert abs(lr_factor(50, 100, 0, "cosine") - 0.5) < 1e-12
    assert lr_factor(4, 100, 10, "cosine") == 0.5 and lr_factor(60, 100, 0, "constant") == 1.0


# ----------------------------------------------------------------------------------- training and checkpoints
SPEC = {"type": "edm", "event_shape": [2], "denoiser": {"type": "resmlp", "width": 64, "depth": 2, "dim_t": 32},
        "normalizer": {"kind": "zscore"}, "sampler": {"sampler": "dpmpp_2m", "steps": 12}}


def test_training_learns_the_mixture_and_checkpoint_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    data = mixture_samples(20_000, seed=0)
    model = build_model(SPEC)
    model.normalizer.fit(data)
    trainer = DiffusionTrainer(model, data, TrainerSettings(steps=600, batch_size=256, lr=2e-3, ema_start=0,
                                                            ema_every=1, ema_decay=0.98), seed=0)
    losses = [float(trainer.train_step()) for _ in range(600)]
    assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:50])
    x = trainer.ema.shadow.sample(3000, generator=torch.Generator().manual_seed(0))
    mode = torch.cdist(x, CENTRES).min(1)
    assert float(mode.values.median()) < 0.6  # samples sit on the modes
    save_checkpoint(tmp_path / "checkpoints", trainer.step, {"diffusion": trainer.state_dict()},
                    meta={"model_spec": SPEC})
    loaded, meta = load_model(tmp_path)
    assert meta["model_spec"] == SPEC
    y = loaded.sample(3000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, y)  # same EMA weights, normaliser and sampler settings
    raw, _ = load_model(tmp_path, ema=False)
    torch.testing.assert_close(raw.normalizer.shift, model.normalizer.shift)


def test_trainer_resume_is_exact(tmp_path) -> None:
    data = mixture_samples(2000, seed=0)

    def make() -> DiffusionTrainer:
        torch.manual_seed(0)
        m = build_model(SPEC)
        m.normalizer.fit(data)
        return DiffusionTrainer(m, data, TrainerSettings(steps=40, ema_start=5, ema_every=2), seed=1)

    full = make()
    for _ in range(40):
        full.train_step()
    half = make()
    for _ in range(20):
        half.train_step()
    save_checkpoint(tmp_path, 20, {"diffusion": half.state_dict()})
    from diffrl.runs.checkpoint import load_checkpoint

    resumed = make()
    resumed.load_state_dict(load_checkpoint(tmp_path)[1]["diffusion"])
    for _ in range(20):
        resumed.train_step()
    for a, b in zip(full.ema.shadow.parameters(), resumed.ema.shadow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddpm_and_unet_train_end_to_end() -> None:
    spec = {"type": "ddpm", "event_shape": [8, 2], "denoiser": {"type": "unet", "dim": 8, "dim_mults": [1, 2]},
            "normalizer": {"kind": "minmax"}, "diffusion": {"num_steps": 20, "clip_x0": 1.0}}
    model = build_model(spec)
    data = torch.cumsum(torch.randn(256, 8, 2) * 0.1, dim=1)
    model.normalizer.fit(data)
    trainer = DiffusionTrainer(model, data, TrainerSettings(steps=5, batch_size=32, bf16=True))
    for _ in range(5):
        assert torch.isfinite(trainer.train_step())
    x = model.sample(4, sampler="ddim", steps=5, clip=1.0)
    assert x.shape == (4, 8, 2) and torch.all(x <= data.amax((0, 1)) + 1e-4)


def test_bad_inputs_are_rejected() -> None:
    model = build_model(SPEC)
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.randn(4, 3))
    with pytest.raises(ValueError, match="does not apply"):
        model.sample(4, sampler="ddim")
    with pytest.raises(ValueError, match="unknown denoiser"):
        build_model({**SPEC, "denoiser": {"type": "transformer"}})
    with pytest.raises(ValueError, match="condition"):
        model.sample(4, cond=torch.zeros(4, 2))


def test_sampler_defaults_apply_only_to_the_default_sampler() -> None:
    model = build_model({**SPEC, "sampler": {"sampler": "heun", "steps": 64, "S_churn": 80.0}})
    assert model.resolve_sampler() == ("heun", 64, {"S_churn": 80.0})
    assert model.resolve_sampler("heun", 8) == ("heun", 8, {"S_churn": 80.0})
    assert model.resolve_sampler("dpmpp_2m") == ("dpmpp_2m", None, {})
    model.sample(3, sampler="dpmpp_2m", steps=4)  # the heun churn settings must not leak into another sampler



def test_ddpm_transition_models_embed_the_integer_step_smoothly() -> None:
    # random Fourier features of t = 0..K-1 change arbitrarily between neighbouring steps; DDPM gets sinusoidal ones
    from diffrl.augment import TransitionLayout
    from diffrl.diffusion.nets import RandomFourierEmbedding
    from diffrl.diffusion.spec import build_model
    from diffrl.pipelines.diffusion import DiffusionConfig, model_spec

    layout = TransitionLayout(11, 3)
    for kind, t in (("ddpm", (50.0, 51.0)), ("edm", (0.25 * math.log(1.0), 0.25 * math.log(1.1)))):
        cfg = DiffusionConfig(dataset="x", model=kind, width=32, depth=1, sampler="ddpm" if kind == "ddpm" else "heun")
        spec = model_spec(cfg, layout)
        features = build_model(spec).net.time[0]
        periodic = slice(1, None) if isinstance(features, RandomFourierEmbedding) else slice(None)  # drop raw t
        a, b = (features(torch.tensor([v]))[:, periodic] for v in t)
        assert torch.nn.functional.cosine_similarity(a, b).item() > 0.9, kind


def test_a_spec_without_a_normalizer_kind_gets_the_identity_either_way() -> None:
    # a missing "normalizer" and one without "kind" mean the same thing (they used to differ: none vs zscore)
    bare = {k: v for k, v in SPEC.items() if k != "normalizer"}
    assert build_model(bare).normalizer.kind == "none"
    assert build_model({**bare, "normalizer": {"skip_dims": [1]}}).normalizer.kind == "none"
    assert build_model(SPEC).normalizer.kind == "zscore"


class _Spy(nn.Module):
    """A denoiser that records its inputs and returns a fixed function of them."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.scale * x


@pytest.mark.parametrize("kind", ["edm", "ddpm"])
def test_loss_holds_fixed_entries_clean_in_the_input_and_leaves_them_out(kind: str) -> None:
    spy = _Spy()
    model = EDM(spy, (4, 3)) if kind == "edm" else DDPM(spy, (4, 3), num_steps=10)
    x = torch.randn(6, 4, 3)
    fixed = torch.zeros(4, 3, dtype=torch.bool)
    fixed[0] = True  # the first row (s0) ...
    fixed[:, 2] = True  # ... and one channel at every step (the given actions)
    per_sample = model.loss(x, generator=torch.Generator().manual_seed(0), fixed=fixed, reduction="none")
    seen = spy.inputs[-1]
    if kind == "edm":  # the network sees c_in * x_noised; the fixed entries are c_in * x
        ratio = seen[:, fixed] / x[:, fixed]
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    else:
        assert torch.equal(seen[:, fixed], x[:, fixed])
    assert not torch.allclose(seen[:, ~fixed], x[:, ~fixed])  # the free entries are noised
    # the same draws without a mask: the loss of the free entries alone is the masked loss
    full = model._loss(x, None, torch.Generator().manual_seed(0), None, fixed.expand_as(x))
    assert torch.allclose(per_sample, full[:, ~fixed].mean(1))
    assert torch.allclose(model.loss(x, generator=torch.Generator().manual_seed(0), fixed=fixed),
                          full[:, ~fixed].mean())


def test_clean_inpainting_shows_the_network_the_clean_values_at_every_step() -> None:
    spy = _Spy()
    model = EDM(spy, (5, 2))
    mask = torch.zeros(5, 2, dtype=torch.bool)
    mask[:, 1] = True
    values = torch.linspace(-1, 1, 10).view(5, 2)
    calls = []
    real_denoise = model.denoise

    def denoise(x: torch.Tensor, sigma: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(x.detach().clone())
        return real_denoise(x, sigma, *args, **kw)

    model.denoise = denoise  # type: ignore[method-assign]
    out = model.sample(3, sampler="heun", steps=6, inpaint=Inpaint(mask, values, clean=True),
                       generator=torch.Generator().manual_seed(1))
    assert len(calls) > 6
    for x in calls:  # every network input holds the clean values (the noised default would not)
        assert torch.allclose(x[:, mask], values[mask].expand(3, -1))
    assert torch.equal(out[:, mask], values[mask].expand(3, -1))
    calls.clear()
    model.sample(3, sampler="heun", steps=6, inpaint=Inpaint(mask, values), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(calls[0][:, mask], values[mask].expand(3, -1))


def test_trainer_passes_one_fixed_mask_or_one_per_sample() -> None:
    spy = _Spy()
    model = DDPM(spy, (2, 2), num_steps=5)
    data = torch.randn(8, 2, 2)
    per_sample = torch.zeros(8, 2, 2, dtype=torch.bool)
    per_sample[:, 0, 0] = True
    for fixed in (per_sample[0], per_sample):
        trainer = DiffusionTrainer(model, data, TrainerSettings(steps=2, batch_size=4), fixed=fixed)
        trainer.train_step()
        seen = spy.inputs[-1]
        assert bool(torch.isin(seen[:, 0, 0], data[:, 0, 0]).all())  # the fixed entry is a clean data value
        assert not bool(torch.isin(seen[:, 1, 1], data[:, 1, 1]).any())  # the others are noised
