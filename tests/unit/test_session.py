"""The run session (runs/session.py): the due rule, counters / timers / generators / RNG round trips, the checks
made before anything is written, and older checkpoints whose loop fields sit at the top of the state part."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.errors import CheckpointError
from diffrl.pipelines.common import RunConfig
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.rundir import write_config
from diffrl.runs.seeding import get_rng_state
from diffrl.runs.session import RunSession, Timers, due


@dataclasses.dataclass(frozen=True)
class Cfg(RunConfig):
    seed: int = 3
    steps: int = 10
    lr: float = 0.1


@dataclasses.dataclass
class Counters:
    step: int = 0
    best: float = -np.inf
    last_eval: dict[str, float] | None = None


@pytest.mark.parametrize(("every", "before", "now", "expected"), [
    (5, 4, 5, True), (5, 5, 6, False), (5, 3, 7, True), (5, 0, 4, False), (0, 4, 5, False), (2, 1, 9, True)])
def test_due_fires_when_a_counter_crosses_a_multiple_of_the_period(every, before, now, expected):
    assert due(every, before, now) is expected


def test_due_for_steps_of_one_equals_the_modulo_rule():
    for every in (1, 3, 7):
        assert [due(every, s - 1, s) for s in range(1, 30)] == [s % every == 0 for s in range(1, 30)]


def test_timers_accumulate_inside_with_blocks():
    t = Timers({"a": 1.0})
    with t.time("a"):
        pass
    with t.time("b"):
        pass
    assert t["a"] >= 1.0 and t["b"] >= 0.0 and set(t) == {"a", "b"}


def _cfg(tmp_path: Path, **kw) -> Cfg:
    return Cfg(run_dir=tmp_path / "run", progress=False, **kw)


def test_save_then_resume_restores_counters_timers_generators_and_every_rng_last(tmp_path):
    cfg = _cfg(tmp_path)
    rng = np.random.default_rng(0)
    s = RunSession(cfg, "p", "env", signature={"env_id": "X"})
    c = s.start(Counters(), timers={"env_s": 0.0}, generators={"rng": rng})
    c.step, c.best, c.last_eval = 7, 2.5, {"eval/return_mean": 2.5}
    s.timers["env_s"] = 4.0
    rng.random(3)
    torch.manual_seed(11)
    s.save(7, state={"w": torch.ones(2)}, parts={"buf": {"x": np.arange(3)}})
    expected = (rng.random(), torch.rand(1).item(), random.random(), np.random.random())
    s.finish({})

    r = RunSession(dataclasses.replace(cfg, resume=tmp_path / "run", steps=20), "p", "env", signature={"env_id": "X"})
    assert r.resumed and r.step == 7 and torch.equal(r.parts["state"]["w"], torch.ones(2))
    assert r.parts["buf"]["x"].tolist() == [0, 1, 2]
    rng2 = np.random.default_rng(99)
    torch.manual_seed(0)  # disturbed after the save: start() must restore the saved states
    c2 = r.start(Counters(), timers={"env_s": 0.0}, generators={"rng": rng2})
    assert (c2.step, c2.best, c2.last_eval) == (7, 2.5, {"eval/return_mean": 2.5})
    assert r.timers["env_s"] == 4.0 and r.wall_s() > 0
    assert (rng2.random(), torch.rand(1).item(), random.random(), np.random.random()) == expected


def test_resume_refuses_another_env_other_data_or_a_changed_field_before_writing(tmp_path):
    cfg = _cfg(tmp_path)
    s = RunSession(cfg, "p", "env", signature={"env_id": "X"}, fingerprint="abc")
    s.start(Counters())
    s.save(1)
    s.finish({})
    before = (tmp_path / "run" / "config.yaml").read_text()
    resume = dataclasses.replace(cfg, resume=tmp_path / "run")
    with pytest.raises(CheckpointError, match="was written for"):
        RunSession(resume, "p", "env", signature={"env_id": "Y"}, fingerprint="abc")
    with pytest.raises(CheckpointError, match="differs from the one"):
        RunSession(resume, "p", "env", signature={"env_id": "X"}, fingerprint="xyz")
    with pytest.raises(CheckpointError, match="cannot resume .* with lr=0.5"):
        RunSession(dataclasses.replace(resume, lr=0.5), "p", "env", signature={"env_id": "X"}, fingerprint="abc")
    with pytest.raises(CheckpointError, match="cannot be resumed by q"):
        RunSession(resume, "q", "env")
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_older_checkpoints_with_loop_fields_at_the_top_of_state_still_resume(tmp_path):
    # diffrl diffusion train / dppo pretrain wrote {"rng", "wall_s", "last_eval", "timers"} into `state` directly
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, "p", dataclasses.asdict(cfg) | {"run_dir": str(run_dir), "runs_root": "runs"})
    torch.manual_seed(5)
    old_state = {"rng": get_rng_state(), "wall_s": 12.0, "last_eval": {"eval/return_mean": 1.0},
                 "timers": {"train_s": 3.0}}
    expected = torch.rand(1).item()
    ckpt.save_checkpoint(run_dir / "checkpoints", 4, {"state": old_state}, {"pipeline": "p"})
    s = RunSession(dataclasses.replace(cfg, resume=run_dir), "p", "env")
    torch.manual_seed(0)
    c = s.start(Counters())
    assert c.last_eval == {"eval/return_mean": 1.0} and s.timers["train_s"] == 3.0 and s.wall_s() >= 12.0
    assert torch.rand(1).item() == expected
