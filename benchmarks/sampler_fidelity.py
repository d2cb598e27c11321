"""Fidelity of generated transitions against the number of network evaluations, for every EDM sampler, on several
datasets (the claim that a few-step sampler matches SynthER's must hold on each, not on Hopper alone).

    python benchmarks/sampler_fidelity.py        # Hopper, HalfCheetah, Walker2d medium-replay; 2 seeds
    python benchmarks/sampler_fidelity.py --datasets benchmarks/out/data/Hopper-v5-medium-replay-quick.hdf5 \
        --num 1000 --seeds 0 --train-steps 500   # a smoke run
    python benchmarks/sampler_fidelity.py --table-only

Per dataset one diffusion model (``diffrl diffusion train --preset quick``: SynthER's residual MLP at width 256,
10k steps; trained once, kept in benchmarks/out/); then each sampler draws ``--num`` transitions per seed and is scored
with the same metrics as ``diffrl diffusion fidelity``: simulator validity (next-state and reward NMSE, termination
agreement), diversity (nearest-real distance relative to real-real) and marginals (W1 / std). The reference is
SynthER's sampler: 128 churned Heun steps (255 evaluations). Target: a sampler with <= 32 evaluations whose
next-state validity is within 10% of the reference's (and, so that over-smoothing does not count as quality,
whose marginals are within 10% of the reference's), on every dataset. Rows (one per dataset and sampler) go to
benchmarks/results/sampler_fidelity.jsonl; finished ones are skipped when re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.augment import TransitionLayout
from diffrl.data import load_dataset
from diffrl.diffusion.samplers import network_evaluations
from diffrl.diffusion.spec import load_model
from diffrl.eval.fidelity import diversity, marginals, simulator_validity
from diffrl.pipelines import diffusion
from diffrl.runs.device import tune_cpu_allocator
from harness import RESULTS, add_common_args, run_all

OUT = Path(__file__).parent / "out"
CHURN = {"S_churn": 80.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
# (label, sampler, steps, options)
CONFIGS = [
    ("heun churn (SynthER)", "heun", 128, CHURN),
    ("heun churn", "heun", 32, CHURN),
    ("heun churn", "heun", 16, CHURN),
    ("heun ODE", "heun", 32, {"S_churn": 0.0}),
    ("heun ODE", "heun", 16, {"S_churn": 0.0}),
    ("heun ODE", "heun", 8, {"S_churn": 0.0}),
    ("dpm-solver++ 2M", "dpmpp_2m", 32, {}),
    ("dpm-solver++ 2M", "dpmpp_2m", 16, {}),
    ("dpm-solver++ 2M", "dpmpp_2m", 8, {}),
    ("dpm-solver++ 2M SDE", "dpmpp_2m_sde", 32, {}),
    ("dpm-solver++ 2M SDE", "dpmpp_2m_sde", 16, {}),
    ("euler ODE", "euler", 32, {"S_churn": 0.0}),
    ("euler ODE", "euler", 16, {"S_churn": 0.0}),
    # candidates for a few-step setting that holds on every dataset: more steps, or more churn
    ("dpm-solver++ 2M SDE", "dpmpp_2m_sde", 48, {}),
    ("dpm-solver++ 2M SDE", "dpmpp_2m_sde", 64, {}),
    ("heun churn", "heun", 48, CHURN),
]


def rows_of(t: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([t["observations"], t["actions"], t["rewards"][:, None], t["next_observations"]], axis=1)


def model_for(dataset: Path, train_steps: int) -> Path:
    """A ``diffrl diffusion train --preset quick`` model of ``dataset`` (trained once, then reused)."""
    model_dir = OUT / f"sampler_fidelity_model-{dataset.stem}-{train_steps}"
    if not (model_dir / "summary.json").exists():
        cfg = dataclasses.replace(diffusion.DiffusionConfig(dataset=str(dataset)),
                                  **{**diffusion.PRESETS["quick"], "steps": train_steps, "run_dir": model_dir,
                                     "fidelity_samples": 0, "progress": False})
        t0 = time.perf_counter()
        diffusion.run(cfg)
        print(f"trained {model_dir.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model_dir


@functools.cache
def loaded(dataset: Path, model_dir: Path) -> tuple:
    """The model, its meta and layout, and the real data (arrays and rows), read once per dataset for all samplers."""
    model, meta = load_model(model_dir)
    real = load_dataset(str(dataset)).arrays()
    return model, meta, TransitionLayout.from_dict(meta["layout"]), real, rows_of(real)


def score(dataset: Path, model_dir: Path, label: str, sampler: str, steps: int, options: dict, num: int,
          seeds: list[int]) -> dict:
    """One sampler on one dataset's model, averaged over seeds."""
    model, meta, layout, real, real_rows = loaded(dataset, model_dir)
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        x = model.sample(num, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed),
                         **options).numpy()
        secs = time.perf_counter() - t0
        syn = layout.split(x)
        v = simulator_validity(meta["env_id"], **syn, reference=real)
        d = diversity(real_rows, rows_of(syn), seed=seed)
        m = marginals(real_rows, rows_of(syn))
        per_seed.append({"state_nmse": v["next_obs_nmse"], "reward_nmse": v["reward_nmse"],
                         "term_agree": v["termination_agreement"], "nn_ratio": d["nn_ratio_mean"],
                         "w1": m["w1_mean"], "samples_per_s": num / secs})
    return {"nfe": network_evaluations(sampler, steps), "model": str(model_dir),
            **{k: None if per_seed[0][k] is None else float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]},
            "state_nmse_seeds": [s["state_nmse"] for s in per_seed]}  # termination agreement: None without a rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", type=Path, default=[OUT / "data" / f"{e}-medium-replay-quick.hdf5"
                                                                  for e in ("Hopper-v5", "HalfCheetah-v5",
                                                                            "Walker2d-v5")])
    ap.add_argument("--num", type=int, default=5000, help="transitions per sampler and seed")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--train-steps", type=int, default=10_000)
    add_common_args(ap, RESULTS / "sampler_fidelity.jsonl")
    args = ap.parse_args()
    tune_cpu_allocator()
    missing = [str(d) for d in args.datasets if not d.exists()]
    if missing and not args.table_only:
        raise SystemExit(f"missing: {', '.join(missing)}; build them with `python benchmarks/datasets.py --kinds "
                         "medium-replay`")
    jobs = [{"dataset": d.stem, "label": label, "sampler": sampler, "steps": steps, "options": options,
             "num": args.num, "seeds": args.seeds, "train_steps": args.train_steps}
            for d in args.datasets for label, sampler, steps, options in CONFIGS]
    paths = {d.stem: d for d in args.datasets}

    def run_one(key: dict) -> dict:
        path = paths[key["dataset"]]
        return {**key, **score(path, model_for(path, key["train_steps"]), key["label"], key["sampler"],
                               key["steps"], key["options"], key["num"], key["seeds"])}

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only,
                   on_row=lambda r: print(f"{r['dataset']} {r['label']} {r['steps']}: next-state NMSE "
                                          f"{r['state_nmse']:.4f}", flush=True))
    best_gap: dict[tuple, list[float]] = {}
    for stem in paths:
        got = [next((r for r in rows if r["dataset"] == stem and r["label"] == c[0] and r["steps"] == c[2]
                     and r["num"] == args.num and r["train_steps"] == args.train_steps), None) for c in CONFIGS]
        if got[0] is None or None in got:
            continue
        ref = got[0]
        print(f"\n**{stem}** ({args.num} samples x seeds {args.seeds} per sampler; next-state NMSE relative to the "
              "255-evaluation reference in brackets)\n")
        print("| sampler | steps | network evals | next-state NMSE | reward NMSE | termination agreement | "
              "NN dist / real NN | marginal W1/std | samples/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in got:
            gap = r["state_nmse"] / ref["state_nmse"] - 1
            best_gap.setdefault((r["label"], r["steps"], r["nfe"]), []).append(
                gap if r["w1"] <= 1.10 * ref["w1"] else float("inf"))
            term = "-" if r["term_agree"] is None else f"{r['term_agree']:.3f}"  # no termination rule: no figure
            print(f"| {r['label']} | {r['steps']} | {r['nfe']} | {r['state_nmse']:.4f} ({100 * gap:+.0f}%) | "
                  f"{r['reward_nmse']:.4f} | {term} | {r['nn_ratio']:.2f} | {r['w1']:.3f} | "
                  f"{r['samples_per_s']:.0f} |")
        print(f"\nseed-to-seed next-state NMSE of the reference: {[round(v, 5) for v in ref['state_nmse_seeds']]}")
    # validity alone rewards over-smoothed samples (first-order Euler collapses towards denoised means: better
    # validity, much worse marginals), so a sampler counts on a dataset only with marginals within 10% there too
    full = {k: v for k, v in best_gap.items() if len(v) == len(paths) and k[2] < 255}
    if full:
        within = [k for k in sorted(full, key=lambda k: k[2]) if max(full[k]) <= 0.10]
        (label, steps, nfe), gaps = min(full.items(), key=lambda kv: max(kv[1]))
        words = ", ".join("marginals off" if g == float("inf") else f"{100 * g:+.0f}%" for g in gaps)
        first = f"{within[0][0]} {within[0][1]} steps ({within[0][2]} evaluations)" if within else "none"
        print(f"\nfewest-evaluations sampler within 10% on every dataset: {first}; smallest worst-case gap: "
              f"{label} {steps} steps ({nfe} evaluations): {words} on {', '.join(paths)}")

if __name__ == "__main__":
    main()
