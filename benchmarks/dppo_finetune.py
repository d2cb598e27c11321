"""DPPO's claim on diffrl's medium datasets: BC pre-training, then PPO fine-tuning of a diffusion policy (DPPO) vs a
Gaussian policy (plain PPO), same data, same env-step budget, several seeds.

Per (env, seed): ``diffrl dppo pretrain`` (quick preset) of a diffusion policy and of a Gaussian policy on the
env's medium-quick dataset (built with ``diffrl data collect`` if missing), then ``diffrl dppo finetune`` of each
(quick preset: 4 envs x 250 chunks of 4 actions = 4k env steps per iteration, 20 iterations, evaluation every 5).
Both see 4 minibatches per update epoch: DPPO's 10k (env step x denoising step) pairs in batches of 2500, the
Gaussian's 1000 env steps in batches of 250. The table gives the normalised score before fine-tuning (the
pre-trained policy) and at each evaluation, mean ± 95% CI over seeds; and the cost per env step of rollouts and
updates.

    python benchmarks/dppo_finetune.py                                  # Hopper + Walker2d, 3 seeds
    python benchmarks/dppo_finetune.py --envs Hopper-v5 --seeds 0       # one seed
    python benchmarks/dppo_finetune.py --eval-paths                     # + both evaluation paths

Rows go to benchmarks/out/dppo_finetune.jsonl (finished runs are skipped when re-run). ``--eval-paths`` also
evaluates every diffusion run's pre-trained and fine-tuned checkpoints both ways, DPPO's sampled chain and the
noise-free DDPM mean path (``diffrl eval RUN_DIR --path sample|mean``, 10 episodes each; cached in
benchmarks/out/dppo_eval_paths.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from diffrl.config import from_dict
from diffrl.pipelines import dppo
from diffrl.registry import find_run
from diffrl.runs.logger import read_metrics
from harness import add_common_args, append_row, read_rows, run_all
from synther_offline import OUT, ci95, dataset


def curve_and_cost(ft_dir: Path | str) -> dict:
    """Normalised score at each evaluation, and rollout / update milliseconds per env step (metrics.csv)."""
    rows = read_metrics(Path(ft_dir))
    evals = [r for r in rows if np.isfinite(r.get("eval/return_mean", np.nan))]
    curve = [(r["env_steps"], r.get("eval/normalized_score", r["eval/return_mean"])) for r in evals]
    perf = [r for r in rows if np.isfinite(r.get("perf/rollout_s_per_env_step", np.nan))]
    return {"curve": curve,
            "rollout_ms_per_step": 1e3 * float(np.mean([r["perf/rollout_s_per_env_step"] for r in perf])),
            "update_ms_per_step": 1e3 * float(np.mean([r["perf/update_s_per_env_step"] for r in perf]))}


def run_pair(env_id: str, seed: int, policy_type: str) -> dict:
    data = dataset(env_id, "medium")
    root = OUT / "runs" / "dppo_bench"
    pre = dppo.PretrainConfig(**{**dppo.PRESETS["pretrain"]["quick"], "dataset": str(data), "env": env_id,
                                 "seed": seed, "policy_type": policy_type, "runs_root": root, "progress": False})
    pre_dir = dppo.pretrain(pre)
    # the Gaussian policy's minibatch is batch_size / K' env steps by default: as many minibatches as DPPO
    ft = from_dict(dppo.FinetuneConfig, {**dppo.PRESETS["finetune"]["quick"], "policy": str(pre_dir),
                                         "seed": seed, "runs_root": str(root), "progress": False})
    ft_dir = dppo.finetune(ft)
    s = json.loads((ft_dir / "summary.json").read_text())
    return {**curve_and_cost(ft_dir), "initial": s["initial_normalized_score"], "final": s["normalized_score"],
            "wall_s": s["wall_s"], "pretrain_dir": str(pre_dir), "finetune_dir": str(ft_dir)}


def eval_paths(rows: list[dict], envs: list[str], cache: Path, episodes: int = 10) -> None:
    """Normalised scores of each diffusion run's pre-trained and fine-tuned policy under both evaluation paths."""
    done = {(r["run_dir"], r["mean_path"]): r for r in read_rows(cache)}
    print(f"### Evaluation paths (DPPO runs; {episodes} episodes each): DPPO's sampled chain / noise-free mean path\n")
    print("| env | seed | pre-trained: sample / mean | fine-tuned: sample / mean |\n|---|---|---|---|")
    for r in sorted((r for r in rows if r["policy_type"] == "diffusion" and r["env"] in envs),
                    key=lambda r: (r["env"], r["seed"])):
        cells = []
        for run_dir in (r["pretrain_dir"], r["finetune_dir"]):
            scores = []
            for mean_path in (False, True):
                if (run_dir, mean_path) not in done:
                    cfg = find_run(Path(run_dir))[2]
                    out = dppo.evaluate_run(Path(run_dir), cfg, episodes=episodes, device="cpu",
                                            mean_path=mean_path)
                    done[run_dir, mean_path] = {"run_dir": run_dir, "mean_path": mean_path,
                                                "normalized_score": out["normalized_score"], "episodes": episodes,
                                                "date": time.strftime("%Y-%m-%d %H:%M")}
                    append_row(cache, done[run_dir, mean_path])
                scores.append(done[run_dir, mean_path]["normalized_score"])
            cells.append(" / ".join(f"{v:.1f}" for v in scores))
        print(f"| {r['env']} | {r['seed']} | {cells[0]} | {cells[1]} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["Hopper-v5", "Walker2d-v5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_common_args(ap, OUT / "dppo_finetune.jsonl")
    ap.add_argument("--eval-paths", action="store_true", help="also evaluate both evaluation paths (see above)")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")

    def run_one(key: dict) -> dict:
        return {**key, **run_pair(key["env"], key["seed"], key["policy_type"]), "date": time.strftime("%Y-%m-%d %H:%M")}

    def report(row: dict) -> None:
        print(f"{row['env']} {row['policy_type']} seed {row['seed']}: score {row['initial']:.1f} -> "
              f"{row['final']:.1f} ({row['wall_s']:.0f} s)", flush=True)

    jobs = (dict(env=env_id, seed=seed, policy_type=policy_type)
            for seed in args.seeds for env_id in args.envs for policy_type in ("diffusion", "gaussian"))
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=report)
    print("\nnormalised score: pre-trained (env steps 0), then after each 20k env steps of fine-tuning; "
          "mean ± 95% CI over seeds (n); cost per env step (ms): rollout / update\n")
    for r in done:  # curves and costs from the runs themselves (rows written before NaN filtering are fixed here)
        r.update(curve_and_cost(r["finetune_dir"]))
    for env_id in args.envs:
        rows = {p: [r for r in done if r["env"] == env_id and r["policy_type"] == p] for p in ("diffusion", "gaussian")}
        if not any(rows.values()):
            continue
        steps = [int(s) for s, _ in next(r for r in rows.values() if r)[0]["curve"]]
        print(f"### {env_id}\n\n| policy | " + " | ".join(f"{s // 1000}k" for s in steps) + " | ms/step |")
        print("|---|" + "---|" * (len(steps) + 1))
        for p, rs in rows.items():
            if not rs:
                continue
            c = np.array([[v for _, v in r["curve"]] for r in rs])
            cells = [f"{col.mean():.1f} ± {ci95(col):.1f}" for col in c.T]
            rollout, update = (np.mean([r[k] for r in rs]) for k in ("rollout_ms_per_step", "update_ms_per_step"))
            cost = f"{rollout:.2f} / {update:.2f}"
            print(f"| {'DPPO' if p == 'diffusion' else 'Gaussian PPO'} (n={len(rs)}) | " + " | ".join(cells)
                  + f" | {cost} |")
        print()
    if args.eval_paths:
        eval_paths(done, args.envs, OUT / "dppo_eval_paths.jsonl")


if __name__ == "__main__":
    main()
