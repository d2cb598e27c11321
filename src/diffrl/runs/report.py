"""Report over finished runs: ``report.md``, ``report.json`` and one learning-curve PNG per experiment.

Runs are grouped by (pipeline, env id) and, within that, by any setting that differs between them (e.g. SynthER's
``data_mode``); the runs of a group are the seeds of one experiment. Final numbers
come from each run's ``summary.json`` (its last evaluation), curves from its ``metrics.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffrl.errors import CheckpointError, ConfigError
from diffrl.runs.logger import read_metrics
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
    keys = sorted({k for r in runs for k in r.config} - BOOKKEEPING)
    varying = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    return [", ".join(f"{k}={r.config.get(k)}" for k in varying) for r in runs]


def _curves(runs: Sequence[_Run], metric: str, x: str) -> tuple[list[Curve], str]:
    """Each seed's curve and the x column used: ``x`` if every eval row has it, else ``step`` for all."""
    rows = [r.rows for r in runs if r.rows]
    col = x if all(not math.isnan(row.get(x, math.nan)) for rs in rows for row in rs) else "step"
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


def _plot(curves: list[Curve], x_col: str, title: str, metric: str, band: str, png: Path) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
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


def make_report(run_dirs: Sequence[Path], out: Path, metric: str = "eval/return_mean", x: str = "env_steps",
                *, band: Literal["minmax", "std"] = "minmax") -> Path:
    """Write ``out/report.md``, ``out/report.json`` and ``out/<pipeline>__<env>.png`` for a set of runs.

    Args:
        run_dirs: run directories; runs with the same pipeline and env id are seeds of one experiment.
        out: output directory (created if missing; other files in it are left alone).
        metric: ``metrics.csv`` column plotted as the learning curve.
        x: x-axis column; ``step`` is used for a group where some eval row has it empty.
        band: spread drawn around the mean of several seeds: ``minmax`` or ``std`` (±1 population std).

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
    md += ["", "## Learning curves", "", f"`{metric}`: mean across seeds with the {band_text} band.", "",
           *images]
    write_json_atomic(out / "report.json", {"metric": metric, "x": x, "band": band, "groups": report})
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path
