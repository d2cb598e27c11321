"""Fidelity of generated Hopper transitions against the number of network evaluations, for every EDM sampler.

    python benchmarks/sampler_fidelity.py                    # trains (or reuses) a quick-preset model, 2 seeds
    python benchmarks/sampler_fidelity.py --num 1000 --seeds 0 --train-steps 500   # a smoke run

One diffusion model (``diffrl diffusion train --preset quick``: SynthER's residual MLP at width 256, 10k steps) on
diffrl's hopper-medium-replay quick dataset; then each sampler draws ``--num`` transitions per seed and is scored
with the same metrics as ``diffrl diffusion fidelity``: simulator validity (next-state and reward NMSE, termination
agreement), diversity (nearest-real distance relative to real-real) and marginals (W1 / std). The reference is
SynthER's sampler: 128 churned Heun steps (255 evaluations). Target: a sampler with <= 32 evaluations whose
next-state validity is within 10% of the reference's (and, so that over-smoothing does not count as quality,
whose marginals are within 10% of the reference's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from diffrl.runs.results import provenance
from harness import RESULTS, append_row

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
]


def rows_of(t: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([t["observations"], t["actions"], t["rewards"][:, None], t["next_observations"]], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=OUT / "data" / "hopper-medium-replay-quick.hdf5")
    ap.add_argument("--num", type=int, default=5000, help="transitions per sampler and seed")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--train-steps", type=int, default=10_000)
    ap.add_argument("--model-dir", type=Path, default=None, help="a trained `diffrl diffusion train` run")
    args = ap.parse_args()
    tune_cpu_allocator()
    if not args.dataset.exists():
        raise SystemExit(f"{args.dataset} is missing: build it with `python benchmarks/datasets.py` or "
                         "`diffrl data collect --env Hopper-v5 --kind medium-replay --preset quick --out ...`")
    model_dir = args.model_dir or OUT / f"sampler_fidelity_model-{args.train_steps}"
    if not (model_dir / "summary.json").exists():
        cfg = dataclasses.replace(diffusion.DiffusionConfig(dataset=str(args.dataset)),
                                  **{**diffusion.PRESETS["quick"], "steps": args.train_steps, "run_dir": model_dir,
                                     "fidelity_samples": 0, "progress": False})
        t0 = time.perf_counter()
        diffusion.run(cfg)
        print(f"trained {model_dir.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    model, meta = load_model(model_dir)
    layout = TransitionLayout.from_dict(meta["layout"])
    ds = load_dataset(str(args.dataset))
    real = ds.arrays()
    real_rows = rows_of(real)
    env_id = meta["env_id"]
    results = []
    for label, sampler, steps, options in CONFIGS:
        per_seed = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            x = model.sample(args.num, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed),
                             **options).numpy()
            secs = time.perf_counter() - t0
            syn = layout.split(x)
            v = simulator_validity(env_id, **syn, reference=real)
            d = diversity(real_rows, rows_of(syn), seed=seed)
            m = marginals(real_rows, rows_of(syn))
            per_seed.append({"state_nmse": v["next_obs_nmse"], "reward_nmse": v["reward_nmse"],
                             "term_agree": v["termination_agreement"], "nn_ratio": d["nn_ratio_mean"],
                             "w1": m["w1_mean"], "samples_per_s": args.num / secs})
        row = {"label": label, "sampler": sampler, "steps": steps, "nfe": network_evaluations(sampler, steps),
               **{k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]},
               "state_nmse_seeds": [s["state_nmse"] for s in per_seed], "num": args.num, "seeds": args.seeds,
               "model": str(model_dir), "date": time.strftime("%Y-%m-%d %H:%M")}
        results.append(row)
        print(json.dumps(row), flush=True)
    prov = provenance()
    for r in results:
        append_row(RESULTS / "sampler_fidelity.jsonl", {**r, **prov})
    ref = results[0]
    print(f"\n{env_id}, {args.num} samples x seeds {args.seeds} per sampler; validity NMSE relative to the "
          "reference in brackets\n")
    print("| sampler | steps | network evals | next-state NMSE | reward NMSE | termination agreement | "
          "NN dist / real NN | marginal W1/std | samples/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['steps']} | {r['nfe']} | {r['state_nmse']:.4f} "
              f"({100 * (r['state_nmse'] / ref['state_nmse'] - 1):+.0f}%) | {r['reward_nmse']:.4f} | "
              f"{r['term_agree']:.3f} | {r['nn_ratio']:.2f} | {r['w1']:.3f} | {r['samples_per_s']:.0f} |")
    # validity alone rewards over-smoothed samples (first-order Euler collapses towards denoised means: better
    # validity, much worse marginals), so the verdict requires marginals within 10% of the reference too
    cheap = [r for r in results[1:] if r["nfe"] <= 32]
    faithful = [r for r in cheap if r["w1"] <= 1.10 * ref["w1"]]
    for name, pool in (("by validity alone", cheap), ("with marginal W1 within 10% of the reference", faithful)):
        if not pool:
            print(f"\nno sampler with <= 32 evaluations {name}")
            continue
        best = min(pool, key=lambda r: r["state_nmse"])
        gap = best["state_nmse"] / ref["state_nmse"] - 1
        print(f"\nbest sampler with <= 32 evaluations {name}: {best['label']} {best['steps']} steps "
              f"({best['nfe']} evaluations), next-state NMSE {100 * gap:+.1f}% and marginal W1 "
              f"{100 * (best['w1'] / ref['w1'] - 1):+.0f}% vs the 255-evaluation reference "
              f"({'meets' if gap <= 0.10 else 'misses'} the 10% validity target)")
    print(f"seed-to-seed next-state NMSE of the reference: {[round(v, 5) for v in ref['state_nmse_seeds']]}")

if __name__ == "__main__":
    main()
