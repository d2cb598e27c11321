"""Checkpoint format (safetensors + JSON, atomic, pruned, never pickle) and global RNG capture/restore."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from diffrl.errors import CheckpointError
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.checkpoint import flatten_tree, load_checkpoint, save_checkpoint, unflatten_tree
from diffrl.runs.seeding import derive_seed, get_rng_state, seed_everything, set_rng_state


def nested_tree() -> dict:
    return {
        "net": {"w": torch.randn(3, 4), "b": torch.arange(4, dtype=torch.int64), "flag": torch.tensor(True)},
        "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}, 1: {"step": 7}},
                  "param_groups": [{"lr": 3e-4, "params": [0, 1], "betas": (0.9, 0.999), "fused": None}]},
        "arrays": [np.arange(6, dtype=np.float64).reshape(2, 3), np.zeros((0, 2), dtype=np.float32)],
        "tup": (1, "two", None, True, 2.5),
        "scalars": {"i": 5, "f": -float("inf"), "s": "text", "n": None, "b": False, "np": np.float32(1.5)},
        "empty": {},
    }


def assert_tree_equal(a, b, path="/"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path  # keys, their types and order
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}{k}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}{i}/")
    else:
        assert a == b, path


def expected_after_round_trip(tree: dict) -> dict:
    out = dict(tree)
    out["scalars"] = {**tree["scalars"], "np": 1.5}  # NumPy scalars become Python numbers
    return out


def test_flatten_unflatten_round_trips_nested_tree_through_json():
    tree = nested_tree()
    skeleton, tensors = flatten_tree(tree)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    skeleton = json.loads(json.dumps(skeleton))  # the skeleton must survive JSON (int keys, tuples)
    assert_tree_equal(unflatten_tree(skeleton, tensors), expected_after_round_trip(tree))


def test_flatten_copies_tensors_so_later_in_place_changes_do_not_leak():
    t = torch.zeros(3)
    _, tensors = flatten_tree({"t": t})
    t.add_(1)
    assert torch.equal(next(iter(tensors.values())), torch.zeros(3))


def test_flatten_rejects_unsupported_leaf_with_its_path():
    with pytest.raises(TypeError, match="/a/obj"):
        flatten_tree({"a": {"obj": object()}})


def test_flatten_keys_containing_slash_do_not_collide():
    tree = {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    skeleton, tensors = flatten_tree(tree)
    assert_tree_equal(unflatten_tree(skeleton, tensors), tree)


def test_save_then_load_returns_equal_parts_and_meta(tmp_path):
    tree = nested_tree()
    final = save_checkpoint(tmp_path, 10, {"state": tree, "buffer": {"x": torch.ones(5)}}, meta={"env": "X"})
    assert final == tmp_path / "step-000000010"
    manifest, parts = load_checkpoint(tmp_path)
    assert manifest["step"] == 10 and manifest["meta"] == {"env": "X"}
    assert "torch" in manifest["versions"]
    assert_tree_equal(parts["state"], expected_after_round_trip(tree))
    assert torch.equal(parts["buffer"]["x"], torch.ones(5))
    _, only = load_checkpoint(final, parts=("buffer",))
    assert set(only) == {"buffer"}


def test_load_of_missing_part_raises_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"state": {"x": 1}})
    with pytest.raises(CheckpointError, match="no part 'buffer'"):
        load_checkpoint(tmp_path, parts=("buffer",))


def test_load_accepts_run_dir_checkpoints_dir_and_step_dir(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save_checkpoint(root, 3, {"state": {"v": torch.tensor(3)}})
    for path in (tmp_path / "run", root, root / "step-000000003"):
        manifest, _ = load_checkpoint(path)
        assert manifest["step"] == 3


def test_latest_points_at_newest_and_keep_last_prunes_old_steps(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"state": {"step": torch.tensor(step)}}, keep_last=2)
    assert os.readlink(tmp_path / "latest") == "step-000000004"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000003", "step-000000004"]
    _, parts = load_checkpoint(tmp_path)
    assert int(parts["state"]["step"]) == 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"s": {"x": 1}}, keep_last=0)
    assert len(list(tmp_path.glob("step-*"))) == 3


def test_resaving_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"s": {"x": torch.tensor(1)}})
    save_checkpoint(tmp_path, 5, {"s": {"x": torch.tensor(2)}})
    _, parts = load_checkpoint(tmp_path)
    assert int(parts["s"]["x"]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_killed_mid_write_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"state": {"x": torch.tensor(1)}, "buffer": {"y": torch.ones(2)}})
    calls = []

    def dies_on_second_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, filename, *args, **kwargs)

    real_save = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"state": {"x": torch.tensor(2)}, "buffer": {"y": torch.zeros(2)}})
    assert os.readlink(tmp_path / "latest") == "step-000000001"
    assert not (tmp_path / "step-000000002").exists()
    manifest, parts = load_checkpoint(tmp_path)
    assert manifest["step"] == 1 and int(parts["state"]["x"]) == 1
    # a later save succeeds despite the leftover temporary directory
    monkeypatch.setattr(ckpt, "save_file", real_save)
    save_checkpoint(tmp_path, 2, {"state": {"x": torch.tensor(2)}})
    assert int(load_checkpoint(tmp_path)[1]["state"]["x"]) == 2


def test_leftover_temporary_dir_with_garbage_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, {"state": {"x": torch.tensor(1)}})
    junk = tmp_path / ".tmp-step-000000009-12345"
    junk.mkdir()
    (junk / "manifest.json").write_text("{garbage")
    (junk / "state.safetensors").write_bytes(b"\x00\x01")
    manifest, _ = load_checkpoint(tmp_path)
    assert manifest["step"] == 1


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 999, "parts": {}}'])
def test_corrupt_manifest_raises_checkpoint_error_naming_the_file(tmp_path, content):
    final = save_checkpoint(tmp_path, 1, {"state": {"x": torch.tensor(1)}})
    (final / "manifest.json").write_text(content)
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(final)


def test_truncated_safetensors_raises_checkpoint_error_naming_the_file(tmp_path):
    final = save_checkpoint(tmp_path, 1, {"state": {"x": torch.arange(1000.0)}})
    f = final / "state.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_checkpoint(final)


def test_missing_safetensors_file_raises_checkpoint_error(tmp_path):
    final = save_checkpoint(tmp_path, 1, {"state": {"x": torch.ones(1)}})
    (final / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_checkpoint(final)


def test_manifest_referencing_absent_tensor_raises_checkpoint_error(tmp_path):
    final = save_checkpoint(tmp_path, 1, {"state": {"x": torch.ones(1)}})
    manifest = json.loads((final / "manifest.json").read_text())
    manifest["parts"]["state"]["__map__"]["y"] = {"__tensor__": "/y"}
    (final / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load_checkpoint(final)


def test_nonexistent_path_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoint_holds_only_json_and_safetensors_and_loads_without_pickle(tmp_path, monkeypatch):
    final = save_checkpoint(tmp_path, 1, {"state": nested_tree(), "rng": get_rng_state()})
    assert {p.suffix for p in final.iterdir()} == {".json", ".safetensors"}

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading used pickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, forbidden)
    _, parts = load_checkpoint(final)
    assert set(parts) == {"state", "rng"}


# -------------------------------------------------------------------------------------------------- RNG
def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip_reproduces_draws_from_every_generator():
    seed_everything(11)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's generator state
    state = get_rng_state()
    first = draws()
    set_rng_state(state)
    assert draws() == first


def test_rng_state_round_trip_through_checkpoint_reproduces_draws(tmp_path):
    seed_everything(5)
    np.random.normal()  # cached Gaussian in NumPy's legacy generator
    save_checkpoint(tmp_path, 1, {"rng": get_rng_state()})
    first = draws()
    seed_everything(999)
    set_rng_state(load_checkpoint(tmp_path)[1]["rng"])
    assert draws() == first


def test_seed_everything_same_seed_same_draws_and_other_seed_differs():
    seed_everything(3)
    a = draws()
    seed_everything(3)
    assert draws() == a
    seed_everything(4)
    assert draws() != a


def test_derive_seed_is_deterministic_31_bit_and_key_sensitive():
    s = derive_seed(0, 1, 2)
    assert s == derive_seed(0, 1, 2) and 0 <= s < 2**31
    assert len({derive_seed(0, i, k) for i in range(4) for k in range(4)}) == 16


def test_checkpoint_dir_listing_is_ordered_by_step(tmp_path):
    for step in (100, 9, 20):
        save_checkpoint(tmp_path, step, {"s": {"x": 1}}, keep_last=0)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.step_dir_name(s) for s in (9, 20, 100)]


def test_a_checkpoint_of_another_env_is_refused_in_one_sentence(tmp_path):
    manifest = {"meta": {"env": {"env_id": "Hopper-v5"}}}
    ckpt.check_env(manifest, {"env_id": "Hopper-v5"}, tmp_path)  # the same env passes
    with pytest.raises(CheckpointError, match=r"written for \{'env_id': 'Hopper-v5'\}, not .*Walker2d.*; nothing was"):
        ckpt.check_env(manifest, {"env_id": "Walker2d-v5"}, tmp_path, resume=True)


def test_weights_of_another_layout_are_one_sentence_naming_the_source() -> None:
    from diffrl.runs.checkpoint import load_weights

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    old_layout = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()  # keys 0, 1
    with pytest.raises(CheckpointError, match=r"weights in runs/x do not fit .*Missing key\(s\)"):
        load_weights(net, old_layout, "runs/x")
    load_weights(net, net.state_dict(), "runs/x")  # a matching state loads


def test_a_run_started_before_a_config_field_existed_resumes_only_at_its_default(tmp_path) -> None:
    import dataclasses
    from typing import ClassVar

    from diffrl.runs.rundir import check_resumable, write_config

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        RESUMABLE: ClassVar[frozenset[str]] = frozenset({"steps"})
        steps: int = 10
        lr: float = 1e-3
        added_later: str = "clip"
        hidden: tuple = dataclasses.field(default_factory=lambda: (64, 64))

    write_config(tmp_path, "p", {"steps": 10, "lr": 1e-3})  # written before the last two fields existed
    check_resumable(tmp_path, "p", Cfg(steps=20))
    with pytest.raises(CheckpointError, match="added_later='reject'"):
        check_resumable(tmp_path, "p", Cfg(added_later="reject"))
    with pytest.raises(CheckpointError, match="hidden"):
        check_resumable(tmp_path, "p", Cfg(hidden=(8,)))
    with pytest.raises(CheckpointError, match="lr=0.1"):
        check_resumable(tmp_path, "p", Cfg(lr=0.1))
    with pytest.raises(CheckpointError, match="is a p run and cannot be resumed by q"):
        check_resumable(tmp_path, "q", Cfg())


def test_a_run_resumes_with_another_spelling_of_the_same_path_not_with_another_path(tmp_path, monkeypatch) -> None:
    import dataclasses
    from typing import ClassVar

    from diffrl.runs.rundir import check_resumable, write_config

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        RESUMABLE: ClassVar[frozenset[str]] = frozenset()
        policy: str = "runs/a/policy"

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, "p", {"policy": "runs/a/policy"})  # a sweep's local runner: relative to the driver's cwd
    check_resumable(run, "p", Cfg(policy=str(tmp_path / "runs/a/policy")))  # its Ray runner: absolute
    check_resumable(run, "p", Cfg(policy="runs/a/../a/policy"))
    with pytest.raises(CheckpointError, match="policy="):
        check_resumable(run, "p", Cfg(policy=str(tmp_path / "runs/b/policy")))
