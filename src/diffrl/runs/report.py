"""Report over finished runs: ``report.md``, ``report.json``, one learning-curve PNG per experiment and, per task
set, statistics with rliable (:mod:`diffrl.runs.stats`) and their plots.

Runs are grouped by (pipeline, env id) and, within that, by any setting that differs between them (e.g. SynthER's
``data_mode``); the runs of a group are the seeds of one experiment. Final numbers
come from each run's ``summary.json`` (its last evaluation), curves from its ``metrics.csv``.

For the statistics, runs form arms (the config fields that differ between runs of one task, e.g.
``utd=20, synthetic_ratio=0.5``) and tasks (env id, or dataset for offline runs); an arm's scores on a task set are
a ``(runs, tasks)`` matrix of final normalized scores where the summaries have them, else final returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffrl.errors import CheckpointError, ConfigError
from diffrl.runs import stats
from diffrl.runs.logger import read_metrics, x_column
from diffrl.runs.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    read_config,
    read_summary,
    slug,
    write_json_atomic,
)

FINAL_KEYS = ("eval_return_mean", "eval_return_std", "best_eval_return", "success_rate",  # from summary.json
              "normalized_score")
# config fields that never make two runs different experiments
BOOKKEEPING = frozenset({"seed", "run_dir", "runs_root", "resume", "progress", "wandb", "wandb_project", "device",
                         "keep_checkpoints", "diffusion"})
# ... nor does how often a run evaluates, logs and saves: fields that change no algorithm
NOT_ALGORITHMIC = BOOKKEEPING | {"eval_every", "eval_episodes", "log_every", "checkpoint_every", "fidelity_samples",
                                 "overwrite", "out"}
Curve = tuple[np.ndarray, np.ndarray]  # (x, metric), x strictly increasing


@dataclass
class _Run:
    path: Path
    pipeline: str
    env: str
    seed: Any
    summary: dict[str, Any]  # {} when the run has no summary.json (unfinished)
    rows: list[dict[str, float]]  # metrics rows where the metric was logged
    env_steps: float | None
    wall_s: float | None
    config: dict[str, Any]

    def get(self, key: str) -> float | None:
        v = self.summary.get(key)
        return None if v is None or math.isnan(v) else float(v)


def _load_run(path: Path, metric: str) -> _Run:
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a diffrl run directory (no {CONFIG_FILE}); pass directories "
                              "written by a diffrl command, e.g. runs/train_sac/<env>/<timestamp>-s0.")
    if not (path / METRICS_FILE).is_file():
        raise CheckpointError(f"run {path} has no {METRICS_FILE}; rerun it or leave it out of the report.")
    cfg = read_config(path)
    summary: dict[str, Any] = {}
    try:
        if (path / SUMMARY_FILE).is_file():
            summary = read_summary(path)
        all_rows = read_metrics(path)
    except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"run {path} has an unreadable {SUMMARY_FILE} or {METRICS_FILE} ({e}); "
                              "leave it out of the report.") from None
    env = cfg["config"].get("env") or summary.get("env_id")
    if not env:
        raise CheckpointError(f"{path / CONFIG_FILE} names no env; this report covers env-based runs only.")
    last = all_rows[-1] if all_rows else {}
    # An unfinished run has no summary: take steps and wall time from its last logged row.
    steps = summary.get("env_steps", last.get("env_steps"))
    wall = summary.get("wall_s", last.get("wall_s"))
    return _Run(path, str(cfg["pipeline"]), str(env), summary.get("seed", cfg["config"].get("seed")), summary,
                [r for r in all_rows if not math.isnan(r.get(metric, math.nan))],
                None if steps is None or math.isnan(steps) else float(steps),
                None if wall is None or math.isnan(wall) else float(wall), dict(cfg["config"]))


def _variants(runs: Sequence[_Run]) -> list[str]:
    """A label per run naming the settings that differ among runs of one (pipeline, env): '' when none do."""
    keys = sorted({k for r in runs for k in r.config} - NOT_ALGORITHMIC)
    varying = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    return [", ".join(f"{k}={r.config.get(k)}" for k in varying) for r in runs]


def _curves(runs: Sequence[_Run], metric: str, x: str) -> tuple[list[Curve], str]:
    """Each seed's curve and the x column used: ``x`` if every eval row has it, else ``step`` for all."""
    rows = [r.rows for r in runs if r.rows]
    col = x_column([row for rs in rows for row in rs], x)
    curves = []
    for rs in rows:
        pts = {row[col]: row[metric] for row in rs}  # a repeated x keeps its last value
        xs = np.array(sorted(pts))
        curves.append((xs, np.array([pts[v] for v in xs])))
    return curves, col


