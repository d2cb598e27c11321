"""`diffrl train ppo` end to end on Hopper-v5 with tiny settings: the run directory, the annealed learning rate, a
killed run resumed to the uninterrupted run's metrics, `diffrl eval` and `diffrl report` on it, and the refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from diffrl.cli import main
from diffrl.runs import checkpoint as ckpt

# 2 envs x 64 steps = 128 env steps per iteration; a 40-step time limit makes truncations happen
TINY = ["--env", "Hopper-v5", "--n-envs", "2", "--n-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
        "--max-episode-steps", "40", "--eval-every", "256", "--eval-episodes", "2", "--log-every", "128",
        "--checkpoint-every", "128", "--keep-checkpoints", "0", "--no-progress"]


def curve(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without its clocks: what an exact resume must reproduce."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("perf/")} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ppo") / "whole"
    assert main(["train", "ppo", *TINY, "--steps", "512", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_ppo_writes_its_run_directory_with_an_annealed_learning_rate(whole):
    rows = curve(whole)
    assert [int(r["step"]) for r in rows] == [128, 256, 384, 512]
    assert [r["eval/return_mean"] != "" for r in rows] == [False, True, False, True]
    # CleanRL's schedule over 4 iterations: lr (1 - (i - 1) / 4)
    assert [float(r["train/learning_rate"]) for r in rows] == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])
    assert [float(r["gradient_steps"]) for r in rows] == [8, 16, 24, 32]  # 2 epochs x 4 minibatches per iteration
    assert all(float(r["train/episodes"]) > 0 for r in rows)  # 40-step episodes end within each 64-step rollout
    s = json.loads((whole / "summary.json").read_text())
    assert s["pipeline"] == "train_ppo" and s["env_steps"] == 512 and s["iterations"] == 4
    assert s["eval_return_mean"] == pytest.approx(float(rows[-1]["eval/return_mean"]))
    assert set(s["time_breakdown_s"]) == {"rollout_s", "update_s", "eval_s"}
    _, parts = ckpt.load_checkpoint(whole, parts=("state",))
    assert {"agent", "envs", "obs_norm", "reward_scaler", "sample_gen", "minibatch_gen"} <= set(parts["state"])
    assert parts["state"]["obs_norm"]["count"] == pytest.approx(1e-4 + 2 + 512)  # the 2 resets and every step


def test_a_killed_ppo_run_resumes_to_the_uninterrupted_runs_metrics_and_eval_and_report_read_it(whole, tmp_path,
                                                                                               capsys):
    # killed after logging all 4 iterations, before any checkpoint after the first landed: resume redoes 2-4
    split = tmp_path / "split"
    shutil.copytree(whole, split, symlinks=True)
    (split / "checkpoints" / ckpt.LATEST).unlink()
    for newer in ckpt.list_checkpoints(split / "checkpoints")[1:]:
        shutil.rmtree(newer)
    assert main(["train", "ppo", "--resume", str(split), "--no-progress"]) == 0
    assert curve(split) == curve(whole)
    assert json.loads((split / "summary.json").read_text())["gradient_steps"] == 32

    assert main(["eval", str(whole), "--episodes", "2"]) == 0
    result = json.loads((whole / "eval-step-512-2ep.json").read_text())
    # the run's own evaluation episodes and frozen observation statistics: the last in-training evaluation again
    assert result["return_mean"] == pytest.approx(float(curve(whole)[-1]["eval/return_mean"]), rel=1e-9)
    assert "Hopper-v5 checkpoint at step 512" in capsys.readouterr().out

    assert main(["report", str(whole), str(split), "--out", str(tmp_path / "report")]) == 0
    assert "train_ppo" in (tmp_path / "report" / "report.md").read_text()


def test_train_ppo_refuses_bad_settings_and_a_resume_by_another_algorithm_in_one_sentence(whole, tmp_path, capsys):
    for flags, sentence in ((["--n-steps", "100"], "num_minibatches=32: it must be a divisor of n_envs * n_steps"),
                            (["--horizon-steps", "4"], "horizon_steps=4: it must be 1")):
        with pytest.raises(SystemExit) as e:  # rejected while parsing (tyro prints the config's sentence)
            main(["train", "ppo", *flags, "--run-dir", str(tmp_path / "r")])
        assert e.value.code == 2 and sentence in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r").exists()
    assert main(["train", "sac", "--resume", str(whole)]) == 2
    assert "resume it with `diffrl train ppo --resume" in capsys.readouterr().err
