"""Denoiser networks. Every denoiser is called ``net(x, t, cond=None)``:

- ``x``: the noisy sample, ``(B, *event_shape)``;
- ``t``: the noise level as one float per sample, ``(B,)`` (EDM passes ``c_noise = log(sigma) / 4``, DDPM the
  step index);
- ``cond``: an optional global condition vector ``(B, cond_dim)``;

and returns a tensor shaped like ``x``. Constructors take ``(event_shape, cond_dim, **options)`` so a model spec
(a plain dict) rebuilds any of them.

- ``ResidualMLPDenoiser`` (``resmlp``): SynthER's network for flat vectors (transitions).
- ``TemporalUNet`` (``unet``): a 1-D convolutional UNet over ``(horizon, channels)`` sequences with FiLM
  conditioning, in the style of Diffuser / Diffusion Policy (trajectories, episodes, action chunks).
- ``ChunkMLPDenoiser`` (``chunk_mlp``): DPPO's MLP over a flattened action chunk, conditioned on observations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class RandomFourierEmbedding(nn.Module):
    """``[t, sin(2 pi w t), cos(2 pi w t)]`` with ``w ~ N(0, 1)`` frozen (SynthER's time features); ``dim + 1``
    outputs."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier embedding dim must be even, got {dim}")
        self.register_buffer("weights", torch.randn(dim // 2))
        self.out_dim = dim + 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None]
        freqs = t * self.weights[None] * 2 * math.pi
        return torch.cat([t, freqs.sin(), freqs.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of ``t`` (DDPM / DPPO): ``dim`` outputs."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / (half - 1)))
        self.out_dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None] * self.freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def time_mlp(kind: str, dim: int, out_dim: int, activation: str) -> nn.Sequential:
    """Features of ``t`` followed by a two-layer MLP to ``out_dim``."""
    features: nn.Module = RandomFourierEmbedding(dim) if kind == "fourier" else SinusoidalEmbedding(dim)
    if kind not in ("fourier", "sinusoidal"):
        raise ValueError(f"unknown time embedding {kind!r}: choose fourier or sinusoidal")
    hidden = out_dim if kind == "fourier" else 2 * out_dim
    return nn.Sequential(features, nn.Linear(features.out_dim, hidden), _activation(activation),
                         nn.Linear(hidden, out_dim))


class _ResidualBlock(nn.Module):
    """``x + Linear(act(LayerNorm(x)))`` (SynthER's block)."""

    def __init__(self, width: int, activation: str, layer_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.act = _activation(activation)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.act(self.norm(x)))


class ResidualMLPDenoiser(nn.Module):
    """SynthER's residual MLP for flat vectors.

    ``[x, cond] -> Linear(dim_t) + time_mlp(t) -> Linear(width) -> depth x (x + Linear(act(LN(x))))
    -> [LN] -> act -> Linear(dim)``. SynthER's offline default: width 2048 (or 1024), depth 6, dim_t 128,
    ReLU, no LayerNorm, 16 random Fourier features.
    """

    def __init__(self, event_shape: Sequence[int], cond_dim: int = 0, *, width: int = 1024, depth: int = 6,
                 dim_t: int = 128, layer_norm: bool = False, activation: str = "relu",
                 time_embedding: str = "fourier", fourier_dim: int = 16) -> None:
        super().__init__()
        if len(event_shape) != 1:
            raise ValueError(f"the residual MLP denoiser takes flat vectors, got event shape {tuple(event_shape)}")
        dim = int(event_shape[0])
        self.proj = nn.Linear(dim + cond_dim, dim_t)
        self.time = time_mlp(time_embedding, fourier_dim, dim_t, "silu")
        self.body = nn.Sequential(nn.Linear(dim_t, width),
                                  *[_ResidualBlock(width, activation, layer_norm) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(width) if layer_norm else nn.Identity(), _activation(activation),
                                  nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x if cond is None else torch.cat([x, cond], dim=-1)) + self.time(t)
        return self.head(self.body(h))


class PreActBlock(nn.Module):
    """``x + L2(act(N2(L1(act(N1(x))))))``: DPPO's two-layer pre-activation residual block, with LayerNorms
    ``N1``, ``N2`` (eps 1e-6) when ``layer_norm``."""

    def __init__(self, width: int, activation: str, layer_norm: bool = False) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.LayerNorm(width, eps=1e-6) if layer_norm else nn.Identity()

        self.net = nn.Sequential(norm(), _activation(activation), nn.Linear(width, width),
                                 norm(), _activation(activation), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ChunkMLPDenoiser(nn.Module):
    """DPPO's ``DiffusionMLP``: denoises an action chunk ``(B, horizon, act_dim)`` given observations.

    Input ``[flatten(x), time_mlp(t), cond]`` (cond = the flattened last ``cond_steps`` observations) ->
    ``Linear(hidden) -> blocks x pre-activation residual block -> Linear(horizon * act_dim)``. DPPO's Hopper
    config ``mlp_dims=[512, 512, 512]`` is ``hidden=512, blocks=1``; time_dim 16, Mish.
    """

    def __init__(self, event_shape: Sequence[int], cond_dim: int = 0, *, hidden: int = 512, blocks: int = 1,
                 time_dim: int = 16, activation: str = "mish", layer_norm: bool = False) -> None:
        super().__init__()
        if len(event_shape) != 2:
            raise ValueError(f"the chunk MLP denoiser takes (horizon, act_dim) chunks, got {tuple(event_shape)}")
        self.event_shape = tuple(int(s) for s in event_shape)
        flat = self.event_shape[0] * self.event_shape[1]
        self.time = time_mlp("sinusoidal", time_dim, time_dim, "mish")
        # DPPO's ResidualMLP: no activation between the last block and the output layer
        self.net = nn.Sequential(nn.Linear(flat + time_dim + cond_dim, hidden),
                                 *[PreActBlock(hidden, activation, layer_norm) for _ in range(blocks)],
                                 nn.Linear(hidden, flat))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x.flatten(1), self.time(t)] + ([] if cond is None else [cond])
        return self.net(torch.cat(parts, dim=-1)).view(-1, *self.event_shape)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int) -> None:
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish())


class _FiLMResBlock(nn.Module):
    """Two conv blocks; the embedding sets a per-channel scale and bias between them (FiLM); 1x1 residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.block1 = _ConvBlock(c_in, c_out, kernel, groups)
        self.block2 = _ConvBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(emb_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(emb)[..., None].chunk(2, dim=1)
        h = self.block1(x) * (1 + scale) + bias
        return self.block2(h) + self.skip(x)


class TemporalUNet(nn.Module):
    """1-D UNet over ``(B, horizon, channels)`` sequences (Janner et al. 2022, Chi et al. 2023).

    Convolutions run along time; each level has two FiLM residual blocks, then a stride-2 down-sampling (not
    after the last level); the up path mirrors it with skip connections. The time embedding (sinusoidal ->
    MLP) and the global condition vector are concatenated and drive every block's FiLM.

    Any horizon works: the time axis is padded at the end, by repeating the last step, up to a multiple of
    ``2 ** (len(dim_mults) - 1)`` and the output is cropped back (e.g. a Fetch episode's ``T + 1 = 51`` rows
    run at 52); Diffuser's TemporalUnet instead requires a divisible horizon.
    """

    def __init__(self, event_shape: Sequence[int], cond_dim: int = 0, *, dim: int = 32,
                 dim_mults: Sequence[int] = (1, 2, 4), kernel_size: int = 5, groups: int = 8) -> None:
        super().__init__()
        if len(event_shape) != 2:
            raise ValueError(f"the temporal UNet takes (horizon, channels) sequences, got {tuple(event_shape)}")
        _, channels = (int(s) for s in event_shape)
        self.time_factor = 2 ** (len(dim_mults) - 1)  # total down-sampling of the time axis
        widths = [dim * m for m in dim_mults]
        if any(w % groups for w in widths):
            raise ValueError(f"UNet widths {widths} must be divisible by groups={groups}")
        self.time = time_mlp("sinusoidal", dim, dim, "mish")
        emb_dim = dim + cond_dim
        self.down = nn.ModuleList()
        c_in = channels
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(nn.ModuleList([
                _FiLMResBlock(c_in, w, emb_dim, kernel_size, groups),
                _FiLMResBlock(w, w, emb_dim, kernel_size, groups),
                nn.Conv1d(w, w, 3, stride=2, padding=1) if not last else nn.Identity()]))
            c_in = w
        self.mid = nn.ModuleList([_FiLMResBlock(c_in, c_in, emb_dim, kernel_size, groups),
                                  _FiLMResBlock(c_in, c_in, emb_dim, kernel_size, groups)])
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):  # up-sample the coarser map, then join the skip of the same level
            self.up.append(nn.ModuleList([
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                _FiLMResBlock(c_in + w, w, emb_dim, kernel_size, groups),
                _FiLMResBlock(w, w, emb_dim, kernel_size, groups)]))
            c_in = w
        self.final = nn.Sequential(_ConvBlock(c_in, c_in, kernel_size, groups), nn.Conv1d(c_in, channels, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t) if cond is None else torch.cat([self.time(t), cond], dim=-1)
        horizon = x.shape[1]
        pad = -horizon % self.time_factor
        if pad:  # replicate the last step so every stride-2 level sees an even length
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], dim=1)  # (B, horizon + pad, C)
        h = x.transpose(1, 2)  # (B, C, horizon + pad)
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = downsample(h)
        skips.pop()  # the deepest level feeds the middle blocks directly
        for block in self.mid:
            h = block(h, emb)
        for upsample, block1, block2 in self.up:
            h = upsample(h)
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), emb), emb)
        return self.final(h).transpose(1, 2)[:, :horizon]


DENOISERS: dict[str, type[nn.Module]] = {
    "resmlp": ResidualMLPDenoiser,
    "unet": TemporalUNet,
    "chunk_mlp": ChunkMLPDenoiser,
}


def build_denoiser(kind: str, event_shape: Sequence[int], cond_dim: int = 0, **options: object) -> nn.Module:
    if kind not in DENOISERS:
        raise ValueError(f"unknown denoiser {kind!r}: choose one of {', '.join(DENOISERS)}")
    return DENOISERS[kind](event_shape, cond_dim, **options)
