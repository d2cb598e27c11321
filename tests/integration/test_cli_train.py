"""End to end through the CLI on real MuJoCo tasks with tiny settings (seconds each)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrl.cli import main
from diffrl.data import load_dataset

TINY = ["--hidden", "32", "32", "--batch-size", "64", "--learning-starts", "100", "--eval-episodes", "1",
        "--log-every", "50", "--no-progress"]
VOLATILE = {"wall_s", "perf/env_steps_per_s"}  # timing columns differ between any two runs


def curve(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(f)]


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def train(algo: str, run_dir: Path, *extra: str) -> int:
    return main(["train", algo, "--run-dir", str(run_dir), *TINY, *extra])


def test_train_sac_writes_the_full_run_directory_then_eval_and_report_read_it(tmp_path, capsys):
    run_dir = tmp_path / "sac"
    assert train("sac", run_dir, "--env", "HalfCheetah-v5", "--steps", "300", "--eval-every", "150",
                 "--checkpoint-every", "150") == 0
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    rows = curve(run_dir)
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200, 250, 300]
    assert rows[-1]["eval/return_mean"] != "" and float(rows[-1]["gradient_steps"]) == 201
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == 300 and summary["gradient_steps"] == 201
    assert summary["eval_return_mean"] == pytest.approx(float(rows[-1]["eval/return_mean"]))
    assert set(summary["time_breakdown_s"]) == {"env_s", "update_s", "eval_s"}
    import torch  # the device the run used (the config says "auto") and its threads are recorded

    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert summary["torch_threads"] == torch.get_num_threads()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000000150", "step-000000300"]
    files = {p.name for p in (run_dir / "checkpoints" / "latest").iterdir()}
    assert files == {"manifest.json", "state.safetensors", "buffer.safetensors"}
    manifest = json.loads((run_dir / "checkpoints" / "latest" / "manifest.json").read_text())
    assert manifest["meta"]["env"]["env_id"] == "HalfCheetah-v5" and manifest["versions"]["torch"]

    # diffrl eval uses the same evaluate() and eval seeds as training: same number on the same checkpoint.
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0
    result = json.loads((run_dir / "eval-step-300-1ep.json").read_text())
    assert result["return_mean"] == pytest.approx(summary["eval_return_mean"])
    assert main(["eval", str(run_dir), "--episodes", "1", "--seed", "7"]) == 0  # another way: another file
    other = json.loads((run_dir / "eval-step-300-1ep-seed7.json").read_text())
    assert other["returns"] != result["returns"]
    assert json.loads((run_dir / "eval-step-300-1ep.json").read_text()) == result

    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert list((tmp_path / "report").glob("*.png"))


@pytest.mark.parametrize("algo", ["sac", "td3", "redq"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, algo):
    # Hopper terminates early and episodes are capped at 120 steps: the checkpoint at 300 is mid-episode.
    extra = ["--env", "Hopper-v5", "--max-episode-steps", "120", "--eval-every", "200",
             "--checkpoint-every", "1000", *(["--utd", "3"] if algo == "redq" else [])]
    assert train(algo, tmp_path / "full", "--steps", "600", *extra) == 0
    assert train(algo, tmp_path / "split", "--steps", "300", *extra) == 0
    assert main(["train", algo, "--resume", str(tmp_path / "split"), "--steps", "600", "--no-progress"]) == 0
    full, split = curve(tmp_path / "full"), curve(tmp_path / "split")
    assert len(full) == 12 and full == split
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_split = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert s_full["eval_return_mean"] == s_split["eval_return_mean"]


def test_same_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
    args = ["--env", "Hopper-v5", "--steps", "250", "--eval-every", "250"]
    train("sac", tmp_path / "a", *args)
    train("sac", tmp_path / "b", *args)
    train("sac", tmp_path / "c", *args, "--seed", "1")
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert curve(tmp_path / "a") != curve(tmp_path / "c")


def test_agent_bf16_runs_the_updates_under_autocast_and_changes_the_numbers(tmp_path):
    args = ["--env", "Hopper-v5", "--steps", "250", "--eval-every", "250"]
    assert train("sac", tmp_path / "a", *args) == 0
    assert train("sac", tmp_path / "b", *args, "--agent-bf16") == 0
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a != b  # same schedule, bf16 losses
    assert all(float(r["critic_loss"]) == float(r["critic_loss"]) for r in b if r.get("critic_loss"))  # finite


def test_resume_with_another_env_or_network_size_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train("sac", run_dir, "--env", "Hopper-v5", "--steps", "200", "--eval-every", "200")
    before = tree_digest(run_dir)
    capsys.readouterr()
    assert main(["train", "sac", "--resume", str(run_dir), "--env", "Walker2d-v5"]) == 2
    assert "env='Walker2d-v5'" in capsys.readouterr().err
    assert main(["train", "sac", "--resume", str(run_dir), "--hidden", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert "hidden=[64, 64]" in err and "nothing was changed" in err and "Traceback" not in err
    assert main(["train", "td3", "--resume", str(run_dir)]) == 2
    assert tree_digest(run_dir) == before


def test_training_into_an_existing_run_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train("sac", run_dir, "--env", "Hopper-v5", "--steps", "120", "--eval-every", "0")
    before = tree_digest(run_dir)
    assert train("sac", run_dir, "--env", "Hopper-v5", "--steps", "120") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--steps", "-5"], "steps=-5"), (["--gamma", "1.5"], "gamma=1.5"), (["--gamma", "0"], "gamma=0"),
     (["--batch-size", "512", "--buffer-size", "100"], "batch_size=512"), (["--utd", "0"], "utd=0"),
     (["--tau", "0"], "tau=0")])
def test_invalid_config_values_are_rejected_with_one_sentence(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "sac", "--run-dir", str(tmp_path / "r"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["train", "sac", "--env", "HalfCheetah-v2", "--steps", "10"], "HalfCheetah-v5"),
     (["train", "sac", "--env", "Hoper-v5", "--steps", "10"], "Did you mean Hopper-v5"),
     (["train", "a2c"], "unknown algorithm 'a2c'"),
     (["train", "sac", "--preset", "huge"], "unknown preset 'huge'"),
     (["eval", "/nonexistent/run"], "not a diffrl run directory"),
     (["report", "/nonexistent/run"], "/nonexistent/run")])
def test_bad_user_input_gets_one_clear_sentence_and_no_traceback(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") <= 2


def test_diffrl_warnings_print_as_one_line_and_other_warnings_keep_their_format():
    # in a fresh interpreter: pytest records warnings instead of printing them
    script = """
