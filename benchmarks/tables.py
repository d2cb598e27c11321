"""The generated tables of ``benchmarks/RESULTS.md``, rebuilt from the committed rows in ``benchmarks/results/``.

    python benchmarks/tables.py                        # rewrite every generated table in RESULTS.md
    python benchmarks/tables.py --check                # exit 1 if RESULTS.md is not what the rows give (a test runs it)
    python benchmarks/tables.py --print synther-online # print one table

A generated table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->`` in RESULTS.md; the prose around it
is written by hand. A sweep table (the benchmarks that are sweep specs, ``benchmarks/*.yaml``) takes the latest row
of every trial of its sweep from the spec's ``results`` file and gives, per task and arm, with rliable's stratified
bootstrap (``diffrl.runs.stats``, 95% percentile CIs): the IQM and mean of the final score, each seed's value, the
mean at half the budget and the median wall clock per run (and, per table, the cost per env step, ALC@N and a
figure of the learning curves in ``benchmarks/figures/``, drawn when RESULTS.md is rewritten, not with ``--check``);
then each arm against the control arm: the per-seed paired differences and their mean with a CI, and the
probability of improvement. Raw returns are shown next to normalised scores where the env or dataset defines
references. A script table is the ``--table-only`` output of a
benchmark script that is not a sweep (peer comparisons, speed measurements).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffrl.config import load_yaml
from diffrl.runs import stats
from diffrl.runs.results import read_rows
from diffrl.sweep import spec_from_dict, trials

HERE = Path(__file__).parent
RESULTS_MD = HERE / "RESULTS.md"
FIGURES = HERE / "figures"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
BOOT = stats.Bootstrap()
METRIC_LABEL = {"return_mean": "return", "normalized_score": "normalised score", "success_rate": "success rate"}


@dataclasses.dataclass(frozen=True)
class SweepTable:
    """A table over one sweep's rows: its spec, the score column, the control arm of the paired comparisons."""

    spec: str
    """the sweep spec, relative to benchmarks/"""
    metric: str = "return_mean"
    """the curve the final score is read from: return_mean, normalized_score or success_rate"""
    control: str | None = None
    """the arm every other arm is compared with (paired by seed)"""
    pairs: tuple[tuple[str, str], ...] = ()
    """(arm, control) pairs to compare instead of every arm against ``control``"""
    digits: int = 1
    alc: int | None = None
    """also report ALC@N: the mean score over a run's first N evaluations (DiffPPO's area under the learning curve)"""
    cost: bool = False
    """also report the cost per env step: rollout and update milliseconds (evaluation excluded), median over seeds"""
    include: tuple[str, ...] = ()
    """other sweep specs whose arms join this table, paired by seed (e.g. PPO from scratch beside DiffPPO)"""
    task_field: str | None = None
    """the config field that names a row's task (None: its dataset's name, else its env)"""
    model_train: bool = False
    """also report the median seconds of diffusion-model training (``diffusion_train_s`` of the summary; a model
    shared by several arms of a seed shows in each); the wall clock is then the agent's stage only, as those
    pipelines measure it"""
    memory: bool = False
    """also report the median peak resident memory per run (``peak_rss_mib`` of the summary)"""
    breakdown: tuple[str, ...] = ()
    """summary prefixes to tabulate per task under the main table: ``fidelity/`` (per model, the mean over runs of
    each ``fidelity/<model>/<column>`` scalar) and ``stage_s/`` (per arm, the median seconds of each stage)"""
    overall: bool = False
    """also aggregate over every task (rliable's standard across tasks): per arm, IQM and mean of the
    (seeds x tasks) score matrix over the seeds it has on every task; per pair, the per-seed difference of the
    mean over tasks and the probability of improvement averaged over tasks"""
    curves: bool = False
    """also draw each task's learning curves (every arm's mean over seeds, its seeds' range shaded) into
    ``benchmarks/figures/<table>-<task>.png``, linked under the table"""


