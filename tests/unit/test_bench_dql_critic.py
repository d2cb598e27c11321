"""benchmarks/dql_critic.py: the behaviour policy's value, by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from dql_critic import behaviour_value  # noqa: E402


def test_behaviour_value_by_hand() -> None:
    # a terminal episode (nothing after it), one cut by a time limit and one cut by the data's end (both continued
    # at their own mean reward, r_mean / (1 - gamma) = r_mean * 2 at gamma 0.5)
    rewards = np.array([1.0, 2.0, 3.0, 1.0, 2.0], np.float32)
    terminals = np.array([0, 1, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 1, 0], bool)
    got = behaviour_value(rewards, terminals, timeouts, gamma=0.5)
    np.testing.assert_allclose(got, [1 + 0.5 * 2, 2, 3 + 0.5 * 3, 1 + 0.5 * 4, 2 + 0.5 * 4])
