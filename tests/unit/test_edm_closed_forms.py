"""EDM's training distribution, loss weight and preconditioning against their closed forms (Karras et al. 2022,
arXiv:2206.00364, Table 1), with sigma_data, P_mean and P_std away from their defaults so a hard-coded constant
shows."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from diffrl.diffusion.models import EDM

SIGMA_DATA, P_MEAN, P_STD = 0.5, -0.8, 1.5


class Probe(nn.Module):
    """A 'network' F that records its inputs and returns fixed outputs ``F(x_in, c_noise) = out``."""

    def __init__(self, out: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out, self.seen = out, {}

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.seen = {"x_in": x_in, "c_noise": c_noise}
        return torch.zeros_like(x_in) if self.out is None else self.out


def recording_edm(net: nn.Module) -> tuple[EDM, dict[str, torch.Tensor]]:
    """An EDM whose ``denoise`` records its noisy input, sigma and output (the loss calls it once per batch)."""
    model = EDM(net, [3], sigma_data=SIGMA_DATA, p_mean=P_MEAN, p_std=P_STD)
    seen: dict[str, torch.Tensor] = {}
    denoise = model.denoise

    def recorded(x, sigma, cond=None, guidance=1.0, net=None):
        out = denoise(x, sigma, cond, guidance, net=net)
        seen.update(x_noisy=x, sigma=torch.as_tensor(sigma), out=out)
        return out

    model.denoise = recorded  # type: ignore[method-assign]
    return model, seen


def test_training_draws_log_sigma_from_n_p_mean_p_std_squared_and_the_noise_from_a_standard_normal() -> None:
    model, seen = recording_edm(Probe())
    n = 200_000
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    model.loss(x, generator=torch.Generator().manual_seed(1))
    log_sigma = seen["sigma"].double().log()
    assert log_sigma.shape == (n,)
    # mean and std of N(P_mean, P_std^2) within 5 standard errors (SE of the mean P_std / sqrt(n) = 0.0034, of
    # the std ~ P_std / sqrt(2 n) = 0.0024); the defaults (-1.2, 1.2) are > 100 SE away
    assert abs(float(log_sigma.mean()) - P_MEAN) < 5 * P_STD / math.sqrt(n)
    assert abs(float(log_sigma.std()) - P_STD) < 5 * P_STD / math.sqrt(2 * n)
    assert stats.kstest(((log_sigma - P_MEAN) / P_STD).numpy(), "norm").pvalue > 1e-3  # normal, not just 2 moments
    # the noise: x_noisy = x + sigma n with n ~ N(0, I), independent of sigma
    z = ((seen["x_noisy"].double() - x.double()) / seen["sigma"].double()[:, None]).flatten()
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel()) and abs(float(z.std()) - 1) < 5 / math.sqrt(2 * z.numel())
    corr = torch.corrcoef(torch.stack([log_sigma, (z.view(n, 3) ** 2).mean(1)]))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(n)


def test_loss_weights_the_squared_error_by_lambda_sigma() -> None:
    # a network with a fixed random output, so D(x; sigma) - x is nonzero and differs across sigma
    n = 4096
    g = torch.Generator().manual_seed(0)
    model, seen = recording_edm(Probe(torch.randn(n, 3, generator=g)))
    x = torch.randn(n, 3, generator=g)
    loss = model.loss(x, generator=torch.Generator().manual_seed(2))
    sigma = seen["sigma"].double()[:, None]
    lam = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2  # lambda(sigma), Table 1
    want = (lam * (seen["out"].double() - x.double()) ** 2).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    unweighted = ((seen["out"].double() - x.double()) ** 2).mean()
    assert abs(float(loss) / float(unweighted) - 1) > 0.5  # the weight matters here


def test_preconditioning_is_karras_table_1_for_any_sigma_data() -> None:
    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-3, 2, 11)  # 0.001 .. 100
    x, out = torch.randn(11, 3, generator=g), torch.randn(11, 3, generator=g)
    net = Probe(out)
    model = EDM(net, [3], sigma_data=SIGMA_DATA)
    d = model.denoise(x, sigma)
    s, sd = sigma.double()[:, None], SIGMA_DATA
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in = 1 / (s ** 2 + sd ** 2).sqrt()
    c_noise = sigma.double().log() / 4
    torch.testing.assert_close(net.seen["x_in"].double(), c_in * x.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(net.seen["c_noise"].double(), c_noise, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d.double(), c_skip * x.double() + c_out * out.double(), rtol=1e-6, atol=1e-7)
    # and a scalar sigma is broadcast to the batch
    net.out = out[:2]
    d_scalar = model.denoise(x[:2], torch.tensor(0.7))
    s7 = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(d_scalar.double(), sd ** 2 / (s7 ** 2 + sd ** 2) * x[:2].double()
                               + s7 * sd / (s7 ** 2 + sd ** 2).sqrt() * out[:2].double(), rtol=1e-6, atol=1e-7)