@dataclasses.dataclass(frozen=True)
class ScriptTable:
    """A benchmark script's own tables (``--table-only``), shown when its results file has rows."""

    argv: tuple[str, ...]
    results: str
    """its results file, relative to benchmarks/"""


TABLES: dict[str, SweepTable | ScriptTable] = {
    "synther-online": SweepTable("synther_online.yaml", digits=0, curves=True,
                                 pairs=(("sac-utd1", "sac-utd20"), ("redq-utd20", "sac-utd20"),
                                        ("synther", "sac-utd20"), ("synther", "redq-utd20"))),
    "iter-push": SweepTable("iter_push.yaml", metric="success_rate", digits=2,
                            pairs=(("iter", "her"), ("iter-diffusion", "her"), ("iter-diffusion", "iter"),
                                  ("iter-diffusion-4k", "iter"))),
    "iter-pickandplace": SweepTable("iter_pickandplace.yaml", metric="success_rate", control="iter", digits=2),
    "dppo-finetune": SweepTable("dppo_finetune.yaml", metric="normalized_score", control="dppo", cost=True,
                                curves=True),
    "dppo-baselines": SweepTable("dppo_baselines.yaml", metric="normalized_score", cost=True, curves=True,
                                 include=("dppo_finetune.yaml",), control="dppo-finetune/dppo"),
    "offline": SweepTable("offline.yaml", metric="normalized_score", control="bc"),
    "synther-offline": SweepTable("synther_offline.yaml", metric="normalized_score", model_train=True, pairs=tuple(
        (f"{agent}-{mode}", f"{agent}-real") for agent in ("td3bc", "iql") for mode in ("synthetic", "mixed"))),
    "synther-model-size": SweepTable("synther_model_size.yaml", metric="normalized_score", control="real",
                                     model_train=True),
    "synther-length": SweepTable("synther_length.yaml", metric="normalized_score", model_train=True,
                                 pairs=(("w256-10k", "real"), ("w256-100k", "real"), ("w256-100k", "w256-10k"))),
    "dydiff": SweepTable("dydiff.yaml", metric="normalized_score", breakdown=("fidelity/", "stage_s/"),
                         pairs=(("dydiff-td3bc", "td3bc"), ("dydiff-td3bc-16k", "td3bc"),
                                ("dydiff-td3bc-16k", "dydiff-td3bc")), overall=True),
    "dydiff-dql": SweepTable("dydiff_dql.yaml", metric="normalized_score", breakdown=("stage_s/",),
                             pairs=(("dydiff-dql", "dql"),), overall=True),
    "diffppo": SweepTable("diffppo.yaml", alc=40, cost=True, memory=True, curves=True, task_field="env",
                          include=("ppo_scratch.yaml",),
                          pairs=(("augment", "bc-real"), ("bc-real", "ppo-scratch"), ("augment", "ppo-scratch"),
                                 ("prior", "ppo-scratch"))),
    "sampler-fidelity": ScriptTable(("benchmarks/sampler_fidelity.py",), "results/sampler_fidelity.jsonl"),
    "dydiff-window-fit": ScriptTable(("benchmarks/dydiff_window_fit.py",), "results/dydiff_window_fit.jsonl"),
    "dydiff-samplers": ScriptTable(("benchmarks/dydiff_samplers.py",), "results/dydiff_samplers.jsonl"),
    "dydiff-halfcheetah": ScriptTable(("benchmarks/dydiff_halfcheetah.py",), "results/dydiff_halfcheetah.jsonl"),
    "dql-eval-modes": ScriptTable(("benchmarks/dql_eval_modes.py",), "results/dql_eval_modes.jsonl"),
    "dql-critic": ScriptTable(("benchmarks/dql_critic.py",), "results/dql_critic.jsonl"),
    "update-speed": ScriptTable(("benchmarks/update_speed.py",), "results/update_speed.jsonl"),
    "sac-vs-sb3": ScriptTable(("benchmarks/sac_vs_sb3.py",), "results/sac_vs_sb3.jsonl"),
    "her-vs-sb3": ScriptTable(("benchmarks/her_vs_sb3.py",), "results/her_vs_sb3.jsonl"),
    "ppo-vs-sb3": ScriptTable(("benchmarks/ppo_vs_sb3.py",), "results/ppo_vs_sb3.jsonl"),
    "gpu-check": ScriptTable(("benchmarks/gpu_check.py",), "results/gpu_check.jsonl"),
}


