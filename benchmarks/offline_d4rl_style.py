"""Offline RL on diffrl's own D4RL-style datasets: BC vs TD3+BC vs IQL, several seeds, normalised scores.

    python benchmarks/offline_d4rl_style.py                 # hopper + halfcheetah, medium + medium-replay, 3 seeds
    python benchmarks/offline_d4rl_style.py --envs Hopper-v5 --seeds 0 --steps 2000   # a smoke run

Datasets are built with ``diffrl data collect --preset quick`` (60k-step SAC expert, 100k transitions) into
benchmarks/out/data; each agent trains with its ``quick`` preset (20k gradient steps) unless --steps is given.
Finished runs are appended to benchmarks/out/offline.jsonl and skipped when re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from diffrl.pipelines import data_collect, offline
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.rundir import task_name
from harness import add_common_args, print_row, run_all

OUT = Path(__file__).parent / "out"


def dataset(env_id: str, kind: str) -> Path:
    path = OUT / "data" / f"{task_name(env_id)}-{kind}-quick.hdf5"
    if not path.exists():
        t0 = time.perf_counter()
        data_collect.run(data_collect.CollectConfig(env=env_id, kind=kind, preset="quick", out=str(path),
                                                    experts_dir=OUT / "experts", progress=False))
        print(f"built {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    ap.add_argument("--kinds", nargs="+", default=["medium", "medium-replay"])
    ap.add_argument("--algos", nargs="+", default=["bc", "td3bc", "iql"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    add_common_args(ap, OUT / "offline.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    tune_cpu_allocator()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    data = {(e, k): dataset(e, k) for e in args.envs for k in args.kinds}

    def run_one(key: dict) -> dict:
        algo, path = key["algo"], data[key["env"], key["kind"]]
        overrides = dict(offline.PRESETS[algo]["quick"], dataset=str(path), seed=key["seed"],
                         runs_root=OUT / "runs", progress=False)
        if args.steps:
            overrides.update(steps=args.steps, eval_every=max(args.steps // 4, 1))
        cls = offline.ALGOS[algo][0]
        run_dir = offline.run(dataclasses.replace(cls(dataset=str(path)), **overrides))
        s = json.loads((run_dir / "summary.json").read_text())
        return {**key, "score": s["normalized_score"], "best": s["best_score"], "return": s["eval_return_mean"],
                "updates_per_s": s["updates_per_s"], "run_dir": str(run_dir), "date": time.strftime("%Y-%m-%d %H:%M")}

    jobs = [dict(env=env_id, kind=kind, algo=algo, seed=seed, steps=args.steps) for seed in args.seeds
            for (env_id, kind) in data for algo in args.algos]
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=print_row)
    rows = [r for r in done if r["steps"] == args.steps]
    print("\nfinal D4RL-style normalised score (x100), mean ± std over seeds (n = seeds)\n")
    print("| dataset | " + " | ".join(args.algos) + " |\n|---|" + "---|" * len(args.algos))
    for env_id, kind in data:
        cells = []
        for algo in args.algos:
            s = np.array([r["score"] for r in rows if (r["env"], r["kind"], r["algo"]) == (env_id, kind, algo)])
            cells.append(f"{s.mean():.1f} ± {s.std():.1f} (n={len(s)})" if len(s) else "—")
        print(f"| {task_name(env_id)}-{kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
