"""Offline datasets: bit-exact round trips between D4RL HDF5, npz and Minari, D4RL-style successor rebuilding,
one test per validation error, atomic writes, and the OfflineDataset helpers (scores, subsets, describe)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import minari
import numpy as np
import pytest
from gymnasium.spaces import Box, Dict
from minari.data_collector import EpisodeBuffer

from diffrl.data import formats
from diffrl.data.datasets import (
    DatasetError,
    OfflineDataset,
    detect_format,
    load_dataset,
    save_dataset,
    validate,
)
from diffrl.eval import dataset_normalized_score, describe_dataset

META = {"env_id": "Hopper-v5", "kind": "medium", "preset": "quick", "seed": 3, "ref_min_score": -20.0,
        "ref_max_score": 3234.3, "budget": [1, 2]}


@pytest.fixture(autouse=True)
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def make_ds(lengths=(4, 3, 2), ends=("timeout", "terminal", "timeout"), do=3, da=2, seed=0,
            metadata=None) -> OfflineDataset:
    """Episodes of the given lengths whose next_observations continue inside each episode (Minari-storable)."""
    rng = np.random.default_rng(seed)
    obs, nxt, term, tout = [], [], [], []
    for length, end in zip(lengths, ends):
        o = rng.standard_normal((length + 1, do)).astype(np.float32)
        obs.append(o[:-1])
        nxt.append(o[1:])
        term.append(np.arange(length) == length - 1 if end == "terminal" else np.zeros(length, bool))
        tout.append(np.arange(length) == length - 1 if end == "timeout" else np.zeros(length, bool))
    n = sum(lengths)
    return OfflineDataset(np.concatenate(obs), rng.uniform(-1, 1, (n, da)).astype(np.float32),
                          rng.standard_normal(n).astype(np.float32), np.concatenate(nxt), np.concatenate(term),
                          np.concatenate(tout), dict(META if metadata is None else metadata))


def assert_same(a: OfflineDataset, b: OfflineDataset) -> None:
    for k, v in a.arrays().items():
        w = getattr(b, k)
        assert v.dtype == w.dtype and np.array_equal(v, w), k
        assert v.tobytes() == w.tobytes(), k  # bit-exact, not only ==
    assert a.metadata == b.metadata


def write_h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return path


def raw_d4rl(n: int = 6, do: int = 3, da: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    timeouts = np.zeros(n, bool)
    timeouts[-1] = True
    return {"observations": rng.standard_normal((n, do)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, da)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32), "terminals": np.zeros(n, bool),
            "timeouts": timeouts}


def out_path(tmp_path: Path, fmt: str, name: str = "ds") -> str | Path:
    return {"d4rl": tmp_path / f"{name}.hdf5", "npz": tmp_path / f"{name}.npz", "minari": f"diffrl/test/{name}-v0"}[fmt]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["d4rl", "npz", "minari"])
def test_save_then_load_is_bit_exact_with_metadata(tmp_path, fmt):
    ds = make_ds()
    spec = save_dataset(ds, out_path(tmp_path, fmt), fmt)
    assert detect_format(spec) == fmt
    assert_same(ds, load_dataset(spec))


def test_chain_through_every_conversion_is_bit_exact(tmp_path):
    """d4rl->minari->npz->d4rl->npz->minari->d4rl covers all six directed conversions."""
    ds = make_ds(lengths=(5, 1, 3, 2), ends=("terminal", "timeout", "timeout", "timeout"))
    spec = save_dataset(ds, tmp_path / "a.hdf5", "d4rl")
    for i, fmt in enumerate(["minari", "npz", "d4rl", "npz", "minari", "d4rl"]):
        spec = save_dataset(load_dataset(spec), out_path(tmp_path, fmt, f"step{i}"), fmt)
    assert_same(ds, load_dataset(spec))


def test_minari_dataset_is_native_minari_with_reference_scores(minari_root):
    ds = make_ds()
    dataset_id = save_dataset(ds, "diffrl/hopper/medium-v0", "minari")
    assert list(minari.list_local_datasets()) == ["diffrl/hopper/medium-v0"]
    mds = minari.load_dataset(dataset_id)
    assert mds.total_episodes == 3 and mds.total_steps == len(ds)
    np.testing.assert_allclose(minari.get_normalized_score(mds, np.array([3234.3])), [1.0])
    ep = next(iter(mds.iterate_episodes()))
    np.testing.assert_array_equal(ep.observations, np.concatenate([ds.observations[:4], ds.next_observations[3:4]]))
    assert not [p for p in minari_root.rglob("*") if p.name.startswith(".")]  # no temporary leftovers


def test_minari_directory_path_round_trip(tmp_path):
    ds = make_ds()
    where = save_dataset(ds, tmp_path / "dirs" / "hopper-medium-v0", "minari")
    assert where == str(tmp_path / "dirs" / "hopper-medium-v0")
    assert_same(ds, load_dataset(where))
    assert_same(ds, load_dataset(Path(where) / "data"))


def test_minari_dataset_written_by_others_gets_metadata_from_minari(minari_root):
    ds = make_ds()
    buffers = formats._episode_buffers(ds.arrays(), "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("other/plain-v0", buffers, observation_space=Box(-np.inf, np.inf, (3,)),
                                           action_space=Box(-1, 1, (2,)), description="from elsewhere")
    back = load_dataset("other/plain-v0")
    assert back.metadata == {"minari_id": "other/plain-v0", "description": "from elsewhere"}
    np.testing.assert_array_equal(back.observations, ds.observations)


def test_minari_refuses_discontinuous_next_observations(tmp_path):
    ds = make_ds()
    ds.next_observations[1] += 1.0
    with pytest.raises(DatasetError, match=r"next_observations\[1\] differs from observations\[2\].*use d4rl or npz"):
        save_dataset(ds, "diffrl/test/bad-v0", "minari")
    save_dataset(ds, tmp_path / "ok.npz", "npz")  # the flat layouts can hold it


def test_minari_dict_observation_space_is_rejected(minari_root):
    buf = EpisodeBuffer(observations={"a": np.zeros((3, 2), np.float32)}, actions=np.zeros((2, 1), np.float32),
                        rewards=np.zeros(2, np.float32), terminations=np.array([False, True]),
                        truncations=np.zeros(2, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("other/dict-v0", [buf], observation_space=Dict(a=Box(-1, 1, (2,))),
                                           action_space=Box(-1, 1, (1,)))
    with pytest.raises(DatasetError, match="Dict observation space.*Box"):
        load_dataset("other/dict-v0")


# ------------------------------------------------------------------------------- derived fields on reading


def qlearning_dataset_reference(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The loop of d4rl.qlearning_dataset(terminate_on_end=False) (d4rl/__init__.py), with timeouts."""
    keep = [i for i in range(len(raw["rewards"]) - 1) if not raw["timeouts"][i]]
    return {"observations": raw["observations"][keep], "next_observations": raw["observations"][[i + 1 for i in keep]],
            "actions": raw["actions"][keep], "rewards": raw["rewards"][keep], "terminals": raw["terminals"][keep]}


