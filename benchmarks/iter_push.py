"""The ITER claim on FetchPush-v4: DDPG+HER vs ITER (KER 8 + GER 4) vs ITER-Diffusion, same env-step budget.

ITER's paper reports 13x fewer samples than HER on Push (single worker, n_cycles 100, 200 epochs). This CPU
carries a much shorter budget: ``--epochs`` epochs of ``--n-cycles`` one-episode cycles (default 15 x 50 =
37.5k env steps), 40 gradient steps per cycle, 10 test episodes after every epoch. ITER-Diffusion trains its episode
model every epoch from ``--ddpm-train-start`` and generates 1000 episodes every ``--ddpm-aug-freq`` epochs from
``--ddpm-aug-start`` (rescaled from the README's 100/150/20 of 200 epochs to this budget).

    python benchmarks/iter_push.py                          # 3 arms x 3 seeds
    python benchmarks/iter_push.py --seeds 0 --arms her     # one run

Rows go to benchmarks/out/iter_push.jsonl (finished runs are skipped when re-run); runs live in fixed directories
under benchmarks/out/runs/iter_push/ and resume from their last epoch when the script is restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from diffrl.pipelines.iter_her import ITERConfig, run
from diffrl.runs.logger import read_metrics
from harness import add_common_args, matches, run_all
from synther_offline import ci95

OUT = Path(__file__).parent / "out"
ARMS = {"her": dict(n_ker=0, n_ger=0), "iter": dict(n_ker=8, n_ger=4),
        "iter-diffusion": dict(n_ker=8, n_ger=4, ddpm=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="FetchPush-v4")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--n-cycles", type=int, default=50)
    ap.add_argument("--ddpm-train-start", type=int, default=5)
    ap.add_argument("--ddpm-aug-start", type=int, default=8)
    ap.add_argument("--ddpm-aug-freq", type=int, default=2)
    add_common_args(ap, OUT / "iter_push.jsonl", tables="table")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    budget = dict(env=args.env, epochs=args.epochs, n_cycles=args.n_cycles)

    def run_one(key: dict) -> dict:
        arm, seed = key["arm"], key["seed"]
        run_dir = OUT / "runs" / "iter_push" / f"{args.env}-{arm}-s{seed}-{args.epochs}x{args.n_cycles}"
        common = dict(env=args.env, seed=seed, epochs=args.epochs, n_cycles=args.n_cycles, eval_episodes=10,
                      device="cpu", progress=False, ddpm_train_start=args.ddpm_train_start,
                      ddpm_aug_start=args.ddpm_aug_start, ddpm_aug_freq=args.ddpm_aug_freq,
                      # what every run here used before these became options (the defaults now are 1 - 1/T =
                      # 0.98 and random overwrite, the same here: 15 epochs never fill the 20k-episode buffer)
                      gamma=0.98, buffer_overwrite="oldest", **ARMS[arm])
        resume = (run_dir / "checkpoints" / "latest").exists()
        cfg = ITERConfig(**common, **({"resume": run_dir} if resume else {"run_dir": run_dir}))
        run(cfg)
        s = json.loads((run_dir / "summary.json").read_text())
        rows = read_metrics(run_dir)
        return {**key, "curve": [(r["env_steps"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r],
                "final_success": s["success_rate"], "wall_s": s["wall_s"], "time_breakdown_s": s["time_breakdown_s"],
                "ddpm": {k: v for k, v in rows[-1].items() if k.startswith("ddpm/")},
                "date": time.strftime("%Y-%m-%d %H:%M")}

    def report(row: dict) -> None:
        print(f"{row['arm']} seed {row['seed']}: final success {row['final_success']:.2f} ({row['wall_s']:.0f} s)",
              flush=True)

    jobs = (dict(arm=arm, seed=seed, **budget) for seed in args.seeds for arm in args.arms)
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=report)
    print(f"\n{args.env}: test success rate after each epoch ({args.n_cycles * 50} env steps per epoch), "
          "mean over seeds [min, max] (n); wall clock per run\n")
    print("| arm | " + " | ".join(f"ep {e + 1}" for e in range(args.epochs)) + " | final ± 95% CI | wall |")
    print("|---|" + "---|" * (args.epochs + 2))
    for arm in args.arms:
        rows = [r for r in done if r["arm"] == arm and matches(r, budget)]
        if not rows:
            continue
        curves = np.array([[s for _, s in r["curve"]][: args.epochs] for r in rows])
        cells = [f"{c.mean():.2f} [{c.min():.1f}, {c.max():.1f}]" for c in curves.T]
        final = curves[:, -1]
        print(f"| {arm} (n={len(rows)}) | " + " | ".join(cells) + f" | {final.mean():.2f} ± {ci95(final):.2f} | "
              f"{np.mean([r['wall_s'] for r in rows]):.0f} s |")


if __name__ == "__main__":
    main()
