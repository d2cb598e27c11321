"""diffrl.runs.report: tables, JSON numbers, PNG curves and user-facing errors on fake run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffrl.errors import CheckpointError, ConfigError, DiffrlError
from diffrl.runs.report import _aggregate, make_report
from diffrl.runs.results import run_row
from diffrl.runs.stats import Bootstrap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = ["step", "env_steps", "wall_s", "eval/return_mean", "eval/return_std", "train/episode_return",
          "critic_loss"]


def fake_run(root: Path, name: str, *, pipeline: str = "train_sac", env: str = "Hopper-v5", seed: int = 0,
             evals: list[tuple[int, float]] | None = None, final: float | None = 100.0,
             best: float | None = None, success: float | None = None, env_steps: int = 3000,
             wall_s: float = 30.0, summary: bool = True) -> Path:
    """A run directory with config.yaml, metrics.csv (eval rows at ``evals``, train rows between) and
    summary.json, shaped like the ones train_sac writes."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "pipeline": pipeline, "config": {"env": env, "seed": seed, "steps": env_steps},
        "versions": {"diffrl": "0.1.0"}, "command": f"diffrl {pipeline} --env {env}"}, sort_keys=False))
    lines = [",".join(HEADER)]
    for s, ret in evals or []:
        lines.append(f"{s - 500},{s - 500},{s / 100},,,{ret / 2},0.5")  # a train-only row: eval cells empty
        lines.append(f"{s},{s},{s / 100},{ret},5.0,{ret / 2},0.4")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "pipeline": pipeline, "env_id": env, "seed": seed, "env_steps": env_steps, "wall_s": wall_s,
            "eval_return_mean": final, "eval_return_std": 5.0 if final is not None else None,
            "success_rate": success, "best_eval_return": best if best is not None else final,
            "eval_episodes": 10}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Two seeds of train_sac on Hopper (finals 100 and 200) and one run on Walker (final 50)."""
    return [
        fake_run(tmp_path / "runs", "hop-s0", seed=0, evals=[(1000, 10.0), (2000, 60.0), (3000, 100.0)],
                 final=100.0, best=120.0, wall_s=30.0),
        fake_run(tmp_path / "runs", "hop-s1", seed=1, evals=[(1000, 20.0), (2000, 90.0), (3000, 200.0)],
                 final=200.0, best=220.0, wall_s=50.0),
        fake_run(tmp_path / "runs", "walk-s0", env="Walker2d-v5", seed=0, evals=[(1500, 5.0), (3000, 50.0)],
                 final=50.0, success=0.5),
    ]


def _row(md: str, pipeline: str, env: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(f"| {pipeline} | {env} | ")]
    return rows[0]  # the group table comes before the per-seed table


def test_report_md_has_one_row_per_group_with_mean_final_return_over_seeds(runs: list[Path], tmp_path: Path):
    md_path = make_report(runs, tmp_path / "out")
    assert md_path == tmp_path / "out" / "report.md"
    md = md_path.read_text()
    hopper = _row(md, "train_sac", "Hopper-v5")
    cells = [c.strip() for c in hopper.strip("|").split("|")]
    assert cells[2] == "2"  # seeds
    assert cells[3] == "150.0 ± 50.0"  # mean and population std of 100 and 200
    assert cells[4] == "170.0"  # best: mean of 120 and 220
    assert cells[5] == "—"  # no success rate logged
    assert cells[7] == "40.0 s"  # wall: mean of 30 and 50
    walker = [c.strip() for c in _row(md, "train_sac", "Walker2d-v5").strip("|").split("|")]
    assert walker[2:4] == ["1", "50.0 ± 0.0"] and walker[5] == "0.50"
    assert "](train_sac__Hopper-v5.png)" in md and "](train_sac__Walker2d-v5.png)" in md


def test_report_json_numbers_equal_the_summaries(runs: list[Path], tmp_path: Path):
    make_report(runs, tmp_path / "out")
    groups = {g["env"]: g for g in json.loads((tmp_path / "out" / "report.json").read_text())["groups"]}
    hop = groups["Hopper-v5"]
    assert hop["n_seeds"] == 2 and hop["final_return_n"] == 2
    assert hop["final_return_mean"] == pytest.approx(150.0)
    assert hop["final_return_std"] == pytest.approx(50.0)
    assert hop["best_return_mean"] == pytest.approx(170.0)
    assert hop["success_rate_mean"] is None
    assert hop["env_steps_mean"] == pytest.approx(3000.0) and hop["wall_s_mean"] == pytest.approx(40.0)
    assert [r["seed"] for r in hop["runs"]] == [0, 1]
    assert groups["Walker2d-v5"]["success_rate_mean"] == pytest.approx(0.5)


def test_one_valid_png_per_group_and_other_files_in_out_are_kept(runs: list[Path], tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    make_report(runs, out)
    for name in ("train_sac__Hopper-v5.png", "train_sac__Walker2d-v5.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "keep.txt").read_text() == "mine"


def test_run_without_eval_rows_is_in_the_table_with_a_note_and_no_curve(tmp_path: Path):
    run = fake_run(tmp_path, "early", env="Ant-v5", evals=[], final=None, env_steps=400, summary=False)
    md = make_report([run], tmp_path / "out").read_text()
    cells = [c.strip() for c in _row(md, "train_sac", "Ant-v5").strip("|").split("|")]
    assert cells[2] == "1" and cells[3] == "— ± —"
    assert f"`{run}` logged no `eval/return_mean` values" in md
    assert f"`{run}` has no summary.json" in md
    assert not list((tmp_path / "out").glob("*.png"))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["groups"][0]["plot"] is None


def test_seeds_are_aligned_on_the_union_of_x_without_extrapolation():
    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    b = (np.array([5.0]), np.array([100.0]))
    xs, mean, lo, hi = _aggregate([a, b], "minmax")
    assert xs.tolist() == [0.0, 5.0, 10.0]
    # x=5: a interpolates to 5, b has 100; x=0 and x=10 lie outside b's range, so only a counts there.
    assert mean.tolist() == [0.0, 52.5, 10.0]
    assert lo.tolist() == [0.0, 5.0, 10.0] and hi.tolist() == [0.0, 100.0, 10.0]
    _, _, lo_sd, hi_sd = _aggregate([a, b], "std")
    assert hi_sd[1] - lo_sd[1] == pytest.approx(2 * 47.5)
    assert not any(math.isnan(v) for v in mean)


def test_non_run_directory_raises_checkpoint_error_naming_it(tmp_path: Path):
    (tmp_path / "notarun").mkdir()
    with pytest.raises(CheckpointError, match="notarun") as e:
        make_report([tmp_path / "notarun"], tmp_path / "out")
    assert isinstance(e.value, DiffrlError)


def test_run_without_metrics_csv_raises_checkpoint_error_naming_it(tmp_path: Path):
    run = fake_run(tmp_path, "nometrics")
    (run / "metrics.csv").unlink()
    with pytest.raises(CheckpointError, match=r"nometrics.*metrics\.csv"):
        make_report([run], tmp_path / "out")


def test_empty_run_list_raises_config_error_naming_the_output(tmp_path: Path):
    with pytest.raises(ConfigError, match="no run directories") as e:
        make_report([], tmp_path / "out")
    assert str(tmp_path / "out") in str(e.value) and isinstance(e.value, DiffrlError)


def test_x_falls_back_to_step_when_env_steps_is_empty(tmp_path: Path):
    run = fake_run(tmp_path, "offline", pipeline="train_offline")
    (run / "metrics.csv").write_text("step,env_steps,wall_s,eval/return_mean\n10,,1.0,3.0\n20,,2.0,4.0\n")
    out = tmp_path / "out"
    make_report([run], out)
    group = json.loads((out / "report.json").read_text())["groups"][0]
    assert group["x"] == "step" and group["plot"] == "train_offline__Hopper-v5.png"
    assert (out / group["plot"]).read_bytes()[:8] == PNG_MAGIC


def test_result_row_of_an_offline_run_uses_gradient_steps_when_env_steps_is_empty(tmp_path: Path):
    run = fake_run(tmp_path, "offline", pipeline="train_offline")
    (run / "metrics.csv").write_text("step,env_steps,wall_s,eval/return_mean\n10,,1.0,3.0\n20,,2.0,4.0\n")
    row = run_row(run)
    assert row["curve_x"] == "step" and row["curves"]["return_mean"] == [[10.0, 3.0], [20.0, 4.0]]


def test_runs_that_differ_in_a_setting_are_separate_experiments_with_normalized_scores(tmp_path: Path) -> None:
    made = []
    for mode in ("real", "synthetic"):
        for seed in (0, 1):
            run = fake_run(tmp_path / "runs", f"{mode}-s{seed}", pipeline="synther_offline_td3bc", seed=seed,
                           evals=[(1000, 10.0)], final=10.0 * (seed + 1))
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["config"].update(data_mode=mode, run_dir=str(run))  # run_dir differs too: bookkeeping, ignored
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "normalized_score": 40.0 + seed}))
            made.append(run)
    md = make_report(made, tmp_path / "out").read_text()
    real = _row(md, "synther_offline_td3bc", "Hopper-v5 (data_mode=real)").split(" | ")
    assert real[2] == "2" and real[-1].rstrip(" |") == "40.5 ± 0.5"
    assert _row(md, "synther_offline_td3bc", "Hopper-v5 (data_mode=synthetic)")


# --- statistics over arms (runs/stats.py through make_report) -------------------------------------------------

FAST = Bootstrap(reps=200)


def sweep_run(root: Path, name: str, *, env: str = "Hopper-v5", seed: int = 0, final: float = 100.0,
              fields: dict | None = None, normalized: float | None = None) -> Path:
    """A fake_run whose config.yaml carries extra ``fields`` and whose summary.json a normalized score."""
    run = fake_run(root, name, env=env, seed=seed, evals=[(1000, final / 2), (2000, final)], final=final)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["config"].update(fields or {})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if normalized is not None:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "normalized_score": normalized}))
    return run


def _statistics(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["statistics"]


def test_arms_are_named_by_the_algorithmic_fields_that_differ_and_tasks_by_env(tmp_path: Path):
    made = []
    for utd, ratio in ((20, 0.5), (1, 0.5), (20, 0.25)):
        for env, horizon in (("Hopper-v5", 1000), ("Walker2d-v5", 500)):
            for seed in (0, 1):
                made.append(sweep_run(tmp_path / "runs", f"{env}-{utd}-{ratio}-s{seed}", env=env, seed=seed,
                                      final=10.0 * utd + 100 * ratio + seed, fields={
                                          "utd": utd, "synthetic_ratio": ratio,
                                          "max_episode_steps": horizon,  # set per env: not an arm field
                                          "eval_every": 1000 + seed, "run_dir": f"runs/{seed}", "device": "cpu"}))
    out = tmp_path / "out"
    make_report(made, out, bootstrap=FAST)
    st = _statistics(out)
    arms = ["utd=1, synthetic_ratio=0.5", "utd=20, synthetic_ratio=0.25", "utd=20, synthetic_ratio=0.5"]
    assert list(st["arms"]) == arms  # numbers in numeric order
    assert all(a["tasks"] == ["Hopper-v5", "Walker2d-v5"] and len(a["runs"]) == 4 for a in st["arms"].values())
    # raw returns are not comparable across envs: one task set per env, each with all three arms
    assert [(s["name"], s["kind"], s["arms"]) for s in st["task_sets"]] == [
        ("Hopper-v5", "return", arms), ("Walker2d-v5", "return", arms)]
    hopper = st["task_sets"][0]
    assert hopper["aggregates"]["utd=1, synthetic_ratio=0.5"]["scores"] == [[60.0], [61.0]]  # (runs, tasks)
    assert hopper["gap_threshold"] is None and "optimality_gap" not in hopper["aggregates"][arms[0]]


def test_offline_runs_are_tasks_by_dataset_and_normalized_scores_pool_tasks_with_gap_at_100(tmp_path: Path):
    made = []
    for dataset, base in (("diffrl/hopper/medium-quick-v0", 40.0), ("diffrl/hopper/expert-quick-v0", 90.0)):
        for mode, bonus in (("real", 0.0), ("mixed", 20.0)):
            for seed in range(3):
                made.append(sweep_run(tmp_path / "runs", f"{dataset[-15:]}-{mode}-s{seed}", seed=seed,
                                      final=1000.0 + seed, normalized=base + bonus + seed,
                                      fields={"dataset": dataset, "data_mode": mode}))
    out = tmp_path / "out"
    make_report(made, out, bootstrap=FAST)
    (ts,) = _statistics(out)["task_sets"]
    assert ts["kind"] == "normalized_score" and ts["gap_threshold"] == 100.0
    assert ts["tasks"] == ["diffrl/hopper/expert-quick-v0", "diffrl/hopper/medium-quick-v0"]
    mixed = np.array(ts["aggregates"]["data_mode=mixed"]["scores"])  # (3 runs, 2 tasks)
    assert mixed.tolist() == [[110.0, 60.0], [111.0, 61.0], [112.0, 62.0]]
    s = np.sort(mixed.ravel())  # IQM: the pooled 6 scores with 1 cut from each end
    assert ts["aggregates"]["data_mode=mixed"]["iqm"]["value"] == pytest.approx(s[1:-1].mean())
    assert ts["aggregates"]["data_mode=mixed"]["optimality_gap"]["value"] == pytest.approx(
        100 - np.minimum(mixed, 100).mean())
    (poi,) = ts["probability_of_improvement"]
    assert (poi["x"], poi["y"], poi["value"]) == ("data_mode=mixed", "data_mode=real", 1.0)
    diffs = {d["task"]: d for d in ts["paired_differences"]}
    assert diffs["diffrl/hopper/medium-quick-v0"]["differences"] == [20.0, 20.0, 20.0]
    assert diffs["diffrl/hopper/medium-quick-v0"]["mean"] == {"value": 20.0, "lo": 20.0, "hi": 20.0}
    per_task = ts["per_task"]["data_mode=real"]["diffrl/hopper/medium-quick-v0"]
    assert per_task["score_mean"] == pytest.approx(41.0) and per_task["return_mean"] == pytest.approx(1001.0)
    md = (out / "report.md").read_text()
    assert "| data_mode=mixed | data_mode=real | 1.00 [1.00, 1.00] |" in md
    assert "optimality gap (γ=100)" in md


def test_one_run_per_arm_says_cis_need_more_seeds_instead_of_printing_an_interval(tmp_path: Path):
    made = [sweep_run(tmp_path / "runs", f"utd{utd}", seed=utd, final=float(utd), fields={"utd": utd})
            for utd in (1, 20)]
    out = tmp_path / "out"
    md = make_report(made, out, bootstrap=FAST).read_text()
    assert "CIs need more seeds: `utd=1`, `utd=20` have one run per task" in md
    assert "| utd=1 | 1 | 1.0 (no CI: 1 run) |" in md
    assert "Paired differences" not in md  # seeds 1 and 20: none shared
    (ts,) = _statistics(out)["task_sets"]
    assert ts["aggregates"]["utd=1"]["iqm"] == {"value": 1.0, "lo": None, "hi": None}
    assert ts["probability_of_improvement"][0]["lo"] is None and ts["paired_differences"] == []


def test_cli_report_writes_the_statistics_sections_and_their_pngs(tmp_path: Path, capsys):
    from diffrl.cli import main

    made = [sweep_run(tmp_path / "runs", f"utd{utd}-s{seed}", seed=seed, final=100.0 * utd + seed,
                      fields={"utd": utd}) for utd in (1, 2) for seed in range(3)]
    out = tmp_path / "rep"
    assert main(["report", *map(str, made), "--out", str(out), "--metric", "eval/return_mean",
                 "--bootstrap-reps", "100", "--bootstrap-seed", "3", "--gap-threshold", "150"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for heading in ("## Statistics", "### final eval return on Hopper-v5", "| arm | runs per task | IQM | mean |",
                    "optimality gap (γ=150)", "Probability of improvement", "Paired differences",
                    "100 resamples, seed 3"):
        assert heading in md
    (ts,) = _statistics(out)["task_sets"]
    for png in ts["plots"].values():
        assert f"]({png})" in md and (out / png).read_bytes()[:8] == PNG_MAGIC
    assert set(ts["curves"]["bands"]["Hopper-v5"]) == {"utd=1", "utd=2"}
    band = ts["curves"]["bands"]["Hopper-v5"]["utd=2"]
    assert band["x"] == [1000.0, 2000.0] and band["mean"] == pytest.approx([100.5, 201.0])
    assert all(lo <= m <= hi for lo, m, hi in zip(band["lo"], band["mean"], band["hi"]))
