"""``diffrl sweep``: a two-arm x two-seed sweep of tiny runs with the local runner and on a local Ray instance, a
killed driver started again, a failing trial among good ones, ``sweep status`` and bad specs as one sentence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diffrl.cli import main
from diffrl.errors import ConfigError
from diffrl.runs.logger import read_metrics
from diffrl.runs.results import read_rows
from diffrl.sweep import spec_from_dict, trial_config, trials

TINY = ["--env", "Hopper-v5", "--steps", "300", "--learning-starts", "50", "--batch-size", "32", "--hidden", "32",
        "32", "--eval-every", "100", "--eval-episodes", "1", "--log-every", "50", "--checkpoint-every", "100"]
SWEEP = ["sweep", "train", "sac", *TINY, "--seeds", "0-1", "--grid", "utd=1,2", "--name", "tiny"]
TRIALS = ["utd_1-s0", "utd_1-s1", "utd_2-s0", "utd_2-s1"]


def curves(sweep_dir: Path, names: list[str] = TRIALS) -> dict[str, list[dict[str, float]]]:
    return {t: [{k: v for k, v in r.items() if k not in ("wall_s", "perf/env_steps_per_s")}
                for r in read_metrics(sweep_dir / "trials" / t)] for t in names}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweeps")
    assert main([*SWEEP, "--root", str(root), "--results", str(root / "rows.jsonl")]) == 0
    return root / "tiny"


def test_local_sweep_runs_every_arm_and_seed_and_a_second_start_runs_nothing(uninterrupted, capsys):
    got = curves(uninterrupted)
    assert all(len(rows) == 6 for rows in got.values())
    assert got["utd_1-s0"] != got["utd_2-s0"] and got["utd_1-s0"] != got["utd_1-s1"]  # arms and seeds differ
    rows = read_rows(uninterrupted.parent / "rows.jsonl")
    assert sorted(r["trial"] for r in rows) == TRIALS and {r["sweep"] for r in rows} == {"tiny"}
    row = next(r for r in rows if r["trial"] == "utd_2-s1")
    assert row["seed"] == 1 and row["config"]["utd"] == 2 and row["arm"] == "utd=2" and row["env"] == "Hopper-v5"
    evals = [(m["env_steps"], m["eval/return_mean"]) for m in read_metrics(uninterrupted / "trials" / "utd_2-s1")
             if m["eval/return_mean"] == m["eval/return_mean"]]
    assert [tuple(p) for p in row["curves"]["return_mean"]] == evals and row["curve_x"] == "env_steps"
    assert row["final"]["eval_return_mean"] == evals[-1][1] and row["wall_s"] > 0
    assert row["versions"]["torch"] and "gymnasium" in row["versions"] and "git_rev" in row and row["machine"]
    assert [s["git_rev"] for s in row["starts"]] == [row["git_rev"]]  # the driver's revision, at the trial's start
    assert main([*SWEEP, "--root", str(uninterrupted.parent), "--results", str(uninterrupted.parent / "rows.jsonl")
                 ]) == 0
    assert "4 trials, 4 finished, 0 to run" in capsys.readouterr().out
    assert len(read_rows(uninterrupted.parent / "rows.jsonl")) == 4  # finished trials are recorded once
    assert main(["sweep", "status", str(uninterrupted)]) == 0
    table = capsys.readouterr().out
    assert table.count(" done ") == 4 and "utd=2" in table and "300/300" in table


def test_killed_driver_started_again_finishes_only_the_unfinished_trials_with_identical_curves(uninterrupted,
                                                                                              tmp_path, capsys):
    cmd = [sys.executable, "-c", "import sys; from diffrl.cli import main; sys.exit(main(sys.argv[1:]))", *SWEEP,
           "--root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFRL_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "tiny" / "trials" / "utd_2-s0" / "checkpoints"  # the run order is seed-major
    deadline = time.time() + 120
    while not (second.is_dir() and any(second.glob("step-*"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = tmp_path / "tiny" / "trials" / TRIALS[0] / "summary.json"
    assert first.is_file() and not (second.parent / "summary.json").exists()
    stamp = first.stat().st_mtime_ns
    assert main([*SWEEP, "--root", str(tmp_path)]) == 0
    assert "1 finished, 3 to run" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    assert curves(tmp_path / "tiny") == curves(uninterrupted)
    starts = json.loads((second.parent / "provenance.json").read_text())  # started, killed, resumed: two starts
    assert len(starts) == 2 and all(s["git_rev"] == starts[0]["git_rev"] and s["versions"] for s in starts)


def test_two_drivers_on_one_sweep_share_its_trials(uninterrupted, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from diffrl.cli import main; sys.exit(main(sys.argv[1:]))", *SWEEP,
           "--root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFRL_PROGRESS": "0"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not list((tmp_path / "tiny" / "trials").glob("*.error")) and "failed" not in "".join(outs)
    assert curves(tmp_path / "tiny") == curves(uninterrupted)


def test_workers_run_the_trials_side_by_side_with_the_curves_of_one_driver(uninterrupted, tmp_path, capsys):
    rows_file = tmp_path / "rows.jsonl"
    assert main([*SWEEP, "--root", str(tmp_path), "--results", str(rows_file), "--workers", "2"]) == 0
    assert "(local runner, 2 workers)" in capsys.readouterr().out
    assert not list((tmp_path / "tiny" / "trials").glob("*.error"))
    assert curves(tmp_path / "tiny") == curves(uninterrupted)
    rows = read_rows(rows_file)
    assert sorted(r["trial"] for r in rows) == TRIALS  # recorded once each, by the driver
    pids = {r["pid"] for r in rows}  # the process that started each trial (its provenance)
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes ran them, not the driver


def test_record_adds_the_rows_of_finished_trials_a_killed_driver_left_unrecorded(uninterrupted, tmp_path, capsys):
    sweep_dir = tmp_path / "tiny"
    shutil.copytree(uninterrupted, sweep_dir)
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    kept = [r for r in read_rows(spec["results"]) if r["trial"] != "utd_2-s1"]  # the driver died before its row
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({**spec, "results": str(tmp_path / "rows.jsonl")}))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    capsys.readouterr()
    assert main(["sweep", "record", str(sweep_dir)]) == 0
    assert "1 row(s) added" in capsys.readouterr().out
    assert sorted(r["trial"] for r in read_rows(tmp_path / "rows.jsonl")) == TRIALS
    assert main(["sweep", "record", str(sweep_dir)]) == 0 and "0 row(s) added" in capsys.readouterr().out
    assert main(["sweep", "record", str(tmp_path)]) == 2  # not a sweep directory: one sentence
    assert "is not a sweep directory" in capsys.readouterr().err
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({**spec, "results": None}))
    assert main(["sweep", "record", str(sweep_dir)]) == 2  # a sweep without a results file: one sentence
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names no results file" in err


def test_table_every_zero_still_records_each_trial_as_it_finishes(uninterrupted, tmp_path, monkeypatch):
    # a driver of worker processes with --table-every 0 recorded rows only at its exit: one killed mid-sweep
    # lost the rows of every trial finished under it
    from diffrl import sweep

    sweep_dir = tmp_path / "tiny"
    shutil.copytree(uninterrupted, sweep_dir)
    spec = spec_from_dict({**yaml.safe_load((sweep_dir / "sweep.yaml").read_text()),
                           "results": str(tmp_path / "rows.jsonl")}, "spec")
    (sweep_dir / "trials" / "utd_2-s1").rename(tmp_path / "running")  # not finished yet when the driver starts
    monkeypatch.setattr(sweep, "POLL_S", 0.02)
    printed: list[str] = []
    with sweep.LiveTable(sweep_dir, spec, printed.append, every=0):
        assert sorted(r["trial"] for r in read_rows(tmp_path / "rows.jsonl")) == TRIALS[:3]  # found at the start
        time.sleep(0.1)
        assert printed == []  # nothing finished under this driver: no table
        (tmp_path / "running").rename(sweep_dir / "trials" / "utd_2-s1")  # the trial finishes
        deadline = time.monotonic() + 10
        while len(read_rows(tmp_path / "rows.jsonl")) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(r["trial"] for r in read_rows(tmp_path / "rows.jsonl")) == TRIALS  # recorded before exit
        time.sleep(0.1)
        assert len(printed) == 1 and printed[0].count(" done ") == 4  # one table, when it finished


def test_drivers_of_one_sweep_record_one_at_a_time(uninterrupted, tmp_path):
    # two drivers on one sweep each read the results file and append what is missing: without a lock both could
    # append the same trial's row
    import fcntl
    import threading

    from diffrl import sweep

    sweep_dir = tmp_path / "tiny"
    shutil.copytree(uninterrupted, sweep_dir)
    spec = spec_from_dict({**yaml.safe_load((sweep_dir / "sweep.yaml").read_text()),
                           "results": str(tmp_path / "rows.jsonl")}, "spec")
    added: list[int] = []
    with open(sweep_dir / sweep.RECORD_LOCK, "a") as other:  # another driver is recording
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: added.append(sweep.record_results(sweep_dir, spec)))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive() and not (tmp_path / "rows.jsonl").exists()  # it waits for the other
    waiting.join(10)
    assert added == [4] and sweep.record_results(sweep_dir, spec) == 0
    assert sorted(r["trial"] for r in read_rows(tmp_path / "rows.jsonl")) == TRIALS


def test_skip_recorded_finishes_a_sweep_whose_rows_were_committed_without_running_them_again(uninterrupted,
                                                                                                 tmp_path, capsys):
    # a fresh clone: the rows file (as committed) but no sweep directory; one trial's row is missing, and one row
    # was recorded with another config (as from older code): those two run, the other two are skipped
    rows = read_rows(uninterrupted.parent / "rows.jsonl")
    rows_file = tmp_path / "rows.jsonl"
    kept = [r for r in rows if r["trial"] != "utd_2-s1"]
    changed = next(r for r in kept if r["trial"] == "utd_1-s1")
    changed["config"] = {**changed["config"], "gamma": 0.9}
    older = next(r for r in kept if r["trial"] == "utd_1-s0")  # recorded before an option (at its default) existed
    assert older["config"].pop("agent_bf16") is False
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    argv = [*SWEEP, "--root", str(tmp_path), "--results", str(rows_file)]
    assert main([*argv, "--skip-recorded"]) == 0
    out = capsys.readouterr().out
    assert "4 trials, 0 finished, 2 recorded in" in out and "(skipped), 2 to run" in out
    ran = sorted(p.parent.name for p in (tmp_path / "tiny" / "trials").glob("*/summary.json"))
    assert ran == ["utd_1-s1", "utd_2-s1"]
    got = curves(tmp_path / "tiny", ran)
    assert got == {t: v for t, v in curves(uninterrupted).items() if t in ran}  # the same runs as before
    after = read_rows(rows_file)
    assert len(after) == 5 and sorted(r["trial"] for r in after[3:]) == ran  # one new row per trial that ran
    assert main(["sweep", "status", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.count(" recorded ") == 2
    assert main(argv) == 0  # without the flag a recorded trial runs again (a reproduction): a newer row
    assert "2 finished, 2 to run" in capsys.readouterr().out and len(read_rows(rows_file)) == 7


def test_skip_recorded_needs_the_same_data_for_a_trial_that_reads_a_dataset(hopper_random, tmp_path, capsys):
    import h5py

    data = tmp_path / "data.hdf5"
    shutil.copy(hopper_random, data)
    argv = ["sweep", "offline", "td3bc", "--dataset", str(data), "--steps", "40", "--batch-size", "16",
            "--eval-every", "40", "--eval-episodes", "1", "--log-every", "20", "--hidden", "16", "16",
            "--seeds", "0", "--name", "data", "--results", str(tmp_path / "rows.jsonl")]
    assert main([*argv, "--root", str(tmp_path / "first")]) == 0
    assert main([*argv, "--root", str(tmp_path / "clone"), "--skip-recorded"]) == 0  # a fresh clone, same data
    assert "1 recorded in" in capsys.readouterr().out
    assert not (tmp_path / "clone" / "data" / "trials" / "run-s0").exists()
    with h5py.File(data, "r+") as f:  # the dataset built anew with other contents: the row is not its run
        f["rewards"][0] += 1.0
    assert main([*argv, "--root", str(tmp_path / "rebuilt"), "--skip-recorded"]) == 0
    assert "0 recorded in" in capsys.readouterr().out
    assert (tmp_path / "rebuilt" / "data" / "trials" / "run-s0" / "summary.json").is_file()


def test_a_trial_finished_on_a_dataset_rebuilt_since_is_stale_and_reruns_only_when_asked(hopper_random, tmp_path,
                                                                                        capsys):
    import h5py

    data = tmp_path / "data.hdf5"
    shutil.copy(hopper_random, data)
    argv = ["sweep", "offline", "td3bc", "--dataset", str(data), "--steps", "40", "--batch-size", "16",
            "--eval-every", "40", "--eval-episodes", "1", "--log-every", "20", "--hidden", "16", "16",
            "--seeds", "0", "--name", "data", "--root", str(tmp_path)]
    assert main(argv) == 0
    trial = tmp_path / "data" / "trials" / "run-s0"
    first = json.loads((trial / "summary.json").read_text())
    capsys.readouterr()
    assert main(argv) == 0  # same data: nothing stale, nothing to run
    assert "stale" not in capsys.readouterr().out
    with h5py.File(data, "r+") as f:  # the dataset rebuilt with other contents under the finished sweep
        f["rewards"][0] += 1.0
    assert main(argv) == 0  # counted as finished, with a warning naming the trial; the run is untouched
    out = capsys.readouterr().out
    assert "warning: 1 finished trial(s) ran on a dataset that has changed since (run-s0)" in out
    assert "0 to run" in out and json.loads((trial / "summary.json").read_text()) == first
    assert main(["sweep", "status", str(tmp_path / "data")]) == 0
    assert " stale " in capsys.readouterr().out
    assert main([*argv, "--rerun-stale"]) == 0  # moved aside (kept), run again on the current data
    assert "1 to run" in capsys.readouterr().out
    kept = list((tmp_path / "data" / "trials" / ".stale").iterdir())
    assert [p.name.startswith("run-s0-") for p in kept] == [True]
    assert json.loads((kept[0] / "summary.json").read_text()) == first
    again = json.loads((trial / "summary.json").read_text())
    assert again["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert main(["sweep", "status", str(tmp_path / "data")]) == 0
    assert " stale " not in capsys.readouterr().out


@pytest.mark.parametrize("extra, sentence", [(["--workers", "0"], "it must be at least 1"),
                                             (["--workers", "two"], "it must be a number")])
def test_bad_worker_counts_are_one_sentence(tmp_path, capsys, extra, sentence):
    assert main([*SWEEP, "--root", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and sentence in err and not (tmp_path / "tiny").exists()


def test_a_failing_trial_is_reported_and_the_others_finish(tmp_path, capsys):
    argv = ["sweep", "train", "sac", *TINY[2:], "--seeds", "0", "--grid", "env=Hopper-v5,Hopper-v3", "--name", "f",
            "--root", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "Hopper-v3 is a mujoco-py environment" in out
    assert (tmp_path / "f" / "trials" / "env_Hopper-v5-s0" / "summary.json").is_file()


def test_ray_runner_gives_the_local_runner_s_curves(uninterrupted, tmp_path):
    pytest.importorskip("ray")
    assert main([*SWEEP, "--root", str(tmp_path), "--runner", "ray", "--cpus-per-trial", "1"]) == 0
    assert curves(tmp_path / "tiny") == curves(uninterrupted)


def test_ray_trials_read_paths_relative_to_where_the_driver_started(hopper_random, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(hopper_random.parent)
    argv = ["sweep", "offline", "bc", "--dataset", hopper_random.name, "--steps", "100", "--batch-size", "32",
            "--eval-every", "100", "--eval-episodes", "1", "--seeds", "0", "--name", "rel", "--root", str(tmp_path),
            "--runner", "ray", "--cpus-per-trial", "1"]
    assert main(argv) == 0
    assert (tmp_path / "rel" / "trials" / "run-s0" / "summary.json").is_file()


@pytest.mark.parametrize(("spec", "sentence"), [
    ("system: nope\n", "unknown system 'nope'"),
    ("system: train\nalgo: sac\nbase: {gama: 0.9}\n", "base sets unknown field(s) gama of SACConfig"),
    ("system: train\nalgo: sac\ngrid: {utd: []}\n", "the grid of utd is empty"),
    ("system: train\nalgo: sac\nbase: {seed: 3}\n", "base sets seed, which the sweep sets for each trial"),
    ("system: train\nalgo: sac\nbogus: 1\n", "unknown key(s) bogus"),
    ("- a\n- b\n", "is not a sweep spec"),
])
def test_bad_specs_are_one_sentence(tmp_path, capsys, spec, sentence):
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    assert main(["sweep", str(path), "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1 and not (tmp_path / "root").exists()


def test_a_sweep_directory_holding_another_spec_is_refused(uninterrupted, capsys):
    before = (uninterrupted / "sweep.yaml").read_text()
    for change in (["--gamma", "0.9"], ["--seeds", "1-2"]):  # a saved trial's config changes; one is dropped
        assert main([*SWEEP, *change, "--root", str(uninterrupted.parent)]) == 2
        err = capsys.readouterr().err
        assert "holds another sweep" in err and err.count("\n") == 1
        assert ("utd_1-s0 would run with another config" if change[0] == "--gamma" else "utd_1-s0 is not in") in err
    assert (uninterrupted / "sweep.yaml").read_text() == before


def test_a_spec_that_only_adds_trials_grows_the_sweep(uninterrupted, tmp_path, capsys):
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    finished = {t: (tmp_path / "tiny" / "trials" / t / "metrics.csv").read_text() for t in TRIALS}
    argv = [*SWEEP, "--root", str(tmp_path)]
    argv[argv.index("utd=1,2")] = "utd=1,2,4"  # one more grid value: two new trials, the four saved ones kept
    assert main(argv) == 0
    assert "6 trials, 4 finished, 2 to run" in capsys.readouterr().out
    assert {t: (tmp_path / "tiny" / "trials" / t / "metrics.csv").read_text() for t in TRIALS} == finished
    assert all((tmp_path / "tiny" / "trials" / f"utd_4-s{s}" / "summary.json").is_file() for s in (0, 1))
    saved = spec_from_dict(yaml.safe_load((tmp_path / "tiny" / "sweep.yaml").read_text()), "saved")
    assert [int(v) for v in saved.grid["utd"]] == [1, 2, 4]


def test_the_table_is_printed_while_a_trial_runs(tmp_path, capsys):
    argv = ["sweep", "train", "sac", *TINY, "--seeds", "0", "--name", "live", "--root", str(tmp_path),
            "--table-every", "0.05"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert " running " in out  # a table printed while the only trial ran
    assert out.rstrip().splitlines()[-1].split()[-2] == "done"


def test_arms_may_name_their_algorithm_and_fields_may_name_seed_root_and_other_fields(tmp_path):
    spec = spec_from_dict({"system": "dppo", "command": "finetune", "base": {"policy": "{root}/pre/trials/run-s{seed}"},
                           "seeds": [0, 3]}, "spec.yaml")
    got = [str(trial_config(spec, t, tmp_path / "ft" / "trials" / t.id, resume=False).policy) for t in trials(spec)]
    assert got == [f"{tmp_path}/pre/trials/run-s0", f"{tmp_path}/pre/trials/run-s3"]
    spec = spec_from_dict({"system": "dppo", "command": "finetune", "grid": {"env": ["Hopper-v5", "Walker2d-v5"]},
                           "base": {"policy": "{root}/pre/{env}-s{seed}-{unknown}"}, "seeds": [1]}, "spec.yaml")
    got = [str(trial_config(spec, t, tmp_path / "ft" / "trials" / t.id, resume=False).policy) for t in trials(spec)]
    assert got == [f"{tmp_path}/pre/Hopper-v5-s1-{{unknown}}", f"{tmp_path}/pre/Walker2d-v5-s1-{{unknown}}"]
    spec = spec_from_dict({"system": "synther", "command": "offline", "grid": {"dataset": ["data/a b.hdf5"]},
                           "base": {"diffusion": "{root}/x/trials/dataset_{dataset_name}-s{seed}/diffusion"}}, "s")
    t = trials(spec)[0]
    assert t.id == "dataset_a_b-s0"  # {dataset_name} spells the value as trial ids do
    assert str(trial_config(spec, t, tmp_path / "y" / "trials" / t.id, False).diffusion) == (
        f"{tmp_path}/x/trials/{t.id}/diffusion")
    spec = spec_from_dict({"system": "train", "algo": "sac", "base": {"utd": 2},
                           "arms": {"sac": None, "redq": {"algo": "redq", "num_critics": 5}}}, "spec.yaml")
    cfgs = {t.arm: trial_config(spec, t, tmp_path / "x" / "trials" / t.id, resume=False) for t in trials(spec)}
    assert type(cfgs["sac"]).__name__ == "SACConfig" and type(cfgs["redq"]).__name__ == "REDQConfig"
    assert cfgs["redq"].num_critics == 5 and cfgs["sac"].utd == cfgs["redq"].utd == 2
    with pytest.raises(ConfigError, match=r"arm t sets unknown field\(s\) init_alpha of TD3Config"):
        spec_from_dict({"system": "train", "algo": "sac", "arms": {"t": {"algo": "td3", "init_alpha": 0.5}}}, "s")


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_gpus_the_runner_cannot_give_are_one_sentence(tmp_path, capsys, runner):
    if runner == "ray":
        pytest.importorskip("ray")
    argv = ["sweep", "train", "sac", *TINY, "--seeds", "0", "--name", "g", "--root", str(tmp_path),
            "--runner", runner, "--gpus-per-trial", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("needs --runner ray" if runner == "local" else "asks for more than") in err
    assert not list((tmp_path / "g" / "trials").glob("*/summary.json"))


def test_eta_uses_the_latest_interval_s_rate(tmp_path):
    from diffrl.config import save_yaml
    from diffrl.sweep import SPEC_FILE, status_rows

    spec = spec_from_dict({"name": "eta", "system": "train", "algo": "sac", "base": {"steps": 1000}}, "s")
    sweep_dir = tmp_path / "eta"
    (sweep_dir / "trials" / "run-s0").mkdir(parents=True)
    save_yaml(spec.to_dict(), sweep_dir / SPEC_FILE)
    # a fast warm-up (400 steps in 4 s), then 100 steps in 10 s: 500 steps left at 0.1 s each
    (sweep_dir / "trials" / "run-s0" / "metrics.csv").write_text("step,env_steps,wall_s\n200,200,2\n400,400,4\n"
                                                                 "500,500,14\n")
    (row,) = status_rows(sweep_dir)
    assert row["step"] == 500 and row["steps"] == 1000 and row["eta_s"] == pytest.approx(50.0)


def test_several_specs_run_in_order_and_stray_arguments_are_one_sentence(tmp_path, capsys):
    import yaml

    tiny = {"env": "Hopper-v5", "steps": 150, "learning_starts": 50, "batch_size": 32, "hidden": [32, 32],
            "eval_every": 150, "eval_episodes": 1, "checkpoint_every": 150}
    for name in ("first", "second"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "system": "train", "algo": "sac",
                                                               "base": tiny, "seeds": [0]}))
    specs = [str(tmp_path / "first.yaml"), str(tmp_path / "second.yaml")]
    assert main(["sweep", *specs, "--root", str(tmp_path / "root"), "--table-every", "0"]) == 0
    out = capsys.readouterr().out
    first, second = (out.index(f"sweep {tmp_path / 'root' / n}:") for n in ("first", "second"))
    assert first < second
    assert all((tmp_path / "root" / n / "trials" / "run-s0" / "summary.json").is_file() for n in ("first", "second"))
    assert main(["sweep", *specs, "--seeds", "0-2", "--root", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "unexpected arguments after the spec files" in err and err.count("\n") == 1
    assert not (tmp_path / "other").exists()
