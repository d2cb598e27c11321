"""ReplayBuffer, MixedSampler and the Batch contract: contents, ring order, sampling, state round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.data import Batch, MixedSampler, ReplayBuffer
from diffrl.errors import CheckpointError

DO, DA = 3, 2


def make_buffer(capacity: int = 8, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer.for_transitions(capacity, DO, DA, seed=seed)


def rows(start: int, n: int, mark: float = 0.0) -> dict[str, np.ndarray]:
    """``n`` transitions whose every entry encodes its row index ``i`` (obs = i, act = 10 i, rew = i + mark...)."""
    i = np.arange(start, start + n, dtype=np.float32)
    return {"obs": np.repeat(i[:, None], DO, 1), "act": np.repeat(10 * i[:, None], DA, 1), "rew": i + mark,
            "next_obs": np.repeat(i[:, None] + 0.5, DO, 1), "done": (i % 2).astype(np.float32)}


def test_add_single_transition_stores_values_and_grows_size():
    buf = make_buffer()
    buf.add(obs=np.array([1.0, 2.0, 3.0]), act=np.array([0.5, -0.5]), rew=2.5, next_obs=np.array([4.0, 5.0, 6.0]),
            done=1.0)
    assert len(buf) == 1
    got = buf.all()
    assert got.obs.shape == (1, DO) and got.act.shape == (1, DA) and got.rew.shape == (1,)
    torch.testing.assert_close(got.obs[0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(got.act[0], torch.tensor([0.5, -0.5]))
    assert got.rew.item() == 2.5 and got.done.item() == 1.0
    torch.testing.assert_close(got.next_obs[0], torch.tensor([4.0, 5.0, 6.0]))


def test_add_batch_stores_rows_in_insertion_order():
    buf = make_buffer(capacity=8)
    buf.add_batch(**rows(0, 3))
    buf.add_batch(**rows(3, 2))
    assert len(buf) == 5
    got = buf.all()
    torch.testing.assert_close(got.obs[:, 0], torch.arange(5, dtype=torch.float32))
    torch.testing.assert_close(got.act[:, 1], 10 * torch.arange(5, dtype=torch.float32))
    torch.testing.assert_close(got.done, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))


def test_ring_wraparound_overwrites_oldest_and_all_returns_oldest_first():
    buf = make_buffer(capacity=5)
    buf.add_batch(**rows(0, 4))
    buf.add_batch(**rows(4, 3))  # rows 0 and 1 are overwritten
    assert len(buf) == 5
    torch.testing.assert_close(buf.all().obs[:, 0], torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(buf.all().rew, torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))


def test_add_batch_larger_than_capacity_keeps_last_rows_in_order():
    buf = make_buffer(capacity=4)
    buf.add_batch(**rows(0, 2))
    buf.add_batch(**rows(2, 7))  # rows 2..8, only 5..8 survive
    torch.testing.assert_close(buf.all().obs[:, 0], torch.tensor([5.0, 6.0, 7.0, 8.0]))


def test_add_batch_with_wrong_keys_raises_keyerror():
    buf = make_buffer()
    data = rows(0, 2)
    del data["done"]
    with pytest.raises(KeyError, match="done"):
        buf.add_batch(**data)
    with pytest.raises(KeyError):
        buf.add_batch(**rows(0, 2), extra=np.zeros(2))


def test_sample_shapes_dtypes_and_rows_were_added():
    buf = make_buffer(capacity=16)
    buf.add_batch(**rows(0, 6))
    b = buf.sample(32)
    assert set(b) == {"obs", "act", "rew", "next_obs", "done"}
    assert b.obs.shape == (32, DO) and b.act.shape == (32, DA) and b.next_obs.shape == (32, DO)
    assert b.rew.shape == (32,) and b.done.shape == (32,)
    assert all(v.dtype == torch.float32 for v in b.values())
    i = b.obs[:, 0]
    assert set(i.tolist()) <= set(range(6))  # only filled rows, never the zero padding beyond size
    # every key of a sampled row comes from the same stored transition
    torch.testing.assert_close(b.act[:, 0], 10 * i)
    torch.testing.assert_close(b.rew, i)
    torch.testing.assert_close(b.next_obs[:, 2], i + 0.5)


def test_sample_from_empty_buffer_raises():
    with pytest.raises(RuntimeError, match="empty"):
        make_buffer().sample(4)


def test_same_seed_gives_same_batches_and_other_seed_differs():
    a, b, c = make_buffer(16, seed=3), make_buffer(16, seed=3), make_buffer(16, seed=4)
    for buf in (a, b, c):
        buf.add_batch(**rows(0, 16))
    sa = [a.sample(8).obs for _ in range(3)]
    sb = [b.sample(8).obs for _ in range(3)]
    sc = [c.sample(8).obs for _ in range(3)]
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc))


@pytest.mark.parametrize("n_added", [5, 13], ids=["partial", "wrapped"])
def test_state_dict_round_trip_restores_contents_and_future_samples(n_added):
    src = make_buffer(capacity=8, seed=1)
    src.add_batch(**rows(0, n_added))
    src.sample(4)  # advance the generator so its state matters
    state = src.state_dict()
    dst = make_buffer(capacity=8, seed=99)
    dst.load_state_dict(state)
    assert len(dst) == len(src) and dst.ptr == src.ptr
    for k, v in src.all().items():
        torch.testing.assert_close(dst.all()[k], v, rtol=0, atol=0)
    for _ in range(3):
        torch.testing.assert_close(dst.sample(6).obs, src.sample(6).obs, rtol=0, atol=0)
    # further additions land at the same ring position in both
    src.add_batch(**rows(100, 3))
    dst.add_batch(**rows(100, 3))
    torch.testing.assert_close(dst.all().obs, src.all().obs, rtol=0, atol=0)


def test_load_state_dict_into_other_shape_or_capacity_raises_checkpoint_error():
    src = make_buffer(capacity=8)
    src.add_batch(**rows(0, 3))
    with pytest.raises(CheckpointError, match="capacity"):
        ReplayBuffer.for_transitions(8, DO + 1, DA).load_state_dict(src.state_dict())
    with pytest.raises(CheckpointError):
        ReplayBuffer.for_transitions(16, DO, DA).load_state_dict(src.state_dict())


# ------------------------------------------------------------------------------------------- MixedSampler
def real_and_synthetic(n_syn: int = 8) -> tuple[ReplayBuffer, ReplayBuffer]:
    real, syn = make_buffer(16, seed=0), make_buffer(16, seed=1)
    real.add_batch(**rows(0, 8, mark=0.0))
    if n_syn:
        syn.add_batch(**rows(0, n_syn, mark=1000.0))  # synthetic rows have rew >= 1000
    return real, syn


@pytest.mark.parametrize("ratio,batch,expected", [(0.25, 8, 2), (0.3, 10, 3), (0.5, 7, 4), (0.0, 6, 0),
                                                  (1.0, 6, 6)])
def test_mixed_sampler_draws_round_ratio_times_batch_synthetic_rows(ratio, batch, expected):
    real, syn = real_and_synthetic()
    b = MixedSampler(real, syn, ratio).sample(batch)
    assert all(v.shape[0] == batch for v in b.values())
    assert int((b.rew >= 1000).sum()) == expected == round(ratio * batch)


def test_mixed_sampler_falls_back_to_real_when_synthetic_empty():
    real, syn = real_and_synthetic(n_syn=0)
    b = MixedSampler(real, syn, 0.5).sample(10)
    assert b.rew.shape == (10,) and bool((b.rew < 1000).all())


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_mixed_sampler_rejects_ratio_outside_unit_interval(ratio):
    real, syn = real_and_synthetic()
    with pytest.raises(ValueError, match="ratio"):
        MixedSampler(real, syn, ratio)


# ------------------------------------------------------------------------------------------------- Batch
def full_batch(b: int = 4) -> Batch:
    return Batch(obs=torch.zeros(b, DO), act=torch.zeros(b, DA), rew=torch.zeros(b), next_obs=torch.zeros(b, DO),
                 done=torch.zeros(b))


def test_batch_validate_accepts_complete_batch_and_exposes_attributes():
    b = full_batch()
    assert b.validate() is b
    assert b.obs is b["obs"]
    with pytest.raises(AttributeError):
        _ = b.goal


def test_batch_len_is_the_batch_size():
    assert len(full_batch(4)) == 4
    assert len(Batch()) == 0


def test_batch_validate_catches_missing_key():
    b = full_batch()
    del b["next_obs"]
    with pytest.raises(KeyError, match="next_obs"):
        b.validate()


def test_batch_validate_catches_mismatched_sizes():
    b = full_batch()
    b["act"] = torch.zeros(5, DA)
    with pytest.raises(ValueError, match="batch size"):
        b.validate()


def test_batch_validate_catches_column_shaped_reward():
    b = full_batch()
    b["rew"] = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="rew"):
        b.validate()