# ------------------------------------------------------------------------------------------------ sweep tables
def latest_rows(rows: Sequence[dict[str, Any]], sweep: str) -> dict[str, dict[str, Any]]:
    """The last row of each trial of ``sweep`` (a trial run again, e.g. from a fresh clone, adds a newer row)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("sweep") == sweep:
            out[r["trial"]] = r
    return out


def arm_name(label: str) -> str:
    """A trial's arm without the grid values that name its task (dataset, env): the task has its own table."""
    return ",".join(p for p in label.split(",") if not p.startswith(("dataset=", "env="))) or "run"


def task_of(row: dict[str, Any]) -> str:
    """The task a row scores: its dataset's name where it has one, else its env."""
    dataset = row["config"].get("dataset")
    return Path(dataset).stem if dataset else str(row.get("env"))


def final(row: dict[str, Any], metric: str) -> float | None:
    """The score at the run's last evaluation."""
    curve = row["curves"].get(metric)
    return float(curve[-1][1]) if curve else None


def at_fraction(row: dict[str, Any], metric: str, fraction: float) -> float | None:
    """The score at the first evaluation at or after ``fraction`` of the run's last evaluation point."""
    curve = row["curves"].get(metric)
    if not curve:
        return None
    target = fraction * curve[-1][0]
    return float(next(v for x, v in curve if x >= target))


def alc(row: dict[str, Any], metric: str, n: int) -> float | None:
    """ALC@n: the mean score over the run's first ``n`` evaluations (the area under the learning curve with unit
    spacing, over the number of evaluations); None when the run has fewer than ``n``."""
    curve = row["curves"].get(metric)
    if not curve or len(curve) < n:
        return None
    return float(np.mean([v for _, v in curve[:n]]))


def cost_ms(row: dict[str, Any], part: str) -> float | None:
    """Milliseconds of the run's ``part`` (``rollout_s``, ``update_s`` of its time breakdown) per env step."""
    spent, steps = (row.get("time_breakdown_s") or {}).get(part), row["final"].get("env_steps")
    return 1e3 * spent / steps if spent is not None and steps else None


def _f(v: float | None, d: int) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def _ci(iv: stats.Interval, d: int) -> str:
    return _f(iv.value, d) + ("" if iv.lo is None else f" [{_f(iv.lo, d)}, {_f(iv.hi, d)}]")


def _machine(m: dict[str, Any]) -> str:
    """A row's device: its GPU, else its CPU with the flags that decide its speed (rows from before they were
    recorded name the CPU alone)."""
    if m.get("gpu"):
        return m["gpu"]
    return m.get("cpu", "?") + (f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else "")


def _provenance(rows: Sequence[dict[str, Any]]) -> str:
    revs = sorted({(s.get("git_rev") or "?")[:7] + ("+edits" if s.get("git_dirty") else "")
                   for r in rows for s in r.get("starts", [r])})  # every revision a run ran under
    dates = sorted(str(r.get("date", "?"))[:10] for r in rows)
    cpus = sorted({f"{_machine(r['machine'])}, {r['machine'].get('torch_threads')} torch thread(s)"
                   for r in rows if r.get("machine")})
    torch = sorted({r.get("versions", {}).get("torch", "?") for r in rows})
    runs = f"{len(rows)} run{'s' if len(rows) != 1 else ''}"
    return (f"{runs}; git {', '.join(revs)}; {dates[0]} – {dates[-1]}; {'; '.join(cpus)}; "
            f"torch {', '.join(torch)}")