def test_d4rl_without_next_observations_reads_like_qlearning_dataset(tmp_path):
    raw = raw_d4rl(n=9)
    raw["terminals"] = np.isin(np.arange(9), [4]).astype(np.float32)[:, None]  # (N, 1) floats, squeezed
    raw["rewards"] = raw["rewards"][:, None]
    raw["timeouts"] = np.isin(np.arange(9), [2, 8])  # episodes [0-2] timeout, [3-4] terminal, [5-8] timeout
    ds = load_dataset(write_h5(tmp_path / "q.hdf5", **raw))
    flat = {k: (v[:, 0] if k in ("rewards", "terminals") else v) for k, v in raw.items()}
    ref = qlearning_dataset_reference(flat)
    assert len(ds) == 7  # the two timeout transitions have no successor and are dropped
    for k in ("observations", "actions", "rewards"):
        np.testing.assert_array_equal(getattr(ds, k), ref[k])
    np.testing.assert_array_equal(ds.terminals, ref["terminals"].astype(bool))
    live = ~ds.terminals  # a terminal's successor is never bootstrapped: we store obs[i] itself
    np.testing.assert_array_equal(ds.next_observations[live], ref["next_observations"][live])
    np.testing.assert_array_equal(ds.next_observations[3], flat["observations"][4])
    assert ds.timeouts.nonzero()[0].tolist() == [1, 6]  # the transition before each dropped one
    assert [s.stop - s.start for s in ds.episode_slices()] == [2, 2, 3]