def _aggregate(curves: list[Curve], band: str) -> tuple[np.ndarray, ...]:
    """Mean and band of seeds aligned on the union of their x values."""
    xs = np.unique(np.concatenate([c[0] for c in curves]))
    ys = np.full((len(curves), len(xs)), np.nan)  # (seeds, len(xs))
    for i, (cx, cy) in enumerate(curves):
        inside = (xs >= cx[0]) & (xs <= cx[-1])  # interpolate inside a seed's range only, never extrapolate
        ys[i, inside] = np.interp(xs[inside], cx, cy)
    mean = np.nanmean(ys, axis=0)  # every x lies in some seed's range, so no all-NaN column
    if band == "std":
        sd = np.nanstd(ys, axis=0)
        return xs, mean, mean - sd, mean + sd
    return xs, mean, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def _new_figure(width: float, height: float) -> Any:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _plot(curves: list[Curve], x_col: str, title: str, metric: str, band: str, png: Path) -> None:
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    xs, mean, lo, hi = _aggregate(curves, band)
    n = len(curves)
    ax.plot(xs, mean, label=f"mean of {n} seeds" if n > 1 else "1 seed")
    if n > 1:
        label = "min–max over seeds" if band == "minmax" else "±1 std over seeds"
        ax.fill_between(xs, lo, hi, alpha=0.25, label=label)
    ax.set(title=title, xlabel=x_col.replace("_", " "), ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(png)


def _stats(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else (None, None, 0)


def _f(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def _time(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


# ---------------------------------------------------------------------------------------------------------------
# Statistics over arms (rliable): arms = runs that share every algorithmic setting, tasks = env or dataset.

TASK_FIELDS = frozenset({"env", "dataset"})  # what a task is: an env id, or a dataset for offline runs
# score kind -> (summary.json key, label, optimality-gap threshold gamma): the best score a run can be counted for
SCORE_KINDS: dict[str, tuple[str, str, float | None]] = {
    "normalized_score": ("normalized_score", "normalized score", 100.0),  # D4RL: 100 = the expert reference
    "success_rate": ("success_rate", "success rate", 1.0),
    "return": ("eval_return_mean", "final eval return", None),  # no natural gamma: only when given
}


def _task(run: _Run) -> str:
    """A run's task: its dataset when it has one (offline), else its env id."""
    dataset = run.config.get("dataset")
    return str(dataset) if dataset else run.env


def _natural(v: Any) -> tuple[int, Any]:
    """Sort key that puts numbers in numeric order (utd=5 before utd=20) and before strings."""
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _arms(runs: Sequence[_Run]) -> tuple[list[str], dict[str, tuple]]:
    """An arm name per run and a sort key per arm name.

    An arm's fields are the config fields whose value differs between runs of the same task (bookkeeping and
    evaluation cadence aside), so task-specific settings never split an arm; the pipeline leads the name when
    runs come from several. Example: ``utd=20, synthetic_ratio=0.5``.
    """
    by_task: dict[str, list[_Run]] = {}
    for r in runs:
        by_task.setdefault(_task(r), []).append(r)
    keys = list(dict.fromkeys(k for r in runs for k in r.config))  # config order, as the runs wrote it
    fields = [k for k in keys if k not in NOT_ALGORITHMIC | TASK_FIELDS
              and any(len({repr(r.config.get(k)) for r in rs}) > 1 for rs in by_task.values())]
    several_pipelines = len({r.pipeline for r in runs}) > 1
    names, order = [], {}
    for r in runs:
        parts = [r.pipeline] if several_pipelines else []
        parts += [f"{k}={r.config[k]}" for k in fields if k in r.config]
        name = ", ".join(parts) or r.pipeline
        names.append(name)
        order[name] = (r.pipeline, tuple(_natural(r.config.get(k)) for k in fields))
    return names, order


def _score_kind(runs: Sequence[_Run], metric: str) -> str:
    """The score of a task: normalized score if every finished run has one, else the success rate for goal tasks
    (when that is the report's metric), else the final eval return."""
    finished = [r for r in runs if r.summary]
    kinds = ["normalized_score"] + (["success_rate"] if metric == "eval/success_rate" else [])
    for kind in kinds:
        if finished and all(r.get(SCORE_KINDS[kind][0]) is not None for r in finished):
            return kind
    return "return"


@dataclass(frozen=True)
class _TaskSet:
    """Tasks whose scores are aggregated together, and the arms that ran all of them."""

    name: str
    kind: str
    tasks: tuple[str, ...]
    arms: tuple[str, ...]


def _task_sets(scored: dict[str, dict[str, list[_Run]]], kinds: dict[str, str],
               order: dict[str, tuple]) -> list[_TaskSet]:
    """Raw returns are on each task's own scale: one set per task. Normalized scores and success rates share a
    scale: tasks run by the same arms form one set."""
    sets, shared = [], {}
    for task in sorted(scored):
        arms = tuple(sorted(scored[task], key=lambda a: order[a]))
        if kinds[task] == "return":
            sets.append(_TaskSet(task, "return", (task,), arms))
        else:
            shared.setdefault((kinds[task], arms), []).append(task)
    for (kind, arms), tasks in shared.items():
        sets.append(_TaskSet(", ".join(tasks), kind, tuple(tasks), arms))
    return sorted(sets, key=lambda s: (s.kind != "normalized_score", s.name))


def _seed_order(r: _Run) -> tuple:
    return (_natural(r.seed), str(r.path))


def _ci(iv: stats.Interval | None, spec: str = ".1f") -> str:
    if iv is None:
        return "—"
    if iv.lo is None or iv.hi is None:
        return f"{iv.value:{spec}} (no CI: 1 run)"
    return f"{iv.value:{spec}} [{iv.lo:{spec}}, {iv.hi:{spec}}]"


def _plot_aggregates(results: dict[str, dict[str, stats.Interval]], title: str, png: Path) -> None:
    """One panel per metric, one row per arm: the point estimate and its CI bar."""
    arms = list(results)
    names = list(next(iter(results.values())))
    fig = _new_figure(2.8 * len(names) + 1.5, 0.45 * len(arms) + 1.6)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        for i, arm in enumerate(arms):
            iv = results[arm][name]
            color = f"C{i % 10}"
            if iv.lo is not None and iv.hi is not None:
                ax.plot([iv.lo, iv.hi], [i, i], color=color, linewidth=6, alpha=0.45, solid_capstyle="butt")
            ax.plot([iv.value], [i], "|", color=color, markersize=14, markeredgewidth=2)
        ax.set_title(name.replace("_", " ").replace("iqm", "IQM"))
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(arms)), arms)
    axes[0].set_ylim(-0.6, len(arms) - 0.4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png)


def _plot_profiles(profiles: dict[str, stats.Profile], label: str, title: str, png: Path) -> None:
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for i, (arm, p) in enumerate(profiles.items()):
        ax.plot(p.taus, p.fraction, color=f"C{i % 10}", label=arm)
        if p.lo is not None and p.hi is not None:
            ax.fill_between(p.taus, p.lo, p.hi, color=f"C{i % 10}", alpha=0.2)
    ax.set(title=title, xlabel=f"{label} τ", ylabel="fraction of runs with score > τ", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def _common_grid(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray] | None:
    """Seeds' curves on the x values they all cover, ``(P,)`` and ``(R, P)``; None when their ranges are apart."""
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if lo > hi:
        return None
    xs = np.unique(np.concatenate([c[0] for c in curves]))
    xs = xs[(xs >= lo) & (xs <= hi)]
    return xs, np.stack([np.interp(xs, cx, cy) for cx, cy in curves])


def _plot_curve_bands(bands: dict[str, dict[str, dict[str, Any]]], x_cols: dict[str, str], metric: str,
                      title: str, png: Path) -> None:
    """One panel per task, one line per arm: the mean over seeds with its 95% bootstrap CI band."""
    tasks = list(bands)
    fig = _new_figure(5.2 * len(tasks), 3.8)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(a for b in bands.values() for a in b))}
    for ax, task in zip(axes, tasks):
        for arm, c in bands[task].items():
            ax.plot(c["x"], c["mean"], color=colors[arm], label=f"{arm} (n={c['n']})")
            if c["lo"] is not None:
                ax.fill_between(c["x"], c["lo"], c["hi"], color=colors[arm], alpha=0.2)
        ax.set(title=task, xlabel=x_cols[task].replace("_", " "), ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png)


def _floats(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [float(v) for v in a]


@dataclass
class _Arms:
    """Runs grouped for the statistics: by arm, by task, and the scored ones by task and arm."""

    by_arm: dict[str, list[_Run]]
    by_task: dict[str, list[_Run]]
    scored: dict[str, dict[str, list[_Run]]]  # task -> arm -> runs with a final score, in seed order
    kinds: dict[str, str]  # task -> score kind (SCORE_KINDS)
    order: dict[str, tuple]  # arm -> sort key
    notes: list[str]


def _group_arms(runs: Sequence[_Run], metric: str) -> _Arms:
    arm_of, order = _arms(runs)
    g = _Arms({}, {}, {}, {}, order, [])
    for r, arm in zip(runs, arm_of):
        g.by_arm.setdefault(arm, []).append(r)
        g.by_task.setdefault(_task(r), []).append(r)
    g.kinds = {task: _score_kind(rs, metric) for task, rs in g.by_task.items()}
    for r, arm in zip(runs, arm_of):
        key, label, _ = SCORE_KINDS[g.kinds[_task(r)]]
        score = r.get(key)
        if score is None or not math.isfinite(score):
            g.notes.append(f"- `{r.path}` has no final {label}: left out of the statistics.")
            continue
        g.scored.setdefault(_task(r), {}).setdefault(arm, []).append(r)
    for arm_map in g.scored.values():
        for rs in arm_map.values():
            rs.sort(key=_seed_order)
    return g


def _score_matrices(ts: _TaskSet, g: _Arms, key: str) -> dict[str, np.ndarray]:
    """Each arm's ``(R, T)`` scores on the task set; an arm with more runs on some tasks keeps its first R seeds
    on each (rliable's bootstrap takes a full matrix), with a note."""
    matrices = {}
    for arm in ts.arms:
        per_task = [g.scored[t][arm] for t in ts.tasks]
        n = min(len(rs) for rs in per_task)
        if any(len(rs) > n for rs in per_task):
            g.notes.append(f"- arm `{arm}` has {', '.join(str(len(rs)) for rs in per_task)} runs on "
                           f"{', '.join(ts.tasks)}: the task set's statistics use the first {n} seeds of each.")
        matrices[arm] = np.array([[r.get(key) for r in rs[:n]] for rs in per_task]).T  # (n, T)
    return matrices


def _per_task(ts: _TaskSet, g: _Arms, key: str, label: str, spec: str) -> tuple[list[str], dict[str, Any]]:
    """Per arm and task: the score's mean ± std over seeds, with absolute returns next to normalized scores."""
    with_return = ts.kind != "return"
    md = [f"| arm | task | runs | seeds | {label} |" + (" final eval return |" if with_return else ""),
          "|---" * (6 if with_return else 5) + "|"]
    numbers: dict[str, dict[str, Any]] = {}
    for arm in ts.arms:
        numbers[arm] = {}
        for t in ts.tasks:
            rs = g.scored[t][arm]
            sc, sc_sd, _ = _stats(r.get(key) for r in rs)
            ret, ret_sd, _ = _stats(r.get("eval_return_mean") for r in rs)
            numbers[arm][t] = {"n": len(rs), "seeds": [r.seed for r in rs], "scores": [r.get(key) for r in rs],
                               "score_mean": sc, "score_std": sc_sd, "return_mean": ret, "return_std": ret_sd}
            md.append(f"| {arm} | {t} | {len(rs)} | {', '.join(_f(r.seed, '') for r in rs)} | "
                      f"{_f(sc, spec)} ± {_f(sc_sd, spec)} |" + (f" {_f(ret)} ± {_f(ret_sd)} |" if with_return else ""))
    return md, numbers


def _comparisons(ts: _TaskSet, g: _Arms, matrices: dict[str, np.ndarray], key: str, label: str, spec: str,
                 boot: stats.Bootstrap) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Probability of improvement for each pair of arms, and paired differences on the seeds they share."""
    pairs = [(a, b) for j, a in enumerate(ts.arms) for b in ts.arms[j + 1:]]
    if not pairs:
        return [], [], []
    md = ["", "Probability of improvement (a random run of X beats one of Y on the same task, averaged over tasks; "
          "independent stratified bootstraps of X's and Y's runs):", "", "| X | Y | P(X > Y) |", "|---|---|---|"]
    poi = []
    for a, b in pairs:
        p = stats.probability_of_improvement(matrices[a], matrices[b], boot=boot)
        md.append(f"| {a} | {b} | {_ci(p, '.2f')} |")
        poi.append({"x": a, "y": b, **p.to_dict()})
    paired, rows = [], []
    for a, b in pairs:
        for t in ts.tasks:
            by_seed = ({r.seed: r.get(key) for r in g.scored[t][arm] if r.seed is not None} for arm in (a, b))
            d = stats.paired_difference(*by_seed, boot=boot)
            if d is not None:
                paired.append({"x": a, "y": b, "task": t, **d.to_dict()})
                rows.append(f"| {a} | {b} | {t} | {len(d.seeds)} | {_ci(d.mean, spec)} | "
                            + ", ".join(f"{s}: {v:+{spec}}" for s, v in zip(d.seeds, d.differences)) + " |")
    if rows:
        md += ["", f"Paired differences over shared seeds ({label} of X − Y per seed; mean with a bootstrap CI over "
               "seeds):", "", "| X | Y | task | shared seeds | mean difference | per seed |",
               "|---|---|---|---|---|---|", *rows]
    return md, poi, paired


def _curve_bands(ts: _TaskSet, g: _Arms, metric: str, x: str,
                 boot: stats.Bootstrap) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Per task and arm: the mean learning curve over seeds with its bootstrap CI band, and each task's x column."""
    bands: dict[str, dict[str, dict[str, Any]]] = {}
    x_cols: dict[str, str] = {}
    for t in ts.tasks:
        _, x_cols[t] = _curves(g.by_task[t], metric, x)  # one x column for every arm of the task
        for arm in ts.arms:
            curves, _ = _curves([r for r in g.by_arm[arm] if _task(r) == t], metric, x_cols[t])
            grid = _common_grid(curves) if curves else None
            if grid is None:
                if curves:
                    g.notes.append(f"- arm `{arm}` on {t}: its seeds' curves cover no common {x_cols[t]} range, so "
                                   "no CI band.")
                continue
            mean, lo, hi = stats.curve_band(grid[1], boot=boot)
            bands.setdefault(t, {})[arm] = {"n": len(curves), "x": _floats(grid[0]), "mean": _floats(mean),
                                            "lo": _floats(lo), "hi": _floats(hi)}
    return bands, {t: x_cols[t] for t in bands}


def _task_set_section(i: int, ts: _TaskSet, g: _Arms, metric: str, x: str, boot: stats.Bootstrap,
                      gap_threshold: float | None, out: Path) -> tuple[list[str], dict[str, Any]]:
    """One task set's tables, plots (in ``out``) and numbers."""
    key, label, gamma = SCORE_KINDS[ts.kind]
    gamma = gamma if gamma is not None else gap_threshold
    spec = ".2f" if ts.kind == "success_rate" else ".1f"
    matrices = _score_matrices(ts, g, key)
    results = {arm: stats.aggregate_metrics(s, gap_threshold=gamma, boot=boot) for arm, s in matrices.items()}
    md = [f"### {label} on {ts.name}", "",
          f"| arm | runs per task | IQM | mean | median | optimality gap{f' (γ={gamma:g})' if gamma else ''} |",
          "|---|---|---|---|---|---|",
          *[f"| {arm} | {matrices[arm].shape[0]} | {_ci(res['iqm'], spec)} | {_ci(res['mean'], spec)} | "
            f"{_ci(res['median'], spec)} | {_ci(res.get('optimality_gap'), spec)} |" for arm, res in results.items()]]
    single = [arm for arm, s in matrices.items() if s.shape[0] < 2]
    if single:
        md += ["", f"CIs need more seeds: {', '.join(f'`{a}`' for a in single)} "
               f"{'has' if len(single) == 1 else 'have'} one run per task, so no interval is given; run at least 2 "
               "seeds (more for narrow intervals)."]
    if gamma is None:
        md += ["", "No optimality gap: raw returns have no natural threshold (give one with --gap-threshold)."]
    per_task_md, per_task = _per_task(ts, g, key, label, spec)
    compare_md, poi, paired = _comparisons(ts, g, matrices, key, label, spec, boot)
    md += ["", *per_task_md, *compare_md]

    stem = f"{i:02d}__{slug(ts.name)[:80]}"
    title = f"{label} on {ts.name}"
    plots: dict[str, str | None] = {"aggregates": f"stats_{stem}.png", "profiles": f"profile_{stem}.png",
                                    "curves": None}
    _plot_aggregates(results, title, out / f"stats_{stem}.png")
    pooled = np.concatenate([s.ravel() for s in matrices.values()])
    lo, hi = float(pooled.min()), float(pooled.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(1.0, abs(lo) * 0.05)
    taus = np.linspace(lo - pad, hi + pad, 101)  # thresholds over every score in the set
    profiles = {arm: stats.performance_profile(s, taus, boot=boot) for arm, s in matrices.items()}
    _plot_profiles(profiles, label, f"performance profiles: {title}", out / f"profile_{stem}.png")
    bands, x_cols = _curve_bands(ts, g, metric, x, boot)
    md += ["", f"![aggregate metrics: {title}](stats_{stem}.png)", "",
           f"![performance profiles: {title}](profile_{stem}.png)", ""]
    if bands:
        plots["curves"] = f"curves_{stem}.png"
        _plot_curve_bands(bands, x_cols, metric, title, out / f"curves_{stem}.png")
        md += [f"`{metric}`: mean over seeds with its {boot.confidence:.0%} bootstrap CI band (seeds resampled at "
               "each point, on the range every seed covers).", "", f"![learning curves: {title}](curves_{stem}.png)",
               ""]
    return md, {
        "name": ts.name, "kind": ts.kind, "score_key": key, "tasks": list(ts.tasks), "arms": list(ts.arms),
        "gap_threshold": gamma,
        "aggregates": {arm: {"runs_per_task": int(matrices[arm].shape[0]), "scores": matrices[arm].tolist(),
                             **{m: iv.to_dict() for m, iv in res.items()}} for arm, res in results.items()},
        "per_task": per_task, "probability_of_improvement": poi, "paired_differences": paired,
        "performance_profiles": {arm: p.to_dict() for arm, p in profiles.items()},
        "curves": {"metric": metric, "x": x_cols, "bands": bands}, "plots": plots}


def _statistics(runs: Sequence[_Run], metric: str, x: str, boot: stats.Bootstrap, gap_threshold: float | None,
                out: Path) -> tuple[list[str], dict[str, Any]]:
    """The report's statistics section (markdown lines, PNGs in ``out``) and its numbers for report.json."""
    g = _group_arms(runs, metric)
    arms = {arm: {"pipelines": sorted({r.pipeline for r in rs}), "tasks": sorted({_task(r) for r in rs}),
                  "runs": [str(r.path) for r in sorted(rs, key=_seed_order)]}
            for arm, rs in sorted(g.by_arm.items(), key=lambda kv: g.order[kv[0]])}
    md = ["## Statistics", "",
          f"Final scores grouped into {len(arms)} arm(s) by the config fields that differ between runs of a "
          "task, and into task sets: normalized scores (or success rates) of several tasks are aggregated "
          "together; raw returns only within one task. IQM (25%-trimmed mean of all runs' scores), mean and "
          "median (over tasks of per-task means) and optimality gap carry "
          f"{boot.confidence:.0%} stratified-bootstrap CIs (rliable; runs resampled within each task, percentile "
          f"method, {boot.reps} resamples, seed {boot.seed}). A CI needs at least 2 runs per task; with one, "
          "only the point estimate is given.", "",
          "| arm | pipeline | tasks | runs |", "|---|---|---|---|",
          *[f"| {arm} | {', '.join(a['pipelines'])} | {', '.join(a['tasks'])} | {len(a['runs'])} |"
            for arm, a in arms.items()], ""]
    task_sets = []
    for i, ts in enumerate(_task_sets(g.scored, g.kinds, g.order)):
        section, numbers = _task_set_section(i, ts, g, metric, x, boot, gap_threshold, out)
        md += section
        task_sets.append(numbers)
    if not task_sets:
        md += ["No run has a final score (summary.json), so there are no statistics.", ""]
    if g.notes:
        md += ["Notes on the statistics:", "", *g.notes, ""]
    return md, {"bootstrap": {"reps": boot.reps, "seed": boot.seed, "confidence": boot.confidence,
                              "method": "percentile", "resampling": "stratified: runs within each task"},
                "arms": arms, "task_sets": task_sets, "notes": g.notes}


def make_report(run_dirs: Sequence[Path], out: Path, metric: str = "eval/return_mean", x: str = "env_steps",
                *, band: Literal["minmax", "std"] = "minmax", bootstrap: stats.Bootstrap | None = None,
                gap_threshold: float | None = None) -> Path:
    """Write ``out/report.md``, ``out/report.json``, ``out/<pipeline>__<env>.png`` and the statistics' PNGs
    (``stats_*``, ``profile_*``, ``curves_*``: one of each per task set) for a set of runs.

    Args:
        run_dirs: run directories; runs with the same pipeline and env id are seeds of one experiment.
        out: output directory (created if missing; other files in it are left alone).
        metric: ``metrics.csv`` column plotted as the learning curve.
        x: x-axis column; ``step`` is used for a group where some eval row has it empty.
        band: spread drawn around the mean of several seeds: ``minmax`` or ``std`` (±1 population std).
        bootstrap: resamples, seed and coverage of every CI (default :class:`~diffrl.runs.stats.Bootstrap`:
            2000 resamples, seed 0, 95%).
        gap_threshold: optimality-gap threshold for raw-return scores (normalized scores use 100, success
            rates 1); ``None`` leaves the gap out for returns.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    if not run_dirs:
        raise ConfigError(f"no run directories given for the report in {out}; pass one or more run "
                          "directories such as runs/train_sac/<env>/<timestamp>-s0.")
    if band not in ("minmax", "std"):
        raise ConfigError(f"band={band!r} is not a known spread; use 'minmax' or 'std'.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report output {out} exists and is not a directory; choose another output path.")
    out.mkdir(parents=True, exist_ok=True)
    paths = list({Path(p).resolve(): Path(p) for p in run_dirs}.values())  # a run given twice counts once
    buckets: dict[tuple[str, str], list[_Run]] = {}
    for p in paths:
        run = _load_run(p, metric)
        buckets.setdefault((run.pipeline, run.env), []).append(run)
    groups: dict[tuple[str, str], list[_Run]] = {}
    for (pipeline, env), bucket in buckets.items():
        for run, variant in zip(bucket, _variants(bucket), strict=True):
            groups.setdefault((pipeline, f"{env} ({variant})" if variant else env), []).append(run)

    summary_rows, detail_rows, notes, images, report = [], [], [], [], []
    for (pipeline, env), runs in sorted(groups.items()):
        runs.sort(key=lambda r: (r.seed if isinstance(r.seed, int) else math.inf, str(r.path)))
        final, final_sd, n_final = _stats(r.get("eval_return_mean") for r in runs)
        best, _, _ = _stats(r.get("best_eval_return") for r in runs)
        success, _, _ = _stats(r.get("success_rate") for r in runs)
        score, score_sd, _ = _stats(r.get("normalized_score") for r in runs)
        steps, _, _ = _stats(r.env_steps for r in runs)
        wall, _, _ = _stats(r.wall_s for r in runs)
        curves, x_col = _curves(runs, metric, x)
        png = None
        if curves:
            png = f"{slug(pipeline)}__{slug(env)}.png"
            _plot(curves, x_col, f"{pipeline} on {env}", metric, band, out / png)
            images.append(f"### {pipeline} on {env}\n\n![{pipeline} on {env}]({png})\n")
        partial = f" (n={n_final})" if 0 < n_final < len(runs) else ""
        summary_rows.append(f"| {pipeline} | {env} | {len(runs)} | {_f(final)} ± {_f(final_sd)}{partial} | "
                            f"{_f(best)} | {_f(success, '.2f')} | {_f(steps, '.0f')} | {_time(wall)} | "
                            f"{f'{score:.1f} ± {score_sd:.1f}' if score is not None else '—'} |")
        run_info = []
        for r in runs:
            detail_rows.append(f"| {pipeline} | {env} | {_f(r.seed, '')} | {_f(r.get('eval_return_mean'))} ± "
                               f"{_f(r.get('eval_return_std'))} | {_f(r.get('best_eval_return'))} | "
                               f"{_f(r.get('success_rate'), '.2f')} | {_f(r.env_steps, '.0f')} | "
                               f"{_time(r.wall_s)} | {_f(r.get('normalized_score'))} | `{r.path}` |")
            if not r.summary:
                notes.append(f"- `{r.path}` has no {SUMMARY_FILE} (unfinished run?): no final numbers.")
            if not r.rows:
                notes.append(f"- `{r.path}` logged no `{metric}` values (stopped before its first eval?): "
                             "no curve.")
            run_info.append({"run_dir": str(r.path), "seed": r.seed, **{k: r.get(k) for k in FINAL_KEYS},
                             "env_steps": r.env_steps, "wall_s": r.wall_s, "has_curve": bool(r.rows)})
        report.append({"pipeline": pipeline, "env": env, "n_seeds": len(runs), "normalized_score_mean": score,
                       "normalized_score_std": score_sd, "final_return_mean": final,
                       "final_return_std": final_sd, "final_return_n": n_final, "best_return_mean": best,
                       "success_rate_mean": success, "env_steps_mean": steps, "wall_s_mean": wall,
                       "plot": png, "x": x_col if curves else None, "runs": run_info})

    cols = "final eval return | best eval return | success rate | env steps | wall time"
    md = ["# diffrl report", "",
          f"{len(paths)} run(s) in {len(groups)} experiment(s). Final numbers come from each run's "
          f"{SUMMARY_FILE} (its last evaluation): mean ± population std across seeds; the other columns are "
          "means across seeds. In the per-seed table, ± is the std over evaluation episodes.", "",
          f"| pipeline | env | seeds | {cols} | final normalized score |", "|---" * 9 + "|", *summary_rows, "",
          "## Runs", "", f"| pipeline | env | seed | {cols} | normalized score | run |", "|---" * 10 + "|",
          *detail_rows]
    if notes:
        md += ["", "Notes:", "", *notes]
    band_text = "min–max" if band == "minmax" else "±1 std"
    stats_md, stats_json = _statistics([r for rs in buckets.values() for r in rs], metric, x,
                                       bootstrap or stats.Bootstrap(), gap_threshold, out)
    md += ["", *stats_md]
    md += ["## Learning curves", "", f"`{metric}`: mean across seeds with the {band_text} band.", "",
           *images]
    write_json_atomic(out / "report.json", {"metric": metric, "x": x, "band": band, "groups": report,
                                            "statistics": stats_json})
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path
