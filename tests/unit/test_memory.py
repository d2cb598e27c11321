"""The run's peak memory (runs/memory.py): a reset starts a new measurement, so a sweep's later trial does not
report an earlier trial's peak."""

from __future__ import annotations

import numpy as np
import pytest

from diffrl.runs.memory import peak_rss_mib, reset_peak_rss


def test_a_reset_forgets_an_earlier_peak():
    if not reset_peak_rss():
        pytest.skip("this platform cannot reset the peak resident memory")
    base = peak_rss_mib()
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    assert peak_rss_mib() > base + 300
    del big
    assert reset_peak_rss()
    assert peak_rss_mib() < base + 100
