"""A user's own Gymnasium env (``tests/envs_for_tests.py``) through the CLI: train, eval in this process and in a
fresh one, the run directory's name, and one sentence for each kind of wrong id."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import envs_for_tests  # noqa: F401  (registers ToyReach-v0 for the "did you mean" hint)
from diffrl.cli import main

TOY = "envs_for_tests:ToyReach-v0"
TESTS_DIR = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "32", "--batch-size", "64", "--learning-starts", "100", "--eval-episodes", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("toy") / "sac"
    assert main(["train", "sac", "--env", TOY, "--steps", "300", "--eval-every", "150", "--run-dir", str(run_dir),
                 *TINY]) == 0
    return run_dir


def test_train_sac_on_a_module_env_writes_metrics_and_eval_reads_the_run(toy_run, capsys):
    with open(toy_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [int(r["step"]) for r in rows if r["eval/return_mean"] != ""]
    assert evals == [150, 300]
    assert f"env: {TOY}" in (toy_run / "config.yaml").read_text()  # eval re-creates the env from this string
    manifest = json.loads((toy_run / "checkpoints" / "latest" / "manifest.json").read_text())
    assert manifest["meta"]["env"]["env_id"] == TOY
    summary = json.loads((toy_run / "summary.json").read_text())

    capsys.readouterr()
    assert main(["eval", str(toy_run), "--episodes", "2"]) == 0
    result = json.loads((toy_run / "eval-step-300-2ep.json").read_text())
    assert result["return_mean"] == pytest.approx(summary["eval_return_mean"])


def test_eval_in_a_fresh_console_script_process_imports_the_module_from_the_working_directory(toy_run):
    # the console script puts its bin/ directory first on sys.path, not the working directory (tests/ here)
    script = shutil.which("diffrl", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "diffrl.cli"]
    done = subprocess.run([*command, "eval", str(toy_run), "--episodes", "2"], cwd=TESTS_DIR, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{TOY} checkpoint at step 300")
    summary = json.loads((toy_run / "summary.json").read_text())
    result = json.loads((toy_run / "eval-step-300-2ep.json").read_text())
    assert result["return_mean"] == pytest.approx(summary["eval_return_mean"])


def test_default_run_directory_name_of_a_module_env_is_a_plain_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sac", "--env", TOY, "--steps", "100", "--eval-every", "100", *TINY]) == 0
    (env_dir,) = (tmp_path / "runs" / "train_sac").iterdir()
    assert env_dir.name == "envs_for_tests_ToyReach-v0"  # slug: the ':' becomes '_'
    assert [p.name for p in env_dir.iterdir()][0].endswith("-s0")


@pytest.mark.parametrize(
    ("env_id", "message"),
    [("envs_for_tests:ToyDiscrete-v0",
      "envs_for_tests:ToyDiscrete-v0 has a Discrete action space; diffrl's agents need continuous (Box) actions."),
     ("diffrl_user_no_such_module:ToyReach-v0", "there is no module 'diffrl_user_no_such_module' to import"),
     ("envs_for_tests:NoSuch-v0", "module 'envs_for_tests' was imported but registers no environment 'NoSuch-v0'"),
     ("ToyReech-v0", "unknown environment id 'ToyReech-v0'. Did you mean ToyReach-v0")])
def test_wrong_user_env_ids_get_one_sentence_and_write_nothing(tmp_path, monkeypatch, capsys, env_id, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sac", "--env", env_id, "--steps", "10", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffrl: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
