"""Data shared by the integration tests (built once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffrl.cli import main


@pytest.fixture(scope="session")
def hopper_random(tmp_path_factory) -> Path:
    """2000 random-action Hopper-v5 transitions in the D4RL layout, with reference returns (a 600-step SAC
    'expert' gives the upper reference)."""
    root = tmp_path_factory.mktemp("hopper-random")
    out = root / "hopper-random.hdf5"
    assert main(["data", "collect", "--env", "Hopper-v5", "--kind", "random", "--expert-steps", "600",
                 "--transitions", "2000", "--no-progress", "--out", str(out), "--experts-dir",
                 str(root / "experts")]) == 0
    return out
