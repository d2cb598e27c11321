"""Offline data and offline RL end to end through the CLI: collect, info, convert, train, eval, resume."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.cli import main
from diffrl.data import fingerprint, load_dataset
from diffrl.pipelines.offline import MAX_SCALED_REWARD
from diffrl.runs.logger import read_metrics

TINY_COLLECT = ["--env", "Hopper-v5", "--expert-steps", "600", "--transitions", "300", "--no-progress"]
TINY_OFFLINE = ["--steps", "200", "--batch-size", "32", "--eval-every", "100", "--eval-episodes", "1",
                "--log-every", "50", "--no-progress"]
NETS = {"bc": ["--hidden", "32", "32"], "td3bc": ["--hidden", "32", "32"], "iql": ["--hidden", "32", "32"],
        "cql": ["--hidden", "32", "32", "--critic-hidden", "32", "32", "--cql-n-actions", "4"],
        "edac": ["--hidden", "32", "32", "--critic-hidden", "32", "32", "--num-critics", "3", "--target-subset", "3"],
        "dql": ["--denoiser-hidden", "32", "--critic-hidden", "32", "32", "--eval-candidates", "4", "--ema-start",
                "20"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offline")


@pytest.fixture(scope="module")
def medium(workdir) -> Path:
    """A tiny Hopper 'medium' dataset (the SAC run behind it is cached for the other kinds)."""
    out = workdir / "hopper-medium.hdf5"
    assert main(["data", "collect", *TINY_COLLECT, "--kind", "medium", "--out", str(out),
                 "--experts-dir", str(workdir / "experts")]) == 0
    return out


def test_collect_records_reference_returns_and_keeps_timeouts_apart_from_terminals(medium):
    ds = load_dataset(medium, env_id="Hopper-v5")
    meta = ds.metadata
    assert len(ds) == 300 and meta["kind"] == "medium" and meta["preset"] == "quick"
    assert meta["ref_max_score"] > meta["ref_min_score"]
    assert "NOT D4RL's sizes" in meta["budget_note"]
    # medium is chosen by the return of the policy that records the data (stochastic), not its mean action
    assert meta["medium"]["selected_by"].startswith("stochastic") and "stochastic_return" in meta["medium"]
    assert ds.timeouts[-1] or ds.terminals[-1]
    assert not np.any(ds.terminals & ds.timeouts)
    # inside an episode the next observation is the following observation
    ends = ds.terminals | ds.timeouts
    assert np.array_equal(ds.next_observations[:-1][~ends[:-1]], ds.observations[1:][~ends[:-1]])
    assert (medium.parent / "hopper-medium.hdf5.policies" / "expert.safetensors").is_file()
    # the expert is the SAC run's best-evaluated checkpoint (the latest of equals), not simply its last one
    evals = {int(r["step"]): r["eval/return_mean"] for r in read_metrics(Path(meta["expert"]["run_dir"]))
             if r["eval/return_mean"] == r["eval/return_mean"]}
    best = max(evals.values())
    assert meta["expert"]["env_steps"] == max(s for s, v in evals.items() if v == best)
    assert meta["expert"]["eval_return"] == best


def test_a_dataset_does_not_depend_on_what_ran_before_in_the_process(workdir, medium):
    # `medium` was built in the process that trained the expert; built again from the cached expert after other
    # draws from torch's generator, the stochastic medium policy must record the same transitions
    torch.manual_seed(123)
    torch.rand(17)
    again = workdir / "hopper-medium-again.hdf5"
    assert main(["data", "collect", *TINY_COLLECT, "--kind", "medium", "--out", str(again),
                 "--experts-dir", str(workdir / "experts")]) == 0
    assert fingerprint(load_dataset(again)) == fingerprint(load_dataset(medium))


@pytest.mark.parametrize("kind", ["random", "expert", "medium-replay", "medium-expert"])
def test_every_recipe_builds_a_valid_dataset_reusing_the_cached_expert(workdir, medium, kind):
    out = workdir / f"hopper-{kind}.npz"
    assert main(["data", "collect", *TINY_COLLECT, "--kind", kind, "--out", str(out),
                 "--experts-dir", str(workdir / "experts")]) == 0
    ds = load_dataset(out, env_id="Hopper-v5")
    meta = ds.metadata
    if kind == "medium-expert":
        assert len(ds) == 600
    elif kind == "medium-replay":  # the SAC replay buffer up to the medium snapshot
        assert len(ds) == meta["medium"]["env_steps"]
    else:
        assert len(ds) == 300
    assert meta["ref_max_score"] == load_dataset(medium).metadata["ref_max_score"]  # same expert, same refs


def test_data_info_and_convert_round_trip_through_the_cli(workdir, medium, capsys):
    assert main(["data", "info", str(medium), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transitions"] == 300 and "normalized_mean" in info and "return_mean" in info
    target = workdir / "converted.npz"
    assert main(["data", "convert", str(medium), "--to", "npz", "--out", str(target)]) == 0
    a, b = load_dataset(medium), load_dataset(target)
    for k, v in a.arrays().items():
        assert np.array_equal(v, b.arrays()[k])
    assert main(["data", "convert", str(medium), "--to", "npz", "--out", str(target)]) == 2  # exists: refused


@pytest.mark.parametrize("algo", ["bc", "td3bc", "iql", "cql", "edac", "dql"])
def test_offline_agent_trains_evaluates_and_reports_normalized_scores(workdir, medium, algo, capsys):
    run_dir = workdir / f"run-{algo}"
    # IQL scales rewards by 1000 / return spread: where this tiny dataset's returns span so little that the scaled
    # rewards pass MAX_SCALED_REWARD per step, that is said aloud (reward_scale's own unit test covers both sides)
    ds = load_dataset(medium)
    returns = ds.episode_returns()
    narrow = 1000.0 / float(returns.max() - returns.min()) * float(np.abs(ds.rewards).mean()) > MAX_SCALED_REWARD
    expect = (pytest.warns(UserWarning, match="scales rewards by") if algo == "iql" and narrow
              else contextlib.nullcontext())
    with expect:
        assert main(["offline", algo, "--dataset", str(medium), "--run-dir", str(run_dir), *TINY_OFFLINE,
                     *NETS[algo]]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gradient_steps"] == 200 and summary["normalized_score"] is not None
    meta = load_dataset(medium).metadata
    assert summary["dataset_fingerprint"] == fingerprint(load_dataset(medium))  # a result row names its data
    expected = 100 * (summary["eval_return_mean"] - meta["ref_min_score"]) / (meta["ref_max_score"] -
                                                                              meta["ref_min_score"])
    assert summary["normalized_score"] == pytest.approx(expected)
    assert summary["best_score"] >= summary["normalized_score"] - 1e-9
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200] and rows[1]["eval/normalized_score"] != ""
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0  # same evaluate(), same normaliser
    assert f"return {summary['eval_return_mean']:.1f}" in capsys.readouterr().out


def test_offline_resume_reproduces_the_uninterrupted_run(workdir, medium):
    args = ["offline", "td3bc", "--dataset", str(medium), *TINY_OFFLINE, *NETS["td3bc"]]
    main([*args, "--run-dir", str(workdir / "full")])
    main([*args, "--run-dir", str(workdir / "split"), "--steps", "100"])
    main(["offline", "td3bc", "--resume", str(workdir / "split"), "--steps", "200", "--no-progress"])

    def curve(d: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "perf/updates_per_s")}
                for r in csv.DictReader((d / "metrics.csv").read_text().splitlines())]

    assert curve(workdir / "full") == curve(workdir / "split")


def test_offline_dql_resume_reproduces_the_uninterrupted_run(workdir, medium):
    # both runs decay the learning rates over 200 updates (by default each invocation's --steps); the EMA actor
    # averages from update 20 on, so a resume that lost its counter would copy the actor again
    args = ["offline", "dql", "--dataset", str(medium), *TINY_OFFLINE, *NETS["dql"], "--lr-decay-steps", "200"]
    main([*args, "--run-dir", str(workdir / "dql-full")])
    main([*args, "--run-dir", str(workdir / "dql-split"), "--steps", "100"])
    main(["offline", "dql", "--resume", str(workdir / "dql-split"), "--steps", "200", "--no-progress"])

    def curve(d: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "perf/updates_per_s")}
                for r in csv.DictReader((d / "metrics.csv").read_text().splitlines())]

    full = curve(workdir / "dql-full")
    assert full == curve(workdir / "dql-split") and [int(r["step"]) for r in full] == [50, 100, 150, 200]
    assert all(float(r["critic_grad_norm"]) > 0 for r in full)  # Wang et al.'s critic clipping is on


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--dataset", "/nonexistent/data.hdf5"], "/nonexistent/data.hdf5"),
     (["--env", "HalfCheetah-v5"], "HalfCheetah-v5"),
     (["--dataset", "nobody/nothing-v0"], "diffrl data collect")])
def test_bad_offline_inputs_get_one_sentence(workdir, medium, capsys, extra, message):
    args = ["offline", "bc", "--dataset", str(medium), "--run-dir", str(workdir / "bad"), *TINY_OFFLINE, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "bad").exists()


class MarkedAugment:
    """A toy :class:`~diffrl.pipelines.offline.OfflineAugment`: each call refills the model buffer with the real
    buffer's first rows, their reward replaced by a marker (1000 + the step it fired at), and takes a further quarter
    of each batch from the model buffer (a quarter after the first call, half from the second on)."""

    every, capacity = 4, 30

    def __init__(self) -> None:
        self.fired: list[int] = []

    def __call__(self, step, ctx) -> dict[str, float]:
        self.fired.append(step)
        rows = {k: v[: self.capacity] for k, v in ctx.real.all().items()}
        ctx.model.add_batch(**{**rows, "rew": torch.full((self.capacity,), 1000.0 + step)})
        return {"augment/fills": float(len(self.fired))}

    def real_ratio(self, step: int) -> float:
        return 1.0 - 0.25 * min(len(self.fired), 2)

    def state_dict(self) -> dict:
        return {"fired": list(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.fired = list(state["fired"])


def test_offline_augment_hook_fills_the_model_buffer_on_due_steps_and_splits_batches(workdir, medium, monkeypatch):
    from diffrl.pipelines import offline

    batches: list[tuple[int, set[float]]] = []  # per update: model rows in the batch, their markers
    build = offline.build

    def spy(*args, **kwargs):
        agent = build(*args, **kwargs)
        update = agent.update

        def recording(batch):
            marked = batch["rew"] >= 999
            batches.append((int(marked.sum()), set(batch["rew"][marked].tolist())))
            return update(batch)

        agent.update = recording
        return agent

    monkeypatch.setattr(offline, "build", spy)
    cfg = offline.TD3BCConfig(dataset=str(medium), steps=14, batch_size=40, hidden=(16, 16), eval_every=0,
                              eval_episodes=1, log_every=1, progress=False, run_dir=workdir / "augment")
    augment = MarkedAugment()
    offline.run(cfg, augment=augment)
    assert augment.fired == [0, 4, 8, 12]  # before the first update, then every 4 gradient steps
    # after the first fill a quarter of each batch (10 of 40 rows) is model data, from the second on half; the
    # model rows are those of the latest fill (the buffer holds one fill)
    assert batches == [(10, {1000.0})] * 4 + [(20, {1004.0})] * 4 + [(20, {1008.0})] * 4 + [(20, {1012.0})] * 2
    rows = list(csv.DictReader((workdir / "augment" / "metrics.csv").read_text().splitlines()))
    assert [r["augment/fills"] for r in rows[:5]] == ["1.0", "", "", "", "2.0"]  # logged with the next row


def test_offline_resume_with_an_augment_hook_reproduces_the_uninterrupted_run(workdir, medium):
    from diffrl.pipelines import offline

    cfg = offline.TD3BCConfig(dataset=str(medium), steps=20, batch_size=40, hidden=(16, 16), eval_every=10,
                              eval_episodes=1, log_every=5, progress=False)
    full, split = MarkedAugment(), MarkedAugment()
    offline.run(dataclasses.replace(cfg, run_dir=workdir / "aug-full"), augment=full)
    # stopped at step 10, between the fills at 8 and 12: steps 11 and 12 draw from the restored model buffer
    offline.run(dataclasses.replace(cfg, steps=10, run_dir=workdir / "aug-split"), augment=split)
    assert split.fired == [0, 4, 8]
    resumed = MarkedAugment()
    offline.run(dataclasses.replace(cfg, resume=workdir / "aug-split"), augment=resumed)
    assert full.fired == resumed.fired == [0, 4, 8, 12, 16]

    def curve(d: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "perf/updates_per_s")}
                for r in csv.DictReader((d / "metrics.csv").read_text().splitlines())]

    assert curve(workdir / "aug-full") == curve(workdir / "aug-split")
    assert [int(r["step"]) for r in curve(workdir / "aug-full")] == [5, 10, 15, 20]


def test_offline_dql_trains_on_real_and_model_rows_through_an_augment_hook(workdir, medium):
    # Dydiff's way in: offline.run(cfg, augment=...) with Diffusion-QL as the agent
    from diffrl.pipelines import offline

    cfg = offline.DQLConfig(dataset=str(medium), steps=10, batch_size=40, denoiser_hidden=16, critic_hidden=(16, 16),
                            eval_candidates=3, eval_every=0, eval_episodes=1, log_every=5, progress=False,
                            run_dir=workdir / "dql-augment")
    augment = MarkedAugment()
    offline.run(cfg, augment=augment)
    assert augment.fired == [0, 4, 8]
    summary = json.loads((workdir / "dql-augment" / "summary.json").read_text())
    assert summary["gradient_steps"] == 10 and summary["eval_return_mean"] is not None
    rows = list(csv.DictReader((workdir / "dql-augment" / "metrics.csv").read_text().splitlines()))
    # the model rows' marker rewards (1000+) reach the TD targets
    assert float(rows[-1]["target_mean"]) > 100
