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


def tune_cpu_allocator() -> bool:
    """Let glibc reuse freed heap memory for PyTorch's CPU tensors instead of mmap/munmap-ing them per op.

    Small-network RL allocates activations of 0.1-1 MB per op; glibc serves those with fresh mmaps, so every
    op page-faults new memory. Raising the mmap/trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` etc. do)
    makes those allocations reuse the heap (faster small-network updates on CPUs). Process-wide and
    numerically neutral; the CLI calls it once. Returns whether it was applied (glibc only).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX)
                    and libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False
