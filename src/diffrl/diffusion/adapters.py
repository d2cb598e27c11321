"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for adapting a pre-trained denoiser online.

``add_lora(module, rank)`` turns each targeted ``nn.Linear`` into a :class:`LoRALinear`, which computes

    y = W x + b + (alpha / r) B A x        A: (r, in), B: (out, r)

with ``A`` Kaiming-uniform and ``B = 0`` (LoRA's initialisation: the adapted module computes exactly the same
function until ``B`` is trained), and freezes every other parameter of ``module``. PPO-DAP (DiffPPO v6) adapts its
action prior this way (rank 8).

A :class:`LoRALinear` *is* an ``nn.Linear`` holding the original ``weight`` and ``bias`` Parameters under their
original names, so the adapted module's ``state_dict`` keeps every pre-trained key and adds ``<layer>.lora_A`` /
``<layer>.lora_B``: a pre-trained checkpoint loads into it with ``strict=False``, and its full state dict loads into
another module prepared the same way (same ``targets`` and ``rank``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "add_lora", "merge_lora", "lora_state_dict", "lora_parameters"]


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``(alpha / rank) B A`` (module docstring); built by :func:`add_lora`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's own (random) weight allocation: the base's Parameters are reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None for a bias-free layer
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # loralib's init of A; B = 0

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``(alpha / rank) B A``, ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # two thin matmuls instead of materialising B A: (..., in) -> (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _children_to_wrap(module: nn.Module, targets: Callable[[str, nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    found = []
    for name, child in module.named_modules():
        if isinstance(child, LoRALinear):
            raise ValueError(f"{type(module).__name__} already has LoRA adapters (at {name!r}); add them once")
        if isinstance(child, nn.Linear) and name and targets(name, child):
            found.append((name, child))
    return found


def _set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, child)


def add_lora(module: nn.Module, rank: int, alpha: float = 1.0,
             targets: Callable[[str, nn.Module], bool] | None = None, *,
             generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Wrap the targeted ``nn.Linear`` layers of ``module`` in :class:`LoRALinear` (in place) and freeze the rest.

    Args:
        module: e.g. a denoiser (``ChunkMLPDenoiser``) or a whole ``DDPM``; the module itself is not replaced, so a
            bare ``nn.Linear`` must be wrapped through its parent.
        rank: ``r``, the rank of the update.
        alpha: LoRA's ``alpha``; the update is scaled by ``alpha / rank``.
        targets: ``(qualified name, layer) -> bool`` choosing the Linear layers to adapt; default all of them.
        generator: for the random init of ``A``.
    Returns:
        The new trainable adapter parameters (``A``, ``B`` of each wrapped layer), to hand to an optimiser. Every
        parameter ``module`` had before is set ``requires_grad=False``, wrapped or not.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    chosen = _children_to_wrap(module, targets or (lambda name, layer: True))
    if not chosen:
        raise ValueError(f"no nn.Linear layer of {type(module).__name__} matches the LoRA targets: nothing to adapt")
    for p in module.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name, layer in chosen:
        wrapped = LoRALinear(layer, rank, alpha, generator)  # type: ignore[arg-type]
        _set_child(module, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of an adapted module (what :func:`add_lora` returned), e.g. after loading it."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``module.state_dict()`` (keys ``<layer>.lora_A`` / ``<layer>.lora_B``); load them
    back with ``module.load_state_dict(sd, strict=False)`` into a module prepared by the same :func:`add_lora`."""
    names = {f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, LoRALinear)
             for p in ("lora_A", "lora_B")}
    return {k: v for k, v in module.state_dict().items() if k in names}


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, ``W <- W + (alpha / r) B A``, and put plain ``nn.Linear`` layers back.

    The module computes the same function (up to rounding) without the adapters' extra matmuls, and its state
    dict has the original keys only. The merged weights keep ``requires_grad=False``. Returns ``module``.
    """
    for name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
        layer.weight.add_(layer.delta_weight())
        plain.weight, plain.bias = layer.weight, layer.bias
        _set_child(module, name, plain)
    return module