def test_d4rl_without_timeouts_ends_with_one_timeout(tmp_path):
    raw = raw_d4rl(n=5)
    del raw["timeouts"]
    raw["next_observations"] = raw["observations"] + 1
    ds = load_dataset(write_h5(tmp_path / "t.hdf5", **raw))
    assert len(ds) == 5 and ds.timeouts.tolist() == [False] * 4 + [True]
    raw.pop("next_observations")
    assert len(load_dataset(write_h5(tmp_path / "u.hdf5", **raw))) == 4  # the last one has no successor


def test_dppo_npz_minimal_layout_builds_successors_per_trajectory(tmp_path):
    rng = np.random.default_rng(0)
    states = rng.standard_normal((7, 3)).astype(np.float32)
    np.savez(tmp_path / "dppo.npz", states=states, actions=np.zeros((7, 2), np.float32),
             rewards=np.arange(7, dtype=np.float32), traj_lengths=np.array([3, 4]))
    ds = load_dataset(tmp_path / "dppo.npz")
    assert len(ds) == 5 and ds.metadata == {}
    np.testing.assert_array_equal(ds.rewards, [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(ds.next_observations, states[[1, 2, 4, 5, 6]])
    assert ds.timeouts.nonzero()[0].tolist() == [1, 4] and not ds.terminals.any()


def test_npz_without_rewards_loads_only_for_behaviour_cloning(tmp_path):
    np.savez(tmp_path / "bc.npz", states=np.zeros((4, 3), np.float32), actions=np.zeros((4, 2), np.float32),
             traj_lengths=np.array([4]))
    with pytest.raises(DatasetError, match="bc.npz has no 'rewards'.*require_rewards=False"):
        load_dataset(tmp_path / "bc.npz")
    ds = load_dataset(tmp_path / "bc.npz", require_rewards=False)
    assert len(ds) == 3 and not ds.rewards.any()


def test_synther_npz_layout_is_one_run_ending_at_the_last_row(tmp_path):
    raw = raw_d4rl(n=5)
    raw.pop("timeouts")
    raw["next_observations"] = raw["observations"] * 2
    np.savez(tmp_path / "synther.npz", **raw)
    ds = load_dataset(tmp_path / "synther.npz")
    np.testing.assert_array_equal(ds.next_observations, raw["next_observations"])
    assert ds.timeouts.tolist() == [False] * 4 + [True] and len(ds.episode_slices()) == 1


# ------------------------------------------------------------------------------------------- validation


BAD_D4RL = {  # what is wrong -> (change to a good raw file, expected message)
    "missing key": (lambda r: r.pop("actions"), r"bad.hdf5 lacks required key\(s\) 'actions'"),
    "length": (lambda r: r.update(actions=r["actions"][:-1]), r"'actions' has 5 rows but 'observations' has 6"),
    "rewards (N, 2)": (lambda r: r.update(rewards=np.zeros((6, 2))), r"'rewards' has shape \(6, 2\); expected \(N,\)"),
    "obs 1-D": (lambda r: r.update(observations=np.zeros(6)), r"'observations' has shape \(6,\); expected \(N, D\)"),
    "strings": (lambda r: r.update(actions=np.full((6, 2), "a", dtype="S1")), r"'actions' has non-numeric dtype \|S1"),
    "terminal 2": (lambda r: r.update(terminals=np.array([0, 0, 2, 0, 0, 0])),
                   r"'terminals' must hold only 0/1 but has 2 at index 2"),
    "timeout 0.5": (lambda r: r.update(timeouts=np.array([0, 0.5, 0, 0, 0, 1])),
                    r"'timeouts' must hold only 0/1 but has 0.5 at index 1"),
    "nan obs": (lambda r: r["observations"].__setitem__((3, 1), np.nan),
                r"'observations' has a non-finite value \(nan\) at index 3 \(column 1\)"),
    "inf reward": (lambda r: r["rewards"].__setitem__(4, np.inf),
                   r"'rewards' has a non-finite value \(inf\) at index 4"),
    "empty": (lambda r: r.update({k: v[:0] for k, v in r.items()}), r"bad.hdf5 holds no transitions"),
}


@pytest.mark.parametrize("case", list(BAD_D4RL))
def test_d4rl_file_errors_name_file_key_and_index(tmp_path, case):
    change, match = BAD_D4RL[case]
    raw = raw_d4rl()
    change(raw)
    with pytest.raises(DatasetError, match=match):
        load_dataset(write_h5(tmp_path / "bad.hdf5", **raw))


def test_npz_errors_name_trajectory_lengths_and_layout(tmp_path):
    np.savez(tmp_path / "a.npz", states=np.zeros((4, 3)), actions=np.zeros((4, 2)), rewards=np.zeros(4),
             traj_lengths=np.array([2, 3]))
    with pytest.raises(DatasetError, match="'traj_lengths' sums to 5 but 'states' has 4 rows"):
        load_dataset(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", foo=np.zeros(3))
    with pytest.raises(DatasetError, match="neither 'states'.*nor 'observations'.*'foo'"):
        load_dataset(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", states=np.zeros((4, 3)), actions=np.zeros((3, 2)), rewards=np.zeros(4),
             traj_lengths=np.array([4]))
    with pytest.raises(DatasetError, match="c.npz: 'actions' has 3 rows but 'states' has 4"):
        load_dataset(tmp_path / "c.npz")
    np.save(tmp_path / "d.npy", np.zeros(3))  # an .npy renamed .npz, and a text file: neither is unpickled
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_text("garbage")
    for name in ("d.npz", "e.npz"):
        with pytest.raises(DatasetError, match=f"{name} is not an npz archive"):
            load_dataset(tmp_path / name)


def test_unknown_ids_and_paths_say_what_exists_and_how_to_build(tmp_path):
    save_dataset(make_ds(), "diffrl/test/there-v0", "minari")
    with pytest.raises(DatasetError, match=r"no dataset 'diffrl/test/nope-v0'.*local ids: diffrl/test/there-v0.*"
                                           r"diffrl data collect"):
        load_dataset("diffrl/test/nope-v0")
    with pytest.raises(DatasetError, match="missing.hdf5 does not exist"):
        load_dataset(tmp_path / "missing.hdf5")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="notes.txt is a file of unknown type"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="is a directory but not a Minari dataset"):
        load_dataset(tmp_path)
    (tmp_path / "junk.hdf5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="junk.hdf5 is not a readable HDF5 file"):
        load_dataset(tmp_path / "junk.hdf5")


def test_validate_rejects_wrong_dtype_and_open_final_episode():
    ds = make_ds()
    ds.observations = ds.observations.astype(np.float64)
    with pytest.raises(DatasetError, match="'observations' has dtype float64; OfflineDataset holds float32"):
        validate(ds)
    ds = make_ds()
    ds.timeouts[-1] = False
    with pytest.raises(DatasetError, match=r"final transition \(index 8\) is neither terminal nor timeout"):
        validate(ds)


def test_hopper_dataset_with_matching_dims_and_bounds_loads(tmp_path):
    ds = make_ds(do=11, da=3)
    ds.actions[0, 0] = 1.0 + 1e-7  # within the float32 slack
    spec = save_dataset(ds, tmp_path / "hopper.hdf5", "d4rl")
    assert len(load_dataset(spec, env_id="Hopper-v5")) == len(ds)


@pytest.mark.parametrize("do, da, match", [
    (5, 3, r"observations have 5 dims but Hopper-v5 observes shape \(11,\)"),
    (11, 2, r"actions have 2 dims but Hopper-v5 takes shape \(3,\)"),
], ids=["obs", "act"])
def test_dims_that_disagree_with_env_are_rejected(tmp_path, do, da, match):
    spec = save_dataset(make_ds(do=do, da=da), tmp_path / "h.npz", "npz")
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec, env_id="Hopper-v5")


def test_actions_outside_env_bounds_name_index_and_dim(tmp_path):
    ds = make_ds(do=11, da=3)
    ds.actions[5, 2] = 1.5
    spec = save_dataset(ds, tmp_path / "h.hdf5", "d4rl")
    with pytest.raises(DatasetError, match=r"h.hdf5: action 1.5 at index 5 \(dim 2\) lies outside Hopper-v5's bounds "
                                           r"\[-1, 1\]; .*rescale"):
        load_dataset(spec, env_id="Hopper-v5")
    with pytest.raises(DatasetError, match=r"action 1.5 at index 5 \(dim 2\) lies outside the given action space"):
        validate(ds, action_space=Box(-1, 1, (3,)))
    validate(ds, action_space=Box(-2, 2, (3,)))


# ---------------------------------------------------------------------------------------- atomic writes


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_failed_d4rl_write_leaves_nothing(tmp_path, monkeypatch):
    real = formats._write_hdf5

    def half_then_fail(path, arrays, text):
        real(path, arrays, text)
        raise RuntimeError("disk full")

    monkeypatch.setattr(formats, "_write_hdf5", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_dataset(make_ds(), tmp_path / "out" / "x.hdf5", "d4rl")
    assert entries(tmp_path / "out") == []


def test_failed_npz_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(f, **arrays):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(formats.np, "savez", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_dataset(make_ds(), tmp_path / "out" / "x.npz", "npz")
    assert entries(tmp_path / "out") == []


def test_failed_minari_write_leaves_nothing(minari_root, monkeypatch):
    real = minari.create_dataset_from_buffers

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        save_dataset(make_ds(), "diffrl/test/x-v0", "minari")
    assert os.environ["MINARI_DATASETS_PATH"] == str(minari_root)  # the redirect was undone
    assert minari.list_local_datasets() == {}
    assert not [p for p in minari_root.rglob("*") if p.is_file() or p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["d4rl", "npz", "minari"])
def test_existing_destination_is_never_overwritten_unless_asked(tmp_path, fmt):
    first, second = make_ds(seed=0), make_ds(seed=1)
    spec = save_dataset(first, out_path(tmp_path, fmt), fmt)
    with pytest.raises(DatasetError, match="already exists; choose another destination or pass overwrite=True"):
        save_dataset(second, out_path(tmp_path, fmt), fmt)
    assert_same(first, load_dataset(spec))
    save_dataset(second, out_path(tmp_path, fmt), fmt, overwrite=True)
    assert_same(second, load_dataset(spec))


def test_save_rejects_wrong_suffix_bad_metadata_and_bad_minari_name(tmp_path):
    with pytest.raises(DatasetError, match="does not end in .npz"):
        save_dataset(make_ds(), tmp_path / "out" / "x.hdf5", "npz")
    with pytest.raises(DatasetError, match="metadata is not JSON-serializable"):
        save_dataset(make_ds(metadata={"bad": object()}), tmp_path / "out" / "x.hdf5", "d4rl")
    with pytest.raises(DatasetError, match="not a valid Minari dataset name"):
        save_dataset(make_ds(), "no_version", "minari")
    assert entries(tmp_path / "out") == []


# ------------------------------------------------------------------------------------ dataset helpers


def test_normalized_score_is_d4rl_formula_times_100():
    ds = make_ds(metadata={"ref_min_score": -20.0, "ref_max_score": 180.0})
    np.testing.assert_allclose(dataset_normalized_score(ds, np.array([-20.0, 80.0, 180.0, 380.0])), [0, 50, 100, 200])
    with pytest.raises(DatasetError, match="no usable reference scores.*diffrl data collect"):
        dataset_normalized_score(make_ds(metadata={}), 1.0)


def test_subset_episodes_keeps_whole_episodes_deterministically():
    ds = make_ds(lengths=tuple(range(1, 11)), ends=("timeout", "terminal") * 5)
    originals = {ds.observations[s].tobytes() for s in ds.episode_slices()}
    sub = ds.subset_episodes(0.3, seed=7)
    assert len(sub.episode_slices()) == 3
    for s in sub.episode_slices():
        assert sub.observations[s].tobytes() in originals
        assert sub.terminals[s][:-1].sum() + sub.timeouts[s][:-1].sum() == 0
    assert_same(sub, ds.subset_episodes(0.3, seed=7))
    assert len(ds.subset_episodes(0.01, seed=0).episode_slices()) == 1
    validate(sub)
    with pytest.raises(DatasetError, match=r"fraction must be in \(0, 1\]"):
        ds.subset_episodes(0.0, seed=0)


def test_describe_reports_episode_returns_and_normalized_scores():
    ds = make_ds(lengths=(2, 3), ends=("terminal", "timeout"), metadata={"env_id": "Hopper-v5",
                                                                       "ref_min_score": 0.0, "ref_max_score": 10.0})
    ds.rewards[:] = [1, 2, 3, 3, 4]
    ds.actions[:] = 0.25
    ds.actions[1, 0] = -0.5
    info = describe_dataset(ds)
    assert info["episodes"] == 2 and info["transitions"] == 5 and (info["obs_dim"], info["act_dim"]) == (3, 2)
    assert (info["return_mean"], info["return_std"], info["return_min"], info["return_max"]) == (6.5, 3.5, 3.0, 10.0)
    assert (info["normalized_min"], info["normalized_max"]) == (30.0, 100.0)
    assert (info["terminals"], info["timeouts"], info["env_id"]) == (1, 1, "Hopper-v5")
    assert (info["action_min"], info["action_max"]) == (-0.5, 0.25)
    assert "normalized_mean" not in describe_dataset(make_ds(metadata={}))


def test_to_batch_uses_terminals_as_done_not_timeouts():
    ds = make_ds()
    batch = ds.to_batch().validate()
    assert set(batch) == {"obs", "act", "rew", "next_obs", "done"} and len(batch) == len(ds)
    assert batch.done.tolist() == ds.terminals.astype(float).tolist()
    assert batch.done.sum() == 1 and ds.timeouts.sum() == 2


def test_detect_format_by_suffix():
    assert [detect_format(s) for s in ("a.hdf5", "b.H5", "c.npz", "diffrl/hopper/medium-v0")] == [
        "d4rl", "d4rl", "npz", "minari"]


def test_iql_reward_scale_warns_when_the_return_spread_is_narrow() -> None:
    import dataclasses
    import warnings

    from diffrl.pipelines.offline import reward_scale

    ds = make_ds(lengths=(500, 500, 500), ends=("timeout",) * 3)
    wide = dataclasses.replace(ds, rewards=np.repeat(np.float32([0.1, 1.0, 3.0]), 500))  # D4RL-like: returns 50-1500
    narrow = dataclasses.replace(ds, rewards=np.repeat(np.float32([3.0, 3.01, 3.02]), 500))  # returns 1500-1510
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reward_scale(wide) == pytest.approx(1000 / 1450)
    with pytest.warns(UserWarning, match=r"scales rewards by 100\.0 because this dataset's episode returns span only"):
        assert reward_scale(narrow) == pytest.approx(100.0, rel=1e-3)
