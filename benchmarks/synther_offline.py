"""SynthER offline evidence: real vs synthetic-only vs mixed data, and small-data upsampling, several seeds.

    python benchmarks/synther_offline.py                                 # both experiments, 3 seeds
    python benchmarks/synther_offline.py --experiment modes --envs Hopper-v5 --algos td3bc --seeds 0
    python benchmarks/synther_offline.py --steps 2000 --diffusion-steps 1000 --num-samples 20000   # a smoke run

Experiment ``modes`` (SynthER's claim: synthetic-only matches real): TD3+BC and IQL on diffrl's quick
medium-replay datasets (built by benchmarks/datasets.py, or here if missing), trained on real,
synthetic-only and mixed (50/50) data. Experiment ``small`` (SynthER's claim: upsampling small data helps):
15% of the episodes of the quick medium dataset, real vs synthetic (upsampled) data. One diffusion model per
(dataset, fraction, seed) is trained (quick preset: width 256, 10k steps, stochastic DPM-Solver++ with 32
evaluations, 200k samples) and reused by every agent and mode of that seed. Finished runs are appended to
benchmarks/results/synther_offline.jsonl and skipped when re-run.

Rejecting out-of-range synthetic actions instead of clipping them, on the same diffusion models (paired: the
first draw of samples is the same, only the out-of-range ones are replaced):

    python benchmarks/synther_offline.py --out-of-range reject --modes synthetic --algos iql \
        --models-from benchmarks/results/synther_offline.jsonl --results benchmarks/results/synther_offline_reject.jsonl

and, the same way, terminal flags from the env's termination rule instead of the model's (``--terminals rule``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from datasets import dataset
from diffrl.pipelines import data_collect, synther_offline
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.logger import read_metrics
from harness import RESULTS, add_common_args, append_row, matches, print_row, read_rows

OUT = Path(__file__).parent / "out"


def ci95(x: np.ndarray) -> float:
    """Half-width of a 95% t-interval of the mean (n <= 10)."""
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    return float(t.get(len(x), 2.0) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=["modes", "small", "both"], default="both")
    ap.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    ap.add_argument("--algos", nargs="+", default=["td3bc", "iql"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="agent gradient steps (default: the quick preset's)")
    ap.add_argument("--diffusion-steps", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--out-of-range", choices=["clip", "reject"], default="clip",
                    help="generated actions outside the action space: clip them (SynthER) or reject the sample")
    ap.add_argument("--terminals", choices=["model", "rule"], default="model",
                    help="synthetic terminal flags: the model's (SynthER) or the env's termination rule")
    ap.add_argument("--modes", nargs="+", choices=["real", "synthetic", "mixed"], default=None,
                    help="run only these data modes (default: every mode of each experiment)")
    ap.add_argument("--models-from", type=Path, default=None,
                    help="a results file whose diffusion models to reuse (same experiment, dataset and seed)")
    add_common_args(ap, RESULTS / "synther_offline.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    tune_cpu_allocator()
    done = read_rows(args.results)
    plan = []  # (experiment, env, kind, fraction, modes)
    if args.experiment in ("modes", "both"):
        plan += [("modes", e, "medium-replay", 1.0, ("real", "synthetic", "mixed")) for e in args.envs]
    if args.experiment in ("small", "both"):
        plan += [("small", e, "medium", args.fraction, ("real", "synthetic")) for e in args.envs]
    if args.modes:
        plan = [(*p[:4], tuple(m for m in p[4] if m in args.modes)) for p in plan]
    # None keeps the key of the runs recorded before the option existed (all clipped)
    settings = {"steps": args.steps, "diffusion_steps": args.diffusion_steps, "num_samples": args.num_samples,
                "out_of_range": None if args.out_of_range == "clip" else args.out_of_range,
                "terminals": None if args.terminals == "model" else args.terminals}
    models = read_rows(args.models_from) if args.models_from else []
    for seed in args.seeds:
        for experiment, env_id, kind, fraction, modes in plan:
            path = dataset(env_id, kind)
            model_dir = next((r["diffusion_run"] for r in models if r.get("diffusion_run") and
                              (r["experiment"], r["env"], r["kind"], r["fraction"], r["seed"]) ==
                              (experiment, env_id, kind, fraction, seed)), None)
            for algo in args.algos:
                for mode in modes:
                    key = dict(experiment=experiment, env=env_id, kind=kind, fraction=fraction, algo=algo, mode=mode,
                               seed=seed, **settings)
                    hit = [r for r in done if matches(r, key)]
                    if hit:
                        model_dir = model_dir or hit[0].get("diffusion_run")
                        continue
                    if args.table_only:
                        continue
                    overrides = {**synther_offline.PRESETS[algo]["quick"], "dataset": str(path), "seed": seed,
                                 "data_mode": mode, "data_fraction": fraction, "runs_root": OUT / "runs",
                                 "progress": False, **{k: v for k, v in settings.items() if v is not None}}
                    if args.steps:
                        overrides["eval_every"] = max(args.steps // 4, 1)
                    if mode != "real" and model_dir is not None:
                        overrides["diffusion"] = Path(model_dir)
                    cls = synther_offline.ALGOS[algo]
                    t0 = time.perf_counter()
                    run_dir = synther_offline.run(dataclasses.replace(cls(dataset=str(path)), **overrides))
                    s = json.loads((run_dir / "summary.json").read_text())
                    if mode != "real":
                        model_dir = model_dir or s["diffusion_run"]
                    fid = s.get("fidelity", {}).get("synthetic", {})
                    row = {**key, "score": s["normalized_score"], "best": s["best_score"],
                           "return": s["eval_return_mean"], "real_transitions": s["real_transitions"],
                           "diffusion_run": s.get("diffusion_run"),
                           "state_nmse": fid.get("validity", {}).get("next_obs_nmse"),
                           "wall_s": time.perf_counter() - t0, "run_dir": str(run_dir),
                           "date": time.strftime("%Y-%m-%d %H:%M")}
                    print_row(row)
                    done.append(row)
                    append_row(args.results, row)
    rows = [r for r in done if matches(r, settings)]
    for title, stat in (("final", lambda r: r["score"]),
                        ("mean of the last 3 evaluations (10k, 15k, 20k steps at the quick preset)", last3)):
        print(f"\n{title} D4RL-style normalised score (x100): mean ± 95% CI over seeds (n)\n")
        for experiment, env_id, kind, fraction, modes in plan:
            print(f"**{experiment}**: {data_collect.task_name(env_id)}-{kind}-quick, {fraction:.0%} of the episodes\n")
            print("| agent | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes))
            for algo in args.algos:
                cells = []
                for mode in modes:
                    vals = [stat(r) for r in rows if (r["experiment"], r["env"], r["algo"], r["mode"]) ==
                            (experiment, env_id, algo, mode)]
                    s = np.array([v for v in vals if v is not None])
                    per_seed = ", ".join(f"{v:.1f}" for v in s)
                    cells.append(f"{s.mean():.1f} ± {ci95(s):.1f} (n={len(s)}: {per_seed})" if len(s) else "—")
                print(f"| {algo} | " + " | ".join(cells) + " |")
            print()


def last3(row: dict) -> float | None:
    """Mean normalised score of a run's last three evaluations (IQL's evaluations swing by 30+ points from one to
    the next on these small datasets, real data included, so one final evaluation is a noisy summary)."""
    if not (Path(row["run_dir"]) / "metrics.csv").is_file():
        return None
    scores = [r["eval/normalized_score"] for r in read_metrics(Path(row["run_dir"]))
              if np.isfinite(r.get("eval/normalized_score", np.nan))]
    return float(np.mean(scores[-3:])) if scores else None


if __name__ == "__main__":
    main()
