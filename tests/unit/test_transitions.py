"""TransitionLayout: SynthER's vector layout, and the way generated vectors become data again."""

from __future__ import annotations

import numpy as np
import pytest

from diffrl.augment import TransitionLayout
from diffrl.errors import DatasetError


def data(n: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, 4)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, 4)).astype(np.float32),
            "terminals": (rng.uniform(size=n) < 0.2).astype(np.float32)}


def test_join_puts_columns_in_synthers_order_and_split_inverts_it() -> None:
    layout = TransitionLayout(4, 2)
    d = data()
    x = layout.join(d)
    assert x.shape == (50, 2 * 4 + 2 + 1 + 1) == (50, layout.dim)
    np.testing.assert_array_equal(x[:, :4], d["observations"])
    np.testing.assert_array_equal(x[:, 4:6], d["actions"])
    np.testing.assert_array_equal(x[:, layout.reward_index], d["rewards"])
    np.testing.assert_array_equal(x[:, 7:11], d["next_observations"])
    assert layout.terminal_index == 11
    back = layout.split(x)
    for k, v in d.items():
        np.testing.assert_array_equal(back[k], v)


def test_split_thresholds_terminals_and_clips_actions() -> None:
    layout = TransitionLayout(4, 2)
    x = layout.join(data())
    x[:, 4] = 3.0  # out-of-range action
    x[:, -1] = np.linspace(-0.5, 1.5, len(x))  # continuous generated terminal flags
    out = layout.split(x)
    assert out["actions"][:, 0].max() == 1.0
    np.testing.assert_array_equal(out["terminals"], (x[:, -1] > 0.5).astype(np.float32))
    assert layout.split(x, clip_actions=False)["actions"][:, 0].max() == 3.0


def test_layout_without_terminals_and_bad_shapes() -> None:
    layout = TransitionLayout(4, 2, terminals=False)
    x = layout.join(data())
    assert x.shape[1] == layout.dim == 11 and layout.terminal_index is None
    assert not layout.split(x)["terminals"].any()
    with pytest.raises(DatasetError, match="layout expects"):
        TransitionLayout(5, 2).join(data())
    with pytest.raises(DatasetError, match="generated samples have shape"):
        layout.split(np.zeros((3, 7)))
    assert TransitionLayout.from_dict(layout.to_dict()) == layout
