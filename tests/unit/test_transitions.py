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


class Gaussian:
    """A stand-in diffusion model: standard normal vectors, wide enough that actions leave [-1, 1]."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        import torch

        self.normalizer = type("N", (), {"shift": torch.zeros(dim)})()
        self.dim, self.scale = dim, scale

    def sample(self, n: int, generator=None, **_):
        import torch

        return self.scale * torch.randn(n, self.dim, generator=generator)


def test_out_of_range_actions_are_clipped_or_rejected_with_the_same_first_draw() -> None:
    from diffrl.augment.transitions import generate_transitions

    layout = TransitionLayout(4, 2)
    model = Gaussian(layout.dim)
    clipped, fc = generate_transitions(model, layout, 2000, out_of_range="clip", seed=3, batch_size=500)
    rejected, fr = generate_transitions(model, layout, 2000, out_of_range="reject", seed=3, batch_size=500)
    # two N(0, 1) action entries both inside [-1, 1]: 0.6827^2 = 0.466 of the samples
    assert abs(fc["out_of_range_fraction"] - (1 - 0.6827 ** 2)) < 0.03
    assert abs(fr["out_of_range_fraction"] - (1 - 0.6827 ** 2)) < 0.03
    assert len(clipped["actions"]) == len(rejected["actions"]) == 2000
    assert np.mean(np.abs(clipped["actions"]) == 1.0) > 0.25  # clipping piles mass onto the bounds
    assert np.all(np.abs(rejected["actions"]) < 1.0)  # rejection keeps none there
    inside = np.all(np.abs(clipped["actions"]) < 1.0, axis=1)  # the first draw's in-range rows lead the kept ones
    np.testing.assert_array_equal(rejected["observations"][:inside.sum()], clipped["observations"][inside])
    again, _ = generate_transitions(model, layout, 2000, out_of_range="reject", seed=3, batch_size=500)
    np.testing.assert_array_equal(again["actions"], rejected["actions"])
    # keep (SynthER's code): the same draw with its actions as generated; clipping them gives the clipped samples
    kept, fk = generate_transitions(model, layout, 2000, out_of_range="keep", seed=3, batch_size=500)
    assert fk["out_of_range_fraction"] == fc["out_of_range_fraction"]
    assert np.mean(np.abs(kept["actions"]) > 1.0) > 0.25
    np.testing.assert_array_equal(np.clip(kept["actions"], -1, 1), clipped["actions"])
    np.testing.assert_array_equal(kept["observations"], clipped["observations"])


def test_rejection_from_a_model_that_never_lands_in_range_stops_with_one_sentence() -> None:
    from diffrl.augment.transitions import generate_transitions
    from diffrl.errors import ConfigError

    layout = TransitionLayout(4, 2)
    with pytest.raises(ConfigError, match="too poor to reject from"):
        generate_transitions(Gaussian(layout.dim, scale=100.0), layout, 500, out_of_range="reject")
    with pytest.raises(ConfigError, match="out_of_range"):
        generate_transitions(Gaussian(layout.dim), layout, 5, out_of_range="drop")


def test_terminals_are_the_models_or_the_rules_and_their_disagreement_is_measured() -> None:
    from diffrl.augment.transitions import generate_transitions
    from diffrl.errors import ConfigError

    layout = TransitionLayout(4, 2)
    model = Gaussian(layout.dim)
    rule = lambda next_obs: next_obs[:, 0] > 1.0  # noqa: E731 - ends where the first state dim exceeds 1
    kept, fm = generate_transitions(model, layout, 1000, rule=rule, seed=1)
    relabelled, fr = generate_transitions(model, layout, 1000, terminals="rule", rule=rule, seed=1)
    np.testing.assert_array_equal(kept["next_observations"], relabelled["next_observations"])
    by_rule = kept["next_observations"][:, 0] > 1.0
    np.testing.assert_array_equal(relabelled["terminals"], by_rule.astype(np.float32))
    np.testing.assert_array_equal(kept["terminals"], (kept["terminals"] > 0.5).astype(np.float32))  # the model's
    want = np.mean(by_rule != (kept["terminals"] > 0.5))  # two independent ~16% / ~31% flags: ~0.37
    assert fm["terminal_rule_disagreement"] == fr["terminal_rule_disagreement"] == pytest.approx(want)
    assert 0.25 < want < 0.5
    assert fr["terminal_rate"] == pytest.approx(by_rule.mean())
    assert generate_transitions(model, layout, 10)[1]["terminal_rule_disagreement"] is None
    with pytest.raises(ConfigError, match="needs the env's termination rule"):
        generate_transitions(model, layout, 10, terminals="rule")
