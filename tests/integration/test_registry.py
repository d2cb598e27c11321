"""The system registry: a system defined inside the tests (tests/toy_system.py) is registered at run time and
driven through the CLI — run, kill-free resume, eval, report, --help — with no edit of diffrl itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffrl import registry
from diffrl.cli import main
from diffrl.runs.logger import read_metrics


@pytest.fixture
def toy():
    registry.register("toy", "toy_system")
    yield
    registry.unregister("toy")


def _wall_free(run_dir: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]


def test_registered_toy_system_runs_resumes_evaluates_and_reports_through_the_cli(toy, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["toy", "--steps", "40", "--no-progress", "--run-dir", str(whole)]) == 0
    assert main(["toy", "--steps", "20", "--no-progress", "--run-dir", str(split)]) == 0
    assert main(["toy", "--resume", str(split), "--steps", "40"]) == 0
    rows = _wall_free(whole)
    assert len(rows) == 8 and rows == _wall_free(split)  # the resumed run's curve is the uninterrupted one's
    assert json.loads((split / "summary.json").read_text())["gradient_steps"] == 40

    assert main(["eval", str(whole), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads((whole / "eval-step-40-2ep.json").read_text())
    # the run's own evaluation episodes: diffrl eval reproduces the last in-training evaluation
    assert result["return_mean"] == pytest.approx(rows[-1]["eval/return_mean"])
    assert "envs_for_tests:ToyReach-v0 checkpoint at step 40" in out

    assert main(["report", str(whole), str(split), "--out", str(tmp_path / "report")]) == 0
    assert "| toy" in (tmp_path / "report" / "report.md").read_text()

    assert main(["--help"]) == 0
    assert "toy" in capsys.readouterr().out


def test_toy_preset_and_resume_with_another_command_are_refused_in_one_sentence(toy, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main(["toy", "--preset", "quick", "--no-progress", "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["gradient_steps"] == 20
    assert main(["train", "sac", "--resume", str(run_dir)]) == 2
    assert "is another kind of run; resume it with `diffrl toy --resume" in capsys.readouterr().err


def test_a_single_command_system_runs_with_no_arguments_and_help_shows_its_flags(toy, tmp_path, monkeypatch,
                                                                                  capsys):
    # `diffrl quickstart` and `diffrl iter` take no sub-command: no arguments means the defaults, not the usage
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFRL_PROGRESS", "0")
    assert main(["toy"]) == 0
    (run_dir,) = (tmp_path / "runs" / "toy").glob("*/*")
    assert json.loads((run_dir / "summary.json").read_text())["gradient_steps"] == 40
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    assert "--sigma" in capsys.readouterr().out


def test_a_run_no_registered_system_knows_is_one_sentence(tmp_path, capsys):
    registry.register("toy", "toy_system")
    try:
        assert main(["toy", "--steps", "10", "--no-progress", "--run-dir", str(tmp_path / "r")]) == 0
    finally:
        registry.unregister("toy")
    assert main(["eval", str(tmp_path / "r")]) == 2
    assert "is a 'toy' run, which no registered diffrl system knows" in capsys.readouterr().err


def test_help_lists_every_registered_system_and_unknown_groups_are_refused(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        assert f"  {name}" in out
    assert main(["tarin"]) == 2
    assert "unknown command 'tarin'" in capsys.readouterr().err
