"""DPPO's two evaluation paths on the DPPO sweep's diffusion runs: each pre-trained and fine-tuned policy scored
with DPPO's sampled chain and with the noise-free DDPM mean path (``diffrl eval RUN_DIR --path sample|mean``).

    diffrl sweep benchmarks/dppo_pretrain.yaml benchmarks/dppo_finetune.yaml     # first
    python benchmarks/dppo_eval_paths.py [--root runs/sweeps] [--episodes 10]
    python benchmarks/dppo_eval_paths.py --table-only

Rows (one per run directory and path) go to benchmarks/results/dppo_eval_paths.jsonl; evaluated checkpoints are
skipped when re-run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffrl.pipelines import dppo
from diffrl.registry import find_run
from harness import RESULTS, add_common_args, run_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="the sweeps' root directory")
    ap.add_argument("--episodes", type=int, default=10)
    add_common_args(ap, RESULTS / "dppo_eval_paths.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    finetuned = sorted((args.root / "dppo-finetune" / "trials").glob("dppo_env_*-s*/summary.json"))
    jobs = []
    for summary in finetuned:
        ft_dir = summary.parent
        task, _, seed = ft_dir.name.removeprefix("dppo_env_").rpartition("-s")
        pre_dir = args.root / "dppo-pretrain" / "trials" / f"diffusion_env_{task}-s{seed}"
        for stage, run_dir in (("pre-trained", pre_dir), ("fine-tuned", ft_dir)):
            for path in ("sample", "mean"):
                jobs.append({"task": task, "seed": int(seed), "stage": stage, "path": path, "episodes": args.episodes,
                             "trial": run_dir.name})

    def run_one(key: dict) -> dict:
        sweep = "dppo-pretrain" if key["stage"] == "pre-trained" else "dppo-finetune"
        run_dir = args.root / sweep / "trials" / key["trial"]
        out = dppo.evaluate_run(run_dir, find_run(run_dir)[2], episodes=key["episodes"], device="cpu",
                                mean_path=key["path"] == "mean")
        return {**key, "normalized_score": out["normalized_score"], "return_mean": out.get("return_mean")}

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    print(f"normalised score, {args.episodes} episodes each: DPPO's sampled chain / noise-free mean path\n")
    print("| task | seed | pre-trained: sample / mean | fine-tuned: sample / mean |\n|---|---|---|---|")
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["task"], r["seed"]), {})[r["stage"], r["path"]] = r["normalized_score"]
    for (task, seed), c in sorted(cells.items()):
        pair = [" / ".join(f"{c[stage, p]:.1f}" if (stage, p) in c else "–" for p in ("sample", "mean"))
                for stage in ("pre-trained", "fine-tuned")]
        print(f"| {task} | {seed} | {pair[0]} | {pair[1]} |")


if __name__ == "__main__":
    main()
