"""SynthER online evidence: SAC (UTD 1) vs SAC + SynthER (UTD 20, 50% synthetic) at a CPU-sized budget, and
SynthER with --warm-start at a quarter of the diffusion steps per retrain (not in the paper: does continuing the
previous model keep the quality at lower cost?).

    python benchmarks/synther_online.py                                   # HalfCheetah + cheetah-run, 3 seeds, 30k
    python benchmarks/synther_online.py --envs HalfCheetah-v5 --seeds 0 --steps 2000   # a smoke run

Both arms use diffrl's SAC with the same networks and batch; SynthER retrains its diffusion model from scratch
every ``--retrain-every`` env steps on the whole real buffer and regenerates ``--num-samples`` transitions (the
`quick` diffusion settings: width 256, stochastic DPM-Solver++ with 32 evaluations). Final and per-evaluation
returns and the wall-clock breakdown (env, updates, diffusion training, sampling) per run go to
benchmarks/out/synther_online.jsonl; finished runs are skipped and interrupted ones resumed (from their last
checkpoint, every tenth of the budget) when re-run. SynthER's paper settings (100k steps,
10 retrains of 100k diffusion steps, 1M samples each) are GPU work: ``diffrl synther online --preset paper``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from diffrl.pipelines import online, synther_online
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.logger import read_metrics
from harness import add_common_args, print_row, run_all
from synther_offline import ci95

OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "dm_control/cheetah-run-v0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30_000)
    ap.add_argument("--retrain-every", type=int, default=10_000)
    ap.add_argument("--diffusion-steps", type=int, default=10_000)
    ap.add_argument("--num-samples", type=int, default=200_000)
    ap.add_argument("--arms", nargs="+", default=["sac", "synther", "synther-warm"],
                    help="synther-warm: --warm-start with a quarter of the diffusion steps per retrain")
    add_common_args(ap, OUT / "synther_online.jsonl", tables="table")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    tune_cpu_allocator()
    common = dict(steps=args.steps, learning_starts=5_000, eval_every=max(args.steps // 10, 1), eval_episodes=5,
                  checkpoint_every=max(args.steps // 10, 1), keep_checkpoints=1, progress=False)

    def run_one(key: dict) -> dict:
        env_id, arm, seed = key["env"], key["arm"], key["seed"]
        dmc = env_id.startswith("dm_control/")
        # a fixed run directory per (env, arm, seed, budget): a killed benchmark resumes its runs exactly
        run_dir = (OUT / "runs" / "synther_online_bench" /
                   f"{env_id.replace('/', '_')}-{arm}-s{seed}-{args.steps}-{args.retrain_every}-"
                   f"{args.diffusion_steps}-{args.num_samples}")
        started = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
        where = {"resume": run_dir} if started else {"run_dir": run_dir}
        if arm == "sac":
            cfg = online.SACConfig(env=env_id, seed=seed, **common, **where)
            run = online.run
        else:
            warm = arm == "synther-warm"
            cfg = synther_online.ALGOS["sac"](
                env=env_id, seed=seed, **common, **where, utd=20, retrain_every=args.retrain_every,
                diffusion_steps=args.diffusion_steps // 4 if warm else args.diffusion_steps, warm_start=warm,
                num_samples=args.num_samples, diffusion_width=256, diffusion_dim_t=128,
                sampler="dpmpp_2m_sde", sample_steps=32,
                # SynthER's DMC config: no terminals (DMC never terminates), raw rewards
                model_terminals=not dmc, normalize_reward=not dmc)
            run = synther_online.run
        if started:
            print(f"resuming {run_dir}", flush=True)
        run_dir = run(cfg)
        s = json.loads((run_dir / "summary.json").read_text())
        curve = [(r["env_steps"], r["eval/return_mean"]) for r in read_metrics(run_dir)
                 if not np.isnan(r.get("eval/return_mean", np.nan))]
        return {**key, "final_return": s["eval_return_mean"], "curve": curve,
                "time_breakdown_s": s["time_breakdown_s"], "wall_s": s["wall_s"],
                "run_dir": str(run_dir), "date": time.strftime("%Y-%m-%d %H:%M")}

    jobs = (dict(env=env_id, arm=arm, seed=seed, steps=args.steps, retrain_every=args.retrain_every,
                 diffusion_steps=args.diffusion_steps, num_samples=args.num_samples)
            for seed in args.seeds for env_id in args.envs for arm in args.arms)
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=print_row)
    half = args.steps // 2
    print(f"\nreturn after {half} and {args.steps} env steps and the mean of the last three evaluations: mean ± 95% "
          "CI over seeds (n; per-seed values); mean wall clock per run (env / updates / diffusion training / "
          "sampling, seconds)\n")
    print(f"| env | arm | return at {half} | final return | last three evaluations | wall | breakdown |\n"
          "|---|---|---|---|---|---|---|")
    for env_id in args.envs:
        for arm in args.arms:
            rs = [r for r in done if r["env"] == env_id and r["arm"] == arm and r["steps"] == args.steps]
            if not rs:
                print(f"| {env_id} | {arm} | — | — | — | — | — |")
                continue
            v = np.array([r["final_return"] for r in rs])
            mid = np.array([next(ret for step, ret in r["curve"] if step >= half) for r in rs])
            last3 = np.array([np.mean([ret for _, ret in r["curve"][-3:]]) for r in rs])
            tb = {k: np.mean([r["time_breakdown_s"].get(k, 0.0) for r in rs])
                  for k in ("env_s", "update_s", "diffusion_train_s", "sampling_s")}
            seeds = ", ".join(f"{x:.0f}" for x in v)
            print(f"| {env_id} | {arm} | {mid.mean():.0f} ± {ci95(mid):.0f} | {v.mean():.0f} ± {ci95(v):.0f} "
                  f"(n={len(v)}: {seeds}) | {last3.mean():.0f} ± {ci95(last3):.0f} | "
                  f"{np.mean([r['wall_s'] for r in rs]):.0f} s | {tb['env_s']:.0f} / "
                  f"{tb['update_s']:.0f} / {tb['diffusion_train_s']:.0f} / {tb['sampling_s']:.0f} |")


if __name__ == "__main__":
    main()
