"""Peak resident memory of the current run, not of the process's whole life.

``ru_maxrss`` (``getrusage``) is the process's peak since it started: a sweep running several trials in one process
(the local runner, or a Ray worker reused for the next trial) would report the largest trial's peak for every later
one. On Linux the peak (``VmHWM``) can be reset by writing ``5`` to ``/proc/self/clear_refs``; a sweep does that
before each trial, and :func:`peak_rss_mib` reads ``VmHWM``. Elsewhere both fall back to ``ru_maxrss``.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["reset_peak_rss", "peak_rss_mib"]

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak-memory measurement (True if the platform supports it)."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The peak resident memory in MiB since the last :func:`reset_peak_rss` (else since the process started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