import sys, warnings
import numpy as np
import diffrl.cli
from diffrl.data.datasets import OfflineDataset
from diffrl.pipelines.offline import reward_scale

n = 30  # three episodes whose returns span 0.2: normalize_reward's scale is large enough to warn
narrow = OfflineDataset(observations=np.zeros((n, 2), np.float32), actions=np.zeros((n, 1), np.float32),
                        rewards=np.repeat(np.float32([1.0, 1.01, 1.02]), 10),
                        next_observations=np.zeros((n, 2), np.float32), terminals=np.zeros(n, bool),
                        timeouts=np.tile(np.arange(10) == 9, 3))

def command(argv):
    reward_scale(narrow)
    warnings.warn("a third-party warning", UserWarning)

diffrl.cli.COMMANDS["fake"] = command
before = warnings.formatwarning
assert diffrl.cli.main(["fake"]) == 0
assert warnings.formatwarning is before, "main() must restore the formatter it found"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "normalize_reward" in line]
    assert len(ours) == 1 and ours[0].startswith("diffrl: warning: normalize_reward scales rewards by"), done.stderr
    assert "<string>:" in done.stderr and "UserWarning: a third-party warning" in done.stderr  # Python's format


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert train("sac", tmp_path / "r", "--env", "Hopper-v5", "--steps", "10", "--device", "cuda") == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_quickstart_runs_the_synther_study_and_writes_a_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--expert-steps", "600", "--diffusion-steps", "50",
                 "--num-samples", "500", "--agent-steps", "100", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "normalized scores: real" in out
    report = Path(out.split("report:")[-1].strip())
    assert report.is_file() and report.is_relative_to(tmp_path / "runs")
    text = report.read_text()
    assert "next-state NMSE" in text and "| synthetic |" in text and "| mixed |" in text
    assert "had an action outside [-1, 1], clipped to it" in text
    for png in ("learning_curves.png", "marginals.png"):
        assert (report.parent / png).stat().st_size > 1000
    summaries = {m: json.loads((report.parent / f"td3bc-{m}" / "summary.json").read_text())
                 for m in ("real", "synthetic", "mixed")}
    # the data is a SAC replay buffer (mixed quality), and every arm trains on the same random slice of its episodes
    (data,) = report.parent.glob("*-medium-replay-*.hdf5")
    full = load_dataset(str(data))
    assert full.metadata["kind"] == "medium-replay"
    sizes = {m: s["real_transitions"] for m, s in summaries.items() if "real_transitions" in s}
    assert set(sizes) >= {"real", "mixed"} and len(set(sizes.values())) == 1
    assert sizes["real"] == len(full.subset_episodes(0.25, 0)) < len(full)
    gain = summaries["mixed"]["normalized_score"] - summaries["real"]["normalized_score"]
    assert f"mixed - real: {gain:+.1f} points" in text


def test_a_bad_env_id_writes_no_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sac", "--env", "Hoper-v5", "--steps", "10"]) == 2
    assert not (tmp_path / "runs").exists()


def test_goal_conditioned_env_is_refused_with_a_sentence(tmp_path, capsys):
    assert train("sac", tmp_path / "r", "--env", "FetchReach-v4", "--steps", "10") == 2
    assert "dict (goal-conditioned) observations" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resuming_from_a_corrupt_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train("sac", run_dir, "--env", "Hopper-v5", "--steps", "120", "--eval-every", "0")
    state = run_dir / "checkpoints" / "latest" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = tree_digest(run_dir)
    capsys.readouterr()
    assert main(["train", "sac", "--resume", str(run_dir), "--steps", "240"]) == 2
    err = capsys.readouterr().err
    assert "state.safetensors" in err and "corrupt" in err and "Traceback" not in err
    assert tree_digest(run_dir) == before


def test_dm_control_task_trains_and_evaluates_with_flat_observations(tmp_path):
    run_dir = tmp_path / "dmc"
    assert train("td3", run_dir, "--env", "dm_control/cartpole-swingup-v0", "--steps", "150",
                 "--eval-every", "0") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == 150 and summary["eval_return_mean"] is not None
    manifest = json.loads((run_dir / "checkpoints" / "latest" / "manifest.json").read_text())
    assert manifest["meta"]["env"]["observation_space"]["type"] == "Box"
