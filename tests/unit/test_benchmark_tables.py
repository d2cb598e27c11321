"""benchmarks/tables.py and the benchmark specs: every spec builds its trials' configs, RESULTS.md is what the
committed rows give, and a sweep table's statistics match an independent computation on hand-made rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from diffrl.config import load_yaml
from diffrl.sweep import spec_from_dict, trial_config, trials

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import tables  # noqa: E402


@pytest.mark.parametrize("spec_path", sorted(BENCH.glob("*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_spec_builds_its_trials_configs(spec_path, tmp_path):
    spec = spec_from_dict(load_yaml(spec_path), str(spec_path))
    assert spec.results and spec.results.startswith("benchmarks/results/")
    for t in trials(spec):
        trial_config(spec, t, tmp_path / spec.name / "trials" / t.id, resume=False)


def test_every_sweep_table_names_a_spec_and_results_md_is_what_the_rows_give():
    for table in tables.TABLES.values():
        if isinstance(table, tables.SweepTable):
            assert (BENCH / table.spec).is_file()
    assert tables.main(["--check"]) == 0, "run python benchmarks/tables.py and commit RESULTS.md"


def _iqm(x: np.ndarray) -> float:
    """The interquartile mean, written out: the mean of the middle half of the sorted scores (n divisible by 4)."""
    x = np.sort(x)
    q = len(x) // 4
    return float(x[q:len(x) - q].mean())


def test_sweep_table_statistics_on_hand_made_rows(tmp_path, monkeypatch):
    spec = {"name": "toy", "system": "train", "algo": "sac", "base": {"env": "Hopper-v5", "steps": 200},
            "arms": {"ctl": {"utd": 1}, "new": {"utd": 2}}, "seeds": [0, 1, 2, 3],
            "results": str(tmp_path / "rows.jsonl")}
    (tmp_path / "toy.yaml").write_text(__import__("yaml").safe_dump(spec))
    finals = {"ctl": [10.0, 40.0, 20.0, 30.0], "new": [15.0, 70.0, 26.0, 33.0]}
    from diffrl.runs.results import append_row

    for t in trials(spec_from_dict(spec, "toy.yaml")):
        v = finals[t.arm][t.seed]
        append_row(tmp_path / "rows.jsonl", {
            "sweep": "toy", "trial": t.id, "env": "Hopper-v5", "config": {"env": "Hopper-v5"}, "wall_s": 5.0,
            "curves": {"return_mean": [[100, v / 2], [200, v]]}, "git_rev": "abc1234def", "date": "2026-12-03 10:00",
            "machine": {"cpu": "toy cpu", "torch_threads": 1}, "versions": {"torch": "2.13.0"},
            "final": {"env_steps": 200, **({"diffusion_train_s": 100.0 * (t.seed + 1)} if t.arm == "new" else {})},
            "time_breakdown_s": {"rollout_s": 0.2 * (t.seed + 1), "update_s": 0.4}})
    text = tables.sweep_table(tables.SweepTable(str(tmp_path / "toy.yaml"), control="ctl", digits=2))
    new = np.array(finals["new"])
    diffs = new - np.array(finals["ctl"])
    assert f"| new | 4/4 | {_iqm(new):.2f} [" in text  # IQM 29.50
    assert f"| {new.mean():.2f} [" in text and "15.00, 70.00, 26.00, 33.00" in text
    assert f"{', '.join(f'{d:.2f}' for d in diffs)} | {diffs.mean():.2f} [" in text
    # P(new > ctl): the share of (new run, ctl run) pairs that new wins, ties counting one half
    p = np.mean([[1.0 if a > b else 0.5 if a == b else 0.0 for b in finals["ctl"]] for a in new])
    assert f"| {p:.2f} [" in text
    assert "4 runs" not in text and "8 runs; git abc1234" in text
    assert f"| {np.mean(new / 2):.2f} | 5 s |" in text  # the mean at half the budget, the median wall clock
    # with ALC@2 the mean over seeds of each run's mean over its two evaluations comes before it
    text = tables.sweep_table(tables.SweepTable(str(tmp_path / "toy.yaml"), control="ctl", digits=2, alc=2))
    assert "mean ALC@2" in text and f"| {np.mean(0.75 * new):.2f} | {np.mean(new / 2):.2f} | 5 s |" in text
    # the cost per env step: milliseconds of rollout (1, 2, 3, 4 by seed) and update, medians over seeds
    text = tables.sweep_table(tables.SweepTable(str(tmp_path / "toy.yaml"), control="ctl", digits=2, cost=True))
    assert "update ms / env step" in text and "| 5 s | 2.50 | 2.00 |" in text
    # the diffusion model's training seconds (100, 200, 300, 400 by seed): their median; none for a real-data arm
    text = tables.sweep_table(tables.SweepTable(str(tmp_path / "toy.yaml"), control="ctl", model_train=True))
    assert "model training" in text and "| 5 s | 250 s |" in text and "| 5 s | – |" in text
    # curves: linked under the task's table; drawn only when asked (RESULTS.md rewritten, never by --check)
    monkeypatch.setattr(tables, "FIGURES", tables.HERE / "figures-test-tmp")
    monkeypatch.setattr(tables, "draw_curves", lambda path, *a: drawn.append((path, *a)))
    drawn: list = []
    toy = tables.SweepTable(str(tmp_path / "toy.yaml"), control="ctl", curves=True)
    text = tables.sweep_table(toy, name="toy")
    assert "![Hopper-v5: return against env steps](figures-test-tmp/toy-Hopper-v5.png)" in text and not drawn
    assert tables.sweep_table(toy, name="toy", draw=True) == text
    (path, task, label, by_arm, metric), = drawn
    assert path.name == "toy-Hopper-v5.png" and sorted(by_arm) == ["ctl", "new"] and len(by_arm["new"]) == 4


def test_alc_is_the_mean_of_the_first_n_evaluations_and_needs_n_of_them():
    row = {"curves": {"return_mean": [[1000 * (i + 1), float(i)] for i in range(50)]}}
    assert tables.alc(row, "return_mean", 40) == pytest.approx(np.mean(np.arange(40)))
    assert tables.alc(row, "return_mean", 51) is None
    assert tables.alc({"curves": {}}, "return_mean", 40) is None


def test_curves_are_averaged_evaluation_by_evaluation_across_seeds(tmp_path):
    rows = {0: {"curves": {"return_mean": [[0, 0.0], [1000, 10.0], [2010, 20.0]]}},
            1: {"curves": {"return_mean": [[0, 2.0], [1010, 12.0]]}}}  # evaluated at other steps, one fewer
    xs, ys = tables.seed_curves(list(rows.values()), "return_mean")
    np.testing.assert_allclose(xs, [0, 1005])
    np.testing.assert_allclose(ys, [[0, 10], [2, 12]])
    tables.draw_curves(tmp_path / "c.png", "task", "return", {"arm": rows}, "return_mean")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_an_included_sweep_joins_the_table_as_an_arm_paired_by_seed_and_task(tmp_path):
    import yaml

    from diffrl.runs.results import append_row

    main_spec = {"name": "main", "system": "train", "algo": "sac", "base": {"env": "Hopper-v5", "steps": 200},
                 "arms": {"new": {"utd": 2}}, "seeds": [0, 1], "results": str(tmp_path / "main.jsonl")}
    other_spec = {"name": "scratch", "system": "train", "algo": "sac", "base": {"steps": 200},
                  "grid": {"env": ["Hopper-v5"]}, "seeds": [0, 1], "results": str(tmp_path / "other.jsonl")}
    scores = {("main", 0): 30.0, ("main", 1): 50.0, ("scratch", 0): 10.0, ("scratch", 1): 20.0}
    for spec in (main_spec, other_spec):
        (tmp_path / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
        for t in trials(spec_from_dict(spec, "x.yaml")):
            append_row(spec["results"], {
                "sweep": spec["name"], "trial": t.id, "env": "Hopper-v5", "config": {"env": "Hopper-v5"},
                "curves": {"return_mean": [[200, scores[spec["name"], t.seed]]]}, "wall_s": 1.0,
                "final": {"peak_rss_mib": 100.0 * (t.seed + 1)}})
    table = tables.SweepTable(str(tmp_path / "main.yaml"), include=(str(tmp_path / "scratch.yaml"),),
                              task_field="env", memory=True, pairs=(("new", "scratch"),))
    text = tables.sweep_table(table)
    assert "| scratch | 2/2 |" in text and "| new | 2/2 |" in text and "| 150 MiB |" in text
    assert "| new − scratch | 0, 1 | 20.0, 30.0 | 25.0 [" in text
    assert "(sweep `main`)" in text and "(sweep `scratch`)" in text


def test_breakdown_tables_average_fidelity_per_model_and_take_median_stage_costs():
    runs = {"dydiff": {s: {"final": {"fidelity/window/h1": 1.0 + s, "fidelity/window/return_error": 10.0,
                                     "fidelity/single_step/h1": 0.1, "stage_s/window_model": 100.0 * (s + 1),
                                     "stage_s/agent": 50.0}} for s in range(3)},
            "control": {0: {"final": {"stage_s/agent": 40.0, "eval_return_mean": 3.0}}}}
    fid = "\n".join(tables.breakdown_table("fidelity/", runs))
    assert "mean over up to 3 run(s) per model" in fid and "| model | h1 | return_error |" in fid
    assert "| window | 2.00 | 10.00 |" in fid and "| single_step | 0.10 | – |" in fid
    cost = "\n".join(tables.breakdown_table("stage_s/", runs))
    assert "| dydiff | 200 s | 50 s |" in cost and "| control | – | 40 s |" in cost
    assert tables.breakdown_table("nothing/", runs) == []
    # two arms with their own models: one row per arm and model, never a mean across arms
    runs["other"] = {s: {"final": {"fidelity/window/h1": 5.0}} for s in range(2)}
    fid = "\n".join(tables.breakdown_table("fidelity/", runs))
    assert "| dydiff: window | 2.00 | 10.00 |" in fid and "| other: window | 5.00 | – |" in fid
    assert "| window |" not in fid and "per model and arm" in fid


def test_a_task_pair_row_counts_only_the_seeds_both_arms_have(tmp_path):
    import yaml

    from diffrl.runs import stats
    from diffrl.runs.results import append_row

    spec = {"name": "pair", "system": "train", "algo": "sac", "base": {"env": "Hopper-v5", "steps": 200},
            "arms": {"new": {"utd": 2}, "ctl": {}}, "seeds": [0, 1, 2], "results": str(tmp_path / "pair.jsonl")}
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(spec))
    # the control misses seed 2, where the arm scores lowest: counted, it would pull P(new > ctl) down
    score = {("new", 0): 10.0, ("new", 1): 30.0, ("new", 2): -50.0, ("ctl", 0): 20.0, ("ctl", 1): 0.0}
    for t in trials(spec_from_dict(spec, "pair.yaml")):
        if (t.arm, t.seed) in score:
            append_row(spec["results"], {"sweep": "pair", "trial": t.id, "env": "Hopper-v5",
                                         "config": {"env": "Hopper-v5"}, "wall_s": 1.0,
                                         "curves": {"return_mean": [[200, score[t.arm, t.seed]]]}})
    table = tables.SweepTable(str(tmp_path / "pair.yaml"), task_field="env", control="ctl")
    row = next(line for line in tables.sweep_table(table, boot=stats.Bootstrap(reps=200)).splitlines()
               if line.startswith("| new − ctl |"))
    # paired seeds 0 and 1: differences -10 and +30; P over those runs only: new (10, 30) vs ctl (20, 0) -> 0.75
    assert row.startswith("| new − ctl | 0, 1 | -10.0, 30.0 | 10.0 [")
    paired = stats.improvement_probability(np.array([[10.0], [30.0]]), np.array([[20.0], [0.0]]))
    every = stats.improvement_probability(np.array([[10.0], [30.0], [-50.0]]), np.array([[20.0], [0.0]]))
    assert paired == 0.75 and every != paired
    assert row.split(" | ")[-1].startswith(f"{paired:.2f} [")


def test_the_overall_table_aggregates_whole_seeds_x_tasks_matrices_and_pairs_them(tmp_path):
    import yaml

    from diffrl.runs import stats
    from diffrl.runs.results import append_row

    spec = {"name": "agg", "system": "train", "algo": "sac", "base": {"steps": 200},
            "arms": {"new": {"utd": 2}, "ctl": {}}, "grid": {"env": ["Hopper-v5", "Walker2d-v5"]},
            "seeds": [0, 1, 2], "results": str(tmp_path / "agg.jsonl")}
    (tmp_path / "agg.yaml").write_text(yaml.safe_dump(spec))
    score = {("new", "Hopper-v5"): [10.0, 20.0, 30.0], ("new", "Walker2d-v5"): [1.0, 2.0, 3.0],
             ("ctl", "Hopper-v5"): [5.0, 5.0, 5.0], ("ctl", "Walker2d-v5"): [4.0, 0.0, 8.0]}
    for t in trials(spec_from_dict(spec, "agg.yaml")):
        arm, env = t.arm.split(",")[0], t.fields["env"]
        if (arm, env, t.seed) == ("new", "Walker2d-v5", 2):
            continue  # seed 2 of the arm misses a task: it leaves the arm's matrix and the pair
        append_row(spec["results"], {"sweep": "agg", "trial": t.id, "env": env, "config": {"env": env},
                                     "curves": {"return_mean": [[200, score[arm, env][t.seed]]]}, "wall_s": 1.0})
    table = tables.SweepTable(str(tmp_path / "agg.yaml"), task_field="env", pairs=(("new", "ctl"),), overall=True)
    text = tables.sweep_table(table, boot=stats.Bootstrap(reps=200))
    new = np.array([[10.0, 1.0], [20.0, 2.0]])
    ctl = np.array([[5.0, 4.0], [5.0, 0.0], [5.0, 8.0]])
    assert "**All 2 tasks**" in text
    # IQM: the middle half of the pooled scores: new (1, 2, 10, 20) -> 6.0; ctl (0, 4, 5, 5, 5, 8) -> 4.75
    assert "| new | 0, 1 | 6.0 [" in text and "| ctl | 0, 1, 2 | 4.8 [" in text
    # per seed: mean over tasks of new minus ctl, on the shared seeds 0 and 1: 5.5 - 4.5, 11.0 - 2.5
    assert "| new − ctl | 0, 1 | 1.0, 8.5 | 4.8 [" in text
    poi = stats.improvement_probability(new, ctl[:2])
    assert f"| {poi:.2f} [" in text.split("| new − ctl | 0, 1 |")[-1]


def test_the_data_line_counts_each_dataset_fingerprint_and_runs_without_one():
    runs = {"a": {0: {"final": {"dataset_fingerprint": "f1"}}, 1: {"final": {"dataset_fingerprint": "f1"}}},
            "b": {0: {"final": {"dataset_fingerprint": "f2"}}, 1: {"final": {}}}}
    line = tables.data_line(runs)[0]
    assert "`f1` (2 runs)" in line and "`f2` (1 run)" in line and "`not recorded` (1 run)" in line
    assert tables.data_line({"a": {0: {"final": {}}}}) == []  # no run recorded one: nothing to say


def test_the_rows_line_names_each_machine_with_its_cpu_flags_or_its_gpu():
    old = {"git_rev": "abc1234def", "date": "2026-12-03", "machine": {"cpu": "toy cpu", "torch_threads": 1}}
    new = {**old, "machine": {"cpu": "toy cpu", "cpu_flags": ["avx2", "avx512_bf16"], "torch_threads": 1}}
    gpu = {**old, "machine": {"cpu": "toy cpu", "cpu_flags": ["avx2"], "gpu": "toy gpu", "torch_threads": 1}}
    line = tables._provenance([old, new, gpu])
    assert "3 runs" in line and "; toy cpu (avx2, avx512_bf16), 1 torch thread(s); toy cpu, 1 torch thread(s); " \
        "toy gpu, 1 torch thread(s);" in line


def test_a_new_row_records_the_cpu_flags_that_decide_its_speed():
    from diffrl.runs.results import cpu_flags, provenance

    flags = provenance()["machine"]["cpu_flags"]
    assert flags == cpu_flags() and set(flags) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
