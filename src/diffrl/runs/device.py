"""Device selection: ``auto`` picks CUDA when present, ``cuda`` without a GPU is a clear error."""

from __future__ import annotations

import torch

from diffrl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name!r} was requested but this torch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu or --device auto."
            )
        return torch.device(name)
    raise ConfigError(f"invalid device={name!r}: it must be one of auto, cpu, cuda (or cuda:N).")