def breakdown_table(prefix: str, by_arm: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Markdown lines of the ``prefix/...`` scalars of a task's runs (see :attr:`SweepTable.breakdown`)."""
    cells: dict[str, dict[str, list[float]]] = {}  # row -> column -> values
    # per-model rows (prefix/model/column) are kept apart per arm when several arms have them: two arms' models
    # (e.g. window models trained with two budgets) are not one model
    nested = {arm for arm, runs in by_arm.items() for r in runs.values()
              for key in r["final"] if key.startswith(prefix) and "/" in key[len(prefix):]}
    for arm, runs in by_arm.items():
        for r in runs.values():
            for key, v in r["final"].items():
                if key.startswith(prefix) and isinstance(v, (int, float)) and np.isfinite(v):
                    parts = key[len(prefix):].split("/")
                    if len(parts) > 1:
                        row, col = (parts[0] if len(nested) < 2 else f"{arm}: {parts[0]}"), "/".join(parts[1:])
                    else:
                        row, col = arm, parts[0]
                    cells.setdefault(row, {}).setdefault(col, []).append(float(v))
    if not cells:
        return []
    cols = list(dict.fromkeys(c for row in cells.values() for c in row))
    if prefix == "stage_s/":
        lines = ["Cost of each stage: median seconds over the arm's runs (a reused stage counts its own run's cost)",
                 "", "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {row} | " + " | ".join(f"{np.median(v[c]):.0f} s" if c in v else "–" for c in cols) + " |"
                  for row, v in cells.items()]
    else:
        n = max(len(x) for v in cells.values() for x in v.values())
        lines = [f"`{prefix}`: mean over up to {n} run(s) per model" + (" and arm" if len(nested) > 1 else ""), "",
                 "| model | " + " | ".join(cols) + " |",
                 "|---|" + "---|" * len(cols)]
        lines += [f"| {row} | " + " | ".join(_f(float(np.mean(v[c])), 2) if c in v else "–" for c in cols) + " |"
                  for row, v in cells.items()]
    return lines + [""]


def figure_path(name: str, task: str) -> Path:
    return FIGURES / f"{name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"


def seed_curves(runs: Sequence[dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x (E,), y (R, E))``: the first ``E`` evaluations every run has, at their mean env step, one row per run."""
    curves = [np.asarray(r["curves"].get(metric, []), dtype=float).reshape(-1, 2) for r in runs]
    n = min((len(c) for c in curves), default=0)
    return np.mean([c[:n, 0] for c in curves], axis=0) if n else np.zeros(0), np.array([c[:n, 1] for c in curves])


def draw_curves(path: Path, task: str, label: str, by_arm: dict[str, dict[int, dict[str, Any]]],
                metric: str) -> None:
    """Every arm's mean curve over its seeds against env steps (the seeds' min-max range shaded), to ``path``.

    Seeds are averaged evaluation by evaluation (the i-th of each run, at their mean env step: on-policy runs
    evaluate after whole iterations, whose env steps differ a little between seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, runs in by_arm.items():
        xs, ys = seed_curves(list(runs.values()), metric)
        if not len(xs):
            continue
        line, = ax.plot(xs, ys.mean(0), label=f"{arm} (n={len(ys)})")
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("env steps")
    ax.set_ylabel(label)
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def median_final(runs: dict[int, dict[str, Any]], key: str, unit: str) -> str:
    """The cell of a summary figure: its median over the runs that report it (whole ``unit``), "–" if none does."""
    values = [v for v in (r["final"].get(key) for r in runs.values()) if v]
    return f"{np.median(values):.0f} {unit}" if values else "–"


def sweep_table(table: SweepTable, boot: stats.Bootstrap = BOOT, name: str | None = None,
                draw: bool = False) -> str:
    """The markdown of one sweep table (see the module docstring); with ``draw`` (and ``table.curves``) its
    figures are written too (the markdown links them either way)."""
    spec = spec_from_dict(load_yaml(HERE / table.spec), table.spec)
    if spec.results is None:
        raise ValueError(f"{table.spec} names no results file")
    rows = latest_rows(read_rows(HERE.parent / spec.results), spec.name)
    command = f"`diffrl sweep benchmarks/{table.spec}`"
    if not rows:
        return f"No rows yet in `{spec.results}`: run {command}.\n"
    # (arm, seed, row) of this sweep's trials, then of the included sweeps' (their arms named by their sweep)
    entries = [(arm_name(t.arm), t.seed, rows[t.id]) for t in trials(spec) if t.id in rows]
    sources = [f"`{spec.results}` (sweep `{spec.name}`): {_provenance(list(rows.values()))}"]
    for other in table.include:
        ospec = spec_from_dict(load_yaml(HERE / other), other)
        orows = latest_rows(read_rows(HERE.parent / ospec.results), ospec.name) if ospec.results else {}
        for t in trials(ospec):
            if t.id in orows:
                arm = arm_name(t.arm)
                entries.append((ospec.name if arm == "run" else f"{ospec.name}/{arm}", t.seed, orows[t.id]))
        if orows:
            sources.append(f"`{ospec.results}` (sweep `{ospec.name}`): {_provenance(list(orows.values()))}")
            command += f" and `diffrl sweep benchmarks/{other}`"
    arms = list(dict.fromkeys(arm for arm, _, _ in entries))
    task = task_of if table.task_field is None else (lambda r: str(r["config"].get(table.task_field)))
    tasks = list(dict.fromkeys(task(r) for _, _, r in entries))
    d = table.digits
    label = METRIC_LABEL.get(table.metric, table.metric)
    extra_raw = table.metric == "normalized_score"
    out = [f"Rows: {'; '.join(sources)}. Regenerate: {command}, then `python benchmarks/tables.py`.", ""]
    for task_name in tasks:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {}
        for arm, seed, r in entries:
            if task(r) == task_name and final(r, table.metric) is not None:
                by_arm.setdefault(arm, {})[seed] = r
        head = (f"**{task_name}**: {label} at the last evaluation, IQM and mean over seeds with 95% "
                "stratified-bootstrap CIs")
        out += [head + (", raw return beside it" if extra_raw else "") + "; mean at half the budget; median wall "
                "clock per run" + (" (the agent's stage) and median seconds of diffusion-model training (a model "
                                   "shared by several arms shows in each)" if table.model_train else "")
                + ("; median rollout and update milliseconds per env step" if table.cost else ""), ""]
        cols = ["arm", "n", f"IQM {label}", f"mean {label}", "per seed"]
        cols += ["mean return"] if extra_raw else []
        cols += [f"mean ALC@{table.alc}"] if table.alc else []
        cols += ["mean at half budget", "wall per run"]
        cols += ["rollout ms / env step", "update ms / env step"] if table.cost else []
        cols += ["model training"] if table.model_train else []
        cols += ["peak memory"] if table.memory else []
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for arm in arms:
            runs = by_arm.get(arm)
            if not runs:
                continue
            seeds = sorted(runs)
            scores = np.array([[final(runs[s], table.metric)] for s in seeds])  # (R, 1): seeds x one task
            agg = stats.aggregate_metrics(scores, boot=boot)
            per_seed = ", ".join(f"{_f(float(v), d)}" for v in scores[:, 0])
            cells = [arm, f"{len(seeds)}/{len(spec.seeds)}", _ci(agg["iqm"], d),
                     _ci(agg["mean"], d), per_seed]
            if extra_raw:
                raw = [final(runs[s], "return_mean") for s in seeds]
                cells.append(_f(float(np.mean([v for v in raw if v is not None])), 0) if any(
                    v is not None for v in raw) else "–")
            if table.alc:
                areas = [alc(runs[s], table.metric, table.alc) for s in seeds]
                cells.append(_f(float(np.mean([v for v in areas if v is not None])), d) if any(
                    v is not None for v in areas) else "–")
            half = [at_fraction(runs[s], table.metric, 0.5) for s in seeds]
            cells.append(_f(float(np.mean([v for v in half if v is not None])), d) if any(
                v is not None for v in half) else "–")
            walls = [runs[s].get("wall_s") for s in seeds]
            cells.append(f"{np.median([w for w in walls if w]):.0f} s" if any(walls) else "–")
            for part in ("rollout_s", "update_s") if table.cost else ():
                ms = [v for v in (cost_ms(runs[s], part) for s in seeds) if v is not None]
                cells.append(_f(float(np.median(ms)), 2) if ms else "–")
            if table.model_train:
                cells.append(median_final(runs, "diffusion_train_s", "s"))
            if table.memory:
                cells.append(median_final(runs, "peak_rss_mib", "MiB"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out += data_line(by_arm)
        if table.curves and name is not None:
            path = figure_path(name, task_name)
            if draw:
                draw_curves(path, task_name, label, by_arm, table.metric)
            out += [f"![{task_name}: {label} against env steps]({path.relative_to(HERE).as_posix()})", ""]
        for prefix in table.breakdown:
            out += breakdown_table(prefix, by_arm)
        pairs = tuple((a, c) for a, c in table_pairs(table, arms) if a in by_arm and c in by_arm)
        if pairs:
            out += ["Paired by seed: per-seed differences, their mean with a 95% bootstrap CI, and the probability "
                    "that a run of the arm beats a run of the control (95% CI)", "",
                    "| arm − control | seeds | per-seed difference | mean difference | P(arm > control) |",
                    "|---|---|---|---|---|"]
            for arm, ctl in pairs:
                x = {s: final(r, table.metric) for s, r in by_arm[arm].items()}
                y = {s: final(r, table.metric) for s, r in by_arm[ctl].items()}
                diff = stats.paired_difference(x, y, boot=boot)
                if diff is None:
                    out.append(f"| {arm} − {ctl} | none shared | – | – | – |")
                    continue
                # P(arm > control) over the shared seeds only, like every other cell of the row: counting a seed
                # that only one arm has would mix unpaired runs into a row that says it is paired
                xs, ys = (np.array([[m[s]] for s in diff.seeds]) for m in (x, y))
                poi = stats.probability_of_improvement(xs, ys, boot=boot)
                out.append(f"| {arm} − {ctl} | {', '.join(map(str, diff.seeds))} | "
                           f"{', '.join(_f(v, d) for v in diff.differences)} | {_ci(diff.mean, d)} | {_ci(poi, 2)} |")
            out.append("")
    if table.overall and len(tasks) > 1:
        out += overall_table(table, arms, tasks, entries, task, boot)
    return "\n".join(out)


def table_pairs(table: SweepTable, arms: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The (arm, control) pairs to compare: ``table.pairs``, else every arm against ``table.control``."""
    return table.pairs or tuple((a, table.control) for a in arms if table.control and a != table.control)


def data_line(by_arm: Mapping[str, Mapping[int, dict[str, Any]]]) -> list[str]:
    """Which data the task's runs trained on: their datasets' fingerprints (a hash of the arrays, in the summary of
    every offline run since it was recorded), so runs on a dataset built anew with other contents show; nothing
    when no run recorded one."""
    prints = [r.get("final", {}).get("dataset_fingerprint") for runs in by_arm.values() for r in runs.values()]
    if not any(prints):
        return []
    counts = collections.Counter(p or "not recorded" for p in prints)
    return ["Data: " + ", ".join(f"`{p}` ({n} run{'s' if n > 1 else ''})" for p, n in counts.items()) +
            " (dataset fingerprints; runs from before they were recorded say so)", ""]


def overall_table(table: SweepTable, arms: Sequence[str], tasks: Sequence[str],
                  entries: Sequence[tuple[str, int, dict[str, Any]]], task: Callable[[dict[str, Any]], str],
                  boot: stats.Bootstrap) -> list[str]:
    """The aggregate over every task (``SweepTable.overall``): only seeds an arm has on every task count, so each
    arm's (seeds x tasks) matrix is whole and a pair compares the same seeds on the same tasks."""
    score: dict[str, dict[int, dict[str, float]]] = {}  # arm -> seed -> task -> final score
    for arm, seed, r in entries:
        v = final(r, table.metric)
        if v is not None:
            score.setdefault(arm, {}).setdefault(seed, {})[task(r)] = float(v)

    def whole(arm: str, seeds: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        have = sorted(s for s, by_task in score.get(arm, {}).items() if all(t in by_task for t in tasks))
        have = [s for s in have if seeds is None or s in seeds]
        return have, np.array([[score[arm][s][t] for t in tasks] for s in have]).reshape(len(have), len(tasks))

    d, label = table.digits, METRIC_LABEL.get(table.metric, table.metric)
    lines = [f"**All {len(tasks)} tasks**: {label} at the last evaluation over the seeds an arm has on every task; "
             "IQM of the seeds x tasks scores and mean over tasks, 95% stratified-bootstrap CIs", "",
             f"| arm | seeds | IQM {label} | mean {label} |", "|---|---|---|---|"]
    for arm in arms:
        seeds, m = whole(arm)
        if seeds:
            agg = stats.aggregate_metrics(m, boot=boot)
            lines.append(f"| {arm} | {', '.join(map(str, seeds))} | {_ci(agg['iqm'], d)} | {_ci(agg['mean'], d)} |")
    rows = []
    for arm, ctl in table_pairs(table, arms):
        shared = sorted(set(whole(arm)[0]) & set(whole(ctl)[0]))
        if not shared:
            continue
        (_, x), (_, y) = whole(arm, shared), whole(ctl, shared)
        diff = stats.paired_difference(dict(zip(shared, x.mean(1))), dict(zip(shared, y.mean(1))), boot=boot)
        poi = stats.probability_of_improvement(x, y, boot=boot)
        rows.append(f"| {arm} − {ctl} | {', '.join(map(str, shared))} | "
                    f"{', '.join(_f(v, d) for v in diff.differences)} | {_ci(diff.mean, d)} | {_ci(poi, 2)} |")
    if rows:
        lines += ["", "Paired by seed over every task: per seed, the arm's mean over tasks minus the control's; their "
                  "mean with a 95% bootstrap CI; P(arm > control) averaged over tasks", "",
                  "| arm − control | seeds | per-seed difference | mean difference | P(arm > control) |",
                  "|---|---|---|---|---|", *rows]
    return lines + [""]


# ------------------------------------------------------------------------------------------------ script tables
def script_table(table: ScriptTable) -> str:
    if not read_rows(HERE / table.results):
        return f"No rows yet in `benchmarks/{table.results}`: run `python {' '.join(table.argv)}`.\n"
    out = subprocess.run([sys.executable, *table.argv, "--table-only"], capture_output=True, text=True, check=True,
                         cwd=HERE.parent)
    return out.stdout.strip() + "\n"


def render(name: str, draw: bool = False) -> str:
    table = TABLES[name]
    return sweep_table(table, name=name, draw=draw) if isinstance(table, SweepTable) else script_table(table)


def regenerate(text: str, make: Callable[[str], str] = render) -> str:
    """``text`` with every generated block replaced by what the rows give now (unknown names: an error)."""
    def body(m: re.Match[str]) -> str:
        if m["name"] not in TABLES:
            raise ValueError(f"RESULTS.md names an unknown table {m['name']!r}; known: {', '.join(TABLES)}")
        return m.group(1) + make(m["name"]).rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(body, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md differs from the rows' tables")
    ap.add_argument("--print", dest="name", choices=sorted(TABLES), help="print one table and change nothing")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    if args.name:
        print(render(args.name))
        return 0
    text = args.results_md.read_text()
    new = regenerate(text, render if args.check else lambda name: render(name, draw=True))
    if args.check:
        if new != text:
            print(f"{args.results_md} is out of date with benchmarks/results/: run python benchmarks/tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.results_md.write_text(new)
    print(f"{args.results_md}: {len(BLOCK.findall(new))} generated tables", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
